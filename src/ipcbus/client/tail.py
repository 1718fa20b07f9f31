"""What ``ipcbus tail`` reads (client side): every batch the hub fans out, or those of some
types, as it passes, without slowing the bus down.

The tail is a client like any other: it proves the bus secret, says HELLO (``ipcbus clients``
lists it), pings, acknowledges the hub's queue-group announcements (GROUPS) and says goodbye. Its
SUB socket subscribes to every topic (or to the types asked for); the hub's fan-out never drops,
so a subscriber that stops reading holds the bus back (docs/guarantees.md). The tail's receiving
thread therefore does nothing but take batches off the socket into a bounded buffer; what does
not fit there (a terminal slower than the bus) is dropped and counted in messages, and whoever
prints says so. Nothing is decoded on that thread.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from ..exceptions import HubUnavailableError
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import read_bus_secret
from .describe import describe
from .handshake import greet, hub_socket
from .spool import read_spooled
from .watch import ConnectionWatch

__all__ = ["Batch", "Tail"]

logger = logging.getLogger("ipcbus.client")

_POLL_MS = 100
_LINGER_MS = 200


@dataclass(frozen=True)
class Batch:
    """One fan-out batch as the tail took it: raw, undecoded."""

    topic: str
    codec: bytes
    count: int
    published_at: float
    publisher: bytes
    payload: list[Any]  # zmq frames

    @property
    def size(self) -> int:
        """Bytes of payload (and out-of-band buffers) of the whole batch."""
        return sum(len(frame) for frame in self.payload)


class Tail:
    """Connected to the hub at ``address``, taking every batch of ``types`` (unique names;
    empty: every type) into a buffer of at most ``buffer`` messages."""

    def __init__(
        self,
        address: str,
        types: Iterable[str] = (),
        *,
        buffer: int = 10_000,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self._topics = [wire.topic_for(name) for name in types] or [b""]
        self._capacity = buffer
        self._buffer: collections.deque[Batch] = collections.deque()
        self._buffered = 0  # messages in the buffer
        self._lock = threading.Condition()
        self.dropped = 0  # messages the buffer had no room for
        self.received = 0
        self.stopped_by_hub = False
        self._stop = threading.Event()
        self._client_id = os.urandom(8).hex().encode()
        self._sync = wire.sync_topic(self._client_id, 1)
        self._live = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(timeout,), name="ipcbus-tail", daemon=True
        )
        self._thread.start()
        if not self._live.wait(timeout + 5) or self._failure is not None:
            self.close()
            if isinstance(self._failure, HubUnavailableError):
                raise self._failure
            raise HubUnavailableError(
                f"no hub answered at {address} within {timeout} s"
            ) from self._failure

    def take(self, timeout: float | None) -> Batch | None:
        """The oldest batch in the buffer, waiting up to ``timeout``; ``None`` if none came
        (or the tail stopped)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._buffer or self.done, timeout):
                return None
            if not self._buffer:
                return None
            batch = self._buffer.popleft()
            self._buffered -= batch.count
            return batch

    @property
    def done(self) -> bool:
        """The receiving thread ended (closed, or the hub stopped or failed)."""
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    # -- the receiving thread ---------------------------------------------------------------

    def _run(self, timeout: float) -> None:
        try:
            self._serve(timeout)
        except BaseException as exc:
            self._failure = exc
            self._live.set()
            if not isinstance(exc, HubUnavailableError):
                logger.critical("ipcbus tail: the receiving thread failed", exc_info=exc)
        finally:
            with self._lock:
                self._lock.notify_all()

    def _serve(self, timeout: float) -> None:
        address = Address.parse(self.address)
        try:
            secret = read_bus_secret(address)
        except HubUnavailableError as exc:
            raise HubUnavailableError(f"no hub answered at {self.address}: {exc}") from exc
        context = zmq.Context()
        sockets: list[zmq.Socket[Any]] = []
        # Counts failed handshakes: an impostor at the address is named in the error.
        watch = ConnectionWatch(self.address, lambda _why: None)
        try:
            control = hub_socket(context, zmq.DEALER, secret)
            sockets.append(control)
            control.linger = _LINGER_MS
            control.routing_id = self._client_id
            hello = wire.hello(self._client_id, describe([], []))
            welcome = greet(control, watch, self.address, hello, timeout)
            sub = hub_socket(context, zmq.SUB, secret)
            sockets.append(sub)
            sub.connect(welcome.fanout_endpoint)
            for topic in self._topics:
                sub.subscribe(topic)
            # Answered once the hub has applied what came before it on this pipe: from then on
            # the tail misses nothing published.
            sub.subscribe(self._sync)
            self._loop(control, sub, welcome.heartbeat_interval)
            with contextlib.suppress(zmq.ZMQError):
                control.send_multipart([wire.header(wire.BYE)], zmq.NOBLOCK)
        finally:
            watch.close()
            for socket in sockets:
                socket.close()
            context.term()

    def _loop(self, control: zmq.Socket[Any], sub: zmq.Socket[Any], interval: float) -> None:
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        next_ping = time.monotonic() + interval
        while not self._stop.is_set():
            events = dict(poller.poll(_POLL_MS))
            if sub in events:
                self._read(sub)
            if control in events and not self._answer(control):
                return
            now = time.monotonic()
            if now >= next_ping:
                control.send_multipart([wire.header(wire.PING)], zmq.NOBLOCK)
                next_ping = now + interval

    def _read(self, sub: zmq.Socket[Any]) -> None:
        for _ in range(1000):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            topic = frames[0].bytes
            if wire.is_sync_topic(topic):
                if topic == self._sync:
                    self._live.set()
                continue  # another client's answer (the tail subscribes to every prefix)
            try:
                batch = wire.Fanout.parse(read_spooled(None, frames))
            except (ValueError, IndexError):
                logger.warning("ipcbus tail: skipped a malformed batch of %r", topic[:64])
                continue
            codec, count, published_at = batch.meta
            self.received += count
            with self._lock:
                if self._buffered + count > self._capacity:
                    self.dropped += count
                    continue
                self._buffer.append(
                    Batch(
                        wire.unique_name_of(batch.topic),
                        codec,
                        count,
                        published_at,
                        batch.publisher,
                        list(batch.payload),
                    )
                )
                self._buffered += count
                self._lock.notify()

    def _answer(self, control: zmq.Socket[Any]) -> bool:
        """Answer what the hub says; False when it stops (or forgot us: a restarted hub)."""
        for _ in range(100):
            try:
                head, *body = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            if head == wire.header(wire.GROUPS):
                # Publishers switch a topic to split batches only once every client knows it
                # has queue groups: a tail that stayed silent would hold new groups back.
                version, _ = wire.parse_groups(body)
                control.send_multipart(wire.groups_ack(version), zmq.NOBLOCK)
            elif head in (wire.header(wire.STOPPING), wire.header(wire.RESET)):
                self.stopped_by_hub = True
                return False
        return True


def describe_publishers(clients: list[dict[str, Any]]) -> dict[bytes, str]:
    """Client id -> "pid P program", from an ``ipcbus clients`` answer."""
    named = {}
    for client in clients:
        with contextlib.suppress(KeyError, ValueError, TypeError):
            named[bytes.fromhex(client["id"])] = (
                f"pid {client.get('pid', '?')} {client.get('program', '?')}"
            )
    return named


def as_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, default=repr)
