"""Queue groups inside the hub: held messages, fair dispatch, acks, redelivery, dead letters.

Pure bookkeeping, no sockets: the relay feeds it batches and acks and sends the deliveries it
returns, so every rule here is testable without a process. Payloads stay opaque bytes.

State is kept per *run*, not per message: a run is consecutive messages of one producer batch
with the same history (attempt, rejections), held as the batch's sizes and payloads, and it is
split only where a rule needs it (a consumer's credit, its fair share, a failure or rejection of
one of its messages). Python runs here per run, so a batch of a thousand messages costs the hub
about what one message did. Measured before: the hub spent ~73 µs of CPU per message (one
DELIVER triple and one ACK quadruple of frames each), which held queue groups at 0.2-0.35x
multiprocessing.Queue.

Rules (docs/guarantees.md, "Queue groups"):
- each message of a topic goes to one consumer of every group subscribed to that topic;
- a consumer holds at most ``prefetch`` unacknowledged deliveries (its credit); runs go to
  consumers with credit in turn (round-robin), each at most its fair share of what is held
  (held / consumers with credit), so that a burst is spread over the group;
- every consumer has a delivery stream whose sequence numbers count its deliveries; an ack
  settles a range of them (one entry for a whole run, cumulative), and names failures,
  rejections and dead letters in entries of their own;
- an ack for deliveries the hub no longer has (redelivered after their consumer was declared
  gone, or settled already) is ignored and counted, per delivery (``late_acks``);
- stream names start with the hub's random id, so they are unique across hubs: an ack for a
  delivery of a previous hub at the same address (its consumer held it through a restart) can
  never settle one of this hub's; it is ignored and counted (``stale_acks``);
- a consumer that leaves (cancel, disconnect, missed heartbeats) gives what it has not settled
  back, at the front of the group and in order, to be redelivered with ``attempt + 1``;
- a handler failure is retried after the delay the consumer asked for; the consumer decides
  (ipcbus.core.retry) when a message is dead and publishes the ``DeadLetter`` (only it can
  unpickle); the hub keeps a record, bounded;
- a consumer whose predicate rejects hands the message back; it is offered to the group's other
  consumers and dropped (counted) once every present consumer rejected it;
- a group lives as long as the hub (and, declared in the hub's groups file, across restarts):
  with no consumer, messages are held; ``delete()`` removes a group without consumers and drops
  what it holds (counted in ``deleted_dropped``);
- a topic one group of which holds ``max_held`` messages, or ``max_held_bytes`` of payloads, is
  *full*: publishers of that topic (and only of that topic) are told to wait, until every group
  of it holds at most half of each again (``update_full``). The hub keeps taking what was
  already on its way, so a group may hold more than ``max_held``: at most what its publishers
  had queued and sent unconfirmed when they learned (docs/guarantees.md).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from ..wire.protocol import pack_sizes
from .dead_letters import DeadEntry
from .journal_hooks import JournalHooks
from .positions import Positions
from .queue_dispatch import QueueDispatch
from .queue_group import ConsumerKey, DeadRecord, Delivery, QueueConsumer, QueueGroup
from .runs import Run

# The names other modules import from here, wherever they are defined now.
__all__ = [
    "ConsumerKey",
    "DeadRecord",
    "Delivery",
    "JournalHooks",
    "QueueBook",
    "QueueConsumer",
    "QueueGroup",
    "Run",
]


class QueueBook(QueueDispatch):
    """Every queue group of the hub, and the deliveries in flight."""

    def __init__(
        self,
        hub_id: bytes,
        *,
        max_held: int = 100_000,
        max_held_bytes: int = 1024 * 1024 * 1024,
        max_dead: int = 1000,
        max_dead_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.hub_id = hub_id
        self._max_held = max_held
        self._max_held_bytes = max_held_bytes
        # A full topic opens again at this many held (hysteresis: not one announcement to every
        # client per message acked at the limit).
        self._low_water = max_held // 2
        self._low_water_bytes = max_held_bytes // 2
        self._max_dead = max_dead
        self._max_dead_bytes = max_dead_bytes
        self._groups: dict[tuple[bytes, str], QueueGroup] = {}
        self._by_topic: dict[bytes, list[QueueGroup]] = {}
        self._streams: dict[bytes, tuple[QueueGroup, QueueConsumer]] = {}
        self._next_id = 1  # message ids are <hub id>-<n>
        # Unique across hubs: before, every hub counted from 1, and a consumer that finished an
        # old hub's delivery 1 settled the new hub's delivery 1, held by another consumer.
        self._stream_prefix = hub_id + b"."
        self._stream_numbers = itertools.count(1)
        self._sequence = itertools.count()
        self.in_flight = 0  # messages delivered and not settled, every group
        self.late_acks = 0  # acks for this hub's deliveries it no longer has
        self.stale_acks = 0  # acks for deliveries of another hub (before a restart)
        self.deleted_dropped = 0  # held messages dropped with their deleted group
        # Per publisher, the runs of numbered batches taken (the data path drops a copy sent
        # again of one; a journal keeps them across a crash).
        self.positions = Positions()
        self.full_topics: frozenset[bytes] = frozenset()
        self.journal: JournalHooks | None = None

    # -- membership -------------------------------------------------------------------------

    @property
    def grouped_topics(self) -> list[bytes]:
        return list(self._by_topic)

    def groups(self) -> Iterator[QueueGroup]:
        return iter(self._groups.values())

    def has_group(self, topic: bytes, name: str) -> bool:
        return (topic, name) in self._groups

    def group(self, topic: bytes, name: str) -> QueueGroup | None:
        return self._groups.get((topic, name))

    def declare(self, topic: bytes, name: str) -> QueueGroup:
        """The group, created (without consumers: it holds messages) if it is new."""
        group = self._groups.get((topic, name))
        if group is None:
            group = QueueGroup(name, topic, self._max_held, self._max_dead, self._max_dead_bytes)
            self._groups[(topic, name)] = group
            self._by_topic.setdefault(topic, []).append(group)
        return group

    def add_consumer(
        self,
        topic: bytes,
        name: str,
        key: ConsumerKey,
        *,
        prefetch: int,
    ) -> QueueGroup:
        group = self.declare(topic, name)
        consumer = group.consumers.get(key)
        if consumer is None:
            stream = self._stream_prefix + b"%d" % next(self._stream_numbers)
            consumer = QueueConsumer(key, max(1, prefetch), stream)
            group.consumers[key] = consumer
            self._streams[stream] = (group, consumer)
        else:
            # The same consumer again (it reconnected): keep what it holds, renew its terms.
            consumer.prefetch, consumer.cancelled = max(1, prefetch), False
        return group

    def cancel_consumer(self, key: ConsumerKey) -> None:
        """The consumer takes nothing new; what it holds it may still finish and ack."""
        for group in self._groups.values():
            consumer = group.consumers.get(key)
            if consumer is not None:
                consumer.cancelled = True
                if not consumer.in_flight:
                    self.remove_consumer(key)

    def remove_consumer(self, key: ConsumerKey) -> None:
        """The consumer cancelled or its process is gone: what it did not settle goes back,
        first, in the order it was delivered."""
        for group in self._groups.values():
            consumer = group.consumers.pop(key, None)
            if consumer is None:
                continue
            del self._streams[consumer.stream]
            back = [part for entry in consumer.in_flight.values() for part in entry.unsettled()]
            returned = sum(part.count for part in back)
            group.push_front(back)
            group.counts["redelivered"] += returned
            self.in_flight -= consumer.unacked
            consumer.in_flight.clear()
            consumer.unacked = 0
            for run in group.pending:
                if run.rejected_by:
                    run.rejected_by.discard(key)

    def queues_by_client(self) -> dict[bytes, list[str]]:
        """The queue groups each client consumes from (``ipcbus clients``)."""
        found: dict[bytes, list[str]] = {}
        for group in self._groups.values():
            for identity, _subscription_id in group.consumers:
                found.setdefault(identity, []).append(f"{group.topic[:-1].decode()}/{group.name}")
        return found

    def remove_client(self, identity: bytes) -> None:
        keys = {
            key for group in self._groups.values() for key in group.consumers if key[0] == identity
        }
        for key in keys:
            self.remove_consumer(key)

    # -- messages ---------------------------------------------------------------------------

    def has_groups(self, topic: bytes) -> bool:
        return topic in self._by_topic

    def update_full(self) -> bool:
        """Recompute ``full_topics``; True when it changed (the clients are to be told).

        Only the topic is held back, never the hub's data socket: before, one abandoned group at
        its limit stopped every publisher of every topic."""
        full = set()
        for topic, groups in self._by_topic.items():
            most = max(group.held for group in groups)
            heaviest = max(group.held_bytes for group in groups)
            over = most >= self._max_held or heaviest >= self._max_held_bytes
            # Once full, open again only at half of both (hysteresis).
            above_half = most > self._low_water or heaviest > self._low_water_bytes
            if over or (topic in self.full_topics and above_half):
                full.add(topic)
        if self.journal is not None and self.journal.full:
            full.update(self._by_topic)  # every grouped topic goes to the journal
        if full == self.full_topics:
            return False
        self.full_topics = frozenset(full)
        return True

    def delete(self, topic: bytes, name: str) -> int | None:
        """Delete a group without consumers: the number of held messages dropped with it (0 for
        a group that does not exist), or ``None`` (nothing done) while it has consumers."""
        group = self._groups.get((topic, name))
        if group is None:
            return 0
        if group.consumers:
            return None
        del self._groups[(topic, name)]
        groups = self._by_topic[topic]
        groups.remove(group)
        if not groups:
            del self._by_topic[topic]
        self.deleted_dropped += group.held
        if self.journal is not None:
            self.journal.dropped(topic, name)
        return group.held

    def enqueue(self, topic: bytes, meta: bytes, payloads: list[bytes]) -> None:
        """Messages of one batch, each pickled alone, for every group of ``topic``."""
        self.enqueue_batch(topic, meta, pack_sizes(map(len, payloads)), b"".join(payloads))

    def enqueue_batch(
        self,
        topic: bytes,
        meta: bytes,
        sizes: bytes,
        payloads: bytes | memoryview,
        attempt: int = 0,
        publisher: tuple[bytes, int, int] | None = None,
    ) -> None:
        """A split batch as it came (``wire.check_split`` passed) for every group of ``topic``:
        kept whole, it is cut only where a consumer's credit or share needs it. ``attempt``: the
        deliveries it may have had (1 for a copy sent again to a new hub); ``publisher``: its
        client id and the run of positions it belongs to, for the journal (``server.positions``).
        """
        groups = self._by_topic.get(topic)
        if not groups:
            return
        count = len(sizes) // 4
        if not count:
            return
        sizes_view, payloads_view = memoryview(sizes), memoryview(payloads)
        first_ids = []
        for group in groups:
            # Each group its own copy: its own message ids and history (the bytes are shared).
            group.push(Run(meta, sizes_view, payloads_view, self._next_id, count, attempt))
            first_ids.append((group.name, self._next_id))
            self._next_id += count
            group.counts["published"] += count
        if self.journal is not None:
            self.journal.enqueued(topic, first_ids, meta, sizes, payloads, attempt, publisher)

    # -- the journal ------------------------------------------------------------------------

    @property
    def next_id(self) -> int:
        return self._next_id

    def reserve_ids(self, next_id: int) -> None:
        """Ids below ``next_id`` are taken (by messages a journal restored)."""
        self._next_id = max(self._next_id, next_id)

    def restore(self, topic: bytes, name: str, run: Run) -> None:
        """A message run a previous hub held (from its journal), held again at the back."""
        group = self.declare(topic, name)
        group.push(run)
        self._next_id = max(self._next_id, run.first_id + run.count)

    def restore_dead(self, topic: bytes, name: str, entry: DeadEntry) -> None:
        """A dead letter a previous hub kept (from its journal), payload included."""
        self.declare(topic, name).dead.restore(entry)

    def live_messages(self) -> int:
        """Messages held or in flight, every group (what a journal checkpoint would copy)."""
        return self.in_flight + sum(group.held for group in self._groups.values())

    def live_runs(self) -> Iterator[tuple[QueueGroup, Run]]:
        """Every message not settled, as runs: in flight, waiting for a retry, held."""
        for group in self._groups.values():
            for consumer in group.consumers.values():
                for entry in consumer.in_flight.values():
                    for run in entry.unsettled():
                        yield group, run
            for _due, _order, run in group.delayed:
                yield group, run
            for run in group.pending:
                yield group, run

    def statistics(self) -> dict[str, dict[str, int]]:
        return {
            f"{group.topic[:-1].decode()}/{group.name}": group.statistics()
            for group in self._groups.values()
        }

    def dead_letters(self) -> dict[str, list[DeadRecord]]:
        return {
            f"{group.topic[:-1].decode()}/{group.name}": [
                DeadRecord(entry.message_id, entry.attempts, entry.error) for entry in group.dead
            ]
            for group in self._groups.values()
        }
