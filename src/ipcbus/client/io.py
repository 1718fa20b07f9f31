"""A client's I/O thread (in each worker process): the one thread that owns its ZeroMQ context
and sockets.

ZeroMQ sockets are not thread-safe, so other threads talk to this one through deques and an
eventfd: publishers append messages to the outbox, the broker appends commands (subscribe,
unsubscribe, consume, ack, stop), and a write to the eventfd wakes the poll. What to batch is the
outbox's business (``outbox``), when the hub counts as gone the session's (``session``); this
module moves frames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..exceptions import HubUnavailableError
from ..message import Message
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import prove
from .control import ControlChannel, DeleteAnswer
from .outbox import FlushMarker, Outbox
from .session import Session
from .subscriptions import Subscriptions

__all__ = ["IOThread"]

logger = logging.getLogger(__name__)

_BURST = 256
_IDLE_POLL_MS = 1000
_HELD_POLL_MS = 1

Socket = zmq.Socket[bytes]


class IOThread:
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
        on_space: Callable[[], None],
        on_error: Callable[[BaseException], None],
        on_delivery: Callable[[list[bytes]], None],  # a DELIVER request's body
    ) -> None:
        self.address = address
        self.endpoint = str(address)
        self.outbox = Outbox(max_batch, on_error)
        self.session = Session(self.endpoint)
        self._subscriptions = Subscriptions(client_id, deliver)
        self._client_id = client_id
        self._secret = secret
        self._hwm = hwm
        self._on_space = on_space
        self._on_error = on_error
        self._on_delivery = on_delivery
        self._control = ControlChannel()
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._running = True
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._sent: list[Any] | None = None  # frames waiting for room in the DEALER pipe
        self._thread = threading.Thread(target=self._run, name="ipcbus-io", daemon=True)
        # Topics whose queue groups are full: publish() of them waits (the hub's FULL).
        self.full_topics: frozenset[bytes] = frozenset()
        self._full_version = 0
        self._hub_id: bytes | None = None  # the hub of the last WELCOME
        self._same_hub = True  # ... and whether the one before it was the same
        self._connect_timeout: float | None = None
        self._monitor: Socket | None = None
        self._dealer: Socket | None = None
        self._sub: Socket | None = None
        self._resync_at: float | None = None  # when an unanswered sync is asked again

    # -- called from other threads -----------------------------------------------------------

    def start(self, timeout: float | None) -> None:
        """Connect; ``HubUnavailableError`` if no hub says WELCOME within ``timeout``."""
        self._connect_timeout = timeout
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            self._thread.join()
            os.close(self._wake_fd)
            raise self._failure

    @property
    def hub_alive(self) -> bool:
        return self.session.hub_alive

    def publish(self, item: Message | FlushMarker) -> None:
        self.outbox.append(item)
        self.wake()

    def wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def call(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self.wake()

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        self.call(lambda: self._subscriptions.subscribe(topic, live))

    def unsubscribe(self, topic: bytes) -> None:
        self.call(lambda: self._subscriptions.unsubscribe(topic))

    def consume(self, request: wire.Consume, live: threading.Event) -> None:
        self.call(lambda: self._control.consume(request, live))

    def cancel_consume(self, subscription_id: bytes) -> None:
        self.call(lambda: self._control.cancel(subscription_id))

    def delete_queue(self, request: wire.DeleteQueue, answer: DeleteAnswer) -> None:
        self.call(lambda: self._control.delete(request, answer))

    def forget_delete(self, request_id: bytes) -> None:
        self.call(lambda: self._control.forget_delete(request_id))

    def ack(self, answers: list[wire.Ack]) -> None:
        def send() -> None:
            for request in wire.acks(answers):
                self._control.send(request)

        self.call(send)

    def stop(self, timeout: float | None) -> None:
        def stop() -> None:
            self._running = False

        self.call(stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("ipcbus I/O thread did not stop within %s s", timeout)
        else:
            os.close(self._wake_fd)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        context = zmq.Context()
        try:
            if self._connect(context):
                self._loop()
        except Exception as exc:
            logger.exception("ipcbus I/O thread failed")
            self._on_error(exc)
        finally:
            if self._monitor is not None and self._dealer is not None:
                self._dealer.disable_monitor()
                self._monitor.close(linger=0)
            for sock in (self._control.socket, self._dealer, self._sub):
                if sock is not None:
                    sock.close(linger=0)
            context.term()
            self._ready.set()

    def _connect(self, context: zmq.Context[Any]) -> bool:
        control = self._control.socket = self._socket(context, zmq.DEALER)
        control.routing_id = self._client_id
        control.connect(self.endpoint)
        control.send_multipart(wire.hello(self._client_id))
        timeout = self._connect_timeout
        if not control.poll(None if timeout is None else int(timeout * 1000)):
            self._failure = HubUnavailableError(
                f"no hub answered at {self.endpoint} within {timeout} s"
            )
            return False
        head, *body = control.recv_multipart()
        try:
            if head != wire.header(wire.WELCOME):
                raise ValueError(f"unexpected answer {head[:8]!r}")
            welcome = wire.Welcome.parse(body)
        except (ValueError, IndexError) as exc:
            self._failure = HubUnavailableError(f"bad WELCOME from {self.endpoint}: {exc}")
            return False
        self._welcome(welcome)
        dealer = self._dealer = self._socket(context, zmq.DEALER)
        dealer.sndhwm = dealer.rcvhwm = self._hwm
        dealer.routing_id = self._client_id
        dealer.connect(welcome.publish_endpoint)
        sub = self._sub = self._subscriptions.sub = self._socket(context, zmq.SUB)
        sub.rcvhwm = self._hwm
        sub.connect(welcome.fanout_endpoint)
        self._ready.set()
        return True

    def _socket(self, context: zmq.Context[Any], kind: int) -> Socket:
        """A socket that proves the bus secret in its handshake (the hub's ZAP handler)."""
        sock: Socket = context.socket(kind)
        sock.linger = 0
        prove(sock, self.address, self._secret)
        return sock

    def _welcome(self, welcome: wire.Welcome) -> bool:
        resync = bool(self._subscriptions.live_topics)
        reconnected = self.session.welcome(welcome, resync)
        self._same_hub = welcome.hub_id == self._hub_id
        self._hub_id = welcome.hub_id
        # Whatever an earlier hub held back, this one says again in a FULL of its own.
        if self.full_topics:
            self.full_topics = frozenset()
            self._on_space()
        self._full_version = 0
        # Kept across hubs: after a restart, consumers re-register one by one, and a publisher
        # that forgot a topic is grouped would send it unsplit meanwhile (unusable for groups).
        self.outbox.grouped = self.outbox.grouped | frozenset(welcome.grouped_topics)
        return reconnected

    def _loop(self) -> None:
        control, dealer, sub = self._control.socket, self._dealer, self._sub
        assert control is not None
        assert dealer is not None
        assert sub is not None
        poller = zmq.Poller()
        poller.register(self._wake_fd, zmq.POLLIN)
        poller.register(control, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        # The data DEALER's connection events: a hub that dies is noticed at once, not after a
        # heartbeat timeout, so publishes stop going into a connection that no longer exists
        # (measured: ~1 000 messages lost per second of undetected outage before this).
        monitor = self._monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        poller.register(monitor, zmq.POLLIN)
        while True:
            while self._commands:
                self._commands.popleft()()
            if not self._running:
                self._control.send([wire.header(wire.BYE)])  # what we hold goes to others
                return
            self._pump(dealer)
            now = time.monotonic()
            self._heartbeat(now)
            self._control.drain()
            poller.modify(dealer, zmq.POLLIN | (zmq.POLLOUT if self._sent is not None else 0))
            poller.modify(control, zmq.POLLIN | (zmq.POLLOUT if self._control.waiting else 0))
            held = self._subscriptions.held is not None
            poller.modify(sub, 0 if held else zmq.POLLIN)
            timeout = _HELD_POLL_MS if held else _IDLE_POLL_MS
            wake_at = self.session.wake_at()
            if self._resync_at is not None:
                wake_at = min(wake_at, self._resync_at)
            timeout = max(0, min(timeout, int((wake_at - now) * 1000) + 1))
            events = dict(poller.poll(timeout))
            if self._wake_fd in events:
                # Read, *then* clear the flag (the pump runs after both). Clearing first would
                # let this read swallow the write of a publisher that set the flag meanwhile,
                # leaving the flag set with nothing to wake the poll: later publishes would wait
                # for the idle timeout (seen as 10x slower runs).
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                self._wake_pending = False
            self._subscriptions.hand_on_held()
            self._resync_at = self._subscriptions.resync_due(time.monotonic())
            if control in events and events[control] & zmq.POLLIN:
                self._read_control(control)
            if dealer in events and events[dealer] & zmq.POLLIN:
                self._read_replies(dealer)
            if sub in events and self._subscriptions.read():
                self.wake()  # the pump may have waited for this sync answer
            if monitor in events:
                self._read_monitor(monitor)

    # -- control -----------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        due = self.session.due(now, can_send=not self._control.waiting)
        if due == "lost":
            self._hub_lost(f"silent for {self.session.silence(now):.1f} s")
        elif due == "ping":
            self._control.send([wire.header(wire.PING)])
        elif due == "hello":
            self._control.send(wire.hello(self._client_id))

    def _hub_lost(self, why: str) -> None:
        if self.session.lost(why):
            self._on_space()  # publishers waiting for room learn that the hub is gone

    def _read_monitor(self, monitor: Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._hub_lost("its connection closed")

    def _read_control(self, control: Socket) -> None:
        for _ in range(_BURST):
            try:
                head, *body = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.session.heard()
            try:
                self._handle_control(wire.parse_kind(head), body)
            except (ValueError, IndexError) as exc:
                logger.error("ignored a malformed %r from the hub: %s", head[:8], exc)

    def _handle_control(self, kind: bytes, body: list[bytes]) -> None:
        if kind == wire.DELIVER:
            self._on_delivery(body)
        elif kind == wire.GROUPS:
            version, grouped = wire.parse_groups(body)
            self.outbox.grouped = grouped
            self._control.send(wire.groups_ack(version))
        elif kind == wire.FULL:
            version, topics = wire.parse_full(body)
            if version > self._full_version:
                self._full_version, self.full_topics = version, topics
                self._on_space()  # publishers waiting for a topic to open again
        elif kind == wire.DELETED:
            self._control.deleted(*wire.parse_deleted(body))
        elif kind == wire.CONSUMING:
            self._control.consuming(body[0])
        elif kind == wire.RESET:
            # The hub does not know us (it declared us gone, or it restarted): introduce
            # ourselves again (at most once per backoff), then our queue consumers.
            self._hub_lost("it does not know this client")
        elif kind == wire.STOPPING:
            self._hub_lost("it is stopping")
        elif kind == wire.LOSSY:
            self._subscriptions.check()  # count what the hub's sends without waiting cost us
        elif kind == wire.WELCOME:
            if self._welcome(wire.Welcome.parse(body)) and self._subscriptions.live_topics:
                self._subscriptions.resync(self.session.resynced, self._same_hub)
            self._control.restore_consumers()
            self.outbox.resend_flushes()
            self.wake()

    # -- data --------------------------------------------------------------------------------

    def _pump(self, dealer: Socket) -> None:
        """Send what the outbox holds until it is empty or the DEALER pipe is full.

        While the hub is unreachable nothing is sent: the outbox holds what is published (up to
        ``max_pending``, then publish() blocks) until a hub says WELCOME again."""
        session = self.session
        while session.hub_alive and session.resynced.is_set():
            if self._sent is not None:
                try:
                    dealer.send_multipart(self._sent, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                self._sent = None
            if not self.outbox.items:
                return
            self._sent = self.outbox.take()
            self._on_space()

    def _read_replies(self, dealer: Socket) -> None:
        for _ in range(_BURST):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            token = wire.parse_flushed(frames)
            if token is not None:
                self.outbox.flushed(token)
