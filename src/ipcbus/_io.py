"""The proxy's I/O thread: the one thread that owns its ZeroMQ context and sockets.

ZeroMQ sockets are not thread-safe (DESIGN.md §4), so other threads talk to this one through
deques and an eventfd: publishers append messages to the outbox, the broker appends commands
(subscribe, unsubscribe, stop), and a write to the eventfd wakes the poll.

Natural batching: each turn sends whatever the outbox holds, as one frame per run of consecutive
messages of the same type (never reordering across types: DESIGN.md §2.2). When idle a batch is one
message, so latency does not suffer; under load batches grow up to ``max_batch``.
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

from . import _codec, _keys, _wire
from .exceptions import HubUnavailableError, MessageSerializationError
from .message import Message, get_unique_name_for_message

__all__ = ["FlushMarker", "IOThread"]

logger = logging.getLogger(__name__)

_BURST = 256
_HELLO_BACKOFF_MIN = 0.05
_HELLO_BACKOFF_MAX = 1.0
_IDLE_POLL_MS = 1000
_HELD_POLL_MS = 1


class FlushMarker:
    """Placed in the outbox by ``flush()``: done once the hub confirmed everything before it."""

    __slots__ = ("done", "token")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.done = threading.Event()


class IOThread:
    """Owns the DEALER (publish, control) and SUB (fan-out) sockets of one proxy."""

    def __init__(
        self,
        endpoint: str,
        deliver: Callable[[list[zmq.Frame]], bool],
        *,
        client_id: bytes,
        secret: bytes,
        hwm: int,
        max_batch: int,
        on_space: Callable[[], None],
        on_error: Callable[[BaseException], None],
        on_delivery: Callable[[list[bytes]], None],  # DELIVER's (descriptor, meta, payload)*n
    ) -> None:
        self.endpoint = endpoint
        self.outbox: deque[Message | FlushMarker] = deque()
        self._deliver = deliver
        self._client_id = client_id
        self._secret = secret
        self._hwm = hwm
        self._max_batch = max_batch
        self._on_space = on_space
        self._on_error = on_error
        self._on_delivery = on_delivery
        self._grouped: frozenset[bytes] = frozenset()  # topics with queue groups: split codec
        self._consumes: dict[bytes, list[bytes]] = {}  # subscription id -> CONSUME body
        self._consuming: dict[bytes, threading.Event] = {}
        self._heartbeat_interval = 0.5
        # Hub liveness: silent for _hub_timeout s = gone; then HELLO, with backoff, until a hub
        # (the same one back, or a new one at the address) says WELCOME.
        self.hub_alive = True
        self._hub_timeout = 3.0
        self._last_heard = time.monotonic()
        self._next_hello = 0.0
        self._hello_backoff = _HELLO_BACKOFF_MIN
        self._control_backlog: deque[list[bytes]] = deque()
        self._next_ping = 0.0
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._running = True
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._sent: list[Any] | None = None  # frames waiting for room in the DEALER pipe
        self._held: list[zmq.Frame] | None = None  # a batch waiting for room in the dispatcher
        self._flushes: dict[bytes, FlushMarker] = {}
        self._syncs: dict[bytes, threading.Event] = {}
        self._sync_ids = iter(range(1, 2**62))
        self._topics: dict[type, bytes] = {}
        self._live_topics: set[bytes] = set()
        # After a reconnect, publishing waits until the new hub has this process's
        # subscriptions (the SUB socket resends them), so it hears its own held publishes.
        self._resynced = threading.Event()
        self._resynced.set()
        self._resync_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="ipcbus-io", daemon=True)
        self._control: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._dealer: zmq.Socket[bytes] | None = None
        self._sub: zmq.Socket[bytes] | None = None

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

    def wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def call(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self.wake()

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        self.call(lambda: self._subscribe(topic, live))

    def unsubscribe(self, topic: bytes) -> None:
        self.call(lambda: self._unsubscribe(topic))

    def consume(self, subscription_id: bytes, body: list[bytes], live: threading.Event) -> None:
        def consume() -> None:
            self._consumes[subscription_id] = body
            self._consuming[subscription_id] = live
            self._send_control(_wire.CONSUME, *body)

        self.call(consume)

    def cancel_consume(self, subscription_id: bytes) -> None:
        def cancel() -> None:
            if self._consumes.pop(subscription_id, None) is not None:
                self._send_control(_wire.CANCEL, subscription_id)

        self.call(cancel)

    def ack(self, acks: list[bytes]) -> None:
        """Send ``(delivery_id, outcome, error) * n``, in ACKs of at most MAX_ACKS each."""
        step = 3 * _wire.MAX_ACKS

        def send() -> None:
            for start in range(0, len(acks), step):
                self._send_control(_wire.ACK, *acks[start : start + step])

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
            for sock in (self._control, self._dealer, self._sub):
                if sock is not None:
                    sock.close(linger=0)
            context.term()
            self._ready.set()

    def _connect(self, context: zmq.Context[Any]) -> bool:
        control = self._control = self._socket(context, zmq.DEALER)
        control.routing_id = self._client_id
        control.connect(self.endpoint)
        control.send_multipart([_wire.header(_wire.HELLO), self._client_id])
        timeout = self._connect_timeout
        if not control.poll(None if timeout is None else int(timeout * 1000)):
            self._failure = HubUnavailableError(
                f"no hub answered at {self.endpoint} within {timeout} s"
            )
            return False
        reply = control.recv_multipart()
        if len(reply) < 5 or reply[0] != _wire.header(_wire.WELCOME):
            self._failure = HubUnavailableError(
                f"unexpected answer {reply[:1]!r} from {self.endpoint}"
            )
            return False
        in_endpoint, pub_endpoint = self._welcome(reply[1:])
        dealer = self._dealer = self._socket(context, zmq.DEALER)
        dealer.sndhwm = dealer.rcvhwm = self._hwm
        dealer.routing_id = self._client_id
        dealer.connect(in_endpoint)
        sub = self._sub = self._socket(context, zmq.SUB)
        sub.rcvhwm = self._hwm
        sub.connect(pub_endpoint)
        self._ready.set()
        return True

    def _socket(self, context: zmq.Context[Any], kind: int) -> zmq.Socket[bytes]:
        """A socket that proves the bus secret in its handshake (the hub's ZAP handler)."""
        sock: zmq.Socket[bytes] = context.socket(kind)
        sock.linger = 0
        _keys.prove(sock, self.endpoint, self._secret)
        return sock

    def _welcome(self, body: list[bytes]) -> tuple[str, str]:
        in_endpoint, pub_endpoint, _hub_id, interval, timeout, *grouped = body
        self._heartbeat_interval = float(interval)
        self._hub_timeout = float(timeout)
        # Kept across hubs: after a restart, consumers re-register one by one, and a publisher
        # that forgot a topic is grouped would send it unsplit meanwhile (unusable for groups).
        self._grouped = self._grouped | frozenset(grouped)
        return in_endpoint.decode(), pub_endpoint.decode()

    def _loop(self) -> None:
        control, dealer, sub = self._control, self._dealer, self._sub
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
                self._send_control(_wire.BYE)  # the hub hands what we hold to others, at once
                return
            self._pump(dealer)
            now = time.monotonic()
            self._heartbeat(now)
            self._drain_control()
            poller.modify(dealer, zmq.POLLIN | (zmq.POLLOUT if self._sent is not None else 0))
            poller.modify(control, zmq.POLLIN | (zmq.POLLOUT if self._control_backlog else 0))
            poller.modify(sub, 0 if self._held is not None else zmq.POLLIN)
            timeout = _HELD_POLL_MS if self._held is not None else _IDLE_POLL_MS
            wake_at = self._next_ping if self.hub_alive else self._next_hello
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
            if self._held is not None and self._deliver(self._held):
                self._held = None
            if control in events and events[control] & zmq.POLLIN:
                self._read_control(control)
            if dealer in events and events[dealer] & zmq.POLLIN:
                self._read_replies(dealer)
            if sub in events:
                self._read_fanout(sub)
            if monitor in events:
                self._read_monitor(monitor)

    def _send_control(self, kind: bytes, *body: bytes) -> None:
        """Send now, or after what waits already; never drop (an ack lost is a stuck delivery)."""
        self._control_backlog.append([_wire.header(kind), *body])
        self._drain_control()

    def _drain_control(self) -> None:
        assert self._control is not None
        while self._control_backlog:
            try:
                self._control.send_multipart(self._control_backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # the pipe to the hub is full: the loop polls POLLOUT and comes back
            self._control_backlog.popleft()

    def _read_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._hub_lost("its connection closed")

    def _heartbeat(self, now: float) -> None:
        if not self._resynced.is_set() and now >= self._resync_deadline:
            logger.warning(
                "the hub at %s did not confirm our subscriptions: going on", self.endpoint
            )
            self._resynced.set()
        if self.hub_alive:
            if now - self._last_heard > self._hub_timeout:
                self._hub_lost(f"silent for {now - self._last_heard:.1f} s")
            elif now >= self._next_ping:
                self._next_ping = now + self._heartbeat_interval
                self._send_control(_wire.PING)
        elif now >= self._next_hello and not self._control_backlog:
            self._next_hello = now + self._hello_backoff
            self._hello_backoff = min(2 * self._hello_backoff, _HELLO_BACKOFF_MAX)
            self._send_control(_wire.HELLO, self._client_id)

    def _hub_lost(self, why: str) -> None:
        if not self.hub_alive:
            return  # already saying HELLO, with backoff
        logger.warning("the hub at %s is gone (%s): reconnecting", self.endpoint, why)
        self.hub_alive = False
        self._next_hello = 0.0
        self._on_space()  # publishers waiting for room learn that the hub is gone

    def _read_control(self, control: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                head, *body = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = head[1:]
            self._last_heard = time.monotonic()
            if kind == _wire.DELIVER:
                self._on_delivery(body)
            elif kind == _wire.GROUPS:
                version, *grouped = body
                self._grouped = frozenset(grouped)
                self._send_control(_wire.GROUPS_ACK, version)
            elif kind == _wire.CONSUMING:
                live = self._consuming.pop(body[0], None)
                if live is not None:
                    live.set()
            elif kind == _wire.RESET:
                # The hub does not know us (it declared us gone, or it restarted): introduce
                # ourselves again (at most once per backoff), then our queue consumers.
                self._hub_lost("it does not know this client")
            elif kind == _wire.STOPPING:
                self._hub_lost("it is stopping")
            elif kind == _wire.WELCOME:
                self._welcome(body)
                if not self.hub_alive:
                    logger.warning("reconnected to the hub at %s", self.endpoint)
                    if self._live_topics:
                        self._resynced = threading.Event()
                        self._resync_deadline = time.monotonic() + self._hub_timeout
                        self._sync(self._resynced)
                self.hub_alive = True
                self._hello_backoff = _HELLO_BACKOFF_MIN
                for consume in self._consumes.values():
                    self._send_control(_wire.CONSUME, *consume)
                # Flushes the old hub never confirmed: ask the new one (after what is queued).
                self.outbox.extend(self._flushes.values())
                self._flushes.clear()
                self.wake()

    def _pump(self, dealer: zmq.Socket[bytes]) -> None:
        """Send what the outbox holds until it is empty or the DEALER pipe is full.

        While the hub is unreachable nothing is sent: the outbox holds what is published (up to
        ``max_pending``, then publish() blocks) until a hub says WELCOME again."""
        outbox = self.outbox
        while self.hub_alive and self._resynced.is_set():
            if self._sent is not None:
                try:
                    dealer.send_multipart(self._sent, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                self._sent = None
            if not outbox:
                return
            first = outbox.popleft()
            if isinstance(first, FlushMarker):
                self._flushes[first.token] = first
                self._sent = [_wire.header(_wire.FLUSH), first.token]
                continue
            cls = type(first)
            topic = self._topic(cls)
            split = topic in self._grouped
            limit = _wire.MAX_SPLIT_BATCH if split else self._max_batch
            batch = [first]
            while outbox and len(batch) < limit and type(outbox[0]) is cls:
                batch.append(outbox.popleft())  # type: ignore[arg-type]
            self._on_space()
            self._sent = self._encode(cls, topic, split, batch)

    def _topic(self, cls: type) -> bytes:
        topic = self._topics.get(cls)
        if topic is None:
            topic = self._topics[cls] = _wire.topic_for(get_unique_name_for_message(cls))
        return topic

    def _encode(
        self, cls: type, topic: bytes, split: bool, batch: list[Message]
    ) -> list[Any] | None:
        published_at = time.time()
        encode = _codec.encode_split if split else _codec.encode_batch
        try:
            codec, frames = encode(cls, batch)
        except MessageSerializationError as exc:
            # Only the first message of a type is checked in publish(); a later one that cannot
            # be serialised is reported to the publisher's next publish()/flush() and logged.
            # It costs only itself: the rest of its batch is sent.
            self._on_error(exc)
            batch = [message for message in batch if _serialisable(cls, message)]
            logger.error("dropped %s that cannot be serialised: %s", cls.__qualname__, exc)
            if not batch:
                return None
            codec, frames = encode(cls, batch)
        meta = _wire.pack_meta(codec, len(batch), published_at)
        return [_wire.header(_wire.PUBLISH), topic, meta, *frames]

    def _read_replies(self, dealer: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frames[0] == _wire.header(_wire.FLUSHED) and len(frames) == 2:
                marker = self._flushes.pop(frames[1], None)
                if marker is not None:
                    marker.done.set()

    def _read_fanout(self, sub: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) == 1:
                topic = frames[0].bytes
                live = self._syncs.pop(topic, None)
                if live is not None:
                    sub.setsockopt(zmq.UNSUBSCRIBE, topic)
                    live.set()
                    self.wake()  # the pump may have waited for this one
                continue
            if not self._deliver(frames):
                self._held = frames
                return

    def _subscribe(self, topic: bytes, live: threading.Event) -> None:
        assert self._sub is not None
        self._live_topics.add(topic)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._sync(live)

    def _sync(self, live: threading.Event) -> None:
        """``live`` is set once the hub has every earlier subscription of this SUB socket."""
        assert self._sub is not None
        sync = _wire.SYNC_PREFIX + self._client_id + b":%d" % next(self._sync_ids)
        self._syncs[sync] = live
        self._sub.setsockopt(zmq.SUBSCRIBE, sync)

    def _unsubscribe(self, topic: bytes) -> None:
        assert self._sub is not None
        self._live_topics.discard(topic)
        self._sub.setsockopt(zmq.UNSUBSCRIBE, topic)


def _serialisable(cls: type, message: Message) -> bool:
    try:
        _codec.encode_batch(cls, [message])
    except MessageSerializationError:
        return False
    return True
