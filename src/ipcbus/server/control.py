"""The hub's control plane (hub process): clients, heartbeats and queue groups, over the control
ROUTER.

Separate from the data path so that backpressure on fan-out never delays a HELLO, a heartbeat, an
ack or a delivery. Payloads stay opaque: queue deliveries carry the bytes the publisher sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from ..wire import protocol as wire
from ..wire.queue_admin import QUEUE_ADMIN
from .clients import ClientDirectory
from .groups_file import GroupsFile
from .notices import Notices
from .queue_admin import QueueAdmin
from .queues import Delivery, QueueBook
from .sending import send_reply

__all__ = ["ControlPlane"]

logger = logging.getLogger(__name__)

Socket = zmq.Socket[Any]

# Requests a client may send before HELLO (a STATS probe is not a client, nor are the queue
# admin tools: their connection proved the bus secret, like every other).
_ANONYMOUS = frozenset({wire.HELLO, wire.STATS, wire.CLIENTS, QUEUE_ADMIN})
_KINDS = _ANONYMOUS | {
    wire.INFO,
    wire.PING,
    wire.ACK,
    wire.CONSUME,
    wire.CANCEL,
    wire.GROUPS_ACK,
    wire.BYE,
    wire.DELETE,
    wire.DECLARE,
}


class ControlPlane:
    def __init__(
        self,
        hub_id: bytes,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        max_held: int,
        max_message_size: int,
        max_held_bytes: int = 1024 * 1024 * 1024,
        max_dead_letters: int = 1000,
        max_dead_letter_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.hub_id = hub_id
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size  # announced in WELCOME: clients split below it
        self.spool_dir = ""  # announced in WELCOME: where big payloads may wait (server.spool)
        self.book = QueueBook(
            hub_id,
            max_held=max_held,
            max_held_bytes=max_held_bytes,
            max_dead=max_dead_letters,
            max_dead_bytes=max_dead_letter_bytes,
        )
        self.admin = QueueAdmin(self.book)
        self.clients: dict[bytes, float] = {}  # identity -> when it was last heard from
        self.directory = ClientDirectory()  # what each client says about itself
        self.clients_lost = 0
        self.unapplied_acks = 0  # acks a bug of ours could not apply (logged with traceback)
        self.notices = Notices(heartbeat_timeout)  # what every client must be told
        self._next_check = 0.0
        self.draining = False  # stopping: no new deliveries, only acks of those in flight
        self._groups_file: GroupsFile | None = None
        self._probes: list[float] = []  # when to probe every client (see probe_soon)

    # -- requests ---------------------------------------------------------------------------

    def handle(self, control: Socket, frames: list[zmq.Frame], endpoints: tuple[str, str]) -> None:
        """One control request; raises ValueError/IndexError on malformed input."""
        identity, kind = frames[0].bytes, wire.parse_kind(frames[1].bytes)
        body = [frame.bytes for frame in frames[2:]]
        now = time.monotonic()
        if kind not in _KINDS:
            raise ValueError(f"unknown control request {kind!r}")
        if kind not in _ANONYMOUS and identity not in self.clients:
            # Declared gone (missed heartbeats) or from before a hub restart: start again. Its
            # acks are for deliveries given to others meanwhile (counted late) or handed out by
            # the previous hub (counted stale): they settle nothing of anyone else's.
            if kind == wire.ACK:
                self._settle(body, now)
            self._send(control, [identity, wire.header(wire.RESET)])
            return
        if kind == wire.HELLO:
            self.directory.joined(identity, wire.parse_hello(body))
            self.clients[identity] = now
            welcome = wire.Welcome(
                *endpoints,
                self.hub_id,
                self.heartbeat_interval,
                self.heartbeat_timeout,
                self.max_message_size,
                tuple(self.book.grouped_topics),
                self.spool_dir,
            )
            self._send(control, welcome.frames(identity))
            self.notices.joined(identity, bool(self.book.full_topics))
            return
        if kind == wire.STATS:
            return  # answered by the relay, which owns the statistics
        if kind == wire.CLIENTS:
            reply = self.directory.describe(self.book.queues_by_client())
            self._send(control, [identity, wire.header(wire.CLIENTS), reply])
            return
        if kind == QUEUE_ADMIN:
            answer = self.admin.handle(body, now, lambda t, n: self.delete_group(control, t, n))
            try:
                # copy=False: a dead letter's payload is sent from the bytes the hub keeps
                # (pyzmq still copies frames under 64 KiB, which is cheaper for those).
                control.send_multipart([identity, *answer], zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                logger.debug("queue admin reply to %r dropped: %s", identity, exc)
            return
        self.clients[identity] = now
        if kind == wire.PING:
            self._send(control, [identity, wire.header(wire.PONG)])
        elif kind == wire.INFO:
            (info,) = body
            self.directory.described(identity, info)
        elif kind == wire.ACK:
            self._settle(body, now)
        elif kind == wire.CONSUME:
            self._consume(control, identity, wire.Consume.parse(body), now)
        elif kind == wire.CANCEL:
            self.book.cancel_consumer((identity, wire.parse_cancel(body)))
        elif kind == wire.GROUPS_ACK:
            self.notices.groups_acked(identity, wire.parse_groups_ack(body))
        elif kind == wire.BYE:
            self._drop_client(identity, "said goodbye")
        elif kind == wire.DELETE:
            self._delete(control, identity, wire.DeleteQueue.parse(body))
        elif kind == wire.DECLARE:
            self._declare(control, identity, wire.DeclareQueue.parse(body), now)
        else:
            raise ValueError(f"unknown control request {kind!r}")

    def _settle(self, body: list[bytes], now: float) -> None:
        # All or nothing at the parser: a client that follows the protocol never sends an ack it
        # refuses (its outcomes are the known four, its delays finite and capped by
        # ipcbus.core.retry), so such a request is forged or corrupt and none of it is applied.
        # Acks for deliveries the hub no longer has (late) or never had (stale) are valid and are
        # counted, one by one. Past the parser, each ack is applied on its own: a bug of ours on
        # one (as the OverflowError of an unbounded backoff was) must not skip the others,
        # whose deliveries would stay in flight forever.
        for ack in wire.parse_acks(body):
            try:
                self.book.settle(ack, now)
            except Exception:
                self.unapplied_acks += 1
                logger.exception(
                    "could not apply the ack of deliveries %d-%d of %r",
                    ack.first,
                    ack.last,
                    ack.stream,
                )

    def _consume(self, control: Socket, identity: bytes, request: wire.Consume, now: float) -> None:
        topic, name = request.topic, request.queue_name
        new_topic = not self.book.has_groups(topic)
        if not self.book.has_group(topic, name):
            self.remember_group(topic, name)
        self.book.add_consumer(
            topic, name, (identity, request.subscription_id), prefetch=request.prefetch
        )
        self._answer_once_grouped(
            control, wire.consuming(identity, request.subscription_id), new_topic, now
        )

    def _declare(
        self, control: Socket, identity: bytes, request: wire.DeclareQueue, now: float
    ) -> None:
        """A group declared before (or without) consumers: it holds what is published."""
        topic, name = request.topic, request.queue_name
        new_topic = not self.book.has_groups(topic)
        if not self.book.has_group(topic, name):
            self.remember_group(topic, name)
            self.book.declare(topic, name)
            logger.info("queue group %s/%s declared", wire.unique_name_of(topic), name)
        self._answer_once_grouped(
            control, wire.declared(identity, request.request_id), new_topic, now
        )

    def _answer_once_grouped(
        self, control: Socket, answer: list[bytes], new_topic: bool, now: float
    ) -> None:
        topics = list(self.book.grouped_topics) if new_topic else None
        self.notices.answer_once_grouped(control, self.clients, answer, topics, now)

    def _delete(self, control: Socket, identity: bytes, request: wire.DeleteQueue) -> None:
        dropped = self.delete_group(control, request.topic, request.queue_name)
        self._send(control, wire.deleted(identity, request.request_id, dropped))

    def delete_group(self, control: Socket, topic: bytes, name: str) -> int | None:
        """Delete a queue group that has no consumers, and what it holds: how many messages it
        held, or ``None`` (nothing done) while it has consumers."""
        dropped = self.book.delete(topic, name)
        if dropped is not None:
            label = f"{wire.unique_name_of(topic)}/{name}"
            if dropped:
                logger.warning("queue group %s deleted: %d held messages dropped", label, dropped)
            else:
                logger.info("queue group %s deleted", label)
            if self._groups_file is not None:
                try:
                    self._groups_file.rewrite((g.topic, g.name) for g in self.book.groups())
                except OSError as exc:
                    logger.error("queue group %s will come back after a restart: %s", label, exc)
            if not self.book.has_groups(topic):
                # Its publishers may batch it again (no longer one frame per message).
                self.notices.groups_changed(control, self.clients, self.book.grouped_topics)
        return dropped

    def restore_groups(self, path: str) -> None:
        """Recreate the queue groups a previous hub at this address had (they outlive the
        absence of their consumers, a hub restart included: docs/guarantees.md)."""
        self._groups_file = GroupsFile(path)
        declared = self._groups_file.load()
        for topic, name in declared:
            self.book.declare(topic, name)
        if declared:
            logger.info("restored %d queue groups from %s", len(declared), path)

    @property
    def bad_group_entries(self) -> int:
        return 0 if self._groups_file is None else self._groups_file.bad_entries

    def remember_group(self, topic: bytes, name: str) -> None:
        if self._groups_file is not None:
            self._groups_file.append(topic, name)

    def announce_stop(self, control: Socket) -> None:
        """The hub is stopping: clients stop waiting for it at once and try to reconnect."""
        self.notices.stopping(control, self.clients)

    def announce_lossy(self) -> None:
        """The fan-out sent without waiting for a stalled subscriber and has stopped: every
        client checks what it missed (sent on the next turns, retried while a pipe is full)."""
        self.notices.lossy(self.clients)

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
                control.send_multipart([identity, wire.header(wire.PONG)], zmq.NOBLOCK)
            except zmq.Again:
                pass  # alive, only busy
            except zmq.ZMQError:
                self._drop_client(identity, "its connection closed")

    def tick(self, control: Socket) -> None:
        now = time.monotonic()
        self.admin.sample(now)
        if self._probes and now >= self._probes[0]:
            self._probes = [due for due in self._probes if due > now]
            self._probe(control)
        if self.notices.waiting:
            self.notices.answer_waiting(control, self.clients, now)
        deliveries = [] if self.draining else self.book.dispatch(now)
        if deliveries:
            if self.book.journal is not None:
                self.book.journal.write()  # their attempts, before a crash can follow the send
            self._deliver(control, deliveries)
        if self.book.update_full():
            self.notices.full_changed(self.clients)
            logger.info(
                "topics held back by a full queue group: %s",
                sorted(wire.unique_name_of(t) for t in self.book.full_topics) or "none",
            )
        self.notices.send_pending(control, self.book.full_topics)
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
        if self.notices.waiting:
            wake.append(time.monotonic() + 0.02)
        seconds = min(wake) - time.monotonic()
        return max(0, min(default_ms, int(seconds * 1000) + 1))

    def _deliver(self, control: Socket, deliveries: list[Delivery]) -> None:
        """Send each client its runs of this turn as one message (4 frames each)."""
        by_client: dict[bytes, list[Delivery]] = {}
        for delivery in deliveries:
            by_client.setdefault(delivery.identity, []).append(delivery)
        for identity, batch in by_client.items():
            frames = wire.deliver(identity, [delivery.wire() for delivery in batch])
            try:
                # Payloads are views of the frames publishers sent: sent without a copy (pyzmq
                # still copies frames under 64 KiB, where that is cheaper).
                control.send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # Its pipe is full: offer them again later, in their order (each goes first).
                for delivery in reversed(batch):
                    self.book.unsend(delivery)
            except zmq.ZMQError:
                # EHOSTUNREACH: the client's connection is gone (the process died).
                self._drop_client(identity, "unreachable")

    def _drop_client(self, identity: bytes, why: str) -> None:
        if self.clients.pop(identity, None) is None:
            return
        self.notices.left(identity)
        self.clients_lost += why != "said goodbye"
        self.directory.left(identity, why)
        self.book.remove_client(identity)

    @staticmethod
    def _send(control: Socket, frames: list[bytes]) -> None:
        send_reply(control, frames)
