"""The hub's serving loop: runs inside the hub process, owns its sockets, never unpickles.

Publishes arrive on a ROUTER socket (one DEALER per proxy keeps each publisher's order and pushes
back instead of dropping); fan-out is an XPUB socket with ``XPUB_NODROP``, so a full subscriber pipe
makes ``send`` fail with EAGAIN instead of silently dropping (DESIGN.md §2.4). The loop then holds
that one message and stops reading the ROUTER until the subscriber drains: backpressure reaches the
publishers through their DEALER high-water marks. Python runs per *batch* here, never per subscriber
per message.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import _wire
from ._control import ControlPlane
from ._keys import (
    USERNAME,
    admits,
    beside_hub,
    key_path_for,
    load_or_create_secret,
    serve_securely,
)

__all__ = ["HubStatistics", "Relay"]

logger = logging.getLogger(__name__)

# How many inputs one loop turn handles before it polls again (keeps subscriptions responsive).
_BURST = 256
_IDLE_POLL_MS = 100
# XPUB_NODROP gives no POLLOUT event for a full pipe: a stalled send is retried on this period.
_STALLED_POLL_MS = 1


@dataclass(frozen=True)
class HubStatistics:
    """What the hub has done since it started (a frozen record; ``ipcbus stats`` renders it)."""

    address: str
    pid: int
    uptime: float
    clients: int
    topics: int
    batches_relayed: int
    messages_relayed: int
    bytes_relayed: int
    backpressure_stalls: int
    malformed_dropped: int
    stall_drops: int = 0
    auth_rejected: int = 0
    clients_lost: int = 0
    late_acks: int = 0
    unsplittable_dropped: int = 0
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    # Per queue, the dead letters the hub keeps (bounded): message_id, attempts, last error.
    dead_letters: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> HubStatistics:
        return cls(**json.loads(text))


class Relay:
    """Binds the hub's sockets and relays until ``should_stop()`` or the watched fd closes."""

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = 1000,
        max_frames: int = _wire.MAX_FRAMES,
        max_message_size: int = 256 * 1024 * 1024,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        max_held: int = 100_000,
        handshake_timeout: float = 5.0,
        drain_timeout: float = 5.0,
        stall_timeout: float = 30.0,
        restart_grace: float = 1.0,
    ) -> None:
        self.endpoint = endpoint
        self.in_endpoint, self.pub_endpoint = _wire.data_endpoints_for(endpoint)
        self._hwm = hwm
        self._max_frames = max_frames
        self._max_message_size = max_message_size
        self._hub_id = os.urandom(8).hex().encode()
        self._started = time.monotonic()
        self.control_plane = ControlPlane(
            self._hub_id,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_held=max_held,
        )
        self._topics: dict[bytes, int] = {}
        self._stalled: list[Any] | None = None
        self._sync_backlog: deque[bytes] = deque()
        self._batches = self._messages = self._bytes = 0
        self._stalls = self._malformed = self._unsplittable = 0
        self._auth_rejected = 0
        self._handshake_ms = int(handshake_timeout * 1000)
        self._drain_timeout = drain_timeout
        # A subscriber that accepts nothing for stall_timeout s (stopped, deadlocked) must not
        # hold the bus forever (DESIGN.md §2.4): the hub then sends without waiting for full
        # pipes (counted in stall_drops) for as long as sends keep stalling. Subscribers learn
        # of what they missed from the per-topic sequence number of every fan-out message.
        self._stall_timeout = stall_timeout
        self._restart_grace = restart_grace
        self._accept_after = 0.0
        self._stalled_since = 0.0
        self._lossy_until = 0.0
        self._stall_drops = 0
        self._topic_seq: dict[bytes, int] = {}
        # Topics sent without waiting: once sends stop stalling, each gets a marker carrying its
        # latest sequence number, so a subscriber that missed the tail learns of it too.
        self._lossy_topics: set[bytes] = set()

    @property
    def endpoints(self) -> tuple[str, str, str]:
        return self.endpoint, self.in_endpoint, self.pub_endpoint

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            address=self.endpoint,
            pid=os.getpid(),
            uptime=time.monotonic() - self._started,
            clients=len(self.control_plane.clients),
            topics=len(self._topics),
            batches_relayed=self._batches,
            messages_relayed=self._messages,
            bytes_relayed=self._bytes,
            backpressure_stalls=self._stalls,
            malformed_dropped=self._malformed,
            stall_drops=self._stall_drops,
            auth_rejected=self._auth_rejected,
            clients_lost=self.control_plane.clients_lost,
            late_acks=self.control_plane.book.late_acks,
            unsplittable_dropped=self._unsplittable,
            queues=self.control_plane.book.statistics(),
            dead_letters={
                name: [asdict(record) for record in records]
                for name, records in self.control_plane.book.dead_letters().items()
                if records
            },
        )

    def serve(
        self,
        should_stop: Callable[[], bool],
        ready: Callable[[], None] | None = None,
        watch_fd: int | None = None,
    ) -> None:
        """Relay until ``should_stop()`` is true or ``watch_fd`` (the parent's pipe) hangs up."""
        context = zmq.Context()
        sockets: list[zmq.Socket[bytes]] = []
        try:
            key_path = key_path_for(self.endpoint)
            restarted = os.path.exists(key_path)
            secret = load_or_create_secret(key_path)
            self.control_plane.restore_groups(beside_hub(self.endpoint, ".groups"))
            if restarted:
                # A previous hub served here: give its clients restart_grace s to reconnect
                # their SUB sockets before the backlog their publishers held is relayed.
                self._accept_after = time.monotonic() + self._restart_grace
            # The ZAP handler must be bound before any socket that uses it.
            zap = context.socket(zmq.REP)
            sockets.append(zap)
            zap.linger = 0
            zap.bind("inproc://zeromq.zap.01")
            control = context.socket(zmq.ROUTER)
            data = context.socket(zmq.ROUTER)
            xpub = context.socket(zmq.XPUB)
            sockets += [control, data, xpub]
            for server in (control, data, xpub):
                server.linger = 0
                serve_securely(server, self.endpoint, secret)
                server.setsockopt(zmq.HANDSHAKE_IVL, self._handshake_ms)
                server.setsockopt(zmq.MAXMSGSIZE, self._max_message_size)
            for router in (control, data):
                router.rcvhwm = router.sndhwm = self._hwm
                router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable peer raises
            xpub.sndhwm = self._hwm
            xpub.setsockopt(zmq.XPUB_NODROP, 1)
            control.bind(self.endpoint)
            data.bind(self.in_endpoint)
            xpub.bind(self.pub_endpoint)
            self.in_endpoint = data.getsockopt_string(zmq.LAST_ENDPOINT)
            self.pub_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
            _restrict_ipc_files(*self.endpoints)
            # Peers that fail the handshake before the ZAP handler is asked (wrong mechanism,
            # garbage instead of ZMTP) are counted from the sockets' monitors.
            # The control socket's disconnections too: a client process that died (kill -9,
            # an unhandled SIGTERM) is found at once by probing, not at its heartbeat timeout.
            failed = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            monitors = [
                server.get_monitor_socket(
                    failed | (zmq.EVENT_DISCONNECTED if server is control else 0)
                )
                for server in (control, data, xpub)
            ]
            sockets += monitors
            if ready is not None:
                ready()
            self._loop(zap, secret, monitors, control, data, xpub, should_stop, watch_fd)
        finally:
            for socket in sockets:
                socket.close(linger=0)
            context.term()

    # -- the loop ---------------------------------------------------------------------------

    def _loop(
        self,
        zap: zmq.Socket[bytes],
        secret: bytes,
        monitors: list[zmq.Socket[bytes]],
        control: zmq.Socket[bytes],
        data: zmq.Socket[bytes],
        xpub: zmq.Socket[bytes],
        should_stop: Callable[[], bool],
        watch_fd: int | None,
    ) -> None:
        full = zmq.Poller()
        stalled = zmq.Poller()
        for poller in (full, stalled):
            for monitor in monitors:
                poller.register(monitor, zmq.POLLIN)
            poller.register(zap, zmq.POLLIN)
            poller.register(control, zmq.POLLIN)
            poller.register(xpub, zmq.POLLIN)
            if watch_fd is not None:
                poller.register(watch_fd, zmq.POLLIN)
        full.register(data, zmq.POLLIN)
        book = self.control_plane.book
        drain_until: float | None = None
        while True:
            if drain_until is None and should_stop():
                # Graceful stop: take no new publishes or deliveries; give consumers up to
                # drain_timeout to finish (ack) what they hold; then tell every client.
                drain_until = time.monotonic() + self._drain_timeout
                self.control_plane.draining = True
                logger.info("stopping: draining %d queue deliveries", book.in_flight)
            if drain_until is not None and (book.in_flight == 0 or time.monotonic() >= drain_until):
                self.control_plane.announce_stop(control)
                return
            # Not accepting publishes while a send is stalled (a full subscriber pipe), a queue
            # group holds its maximum, the hub drains or waits out its restart grace: publishers
            # feel backpressure, nothing is dropped. Only a stalled send needs the fast retry
            # (XPUB_NODROP gives no POLLOUT); the others wake on control traffic or a deadline.
            now = time.monotonic()
            in_grace = now < self._accept_after
            retrying = self._stalled is not None or bool(self._sync_backlog)
            accepting = not book.full() and drain_until is None and not in_grace
            poller = full if accepting and not retrying else stalled
            if retrying:
                timeout = _STALLED_POLL_MS
            else:
                timeout = self.control_plane.timeout_ms(_IDLE_POLL_MS)
                if in_grace:
                    timeout = min(timeout, int((self._accept_after - now) * 1000) + 1)
            events = dict(poller.poll(timeout))
            if watch_fd is not None and watch_fd in events:
                logger.info("the process that started the hub is gone: stopping")
                return
            if zap in events:
                self._authenticate(zap, secret)
            for monitor in monitors:
                if monitor in events:
                    self._count_failed_handshakes(monitor)
            if xpub in events:
                self._read_subscriptions(xpub)
            self._send_sync_replies(xpub)
            if control in events:
                self._read(control, lambda frames: self._handle_control(control, frames))
            self.control_plane.tick(control)
            if self._stalled is not None:
                if not self._send(xpub, self._stalled):
                    continue
                self._stalled = None
            if self._lossy_topics and time.monotonic() >= self._lossy_until:
                self._send_gap_markers(xpub)
            if accepting and not book.full() and (data in events or poller is stalled):
                self._read(data, lambda frames: self._handle_data(data, xpub, frames), True)

    def _authenticate(self, zap: zmq.Socket[bytes], secret: bytes) -> None:
        """Answer ZAP requests: the handshake of every connection to every hub socket."""
        for _ in range(_BURST):
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id, _domain, _address, _identity, mechanism, *credentials = request
            allowed = admits(secret, mechanism, credentials)
            if not allowed:
                self._auth_rejected += 1
                logger.warning("refused a connection that did not prove the bus secret")
            status = (b"200", b"OK") if allowed else (b"400", b"no valid bus secret")
            zap.send_multipart([version, request_id, *status, USERNAME if allowed else b"", b""])

    def _count_failed_handshakes(self, monitor: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.control_plane.probe_soon()
            else:
                self._auth_rejected += 1

    def _read_subscriptions(self, xpub: zmq.Socket[bytes]) -> None:
        for _ in range(_BURST):
            try:
                event = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event:
                continue
            subscribe, topic = event[0] == 1, event[1:]
            if _wire.is_sync_topic(topic):
                if subscribe:
                    self._sync_backlog.append(topic)
                continue
            if subscribe:
                self._topics[topic] = self._topics.get(topic, 0) + 1
            elif topic in self._topics:
                del self._topics[topic]

    def _send_sync_replies(self, xpub: zmq.Socket[bytes]) -> None:
        while self._sync_backlog:
            try:
                xpub.send(self._sync_backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # that subscriber's pipe is full: it drains, then gets its answer
            self._sync_backlog.popleft()

    def _send(self, xpub: zmq.Socket[bytes], frames: list[Any]) -> bool:
        try:
            xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass
        else:
            return True
        now = time.monotonic()
        if self._stalled is None:
            self._stalls += 1
            self._stalled_since = now
        if now < self._lossy_until or now - self._stalled_since >= self._stall_timeout:
            if now >= self._lossy_until:
                logger.error(
                    "a subscriber accepted nothing for %.0f s: sending without waiting for it",
                    now - self._stalled_since,
                )
            # Without NODROP a full pipe drops this message instead of refusing it.
            xpub.setsockopt(zmq.XPUB_NODROP, 0)
            try:
                xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
            finally:
                xpub.setsockopt(zmq.XPUB_NODROP, 1)
            self._stall_drops += 1
            self._lossy_until = now + self._stall_timeout
            self._lossy_topics.add(bytes(frames[0]))
            return True
        return False

    def _send_gap_markers(self, xpub: zmq.Socket[bytes]) -> None:
        """``[topic, b"", seq]`` for each topic sent without waiting, now that nothing stalls."""
        for topic in list(self._lossy_topics):
            try:
                xpub.send_multipart(
                    [topic, b"", _wire.pack_seq(self._topic_seq[topic])], zmq.NOBLOCK
                )
            except zmq.Again:
                return  # still full: next turn
            self._lossy_topics.discard(topic)

    def _read(
        self,
        router: zmq.Socket[bytes],
        handle: Callable[[list[zmq.Frame]], None],
        stop_when_stalled: bool = False,
    ) -> None:
        for _ in range(_BURST):
            if stop_when_stalled and self._stalled is not None:
                return
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if not 2 <= len(frames) <= self._max_frames:
                    raise ValueError(f"{len(frames)} frames")
                head = frames[1].bytes
                if len(head) != _wire.HEADER_LEN or head[0] != _wire.VERSION:
                    raise ValueError(f"bad header {head[:8]!r}")
                handle(frames)
            except (ValueError, IndexError) as exc:
                # Malformed input is counted and dropped; the hub keeps serving (DESIGN.md §3).
                self._malformed += 1
                logger.debug("dropped malformed request: %s", exc)
            except Exception:
                # A bug of ours that one request triggers must not stop the hub for everyone.
                self._malformed += 1
                logger.exception("dropped a request the hub could not handle")

    def _handle_data(
        self, data: zmq.Socket[bytes], xpub: zmq.Socket[bytes], frames: list[zmq.Frame]
    ) -> None:
        identity, kind = frames[0].bytes, frames[1].bytes[1:]
        if kind == _wire.PUBLISH:
            if len(frames) < 5:
                raise ValueError("PUBLISH without topic, meta and payload")
            topic = _wire.check_topic(frames[2].bytes)
            meta = frames[3].bytes
            codec, count, _ = _wire.unpack_meta(meta)
            seq = self._topic_seq[topic] = self._topic_seq.get(topic, 0) + 1
            relayed: list[Any] = [frames[2], frames[3], _wire.pack_seq(seq), *frames[4:]]
            self._batches += 1
            self._messages += count
            self._bytes += sum(len(frame) for frame in frames[2:])
            book = self.control_plane.book
            if book.has_groups(topic):
                if codec in _wire.SPLIT_CODECS:
                    book.enqueue(topic, meta, [frame.bytes for frame in frames[4:]])
                else:
                    # Encoded before its publisher learned the topic has queue groups, i.e.
                    # published before the group's first subscribe_async() returned.
                    self._unsplittable += count
                    logger.warning("%d messages of %r reached no queue group", count, topic)
            if not self._send(xpub, relayed):
                self._stalled = relayed
        elif kind == _wire.FLUSH and len(frames) == 3:
            self._reply(data, identity, _wire.FLUSHED, frames[2].bytes)
        else:
            raise ValueError(f"unknown data request {kind!r}")

    def _handle_control(self, control: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        if frames[1].bytes[1:] == _wire.STATS:
            statistics = self.statistics().to_json().encode()
            self._reply(control, frames[0].bytes, _wire.STATS, statistics)
        else:
            self.control_plane.handle(control, frames, (self.in_endpoint, self.pub_endpoint))

    def _reply(self, router: zmq.Socket[bytes], identity: bytes, kind: bytes, *body: bytes) -> None:
        try:
            router.send_multipart([identity, _wire.header(kind), *body], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer left; EAGAIN: it reads nothing. Either way it is not waiting.
            logger.debug("reply to %r dropped: %s", identity, exc)


def _restrict_ipc_files(*endpoints: str) -> None:  # tcp endpoints have no file
    """Sockets 0600: only this user may connect (DESIGN.md §3)."""
    for endpoint in endpoints:
        if endpoint.startswith("ipc://"):
            os.chmod(endpoint[len("ipc://") :], 0o600)
