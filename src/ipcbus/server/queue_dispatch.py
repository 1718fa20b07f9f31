"""The queue book's traffic: dispatch to consumers with credit (round-robin, fair shares),
settling their acks, retries after a failure, deliveries that could not be sent. The rules are
in :mod:`ipcbus.server.queues`; ``QueueBook`` there owns the state below."""

from __future__ import annotations

from collections.abc import Iterator

from ..wire.protocol import OUTCOME_DEAD, OUTCOME_OK, OUTCOME_REJECTED, Ack
from .journal_hooks import JournalHooks
from .queue_group import ConsumerKey, Delivery, QueueConsumer, QueueGroup
from .runs import InFlight, Run, overlapping

__all__ = ["QueueDispatch"]


class QueueDispatch:
    """Dispatch and ack settlement of :class:`~ipcbus.server.queues.QueueBook`."""

    hub_id: bytes
    _groups: dict[tuple[bytes, str], QueueGroup]
    _streams: dict[bytes, tuple[QueueGroup, QueueConsumer]]  # consumers by delivery stream
    _stream_prefix: bytes
    _sequence: Iterator[int]  # orders retries due at the same time
    in_flight: int
    late_acks: int
    stale_acks: int
    journal: JournalHooks | None

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
                    message_id = f"{self.hub_id.decode()}-{part.first_id + index}"
                    entry = group.dead.add(message_id, part.attempt, ack.error, part.meta, payload)
                    if self.journal is not None and entry is not None:
                        self.journal.dead(group.topic, group.name, entry)
        else:  # failed: retried after the delay the consumer decided (bounded by the wire)
            group.counts["retried"] += count
            for part in parts:
                group.delay(now + ack.retry_delay, next(self._sequence), part)

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
                run = group.undelay()
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
                run = group.take_front(take)  # the rest stays first in line
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
            deliveries.append(Delivery(consumer, run, seq, group.topic, self.hub_id))

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
