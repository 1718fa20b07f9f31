"""A client's I/O thread (in each worker process): the one thread that owns its ZeroMQ context
and sockets.

ZeroMQ sockets are not thread-safe, so other threads talk to this one through deques and an
eventfd: publishers append messages to the outbox, the broker appends commands (subscribe,
unsubscribe, consume, ack, stop: ``io_calls``), and a write to the eventfd wakes the poll. What to
batch is the outbox's business (``outbox``), when the hub counts as gone the session's
(``session``); this module moves frames.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from ..exceptions import HubUnavailableError
from ..message import Message
from ..wire import protocol as wire
from ..wire.address import Address
from .control import ControlChannel
from .control_reader import ControlReader
from .data import DataChannel
from .handshake import data_sockets, greet, hub_socket
from .io_calls import IOCalls
from .outbox import FlushMarker, Outbox, Prepared, Rejected
from .session import Session
from .subscriptions import Subscriptions
from .threads import OnDeath, guarded
from .waker import Waker
from .watch import ConnectionWatch

__all__ = ["IOThread", "Waker"]

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
_HELD_POLL_MS = 1
_GOODBYE_LINGER_MS = 200

Socket = zmq.Socket[bytes]


class IOThread(IOCalls, ControlReader):
    """Owns the control DEALER, the data DEALER and the fan-out SUB socket of one client."""

    def __init__(
        self,
        address: Address,
        deliver: Callable[[list[zmq.Frame]], bool],
        *,
        client_id: bytes,
        secret: bytes,
        hwm: int,
        max_batch: int,
        max_unconfirmed: int,
        on_space: Callable[[], None],
        on_error: Callable[[BaseException], None],
        on_delivery: Callable[[list[bytes]], None],  # a DELIVER request's body
        on_reject: Callable[[Rejected], None],
        on_hub_state: Callable[[bool], None],  # hub_lost_timeout expired / a hub is back
        hub_lost_timeout: float | None,
        on_death: OnDeath,
    ) -> None:
        self.address = address
        self.endpoint = str(address)
        self.outbox = Outbox(max_batch, on_reject)
        self.session = Session(self.endpoint, hub_lost_timeout)
        self._on_hub_state = on_hub_state
        self._subscriptions = Subscriptions(client_id, deliver, self.wake)
        self._client_id = client_id
        self._secret = secret
        self._hwm = hwm
        self._on_space = on_space
        self._on_error = on_error
        self._on_delivery = on_delivery
        self._control = ControlChannel()
        self._commands: deque[Callable[[], None]] = deque()
        self._acks: list[wire.Ack] = []  # handed over by queue handlers, to send
        self._acks_lock = threading.Lock()
        self._waker = Waker()
        self._running = True
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._died: BaseException | None = None
        self._started = self._ended = False
        self._thread = threading.Thread(
            target=guarded("ipcbus-io", self._run, on_death), name="ipcbus-io", daemon=True
        )
        # Topics whose queue groups are full: publish() of them waits (the hub's FULL).
        self.full_topics: frozenset[bytes] = frozenset()
        self._full_version = 0
        self._same_hub = True  # whether the hub of the last WELCOME was the one before it
        self._connect_timeout: float | None = None
        self._endpoints = ("", "")  # the hub's publish and fan-out endpoints, from WELCOME
        self._watch = ConnectionWatch(self.endpoint, self._hub_lost)
        self._dealer: Socket | None = None
        self._data = DataChannel(
            self.outbox, self.session, on_space, self._waker.wake, max_unconfirmed
        )
        self._sub: Socket | None = None
        self._resync_at: float | None = None  # when an unanswered sync is asked again

    # -- called from other threads -----------------------------------------------------------

    def start(self, timeout: float | None) -> None:
        """Connect; ``HubUnavailableError`` if no hub says WELCOME within ``timeout``."""
        self._connect_timeout = timeout
        self._thread.start()
        self._started = True
        self._ready.wait()
        if self._failure is None and self._died is not None:
            self._failure = HubUnavailableError(
                f"the ipcbus I/O thread failed while connecting to {self.endpoint}: "
                f"{type(self._died).__name__}: {self._died}"
            )
        if self._failure is not None:
            self._thread.join()
            self._waker.close()
            raise self._failure

    @property
    def auth_failures(self) -> int:
        """Handshakes with a peer at the hub's address that did not prove the bus secret."""
        return self._watch.auth_failures

    @property
    def fanout(self) -> Subscriptions:
        """The SUB side, which the dispatcher reads when idle."""
        return self._subscriptions

    @property
    def hub_alive(self) -> bool:
        return self.session.hub_alive

    def publish(self, item: Message | FlushMarker | Prepared) -> None:
        # A quiet bus sends a message, a request or a reply at once, from the caller's thread
        # (client/data.py); otherwise the I/O thread batches what queued. Flush markers always
        # go through the outbox (the I/O thread keeps them until their answer).
        if isinstance(item, FlushMarker) or not self._data.send_at_once(item):
            self.outbox.append(item)
            self.wake()

    def stop(self, timeout: float | None) -> None:
        self.request_stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("ipcbus I/O thread did not stop within %s s", timeout)
        else:
            self._waker.close()

    @property
    def alive(self) -> bool:
        # Thread.is_alive() takes a lock (~2 us of every publish()); until the thread's body
        # has ended the flag says as much, and from then on is_alive() says exactly.
        return self._started and (not self._ended or self._thread.is_alive())

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        try:
            if self._connect(context):
                self._loop()
        except BaseException as exc:
            # The guard (threads.guarded) logs this and fails the broker; the hub learns now
            # that we are gone, not after a heartbeat timeout.
            self._died = exc
            self._say_goodbye()
            raise
        finally:
            self._watch.close()
            self._data.close()
            self._subscriptions.close()
            if self.outbox.spool is not None:
                self.outbox.spool.close()
            if self._control.socket is not None:
                self._control.socket.close()  # linger 0, but after a goodbye (_say_goodbye)
            context.term()
            self._ready.set()
            self._ended = True

    def _say_goodbye(self) -> None:
        control = self._control.socket
        if control is None or not self._ready.is_set():
            return
        with contextlib.suppress(zmq.ZMQError):
            control.send_multipart([wire.header(wire.BYE)], zmq.NOBLOCK)
            control.linger = _GOODBYE_LINGER_MS  # closing must not discard it at once

    def _connect(self, context: zmq.Context[Any]) -> bool:
        """HELLO and WELCOME, then the data sockets (``handshake``); False, with the reason in
        ``_failure``, when no hub answers."""
        control = self._control.socket = hub_socket(context, zmq.DEALER, self._secret)
        control.routing_id = self._client_id
        hello = wire.hello(self._client_id, self._description())
        try:
            welcome = greet(control, self._watch, self.endpoint, hello, self._connect_timeout)
        except HubUnavailableError as exc:
            self._failure = exc
            return False
        self._welcome(welcome)
        self._endpoints = (welcome.publish_endpoint, welcome.fanout_endpoint)
        self._dealer, self._sub = data_sockets(
            context, self._secret, welcome, self._client_id, self._hwm, self._watch
        )
        self._data.attach(self._dealer)
        self._subscriptions.attach(self._sub)
        self._ready.set()
        return True

    def _loop(self) -> None:
        control, dealer, sub = self._control.socket, self._dealer, self._sub
        assert control is not None
        assert dealer is not None
        assert sub is not None
        poller = zmq.Poller()
        poller.register(self._waker.fd, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        # The DEALER's ZMQ_FD, not the DEALER: publishers use the socket too (client/data.py).
        poller.register(self._data.fd, zmq.POLLIN)
        # Likewise the SUB socket's: the dispatcher reads it when idle (client/subscriptions.py).
        sub_fd = self._subscriptions.fd
        poller.register(sub_fd, zmq.POLLIN)
        # The data DEALER's connection events: a hub that dies is noticed at once, not after a
        # heartbeat timeout, so publishes stop going into a connection that no longer exists
        # (measured: ~1 000 messages lost per second of undetected outage before this).
        # Every socket's failed handshakes: a peer at the hub's address that cannot prove the
        # secret (an impostor) is reported, and nothing of it is read.
        monitors = list(self._watch.monitors())
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        while True:
            while self._commands:
                self._commands.popleft()()
            if not self._running:
                self._control.send([wire.header(wire.BYE)])  # what we hold goes to others
                return
            more = self._data.pump()  # True: its burst ended with more to send at once
            now = time.monotonic()
            self._heartbeat(now)
            self._control.drain()
            poller.modify(control, zmq.POLLIN | (zmq.POLLOUT if self._control.waiting else 0))
            held = self._subscriptions.held is not None
            reading = self._subscriptions.reading  # a sync waits: read, as the dispatcher may not
            poller.modify(sub_fd, zmq.POLLIN if reading else 0)
            timeout = 0 if more else _HELD_POLL_MS if held else _IDLE_POLL_MS
            looked = reading  # the look below may take the edge of a batch that waits
            if reading and self._subscriptions.readable():
                timeout = 0
            wake_at = self.session.wake_at()
            if self._resync_at is not None:
                wake_at = min(wake_at, self._resync_at)
            confirm_at = self.outbox.confirm.due_at()
            if confirm_at is not None:
                wake_at = min(wake_at, confirm_at)
            timeout = max(0, min(timeout, int((wake_at - now) * 1000) + 1))
            events = dict(poller.poll(timeout))
            if self._waker.fd in events:
                self._waker.clear()
            self._subscriptions.hand_on_held()
            self._resync_at = self._subscriptions.resync_due(time.monotonic())
            if control in events and events[control] & zmq.POLLIN:
                self._read_control(control)
            if self._subscriptions.reading:
                if self._subscriptions.read():
                    self.wake()  # the pump may have waited for this sync answer
            elif looked:
                # It stopped reading since it looked (the dispatcher took the sync answer): a
                # batch whose edge that look took is the dispatcher's, which may be asleep on
                # it. Found by a round trip that waited for ever, 5 in 3 000 runs.
                self._subscriptions.hand_over()
            for monitor in monitors:
                if monitor in events:
                    self._watch.read(monitor)

    # -- control -----------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        if self.session.expired(now):
            self._on_hub_state(False)  # publishers waiting for room learn it too
        due = self.session.due(now, can_send=not self._control.waiting)
        if due == "lost":
            self._hub_lost(f"silent for {self.session.silence(now):.1f} s")
        elif due == "ping":
            self._control.send([wire.header(wire.PING)])
        elif due == "hello":
            self._control.send(wire.hello(self._client_id, self._description()))

    def _hub_lost(self, why: str) -> None:
        with self._data.lock:  # no publisher sends at once into a connection known gone
            news = self.session.lost(why)
        if news:
            self._on_space()  # publishers waiting for room learn that the hub is gone

    # -- data --------------------------------------------------------------------------------
