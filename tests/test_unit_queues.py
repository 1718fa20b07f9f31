"""Unit tests of the hub's queue book (ipcbus.server.queues): pure bookkeeping, time passed in.

The book hands out runs (consecutive messages of one batch) and settles ranges of a consumer's
delivery stream; ``Msg`` is one message of a delivered run as its consumer sees it, so that the
rules are checked message by message.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from ipcbus.server.queues import Delivery, QueueBook, QueueGroup
from ipcbus.wire.protocol import (
    OUTCOME_DEAD,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    Ack,
    Deliver,
    pack_sizes,
)

TOPIC = b"app.Order\x00"
OTHER_TOPIC = b"app.Invoice\x00"
A = (b"client-a", b"sub-a")
B = (b"client-b", b"sub-b")
C = (b"client-c", b"sub-c")


@dataclass(frozen=True)
class Msg:
    """One message of a delivered run, as delivered (its attempt then)."""

    delivery: Delivery
    index: int
    payload: bytes
    attempt: int
    message_id: str

    @property
    def key(self) -> tuple[bytes, bytes]:
        return (self.delivery.identity, self.delivery.subscription_id)

    @property
    def seq(self) -> int:
        return self.delivery.first_seq + self.index


def messages(deliveries: list[Delivery]) -> list[Msg]:
    found = []
    for delivery in deliveries:
        run = delivery.run
        prefix = delivery.id_prefix.decode()
        for index, payload in enumerate(run.payload_list()):
            message_id = f"{prefix}-{run.first_id + index}"
            found.append(Msg(delivery, index, payload, run.attempt, message_id))
    return found


def dispatch(book: QueueBook, now: float) -> list[Msg]:
    return messages(book.dispatch(now))


def answer(msg: Msg, outcome: bytes, delay: float = 0.0, error: str = "") -> Ack:
    return Ack(msg.delivery.stream, msg.seq, msg.seq, outcome, delay, error)


def ok(msg: Msg) -> Ack:
    return answer(msg, OUTCOME_OK)


def failed(msg: Msg, delay: float) -> Ack:
    return answer(msg, OUTCOME_FAILED, delay, "boom")


def rejected(msg: Msg) -> Ack:
    return answer(msg, OUTCOME_REJECTED)


def dead(msg: Msg, error: str = "ValueError: bad") -> Ack:
    return answer(msg, OUTCOME_DEAD, error=error)


def ok_run(delivery: Delivery) -> Ack:
    return Ack(delivery.stream, delivery.first_seq, delivery.last_seq, OUTCOME_OK)


def payloads(msgs: list[Msg]) -> list[bytes]:
    return [msg.payload for msg in msgs]


def held(group: QueueGroup) -> list[tuple[bytes, int]]:
    """What the group holds, in order: (payload, attempt) per message."""
    return [(payload, run.attempt) for run in group.pending for payload in run.payload_list()]


def book_with(
    *keys: tuple[bytes, bytes], prefetch: int = 10, **kwargs: int
) -> tuple[QueueBook, QueueGroup]:
    book = QueueBook(b"hub", **kwargs)
    group = book.declare(TOPIC, "workers")
    for key in keys:
        book.add_consumer(TOPIC, "workers", key, prefetch=prefetch)
    return book, group


# -- declare and membership -------------------------------------------------------------------


def test_declare_is_idempotent_and_indexes_the_topic() -> None:
    book = QueueBook(b"hub")
    assert not book.has_groups(TOPIC)
    group = book.declare(TOPIC, "workers")
    assert book.declare(TOPIC, "workers") is group
    assert book.has_group(TOPIC, "workers")
    assert not book.has_group(TOPIC, "others")
    assert book.has_groups(TOPIC)
    assert book.grouped_topics == [TOPIC]
    assert list(book.groups()) == [group]
    assert (group.name, group.topic, group.consumers) == ("workers", TOPIC, {})


def test_add_consumer_declares_the_group_and_renews_a_known_consumer() -> None:
    book = QueueBook(b"hub")
    group = book.add_consumer(TOPIC, "workers", A, prefetch=0)
    assert book.has_group(TOPIC, "workers")
    assert group.consumers[A].prefetch == 1  # at least one
    book.enqueue(TOPIC, b"m", [b"p1"])
    (first,) = dispatch(book, now=0.0)
    book.cancel_consumer(A)  # it holds one delivery: it stays, cancelled
    assert group.consumers[A].cancelled
    stream = group.consumers[A].stream
    again = book.add_consumer(TOPIC, "workers", A, prefetch=5)
    assert again is group
    consumer = group.consumers[A]
    assert (consumer.prefetch, consumer.cancelled) == (5, False)
    assert list(consumer.in_flight) == [first.seq]  # what it held is kept
    assert consumer.stream == stream  # and its acks still settle it
    book.settle(ok(first), now=0.0)
    assert group.counts["acked"] == 1


def test_each_group_of_a_topic_gets_every_message() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "one", A, prefetch=10)
    book.add_consumer(TOPIC, "two", B, prefetch=10)
    book.add_consumer(OTHER_TOPIC, "three", C, prefetch=10)
    book.enqueue(TOPIC, b"meta", [b"p1", b"p2"])
    delivered = dispatch(book, now=0.0)
    by_consumer: dict[tuple[bytes, bytes], list[bytes]] = {}
    for msg in delivered:
        by_consumer.setdefault(msg.key, []).append(msg.payload)
    assert by_consumer == {A: [b"p1", b"p2"], B: [b"p1", b"p2"]}
    # each group has its own copy: distinct message ids
    ids = {msg.message_id for msg in delivered}
    assert len(ids) == 4


def test_enqueue_for_a_topic_without_groups_is_dropped() -> None:
    book, group = book_with(A)
    book.enqueue(OTHER_TOPIC, b"m", [b"p"])
    assert book.dispatch(now=0.0) == []
    assert group.counts["published"] == 0


def test_an_empty_batch_is_nothing_to_hold() -> None:
    book, group = book_with(A)
    book.enqueue_batch(TOPIC, b"m", b"", b"")
    assert group.held == 0
    assert book.dispatch(now=0.0) == []


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatch_builds_runs_with_ids_attempt_and_wire_form() -> None:
    book, _group = book_with(A)
    book.enqueue(TOPIC, b"meta-1", [b"p1", b"p22"])
    (delivery,) = book.dispatch(now=0.0)  # one batch, one consumer: one run
    first, second = messages([delivery])
    assert (delivery.identity, delivery.subscription_id, delivery.topic) == (*A, TOPIC)
    assert first.message_id == "hub-1"
    assert second.message_id == "hub-2"
    assert second.seq == first.seq + 1
    assert first.attempt == second.attempt == 1
    assert delivery.stream.startswith(b"hub.")
    assert delivery.wire() == Deliver(
        b"sub-a",
        delivery.stream,
        first.seq,
        1,
        b"hub",
        1,
        TOPIC,
        b"meta-1",
        pack_sizes([2, 3]),
        b"p1p22",
    )
    assert book.in_flight == 2
    assert book.dispatch(now=0.0) == []  # nothing twice


def test_each_consumer_has_a_stream_of_its_own_unique_across_comings() -> None:
    book, group = book_with(A, B)
    streams = {group.consumers[A].stream, group.consumers[B].stream}
    book.remove_consumer(A)
    book.add_consumer(TOPIC, "workers", A, prefetch=10)
    streams.add(group.consumers[A].stream)
    assert len(streams) == 3


def test_dispatch_is_round_robin_in_fair_shares() -> None:
    book, _group = book_with(A, B, C)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(7)])
    deliveries = book.dispatch(now=0.0)
    # one batch cut into each consumer's share (7 held, 3 consumers: 3 each at most), in turn
    assert [(d.identity, d.subscription_id) for d in deliveries] == [A, B, C]
    assert [d.run.count for d in deliveries] == [3, 3, 1]
    assert payloads(messages(deliveries)) == [b"p%d" % n for n in range(7)]
    # the turn carries over to the next dispatch
    book.enqueue(TOPIC, b"m", [b"q"])
    (next_one,) = dispatch(book, now=0.0)
    assert next_one.key == A
    book.enqueue(TOPIC, b"m", [b"r"])
    (after,) = dispatch(book, now=0.0)
    assert after.key == B


def test_a_batch_goes_whole_to_a_lone_consumer_with_credit() -> None:
    book, group = book_with(A, prefetch=1000)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(500)])
    (delivery,) = book.dispatch(now=0.0)
    assert delivery.run.count == 500
    book.settle(ok_run(delivery), now=0.0)
    assert group.counts["acked"] == 500
    assert book.in_flight == 0


def test_prefetch_bounds_the_deliveries_a_consumer_holds() -> None:
    book, group = book_with(A, B, prefetch=2)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(6)])
    delivered = dispatch(book, now=0.0)
    assert len(delivered) == 4
    assert sum(1 for msg in delivered if msg.key == A) == 2
    assert group.held == 2
    assert book.dispatch(now=0.0) == []  # no credit left
    book.settle(ok(delivered[0]), now=0.0)
    (more,) = dispatch(book, now=0.0)  # one credit back, one delivery
    assert more.payload == b"p4"
    assert more.key == delivered[0].key
    assert group.held == 1


def test_a_fast_consumer_gets_more_than_a_slow_one() -> None:
    book, _group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(6)])
    got: dict[tuple[bytes, bytes], int] = {A: 0, B: 0}
    for first in dispatch(book, now=0.0):
        got[first.key] += 1
        if first.key == A:
            book.settle(ok(first), now=0.0)
    for _ in range(4):  # B never acks; A acks each delivery at once
        for msg in dispatch(book, now=0.0):
            got[msg.key] += 1
            book.settle(ok(msg), now=0.0)
    assert got == {A: 5, B: 1}


def test_messages_are_held_without_consumers() -> None:
    book = QueueBook(b"hub")
    group = book.declare(TOPIC, "workers")
    book.enqueue(TOPIC, b"m", [b"p1", b"p2"])
    assert book.dispatch(now=0.0) == []
    assert group.held == 2
    book.add_consumer(TOPIC, "workers", A, prefetch=10)
    assert payloads(dispatch(book, now=0.0)) == [b"p1", b"p2"]
    assert group.held == 0


# -- settle: ok, failed, rejected, dead -------------------------------------------------------


def test_ok_settles_the_delivery() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(ok(delivered), now=1.0)
    assert group.counts["acked"] == 1
    assert book.in_flight == 0
    assert group.consumers[A].in_flight == {}
    assert book.dispatch(now=2.0) == []


def test_one_ack_settles_consecutive_runs() -> None:
    """Cumulative: a consumer that finished several runs acks them in one range."""
    book, group = book_with(A, prefetch=100)
    book.enqueue(TOPIC, b"m", [b"a1", b"a2"])
    book.enqueue(TOPIC, b"m", [b"b1"])
    first = book.dispatch(now=0.0)
    book.enqueue(TOPIC, b"m", [b"c1", b"c2", b"c3"])
    second = book.dispatch(now=0.0)
    runs = first + second
    assert [d.run.count for d in runs] == [2, 1, 3]
    book.settle(Ack(runs[0].stream, runs[0].first_seq, runs[-1].last_seq, OUTCOME_OK), now=0.0)
    assert group.counts["acked"] == 6
    assert book.in_flight == 0
    assert group.consumers[A].in_flight == {}
    assert book.late_acks == 0


def test_one_ack_across_a_gap_settles_what_is_in_flight_on_both_sides() -> None:
    book, group = book_with(A, prefetch=100)
    runs = []
    for name in (b"a", b"b", b"c"):
        book.enqueue(TOPIC, b"m", [name + b"1", name + b"2"])
        runs += book.dispatch(now=0.0)
    book.unsend(runs[1])  # its sequence numbers are a gap now
    first, last = runs[0].first_seq, runs[2].last_seq
    book.settle(Ack(runs[0].stream, first, last, OUTCOME_OK), now=0.0)
    assert (group.counts["acked"], book.late_acks) == (4, 2)
    assert held(group) == [(b"b1", 0), (b"b2", 0)]
    assert group.consumers[A].in_flight == {}


def test_a_run_acked_as_it_goes_and_out_of_order_is_settled_once() -> None:
    book, group = book_with(A, prefetch=100)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(10)])
    (delivery,) = book.dispatch(now=0.0)
    stream, first = delivery.stream, delivery.first_seq
    book.settle(Ack(stream, first, first + 2, OUTCOME_OK), now=0.0)  # in order: 0-2
    book.settle(Ack(stream, first + 3, first + 4, OUTCOME_OK), now=0.0)  # 3-4
    assert (group.counts["acked"], book.in_flight) == (5, 5)
    book.settle(Ack(stream, first + 7, first + 9, OUTCOME_OK), now=0.0)  # out of order: 7-9
    book.settle(Ack(stream, first + 6, first + 7, OUTCOME_OK), now=0.0)  # 6, and 7 again
    assert (group.counts["acked"], book.in_flight, book.late_acks) == (9, 1, 1)
    book.remove_consumer(A)  # only message 5 was not settled: it alone goes back
    assert held(group) == [(b"p5", 1)]
    assert group.counts["redelivered"] == 1


def test_a_failure_in_a_run_retries_that_message_alone() -> None:
    book, group = book_with(A, prefetch=100)
    book.enqueue(TOPIC, b"m", [b"p0", b"p1", b"p2", b"p3"])
    (delivery,) = book.dispatch(now=0.0)
    p0, p1, p2, p3 = messages([delivery])
    book.settle(Ack(delivery.stream, p0.seq, p0.seq, OUTCOME_OK), now=0.0)
    book.settle(failed(p1, 1.0), now=0.0)
    book.settle(Ack(delivery.stream, p2.seq, p3.seq, OUTCOME_OK), now=0.0)
    assert (group.counts["acked"], group.counts["retried"], book.in_flight) == (3, 1, 0)
    (retry,) = dispatch(book, now=1.0)
    assert (retry.payload, retry.message_id, retry.attempt) == (b"p1", p1.message_id, 2)


def test_failed_is_retried_only_after_its_delay() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivered,) = dispatch(book, now=10.0)
    assert book.next_due() is None
    book.settle(failed(delivered, 2.5), now=10.0)
    assert group.counts["retried"] == 1
    assert book.next_due() == 12.5
    assert group.held == 1
    assert book.in_flight == 0
    assert book.dispatch(now=12.4) == []
    (retry,) = dispatch(book, now=12.5)
    assert (retry.payload, retry.message_id) == (delivered.payload, delivered.message_id)
    assert retry.attempt == 2
    assert retry.seq != delivered.seq
    assert book.next_due() is None


def test_next_due_is_the_earliest_of_every_group() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "one", A, prefetch=10)
    book.add_consumer(OTHER_TOPIC, "two", B, prefetch=10)
    book.enqueue(TOPIC, b"m", [b"p1"])
    book.enqueue(OTHER_TOPIC, b"m", [b"p2"])
    first, second = dispatch(book, now=0.0)
    book.settle(failed(first, 5.0), now=0.0)
    book.settle(failed(second, 3.0), now=0.0)
    assert book.next_due() == 3.0
    (due,) = dispatch(book, now=3.0)
    assert due.payload == second.payload
    assert book.next_due() == 5.0


def test_a_due_retry_goes_before_new_messages() -> None:
    book, _group = book_with(A, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"first"])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(failed(delivered, 1.0), now=0.0)
    book.enqueue(TOPIC, b"m", [b"second"])
    (early,) = dispatch(book, now=0.5)  # the retry is not due yet: the new message goes
    assert early.payload == b"second"
    book.settle(ok(early), now=0.5)
    book.enqueue(TOPIC, b"m", [b"third"])
    (due,) = dispatch(book, now=1.0)
    assert due.payload == b"first"
    assert due.attempt == 2


def test_rejected_is_offered_to_another_consumer_and_is_not_an_attempt() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (first,) = dispatch(book, now=0.0)
    assert first.key == A
    book.settle(rejected(first), now=0.0)
    assert group.held == 1
    (second,) = dispatch(book, now=0.0)
    assert second.key == B
    assert second.message_id == first.message_id
    assert second.attempt == 1
    assert group.counts["rejected_dropped"] == 0


def test_rejected_by_every_present_consumer_is_dropped_and_counted() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p", b"q"])
    first_p, first_q = dispatch(book, now=0.0)
    assert (first_p.key, first_q.key) == (A, B)
    book.settle(rejected(first_p), now=0.0)  # A rejects p
    book.settle(ok(first_q), now=0.0)
    (second_p,) = dispatch(book, now=0.0)
    assert second_p.key == B
    book.settle(rejected(second_p), now=0.0)  # B rejects p too
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 1
    assert group.held == 0
    book.add_consumer(TOPIC, "workers", C, prefetch=10)
    assert book.dispatch(now=0.0) == []  # gone for good


def test_a_rejected_message_waits_for_credit_of_a_consumer_that_did_not_reject() -> None:
    book, group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p", b"q"])
    to_a, to_b = dispatch(book, now=0.0)
    book.settle(rejected(to_a), now=0.0)  # A has credit again, but rejected p; B is busy
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 0
    book.settle(ok(to_b), now=0.0)
    (again,) = dispatch(book, now=0.0)
    assert (again.key, again.payload) == (B, b"p")


def test_a_rejected_message_of_a_run_goes_back_alone() -> None:
    book, group = book_with(A, prefetch=10)
    book.enqueue(TOPIC, b"m", [b"p0", b"p1", b"p2"])
    p0, p1, p2 = dispatch(book, now=0.0)
    for msg, answer_of in ((p0, ok), (p1, rejected), (p2, ok)):
        book.settle(answer_of(msg), now=0.0)
    assert held(group) == [(b"p1", 0)]
    book.add_consumer(TOPIC, "workers", B, prefetch=10)
    (again,) = dispatch(book, now=0.0)
    assert (again.key, again.payload, again.attempt) == (B, b"p1", 1)


def test_dropped_once_only_consumers_that_rejected_are_left() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = dispatch(book, now=0.0)
    book.settle(rejected(to_a), now=0.0)
    book.remove_consumer(B)  # only A, which rejected, is left: dropped
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 1


def test_a_consumer_that_rejected_then_rejoined_is_offered_the_message_again() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = dispatch(book, now=0.0)
    book.settle(rejected(to_a), now=0.0)
    book.remove_consumer(B)
    book.remove_consumer(A)  # A leaves: its rejection is forgotten
    book.add_consumer(TOPIC, "workers", A, prefetch=1)
    (again,) = dispatch(book, now=0.0)
    assert (again.key, again.payload) == (A, b"p")
    assert group.counts["rejected_dropped"] == 0


def test_dead_keeps_a_record() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(dead(delivered, "ValueError: poison"), now=0.0)
    assert group.counts["dead_lettered"] == 1
    assert group.held == 0
    assert book.in_flight == 0
    (record,) = book.dead_letters()["app.Order/workers"]
    assert (record.message_id, record.attempts, record.error) == ("hub-1", 1, "ValueError: poison")
    assert book.dispatch(now=100.0) == []


def test_dead_records_are_bounded_by_max_dead() -> None:
    book, group = book_with(A, max_dead=3)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(5)])
    for msg in dispatch(book, now=0.0):
        book.settle(dead(msg, f"E{msg.payload.decode()}"), now=0.0)
    records = book.dead_letters()["app.Order/workers"]
    assert [record.error for record in records] == ["Ep2", "Ep3", "Ep4"]
    assert group.counts["dead_lettered"] == 5
    assert group.statistics()["dead_letters_kept"] == 3


# -- late and unknown acks --------------------------------------------------------------------


def test_an_unknown_ack_is_counted_and_ignored() -> None:
    """A stream of this hub it no longer has is late; any other stream is stale (another
    hub's). Counted per delivery."""
    book, group = book_with(A)
    book.settle(Ack(b"hub.999", 1, 1, OUTCOME_OK), now=0.0)
    assert (book.late_acks, book.stale_acks) == (1, 0)
    book.settle(Ack(b"no-such-stream", 1, 1, OUTCOME_OK), now=0.0)
    assert (book.late_acks, book.stale_acks) == (1, 1)
    book.settle(Ack(b"other-hub.1", 5, 7, OUTCOME_OK), now=0.0)
    assert (book.late_acks, book.stale_acks) == (1, 4)
    assert group.counts["acked"] == 0


def test_a_second_ack_is_late_and_never_applied_twice() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(ok(delivered), now=0.0)
    book.settle(ok(delivered), now=0.0)
    book.settle(dead(delivered), now=0.0)
    book.settle(failed(delivered, 0.0), now=0.0)
    assert book.late_acks == 3
    assert group.counts["acked"] == 1
    assert group.counts["dead_lettered"] == 0
    assert group.counts["retried"] == 0
    assert group.held == 0


def test_an_ack_beyond_what_was_delivered_is_late() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(Ack(delivered.delivery.stream, delivered.seq, delivered.seq + 4, OUTCOME_OK), 0.0)
    assert (group.counts["acked"], book.late_acks, book.in_flight) == (1, 4, 0)


def test_an_ack_after_redelivery_is_late() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = dispatch(book, now=0.0)
    book.remove_consumer(A)  # declared gone: p goes to B
    (to_b,) = dispatch(book, now=0.0)
    assert to_b.key == B
    book.settle(ok(to_a), now=0.0)  # A was not dead after all
    assert book.late_acks == 1
    assert group.counts["acked"] == 0
    assert book.in_flight == 1
    book.settle(ok(to_b), now=0.0)
    assert group.counts["acked"] == 1
    assert book.in_flight == 0


# -- unsend -----------------------------------------------------------------------------------


def test_unsend_puts_the_delivery_back_first_without_counting_an_attempt() -> None:
    book, group = book_with(A, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p", b"q"])
    (delivery,) = book.dispatch(now=0.0)
    (unsent,) = messages([delivery])
    book.unsend(delivery)
    assert delivery.run.attempt == 0
    assert group.counts["delivered"] == 0
    assert book.in_flight == 0
    assert group.pending[0] is delivery.run
    assert held(group) == [(b"p", 0), (b"q", 0)]
    (again,) = dispatch(book, now=0.0)
    assert (again.payload, again.message_id) == (b"p", unsent.message_id)
    assert again.attempt == 1
    assert group.counts["delivered"] == 1
    book.settle(ok(unsent), now=0.0)  # the unsent sequence number is unknown now
    assert book.late_acks == 1


def test_unsend_of_a_delivery_no_longer_in_flight_does_nothing() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivery,) = book.dispatch(now=0.0)
    book.settle(ok_run(delivery), now=0.0)
    book.unsend(delivery)
    assert group.statistics()["delivered"] == 1
    assert group.held == 0
    assert book.late_acks == 0


# -- consumers leaving ------------------------------------------------------------------------


def test_cancel_without_deliveries_removes_the_consumer_at_once() -> None:
    book, group = book_with(A)
    book.cancel_consumer(A)
    assert A not in group.consumers
    assert book.has_group(TOPIC, "workers")  # the group outlives its consumers


def test_cancel_keeps_in_flight_until_settled_and_takes_nothing_new() -> None:
    book, group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p1", b"p2"])
    to_a, to_b = dispatch(book, now=0.0)
    book.cancel_consumer(A)
    assert group.consumers[A].cancelled
    assert group.counts["redelivered"] == 0
    book.enqueue(TOPIC, b"m", [b"p3"])
    book.settle(ok(to_b), now=0.0)
    (next_one,) = dispatch(book, now=0.0)
    assert next_one.key == B  # never the cancelled A
    book.settle(ok(to_a), now=0.0)  # its last delivery: it leaves
    assert A not in group.consumers
    assert group.counts["acked"] == 2
    assert book.late_acks == 0


def test_a_cancelled_consumer_may_still_reject_its_last_delivery() -> None:
    book, group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = dispatch(book, now=0.0)
    book.cancel_consumer(A)
    book.settle(rejected(to_a), now=0.0)
    assert A not in group.consumers
    (to_b,) = dispatch(book, now=0.0)
    assert (to_b.key, to_b.payload) == (B, b"p")


def test_remove_consumer_gives_deliveries_back_first_in_order_with_attempt_kept() -> None:
    book, group = book_with(A, prefetch=3)
    book.enqueue(TOPIC, b"m", [b"p1", b"p2", b"p3", b"p4"])
    in_hand = dispatch(book, now=0.0)
    assert payloads(in_hand) == [b"p1", b"p2", b"p3"]
    book.remove_consumer(A)
    assert A not in group.consumers
    assert group.counts["redelivered"] == 3
    assert book.in_flight == 0
    assert held(group) == [(b"p1", 1), (b"p2", 1), (b"p3", 1), (b"p4", 0)]
    book.add_consumer(TOPIC, "workers", B, prefetch=10)
    again = dispatch(book, now=0.0)
    assert payloads(again) == [b"p1", b"p2", b"p3", b"p4"]
    assert [msg.attempt for msg in again] == [2, 2, 2, 1]
    for old in in_hand:
        book.settle(ok(old), now=0.0)
    assert book.late_acks == 3


def test_remove_client_removes_each_of_its_consumers() -> None:
    book = QueueBook(b"hub")
    a2 = (A[0], b"sub-a2")
    book.add_consumer(TOPIC, "one", A, prefetch=10)
    book.add_consumer(OTHER_TOPIC, "two", a2, prefetch=10)
    book.add_consumer(TOPIC, "one", B, prefetch=10)
    book.enqueue(TOPIC, b"m", [b"p1", b"p2"])
    book.enqueue(OTHER_TOPIC, b"m", [b"q1"])
    book.dispatch(now=0.0)
    assert book.in_flight == 3
    book.remove_client(A[0])
    statistics = book.statistics()
    assert statistics["app.Order/one"]["consumers"] == 1
    assert statistics["app.Order/one"]["redelivered"] == 1
    assert statistics["app.Invoice/two"]["consumers"] == 0
    assert statistics["app.Invoice/two"]["redelivered"] == 1
    assert statistics["app.Invoice/two"]["held"] == 1
    assert book.in_flight == 1  # B's
    book.remove_client(b"unknown")  # nothing to do
    assert book.in_flight == 1


# -- full, statistics, dead letters -----------------------------------------------------------


def test_a_topic_is_full_at_max_held_and_reopens_at_half() -> None:
    book = QueueBook(b"hub", max_held=4)
    book.declare(TOPIC, "workers")
    book.declare(OTHER_TOPIC, "others")
    book.enqueue(TOPIC, b"m", [b"p1", b"p2", b"p3"])
    assert not book.update_full()
    assert book.full_topics == frozenset()
    book.enqueue(TOPIC, b"m", [b"p4"])
    assert book.update_full()
    assert book.full_topics == {TOPIC}  # that topic only
    assert not book.update_full()  # no change, nothing to tell
    book.add_consumer(TOPIC, "workers", A, prefetch=1)
    (delivered,) = dispatch(book, now=0.0)  # in flight is not held: 3 held, above half
    assert not book.update_full()
    assert book.full_topics == {TOPIC}
    book.settle(ok(delivered), now=0.0)
    book.dispatch(now=0.0)  # 2 held: at half, it reopens
    assert book.update_full()
    assert book.full_topics == frozenset()


def test_a_topic_is_full_at_max_held_bytes_and_reopens_at_half() -> None:
    """Few messages, big ones: the bytes bound the group (100 000 messages of 8 MB would be
    800 GB of the hub's memory under the message bound alone)."""
    book, group = book_with(max_held=1000, max_held_bytes=100)
    book.enqueue(TOPIC, b"m", [b"a" * 30, b"b" * 30, b"c" * 30])
    assert not book.update_full()
    assert group.held_bytes == 90
    book.enqueue(TOPIC, b"m", [b"d" * 30])
    assert book.update_full()
    assert book.full_topics == {TOPIC}
    book.add_consumer(TOPIC, "workers", A, prefetch=1)
    (first,) = dispatch(book, now=0.0)  # cut from a run of three: only it leaves
    assert group.held_bytes == 90
    assert not book.update_full()  # above half: still full
    book.settle(failed(first, delay=5.0), now=0.0)  # waits out its retry delay: held again
    assert group.held_bytes == 120
    (second,) = dispatch(book, now=0.0)
    book.settle(ok(second), now=0.0)
    dispatch(book, now=0.0)  # the rest of the run goes out
    assert group.held_bytes == 60  # the retry and the last one
    assert not book.update_full()
    assert book.statistics()["app.Order/workers"]["held_bytes"] == 60
    book.remove_client(A[0])  # its delivery comes back to the front
    assert group.held_bytes == 90
    consumer = (b"client-c", b"sub-c")
    book.add_consumer(TOPIC, "workers", consumer, prefetch=1)
    (taken,) = dispatch(book, now=0.0)
    book.settle(ok(taken), now=0.0)
    dispatch(book, now=0.0)
    assert group.held_bytes == 30  # the retry alone: at most half, open again
    assert book.update_full()
    assert book.full_topics == frozenset()


def test_a_purge_leaves_no_bytes_held() -> None:
    book, group = book_with(A, prefetch=1, max_held_bytes=100)
    book.enqueue(TOPIC, b"m", [b"x" * 40, b"y" * 40, b"z" * 40])
    (delivered,) = dispatch(book, now=0.0)
    book.settle(failed(delivered, delay=5.0), now=0.0)  # a retry waiting: held too
    assert group.held_bytes == 120
    assert book.update_full()
    assert group.clear() == 3
    assert group.held_bytes == 0
    assert book.update_full()
    assert book.full_topics == frozenset()


def test_no_groups_no_full_topics() -> None:
    book = QueueBook(b"hub", max_held=1)
    assert not book.update_full()
    assert book.full_topics == frozenset()


def test_statistics_and_dead_letters_shapes() -> None:
    book = QueueBook(b"hub")
    book.declare(OTHER_TOPIC, "idle")
    book.add_consumer(TOPIC, "workers", A, prefetch=10)
    book.enqueue(TOPIC, b"m", [b"p1", b"p2", b"p3", b"p4"])
    first, second, third, _fourth = dispatch(book, now=0.0)
    book.settle(ok(first), now=0.0)
    book.settle(failed(second, 1.0), now=0.0)
    book.settle(dead(third, "E"), now=0.0)
    assert book.statistics() == {
        "app.Order/workers": {
            "published": 4,
            "delivered": 4,
            "acked": 1,
            "redelivered": 0,
            "retried": 1,
            "dead_lettered": 1,
            "rejected_dropped": 0,
            "consumers": 1,
            "held": 1,
            "held_bytes": 2,  # the retry waiting: p2
            "in_flight": 1,
            "dead_letters_kept": 1,
        },
        "app.Invoice/idle": {
            "published": 0,
            "delivered": 0,
            "acked": 0,
            "redelivered": 0,
            "retried": 0,
            "dead_lettered": 0,
            "rejected_dropped": 0,
            "consumers": 0,
            "held": 0,
            "held_bytes": 0,
            "in_flight": 0,
            "dead_letters_kept": 0,
        },
    }
    dead_letters = book.dead_letters()
    assert set(dead_letters) == {"app.Order/workers", "app.Invoice/idle"}
    assert dead_letters["app.Invoice/idle"] == []
    (record,) = dead_letters["app.Order/workers"]
    assert (record.message_id, record.attempts, record.error) == ("hub-3", 1, "E")


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_every_message_is_acked_exactly_once_under_mixed_outcomes(prefetch: int) -> None:
    """A seeded mixture of outcomes, unsent runs and departures, over batches of several
    sizes: nothing lost, nothing acked twice."""
    rng = random.Random(prefetch)
    book, group = book_with(A, B, C, prefetch=prefetch)
    published = [b"p%d" % n for n in range(60)]
    for start in range(0, len(published), 7):
        book.enqueue(TOPIC, b"m", published[start : start + 7])
    acked: list[bytes] = []
    now = 0.0
    for _ in range(2000):
        if len(acked) == len(published):
            break
        now += 0.5
        for delivery in book.dispatch(now):
            if rng.random() < 0.1:
                book.unsend(delivery)
                continue
            for msg in messages([delivery]):
                roll = rng.random()
                if roll < 0.65:
                    late = book.late_acks
                    book.settle(ok(msg), now)
                    if book.late_acks == late:  # not given back by a departure earlier
                        acked.append(msg.payload)
                elif roll < 0.9:
                    book.settle(failed(msg, rng.choice([0.0, 0.5, 2.0])), now)
                else:
                    book.remove_consumer(msg.key)
                    book.settle(ok(msg), now)  # late: never counted
                    book.add_consumer(TOPIC, "workers", msg.key, prefetch=prefetch)
    assert sorted(acked) == sorted(published)
    assert group.counts["acked"] == len(published)
    assert group.counts["retried"] > 0
    assert group.counts["redelivered"] > 0
    assert book.late_acks > 0
    assert group.held == 0
    assert book.in_flight == 0
