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
- a topic one group of which holds ``max_held`` messages is *full*: publishers of that topic (and
  only of that topic) are told to wait, until every group of it holds at most half of
  ``max_held`` again (``update_full``). The hub keeps taking what was already on its way, so a
  group may hold more than ``max_held``: at most what its publishers had queued and in their
  pipes when they learned (docs/guarantees.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..wire.protocol import OUTCOME_DEAD, OUTCOME_OK, OUTCOME_REJECTED, Ack, Deliver, pack_sizes
from .dead_letters import DeadEntry, DeadLetters
from .runs import InFlight, Run, overlapping

__all__ = ["ConsumerKey", "Delivery", "QueueBook", "QueueConsumer", "QueueGroup", "Run"]

ConsumerKey = tuple[bytes, bytes]  # (client identity, subscription id)


class JournalHooks(Protocol):
    """What the book tells a journal (server.journal): ids of messages, never their content."""

    full: bool

    def enqueued(
        self, topic: bytes, groups: Sequence[tuple[str, int]], meta: bytes, sizes: Any, data: Any
    ) -> None: ...

    def delivered(self, first_id: int, count: int, attempt: int) -> None: ...

    def settled(self, first_id: int, count: int) -> None: ...

    def dropped(self, topic: bytes, name: str) -> None: ...

    def dead(self, topic: bytes, name: str, entry: DeadEntry) -> None: ...

    def rewrite(self) -> None: ...

    def write(self) -> bool: ...


@dataclass(eq=False)
class QueueConsumer:
    key: ConsumerKey
    prefetch: int
    stream: bytes  # its delivery stream (unique per hub and per coming of the consumer)
    next_seq: int = 1
    # Runs delivered and not settled, by first sequence number (ascending: insertion order).
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    unacked: int = 0  # messages in flight
    cancelled: bool = False  # takes nothing new; leaves once its deliveries are settled

    @property
    def credit(self) -> int:
        return self.prefetch - self.unacked


@dataclass(frozen=True)
class Delivery:
    """A run handed to one consumer; the control plane sends it in a DELIVER request."""

    consumer: QueueConsumer
    run: Run
    first_seq: int
    topic: bytes
    id_prefix: bytes

    @property
    def identity(self) -> bytes:
        return self.consumer.key[0]

    @property
    def subscription_id(self) -> bytes:
        return self.consumer.key[1]

    @property
    def stream(self) -> bytes:
        return self.consumer.stream

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.run.count - 1

    def wire(self) -> Deliver:
        run = self.run
        return Deliver(
            self.subscription_id,
            self.consumer.stream,
            self.first_seq,
            run.attempt,
            self.id_prefix,
            run.first_id,
            self.topic,
            run.meta,
            run.sizes,
            run.payloads,
        )


@dataclass(frozen=True)
class DeadRecord:
    message_id: str
    attempts: int
    error: str


class QueueGroup:
    """One ``queue_name`` on one topic."""

    def __init__(
        self, name: str, topic: bytes, max_held: int, max_dead: int, max_dead_bytes: int
    ) -> None:
        self.name = name
        self.topic = topic
        self.max_held = max_held
        self.pending: deque[Run] = deque()
        self.pending_messages = 0
        self.delayed: list[tuple[float, int, Run]] = []  # retries waiting for backoff
        self.delayed_messages = 0
        self.consumers: dict[ConsumerKey, QueueConsumer] = {}
        self.cursor = 0
        self.dead = DeadLetters(max_dead, max_dead_bytes)  # with their payloads, bounded
        self.counts = {
            "published": 0,
            "delivered": 0,
            "acked": 0,
            "redelivered": 0,
            "retried": 0,
            "dead_lettered": 0,
            "rejected_dropped": 0,
        }

    @property
    def held(self) -> int:
        return self.pending_messages + self.delayed_messages

    @property
    def in_flight(self) -> int:
        return sum(consumer.unacked for consumer in self.consumers.values())

    def push(self, run: Run) -> None:
        self.pending.append(run)
        self.pending_messages += run.count

    def push_front(self, runs: list[Run]) -> None:
        """``runs``, in order, before everything held."""
        self.pending.extendleft(reversed(runs))
        self.pending_messages += sum(run.count for run in runs)

    def pop(self) -> Run:
        run = self.pending.popleft()
        self.pending_messages -= run.count
        return run

    def statistics(self) -> dict[str, int]:
        return {
            **self.counts,
            "consumers": len(self.consumers),
            "held": self.held,
            "in_flight": self.in_flight,
            "dead_letters_kept": len(self.dead),
        }


class QueueBook:
    """Every queue group of the hub, and the deliveries in flight."""

    def __init__(
        self,
        hub_id: bytes,
        *,
        max_held: int = 100_000,
        max_dead: int = 1000,
        max_dead_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._hub_id = hub_id
        self._max_held = max_held
        # A full topic opens again at this many held (hysteresis: not one announcement to every
        # client per message acked at the limit).
        self._low_water = max_held // 2
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
            if most >= self._max_held or (topic in self.full_topics and most > self._low_water):
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
        self, topic: bytes, meta: bytes, sizes: bytes, payloads: bytes | memoryview
    ) -> None:
        """A split batch as it came (``wire.check_split`` passed) for every group of ``topic``:
        kept whole, it is cut only where a consumer's credit or share needs it."""
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
            group.push(Run(meta, sizes_view, payloads_view, self._next_id, count))
            first_ids.append((group.name, self._next_id))
            self._next_id += count
            group.counts["published"] += count
        if self.journal is not None:
            self.journal.enqueued(topic, first_ids, meta, sizes, payloads)

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

    def settle(self, ack: Ack, now: float) -> None:
        """Apply a consumer's answer for a range of its deliveries."""
        if not ack.stream.startswith(self._stream_prefix):
            # Handed out by a previous hub at this address: what it settled is gone with it.
            self.stale_acks += ack.count
            return
        found = self._streams.get(ack.stream)
        if found is None:
            # Its consumer was declared gone and its deliveries given to others (or a forged
            # stream): ignored, never counted twice.
            self.late_acks += ack.count
            return
        group, consumer = found
        settled = 0
        for entry in overlapping(consumer.in_flight, ack.first, ack.last):
            low = max(ack.first, entry.first_seq) - entry.first_seq
            high = min(ack.last, entry.last_seq) - entry.first_seq + 1
            count, parts = entry.settle(low, high, ack.outcome != OUTCOME_OK)
            if not count:
                continue
            if self.journal is not None and ack.outcome in (OUTCOME_OK, OUTCOME_DEAD):
                self.journal.settled(entry.run.first_id + low, high - low)
            settled += count
            if not entry.left:
                del consumer.in_flight[entry.first_seq]
            self._apply(group, consumer, ack, parts, count, now)
        consumer.unacked -= settled
        self.in_flight -= settled
        self.late_acks += ack.count - settled
        if consumer.cancelled and not consumer.in_flight:
            del group.consumers[consumer.key]
            del self._streams[consumer.stream]

    def _apply(
        self,
        group: QueueGroup,
        consumer: QueueConsumer,
        ack: Ack,
        parts: list[Run],
        count: int,
        now: float,
    ) -> None:
        outcome = ack.outcome
        if outcome == OUTCOME_OK:
            group.counts["acked"] += count
        elif outcome == OUTCOME_REJECTED:
            for part in parts:
                part.attempt -= 1  # a rejection is not an attempt
                part.rejected_by = {*(part.rejected_by or ()), consumer.key}
            group.push_front(parts)
        elif outcome == OUTCOME_DEAD:
            group.counts["dead_lettered"] += count
            for part in parts:
                # Copies (payload_list): a view would keep the whole batch alive.
                for index, payload in enumerate(part.payload_list()):
                    message_id = f"{self._hub_id.decode()}-{part.first_id + index}"
                    entry = group.dead.add(message_id, part.attempt, ack.error, part.meta, payload)
                    if self.journal is not None and entry is not None:
                        self.journal.dead(group.topic, group.name, entry)
        else:  # failed: retried after the delay the consumer decided (bounded by the wire)
            group.counts["retried"] += count
            for part in parts:
                heapq.heappush(group.delayed, (now + ack.retry_delay, next(self._sequence), part))
                group.delayed_messages += part.count

    def unsend(self, delivery: Delivery) -> None:
        """A delivery could not be sent after all: back to the front, not an attempt."""
        consumer = delivery.consumer
        entry = consumer.in_flight.get(delivery.first_seq)
        found = self._streams.get(consumer.stream)
        if entry is None or entry.run is not delivery.run or found is None:
            return
        del consumer.in_flight[delivery.first_seq]
        group = found[0]
        run = delivery.run
        run.attempt -= 1
        group.counts["delivered"] -= run.count
        consumer.unacked -= run.count
        self.in_flight -= run.count
        group.push_front([run])

    def next_due(self) -> float | None:
        """When the earliest delayed retry becomes due (for the relay's poll timeout)."""
        due = [group.delayed[0][0] for group in self._groups.values() if group.delayed]
        return min(due) if due else None

    def dispatch(self, now: float) -> list[Delivery]:
        """Hand what is deliverable to consumers with credit (round-robin, fair shares)."""
        deliveries: list[Delivery] = []
        for group in self._groups.values():
            while group.delayed and group.delayed[0][0] <= now:
                run = heapq.heappop(group.delayed)[2]
                group.delayed_messages -= run.count
                group.push_front([run])
            if group.pending and group.consumers:
                self._dispatch_group(group, deliveries)
        return deliveries

    def _dispatch_group(self, group: QueueGroup, deliveries: list[Delivery]) -> None:
        # Python runs here once per run: the consumer list is built once per turn.
        consumers = [c for c in group.consumers.values() if not c.cancelled]
        with_credit = sum(1 for c in consumers if c.credit > 0)
        if not with_credit:
            return
        # At most a fair share each: 30 messages published at once reach all of 3 consumers.
        share = -(-group.pending_messages // with_credit)
        while group.pending and consumers:
            run = group.pending[0]
            rejected_by = run.rejected_by
            if rejected_by and all(c.key in rejected_by for c in consumers):
                group.pop()
                group.counts["rejected_dropped"] += run.count
                if self.journal is not None:
                    self.journal.settled(run.first_id, run.count)
                continue
            consumer = self._next_with_credit(group, consumers, rejected_by)
            if consumer is None:
                break  # every willing consumer is at its prefetch limit
            take = min(consumer.credit, share)
            if take < run.count:
                run = run.split_off(take)  # the rest stays first in line
                group.pending_messages -= take
            else:
                group.pop()
            run.attempt += 1
            if self.journal is not None:
                self.journal.delivered(run.first_id, run.count, run.attempt)
            seq = consumer.next_seq
            consumer.next_seq += run.count
            consumer.in_flight[seq] = InFlight(run, seq)
            consumer.unacked += run.count
            self.in_flight += run.count
            group.counts["delivered"] += run.count
            deliveries.append(Delivery(consumer, run, seq, group.topic, self._hub_id))

    @staticmethod
    def _next_with_credit(
        group: QueueGroup, consumers: list[QueueConsumer], rejected_by: set[ConsumerKey] | None
    ) -> QueueConsumer | None:
        count = len(consumers)
        for step in range(count):
            index = (group.cursor + step) % count
            consumer = consumers[index]
            if consumer.unacked >= consumer.prefetch or (
                rejected_by and consumer.key in rejected_by
            ):
                continue
            group.cursor = index + 1
            return consumer
        return None

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
