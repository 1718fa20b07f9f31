"""The hub's control plane: clients, heartbeats and queue groups, over the control ROUTER.

Separate from the data path so that backpressure on fan-out never delays a HELLO, a heartbeat, an
ack or a delivery. Payloads stay opaque: queue deliveries carry the bytes the publisher sent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import zmq

from . import _wire
from ._queues import Delivery, QueueBook

__all__ = ["ControlPlane"]

logger = logging.getLogger(__name__)

Socket = zmq.Socket[Any]

# Requests a client may send before HELLO (a STATS probe is not a client).
_ANONYMOUS = frozenset({_wire.HELLO, _wire.STATS})
_KINDS = _ANONYMOUS | {
    _wire.PING,
    _wire.ACK,
    _wire.CONSUME,
    _wire.CANCEL,
    _wire.GROUPS_ACK,
    _wire.BYE,
}


class ControlPlane:
    def __init__(
        self,
        hub_id: bytes,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        max_held: int,
    ) -> None:
        self.hub_id = hub_id
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.book = QueueBook(hub_id, max_held=max_held)
        self.clients: dict[bytes, float] = {}  # identity -> when it was last heard from
        self.clients_lost = 0
        self._groups_version = 0
        self._acked_version: dict[bytes, int] = {}
        # CONSUME requests waiting for every client to know their topic is grouped:
        # (identity, subscription id, groups version, deadline)
        self._waiting: list[tuple[bytes, bytes, int, float]] = []
        self._next_check = 0.0
        self.draining = False  # stopping: no new deliveries, only acks of those in flight
        self._groups_file: str | None = None
        self._probes: list[float] = []  # when to probe every client (see probe_soon)

    # -- requests ---------------------------------------------------------------------------

    def handle(self, control: Socket, frames: list[zmq.Frame], endpoints: tuple[str, str]) -> None:
        """One control request; raises ValueError/IndexError on malformed input."""
        identity, kind = frames[0].bytes, frames[1].bytes[1:]
        body = [frame.bytes for frame in frames[2:]]
        now = time.monotonic()
        if kind not in _KINDS:
            raise ValueError(f"unknown control request {kind!r}")
        if kind not in _ANONYMOUS and identity not in self.clients:
            # Declared gone (missed heartbeats) or from before a hub restart: start again. Its
            # acks are for deliveries given to others meanwhile: counted as late, nothing more.
            if kind == _wire.ACK:
                self._settle(body, now)
            self._send(control, identity, _wire.RESET)
            return
        if kind == _wire.HELLO:
            self.clients[identity] = now
            self._acked_version[identity] = self._groups_version
            in_endpoint, pub_endpoint = (endpoint.encode() for endpoint in endpoints)
            self._send(
                control,
                identity,
                _wire.WELCOME,
                in_endpoint,
                pub_endpoint,
                self.hub_id,
                repr(self.heartbeat_interval).encode(),
                repr(self.heartbeat_timeout).encode(),
                *self.book.grouped_topics,
            )
            return
        if kind == _wire.STATS:
            return  # answered by the relay, which owns the statistics
        self.clients[identity] = now
        if kind == _wire.PING:
            self._send(control, identity, _wire.PONG)
        elif kind == _wire.ACK:
            self._settle(body, now)
        elif kind == _wire.CONSUME:
            self._consume(control, identity, body, now)
        elif kind == _wire.CANCEL:
            (subscription_id,) = body
            self.book.cancel_consumer((identity, subscription_id))
        elif kind == _wire.GROUPS_ACK:
            (version,) = body
            self._acked_version[identity] = int(version)
        elif kind == _wire.BYE:
            self._drop_client(identity, "said goodbye")
        else:
            raise ValueError(f"unknown control request {kind!r}")

    def _settle(self, body: list[bytes], now: float) -> None:
        if not body or len(body) % 3:
            raise ValueError(f"ACK with {len(body)} frames")
        for index in range(0, len(body), 3):
            delivery_id, outcome, error = body[index : index + 3]
            self.book.settle(delivery_id, outcome, error.decode(errors="replace"), now)

    def _consume(self, control: Socket, identity: bytes, body: list[bytes], now: float) -> None:
        subscription_id, topic, queue_name, prefetch, max_attempts, retry_backoff = body
        _wire.check_topic(topic)
        queue_name.decode()  # UnicodeDecodeError is a ValueError
        new_topic = not self.book.has_groups(topic)
        if not self.book.has_group(topic, queue_name.decode()):
            self.remember_group(topic, queue_name.decode())
        self.book.add_consumer(
            topic,
            queue_name.decode(),
            (identity, subscription_id),
            prefetch=int(prefetch),
            max_attempts=int(max_attempts),
            retry_backoff=float(retry_backoff),
        )
        if not new_topic:
            self._send(control, identity, _wire.CONSUMING, subscription_id)
            return
        # Publishers batch a grouped topic differently (one frame per message): every client
        # must know before the first consumer may rely on receiving everything published.
        self._groups_version += 1
        self._announce_groups(control)
        deadline = now + self.heartbeat_timeout
        self._waiting.append((identity, subscription_id, self._groups_version, deadline))

    def restore_groups(self, path: str) -> None:
        """Recreate the queue groups a previous hub at this address had (they outlive the
        absence of their consumers, a hub restart included: DESIGN.md §2.8, §2.11)."""
        self._groups_file = path
        try:
            with open(path, encoding="utf-8") as lines:
                declared = [json.loads(line) for line in lines if line.strip()]
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.error("cannot read the queue groups of the previous hub (%s): %s", path, exc)
            return
        for entry in declared:
            self.book.declare(entry["topic"].encode() + _wire.TOPIC_END, entry["queue"])
        logger.info("restored %d queue groups from %s", len(declared), path)

    def remember_group(self, topic: bytes, name: str) -> None:
        if self._groups_file is None:
            return
        entry = json.dumps({"topic": topic[:-1].decode(), "queue": name})
        fd = os.open(self._groups_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, entry.encode() + b"\n")
        finally:
            os.close(fd)

    def announce_stop(self, control: Socket) -> None:
        """The hub is stopping: clients stop waiting for it at once and try to reconnect."""
        for client in list(self.clients):
            self._send(control, client, _wire.STOPPING)

    def _announce_groups(self, control: Socket) -> None:
        version = b"%d" % self._groups_version
        for client in list(self.clients):
            self._send(control, client, _wire.GROUPS, version, *self.book.grouped_topics)

    # -- every loop turn --------------------------------------------------------------------

    def probe_soon(self) -> None:
        """A connection to the control socket closed: find out whose, shortly (the ROUTER
        forgets the peer asynchronously), and again a little later in case it was slow."""
        now = time.monotonic()
        self._probes = sorted([*self._probes, now + 0.02, now + 0.25])

    def _probe(self, control: Socket) -> None:
        # ROUTER_MANDATORY: sending to a peer whose connection is gone raises EHOSTUNREACH.
        for identity in list(self.clients):
            try:
                control.send_multipart([identity, _wire.header(_wire.PONG)], zmq.NOBLOCK)
            except zmq.Again:
                pass  # alive, only busy
            except zmq.ZMQError:
                self._drop_client(identity, "its connection closed")

    def tick(self, control: Socket) -> None:
        now = time.monotonic()
        if self._probes and now >= self._probes[0]:
            self._probes = [due for due in self._probes if due > now]
            self._probe(control)
        if self._waiting:
            self._answer_waiting(control, now)
        deliveries = [] if self.draining else self.book.dispatch(now)
        if deliveries:
            self._deliver(control, deliveries)
        if now >= self._next_check:
            self._next_check = now + min(self.heartbeat_interval, 0.1)
            silent_since = now - self.heartbeat_timeout
            for identity, last_heard in list(self.clients.items()):
                if last_heard < silent_since:
                    self._drop_client(identity, f"silent for {now - last_heard:.1f} s")

    def timeout_ms(self, default_ms: int) -> int:
        """How long the relay may poll before ``tick`` has work (due retries, heartbeats)."""
        wake = [self._next_check, *self._probes[:1]]
        due = self.book.next_due()
        if due is not None:
            wake.append(due)
        if self._waiting:
            wake.append(time.monotonic() + 0.02)
        seconds = min(wake) - time.monotonic()
        return max(0, min(default_ms, int(seconds * 1000) + 1))

    def _answer_waiting(self, control: Socket, now: float) -> None:
        still_waiting = []
        for identity, subscription_id, version, deadline in self._waiting:
            everyone_knows = all(
                self._acked_version.get(client, 0) >= version for client in self.clients
            )
            if everyone_knows or now >= deadline:
                if not everyone_knows:
                    logger.warning("not every client confirmed the queue groups; going on")
                self._send(control, identity, _wire.CONSUMING, subscription_id)
            else:
                still_waiting.append((identity, subscription_id, version, deadline))
        self._waiting = still_waiting

    def _deliver(self, control: Socket, deliveries: list[Delivery]) -> None:
        """Send each client its deliveries of this turn as one message (3 frames each)."""
        by_client: dict[bytes, list[Delivery]] = {}
        for delivery in deliveries:
            by_client.setdefault(delivery.identity, []).append(delivery)
        for identity, batch in by_client.items():
            frames = [identity, _wire.header(_wire.DELIVER)]
            for delivery in batch:
                item = delivery.item
                descriptor = b" ".join(
                    (
                        delivery.subscription_id,
                        delivery.delivery_id,
                        item.message_id,
                        b"%d" % item.attempt,
                        b"1" if delivery.final else b"0",
                        delivery.topic,
                    )
                )
                frames += (descriptor, item.meta, item.payload)
            try:
                control.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                for delivery in batch:  # its pipe is full: offer them again later
                    self.book.unsend(delivery.delivery_id)
            except zmq.ZMQError:
                # EHOSTUNREACH: the client's connection is gone (the process died).
                self._drop_client(identity, "unreachable")

    def _drop_client(self, identity: bytes, why: str) -> None:
        if self.clients.pop(identity, None) is None:
            return
        self._acked_version.pop(identity, None)
        self.clients_lost += why != "said goodbye"
        logger.info("client %s gone (%s): its deliveries go to others", identity.hex(), why)
        self.book.remove_client(identity)

    @staticmethod
    def _send(control: Socket, identity: bytes, kind: bytes, *body: bytes) -> None:
        try:
            control.send_multipart([identity, _wire.header(kind), *body], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer left; EAGAIN: it reads nothing. Either way it is not waiting.
            logger.debug("reply to %r dropped: %s", identity, exc)
