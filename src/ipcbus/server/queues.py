"""Queue groups inside the hub: held messages, fair dispatch, acks, redelivery, dead letters.

Pure bookkeeping, no sockets: the relay feeds it messages and acks and sends the deliveries it
returns, so every rule here is testable without a process. Payloads stay opaque bytes.

Rules (docs/guarantees.md, "Queue groups"):
- each message of a topic goes to one consumer of every group subscribed to that topic;
- a consumer holds at most ``prefetch`` unacknowledged deliveries (fair dispatch, round-robin);
- an ack settles a delivery; an ack for a delivery the hub no longer has (it was redelivered after
  its consumer was declared gone) is ignored and counted (``late_acks``);
- delivery ids start with the hub's random id, so they are unique across hubs: an ack for a
  delivery of a previous hub at the same address (its consumer held it through a restart) can
  never settle one of this hub's; it is ignored and counted (``stale_acks``);
- a consumer that leaves (cancel, disconnect, missed heartbeats) gives its deliveries back, to be
  redelivered with ``attempt + 1``;
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
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..wire.protocol import OUTCOME_DEAD, OUTCOME_OK, OUTCOME_REJECTED, Ack, Deliver

__all__ = ["ConsumerKey", "Delivery", "QueueBook", "QueueGroup", "QueueItem"]

ConsumerKey = tuple[bytes, bytes]  # (client identity, subscription id)


@dataclass(eq=False)
class QueueItem:
    message_id: bytes
    meta: bytes
    payload: bytes
    attempt: int = 0  # deliveries so far
    rejected_by: set[ConsumerKey] = field(default_factory=set)


@dataclass(frozen=True)
class Delivery:
    """One message handed to one consumer; the control plane sends it in a DELIVER request."""

    identity: bytes
    subscription_id: bytes
    delivery_id: bytes
    item: QueueItem
    topic: bytes

    def wire(self) -> Deliver:
        item = self.item
        return Deliver(
            self.subscription_id,
            self.delivery_id,
            item.message_id,
            item.attempt,
            self.topic,
            item.meta,
            item.payload,
        )


@dataclass(eq=False)
class QueueConsumer:
    key: ConsumerKey
    prefetch: int
    in_flight: dict[bytes, QueueItem] = field(default_factory=dict)
    cancelled: bool = False  # takes nothing new; leaves once its deliveries are settled


@dataclass(frozen=True)
class DeadRecord:
    message_id: str
    attempts: int
    error: str


class QueueGroup:
    """One ``queue_name`` on one topic."""

    def __init__(self, name: str, topic: bytes, max_held: int, max_dead: int) -> None:
        self.name = name
        self.topic = topic
        self.max_held = max_held
        self.pending: deque[QueueItem] = deque()
        self.delayed: list[tuple[float, int, QueueItem]] = []  # retries waiting for backoff
        self.consumers: dict[ConsumerKey, QueueConsumer] = {}
        self.cursor = 0
        self.dead: deque[DeadRecord] = deque(maxlen=max_dead)
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
        return len(self.pending) + len(self.delayed)

    @property
    def in_flight(self) -> int:
        return sum(len(consumer.in_flight) for consumer in self.consumers.values())

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

    def __init__(self, hub_id: bytes, *, max_held: int = 100_000, max_dead: int = 1000) -> None:
        self._max_held = max_held
        # A full topic opens again at this many held (hysteresis: not one announcement to every
        # client per message acked at the limit).
        self._low_water = max_held // 2
        self._max_dead = max_dead
        self._groups: dict[tuple[bytes, str], QueueGroup] = {}
        self._by_topic: dict[bytes, list[QueueGroup]] = {}
        self._deliveries: dict[bytes, tuple[QueueGroup, ConsumerKey]] = {}
        self._message_ids = (b"%s-%d" % (hub_id, n) for n in itertools.count(1))
        # Unique across hubs: before, every hub counted from 1, and a consumer that finished an
        # old hub's delivery 1 settled the new hub's delivery 1, held by another consumer.
        self._delivery_prefix = hub_id + b"."
        self._delivery_ids = (b"%s%d" % (self._delivery_prefix, n) for n in itertools.count(1))
        self._sequence = itertools.count()
        self.late_acks = 0  # acks for this hub's deliveries it no longer has
        self.stale_acks = 0  # acks for deliveries of another hub (before a restart)
        self.deleted_dropped = 0  # held messages dropped with their deleted group
        self.full_topics: frozenset[bytes] = frozenset()

    # -- membership -------------------------------------------------------------------------

    @property
    def grouped_topics(self) -> list[bytes]:
        return list(self._by_topic)

    def groups(self) -> Iterator[QueueGroup]:
        return iter(self._groups.values())

    def has_group(self, topic: bytes, name: str) -> bool:
        return (topic, name) in self._groups

    def declare(self, topic: bytes, name: str) -> QueueGroup:
        """The group, created (without consumers: it holds messages) if it is new."""
        group = self._groups.get((topic, name))
        if group is None:
            group = QueueGroup(name, topic, self._max_held, self._max_dead)
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
            group.consumers[key] = QueueConsumer(key, max(1, prefetch))
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
        """The consumer cancelled or its process is gone: its deliveries go back, first."""
        for group in self._groups.values():
            consumer = group.consumers.pop(key, None)
            if consumer is None:
                continue
            for delivery_id, item in reversed(list(consumer.in_flight.items())):
                del self._deliveries[delivery_id]
                group.pending.appendleft(item)
                group.counts["redelivered"] += 1
            for other in group.pending:
                other.rejected_by.discard(key)

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
        return group.held

    def enqueue(self, topic: bytes, meta: bytes, payloads: list[bytes]) -> None:
        for group in self._by_topic.get(topic, ()):
            for payload in payloads:
                group.pending.append(QueueItem(next(self._message_ids), meta, payload))
            group.counts["published"] += len(payloads)

    def settle(self, ack: Ack, now: float) -> None:
        """Apply a consumer's answer for one delivery."""
        delivery_id, outcome = ack.delivery_id, ack.outcome
        if not delivery_id.startswith(self._delivery_prefix):
            # Handed out by a previous hub at this address: what it settled is gone with it.
            self.stale_acks += 1
            return
        found = self._deliveries.pop(delivery_id, None)
        if found is None:
            # Redelivered elsewhere after its consumer was declared gone (or a forged id):
            # ignored, never counted twice.
            self.late_acks += 1
            return
        group, key = found
        consumer = group.consumers[key]
        item = consumer.in_flight.pop(delivery_id)
        if consumer.cancelled and not consumer.in_flight:
            del group.consumers[key]
        if outcome == OUTCOME_OK:
            group.counts["acked"] += 1
        elif outcome == OUTCOME_REJECTED:
            item.attempt -= 1  # a rejection is not an attempt
            item.rejected_by.add(key)
            group.pending.appendleft(item)
        elif outcome == OUTCOME_DEAD:
            group.counts["dead_lettered"] += 1
            group.dead.append(DeadRecord(item.message_id.decode(), item.attempt, ack.error))
        else:  # failed: retried after the delay the consumer decided (bounded by the wire)
            group.counts["retried"] += 1
            heapq.heappush(group.delayed, (now + ack.retry_delay, next(self._sequence), item))

    def unsend(self, delivery_id: bytes) -> None:
        """A delivery could not be sent after all: back to the front, not an attempt."""
        found = self._deliveries.pop(delivery_id, None)
        if found is None:
            return
        group, key = found
        item = group.consumers[key].in_flight.pop(delivery_id)
        item.attempt -= 1
        group.counts["delivered"] -= 1
        group.pending.appendleft(item)

    def next_due(self) -> float | None:
        """When the earliest delayed retry becomes due (for the relay's poll timeout)."""
        due = [group.delayed[0][0] for group in self._groups.values() if group.delayed]
        return min(due) if due else None

    def dispatch(self, now: float) -> list[Delivery]:
        """Hand every deliverable message to a consumer with credit (round-robin)."""
        deliveries: list[Delivery] = []
        for group in self._groups.values():
            while group.delayed and group.delayed[0][0] <= now:
                group.pending.appendleft(heapq.heappop(group.delayed)[2])
            # Python runs here once per message: the consumer list is built once per turn.
            consumers = [c for c in group.consumers.values() if not c.cancelled]
            while group.pending and consumers:
                item = group.pending[0]
                if item.rejected_by and all(c.key in item.rejected_by for c in consumers):
                    group.pending.popleft()
                    group.counts["rejected_dropped"] += 1
                    continue
                consumer = self._next_with_credit(group, consumers, item)
                if consumer is None:
                    break  # every willing consumer is at its prefetch limit
                group.pending.popleft()
                item.attempt += 1
                delivery_id = next(self._delivery_ids)
                consumer.in_flight[delivery_id] = item
                self._deliveries[delivery_id] = (group, consumer.key)
                group.counts["delivered"] += 1
                identity, subscription_id = consumer.key
                deliveries.append(
                    Delivery(identity, subscription_id, delivery_id, item, group.topic)
                )
        return deliveries

    @staticmethod
    def _next_with_credit(
        group: QueueGroup, consumers: list[QueueConsumer], item: QueueItem
    ) -> QueueConsumer | None:
        count = len(consumers)
        for step in range(count):
            index = (group.cursor + step) % count
            consumer = consumers[index]
            if consumer.key in item.rejected_by or len(consumer.in_flight) >= consumer.prefetch:
                continue
            group.cursor = index + 1
            return consumer
        return None

    @property
    def in_flight(self) -> int:
        return len(self._deliveries)

    def statistics(self) -> dict[str, dict[str, int]]:
        return {
            f"{group.topic[:-1].decode()}/{group.name}": group.statistics()
            for group in self._groups.values()
        }

    def dead_letters(self) -> dict[str, list[DeadRecord]]:
        return {
            f"{group.topic[:-1].decode()}/{group.name}": list(group.dead)
            for group in self._groups.values()
        }
