"""Unit tests of the hub's queue book (ipcbus.server.queues): pure bookkeeping, time passed in."""

from __future__ import annotations

import random

import pytest

from ipcbus.server.queues import Delivery, QueueBook, QueueGroup
from ipcbus.wire.protocol import (
    OUTCOME_DEAD,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    Ack,
    Deliver,
)

TOPIC = b"app.Order\x00"
OTHER_TOPIC = b"app.Invoice\x00"
A = (b"client-a", b"sub-a")
B = (b"client-b", b"sub-b")
C = (b"client-c", b"sub-c")


def ok(delivery: Delivery) -> Ack:
    return Ack(delivery.delivery_id, OUTCOME_OK)


def failed(delivery: Delivery, delay: float) -> Ack:
    return Ack(delivery.delivery_id, OUTCOME_FAILED, retry_delay=delay, error="boom")


def rejected(delivery: Delivery) -> Ack:
    return Ack(delivery.delivery_id, OUTCOME_REJECTED)


def dead(delivery: Delivery, error: str = "ValueError: bad") -> Ack:
    return Ack(delivery.delivery_id, OUTCOME_DEAD, error=error)


def payloads(deliveries: list[Delivery]) -> list[bytes]:
    return [delivery.item.payload for delivery in deliveries]


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
    (first,) = book.dispatch(now=0.0)
    book.cancel_consumer(A)  # it holds one delivery: it stays, cancelled
    assert group.consumers[A].cancelled
    again = book.add_consumer(TOPIC, "workers", A, prefetch=5)
    assert again is group
    consumer = group.consumers[A]
    assert (consumer.prefetch, consumer.cancelled) == (5, False)
    assert list(consumer.in_flight) == [first.delivery_id]  # what it held is kept


def test_each_group_of_a_topic_gets_every_message() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "one", A, prefetch=10)
    book.add_consumer(TOPIC, "two", B, prefetch=10)
    book.add_consumer(OTHER_TOPIC, "three", C, prefetch=10)
    book.enqueue(TOPIC, b"meta", [b"p1", b"p2"])
    deliveries = book.dispatch(now=0.0)
    by_consumer: dict[tuple[bytes, bytes], list[bytes]] = {}
    for delivery in deliveries:
        by_consumer.setdefault((delivery.identity, delivery.subscription_id), []).append(
            delivery.item.payload
        )
    assert by_consumer == {A: [b"p1", b"p2"], B: [b"p1", b"p2"]}
    # each group has its own copy: distinct message ids
    ids = {delivery.item.message_id for delivery in deliveries}
    assert len(ids) == 4


def test_enqueue_for_a_topic_without_groups_is_dropped() -> None:
    book, group = book_with(A)
    book.enqueue(OTHER_TOPIC, b"m", [b"p"])
    assert book.dispatch(now=0.0) == []
    assert group.counts["published"] == 0


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatch_builds_deliveries_with_ids_attempt_and_wire_form() -> None:
    book, _group = book_with(A)
    book.enqueue(TOPIC, b"meta-1", [b"p1", b"p2"])
    first, second = book.dispatch(now=0.0)
    assert (first.identity, first.subscription_id, first.topic) == (*A, TOPIC)
    assert first.item.message_id == b"hub-1"
    assert second.item.message_id == b"hub-2"
    assert first.delivery_id != second.delivery_id
    assert first.item.attempt == 1
    assert first.wire() == Deliver(
        b"sub-a", first.delivery_id, b"hub-1", 1, TOPIC, b"meta-1", b"p1"
    )
    assert book.in_flight == 2
    assert book.dispatch(now=0.0) == []  # nothing twice


def test_dispatch_is_round_robin() -> None:
    book, _group = book_with(A, B, C)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(7)])
    deliveries = book.dispatch(now=0.0)
    assert [(d.identity, d.subscription_id) for d in deliveries] == [A, B, C, A, B, C, A]
    assert payloads(deliveries) == [b"p%d" % n for n in range(7)]
    # the cursor carries over to the next dispatch
    book.enqueue(TOPIC, b"m", [b"q"])
    (next_one,) = book.dispatch(now=0.0)
    assert (next_one.identity, next_one.subscription_id) == B


def test_prefetch_bounds_the_deliveries_a_consumer_holds() -> None:
    book, group = book_with(A, B, prefetch=2)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(6)])
    deliveries = book.dispatch(now=0.0)
    assert len(deliveries) == 4
    assert sum(1 for d in deliveries if (d.identity, d.subscription_id) == A) == 2
    assert group.held == 2
    assert book.dispatch(now=0.0) == []  # no credit left
    book.settle(ok(deliveries[0]), now=0.0)
    (more,) = book.dispatch(now=0.0)  # one credit back, one delivery
    assert more.item.payload == b"p4"
    assert (more.identity, more.subscription_id) == (
        deliveries[0].identity,
        deliveries[0].subscription_id,
    )
    assert group.held == 1


def test_a_fast_consumer_gets_more_than_a_slow_one() -> None:
    book, _group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(6)])
    got: dict[tuple[bytes, bytes], int] = {A: 0, B: 0}
    for first in book.dispatch(now=0.0):
        got[(first.identity, first.subscription_id)] += 1
        if (first.identity, first.subscription_id) == A:
            book.settle(ok(first), now=0.0)
    for _ in range(4):  # B never acks; A acks each delivery at once
        for delivery in book.dispatch(now=0.0):
            got[(delivery.identity, delivery.subscription_id)] += 1
            book.settle(ok(delivery), now=0.0)
    assert got == {A: 5, B: 1}


def test_messages_are_held_without_consumers() -> None:
    book = QueueBook(b"hub")
    group = book.declare(TOPIC, "workers")
    book.enqueue(TOPIC, b"m", [b"p1", b"p2"])
    assert book.dispatch(now=0.0) == []
    assert group.held == 2
    book.add_consumer(TOPIC, "workers", A, prefetch=10)
    assert payloads(book.dispatch(now=0.0)) == [b"p1", b"p2"]
    assert group.held == 0


# -- settle: ok, failed, rejected, dead -------------------------------------------------------


def test_ok_settles_the_delivery() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivery,) = book.dispatch(now=0.0)
    book.settle(ok(delivery), now=1.0)
    assert group.counts["acked"] == 1
    assert book.in_flight == 0
    assert group.consumers[A].in_flight == {}
    assert book.dispatch(now=2.0) == []


def test_failed_is_retried_only_after_its_delay() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivery,) = book.dispatch(now=10.0)
    assert book.next_due() is None
    book.settle(failed(delivery, 2.5), now=10.0)
    assert group.counts["retried"] == 1
    assert book.next_due() == 12.5
    assert group.held == 1
    assert book.in_flight == 0
    assert book.dispatch(now=12.4) == []
    (retry,) = book.dispatch(now=12.5)
    assert retry.item is delivery.item
    assert retry.item.attempt == 2
    assert retry.delivery_id != delivery.delivery_id
    assert book.next_due() is None


def test_next_due_is_the_earliest_of_every_group() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "one", A, prefetch=10)
    book.add_consumer(OTHER_TOPIC, "two", B, prefetch=10)
    book.enqueue(TOPIC, b"m", [b"p1"])
    book.enqueue(OTHER_TOPIC, b"m", [b"p2"])
    first, second = book.dispatch(now=0.0)
    book.settle(failed(first, 5.0), now=0.0)
    book.settle(failed(second, 3.0), now=0.0)
    assert book.next_due() == 3.0
    (due,) = book.dispatch(now=3.0)
    assert due.item.payload == second.item.payload
    assert book.next_due() == 5.0


def test_a_due_retry_goes_before_new_messages() -> None:
    book, _group = book_with(A, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"first"])
    (delivery,) = book.dispatch(now=0.0)
    book.settle(failed(delivery, 1.0), now=0.0)
    book.enqueue(TOPIC, b"m", [b"second"])
    (early,) = book.dispatch(now=0.5)  # the retry is not due yet: the new message goes
    assert early.item.payload == b"second"
    book.settle(ok(early), now=0.5)
    book.enqueue(TOPIC, b"m", [b"third"])
    (due,) = book.dispatch(now=1.0)
    assert due.item.payload == b"first"
    assert due.item.attempt == 2


def test_rejected_is_offered_to_another_consumer_and_is_not_an_attempt() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (first,) = book.dispatch(now=0.0)
    assert (first.identity, first.subscription_id) == A
    book.settle(rejected(first), now=0.0)
    assert group.held == 1
    (second,) = book.dispatch(now=0.0)
    assert (second.identity, second.subscription_id) == B
    assert second.item is first.item
    assert second.item.attempt == 1
    assert group.counts["rejected_dropped"] == 0


def test_rejected_by_every_present_consumer_is_dropped_and_counted() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p", b"q"])
    first_p, first_q = book.dispatch(now=0.0)
    book.settle(rejected(first_p), now=0.0)  # A rejects p
    book.settle(ok(first_q), now=0.0)
    (second_p,) = book.dispatch(now=0.0)
    assert (second_p.identity, second_p.subscription_id) == B
    book.settle(rejected(second_p), now=0.0)  # B rejects p too
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 1
    assert group.held == 0
    book.add_consumer(TOPIC, "workers", C, prefetch=10)
    assert book.dispatch(now=0.0) == []  # gone for good


def test_a_rejected_message_waits_for_credit_of_a_consumer_that_did_not_reject() -> None:
    book, group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p", b"q"])
    to_a, to_b = book.dispatch(now=0.0)
    book.settle(rejected(to_a), now=0.0)  # A has credit again, but rejected p; B is busy
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 0
    book.settle(ok(to_b), now=0.0)
    (again,) = book.dispatch(now=0.0)
    assert (again.identity, again.subscription_id, again.item.payload) == (*B, b"p")


def test_dropped_once_only_consumers_that_rejected_are_left() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = book.dispatch(now=0.0)
    book.settle(rejected(to_a), now=0.0)
    book.remove_consumer(B)  # only A, which rejected, is left: dropped
    assert book.dispatch(now=0.0) == []
    assert group.counts["rejected_dropped"] == 1


def test_a_consumer_that_rejected_then_rejoined_is_offered_the_message_again() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = book.dispatch(now=0.0)
    book.settle(rejected(to_a), now=0.0)
    book.remove_consumer(B)
    book.remove_consumer(A)  # A leaves: its rejection is forgotten
    book.add_consumer(TOPIC, "workers", A, prefetch=1)
    (again,) = book.dispatch(now=0.0)
    assert (again.identity, again.subscription_id, again.item.payload) == (*A, b"p")
    assert group.counts["rejected_dropped"] == 0


def test_dead_keeps_a_record() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivery,) = book.dispatch(now=0.0)
    book.settle(dead(delivery, "ValueError: poison"), now=0.0)
    assert group.counts["dead_lettered"] == 1
    assert group.held == 0
    assert book.in_flight == 0
    (record,) = book.dead_letters()["app.Order/workers"]
    assert (record.message_id, record.attempts, record.error) == ("hub-1", 1, "ValueError: poison")
    assert book.dispatch(now=100.0) == []


def test_dead_records_are_bounded_by_max_dead() -> None:
    book, group = book_with(A, max_dead=3)
    book.enqueue(TOPIC, b"m", [b"p%d" % n for n in range(5)])
    for delivery in book.dispatch(now=0.0):
        book.settle(dead(delivery, f"E{delivery.item.payload.decode()}"), now=0.0)
    records = book.dead_letters()["app.Order/workers"]
    assert [record.error for record in records] == ["Ep2", "Ep3", "Ep4"]
    assert group.counts["dead_lettered"] == 5
    assert group.statistics()["dead_letters_kept"] == 3


# -- late and unknown acks --------------------------------------------------------------------


def test_an_unknown_ack_is_counted_and_ignored() -> None:
    """An id of this hub it no longer has is late; any other id is stale (another hub's)."""
    book, group = book_with(A)
    book.settle(Ack(b"hub.999", OUTCOME_OK), now=0.0)
    assert (book.late_acks, book.stale_acks) == (1, 0)
    book.settle(Ack(b"no-such-delivery", OUTCOME_OK), now=0.0)
    assert (book.late_acks, book.stale_acks) == (1, 1)
    assert group.counts["acked"] == 0


def test_a_second_ack_is_late_and_never_applied_twice() -> None:
    book, group = book_with(A)
    book.enqueue(TOPIC, b"m", [b"p"])
    (delivery,) = book.dispatch(now=0.0)
    book.settle(ok(delivery), now=0.0)
    book.settle(ok(delivery), now=0.0)
    book.settle(dead(delivery), now=0.0)
    book.settle(failed(delivery, 0.0), now=0.0)
    assert book.late_acks == 3
    assert group.counts["acked"] == 1
    assert group.counts["dead_lettered"] == 0
    assert group.counts["retried"] == 0
    assert group.held == 0


def test_an_ack_after_redelivery_is_late() -> None:
    book, group = book_with(A, B)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = book.dispatch(now=0.0)
    book.remove_consumer(A)  # declared gone: p goes to B
    (to_b,) = book.dispatch(now=0.0)
    assert (to_b.identity, to_b.subscription_id) == B
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
    book.unsend(delivery.delivery_id)
    assert delivery.item.attempt == 0
    assert group.counts["delivered"] == 0
    assert book.in_flight == 0
    assert group.pending[0] is delivery.item
    (again,) = book.dispatch(now=0.0)
    assert again.item is delivery.item
    assert again.item.attempt == 1
    assert group.counts["delivered"] == 1
    book.settle(ok(delivery), now=0.0)  # the unsent id is unknown now
    assert book.late_acks == 1


def test_unsend_of_an_unknown_delivery_does_nothing() -> None:
    book, group = book_with(A)
    book.unsend(b"nope")
    assert group.statistics()["delivered"] == 0
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
    to_a, to_b = book.dispatch(now=0.0)
    book.cancel_consumer(A)
    assert group.consumers[A].cancelled
    assert group.counts["redelivered"] == 0
    book.enqueue(TOPIC, b"m", [b"p3"])
    book.settle(ok(to_b), now=0.0)
    (next_one,) = book.dispatch(now=0.0)
    assert (next_one.identity, next_one.subscription_id) == B  # never the cancelled A
    book.settle(ok(to_a), now=0.0)  # its last delivery: it leaves
    assert A not in group.consumers
    assert group.counts["acked"] == 2
    assert book.late_acks == 0


def test_a_cancelled_consumer_may_still_reject_its_last_delivery() -> None:
    book, group = book_with(A, B, prefetch=1)
    book.enqueue(TOPIC, b"m", [b"p"])
    (to_a,) = book.dispatch(now=0.0)
    book.cancel_consumer(A)
    book.settle(rejected(to_a), now=0.0)
    assert A not in group.consumers
    (to_b,) = book.dispatch(now=0.0)
    assert (to_b.identity, to_b.subscription_id, to_b.item.payload) == (*B, b"p")


def test_remove_consumer_gives_deliveries_back_first_in_order_with_attempt_kept() -> None:
    book, group = book_with(A, prefetch=3)
    book.enqueue(TOPIC, b"m", [b"p1", b"p2", b"p3", b"p4"])
    held = book.dispatch(now=0.0)
    assert payloads(held) == [b"p1", b"p2", b"p3"]
    book.remove_consumer(A)
    assert A not in group.consumers
    assert group.counts["redelivered"] == 3
    assert book.in_flight == 0
    assert [item.payload for item in group.pending] == [b"p1", b"p2", b"p3", b"p4"]
    assert [item.attempt for item in group.pending] == [1, 1, 1, 0]
    book.add_consumer(TOPIC, "workers", B, prefetch=10)
    again = book.dispatch(now=0.0)
    assert payloads(again) == [b"p1", b"p2", b"p3", b"p4"]
    assert [d.item.attempt for d in again] == [2, 2, 2, 1]
    for old in held:
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
    (delivery,) = book.dispatch(now=0.0)  # in flight is not held: 3 held, above half
    assert not book.update_full()
    assert book.full_topics == {TOPIC}
    book.settle(Ack(delivery.delivery_id, OUTCOME_OK), now=0.0)
    book.dispatch(now=0.0)  # 2 held: at half, it reopens
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
    first, second, third, _fourth = book.dispatch(now=0.0)
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
    """A seeded mixture of outcomes and departures: nothing lost, nothing acked twice."""
    rng = random.Random(prefetch)
    book, group = book_with(A, B, C, prefetch=prefetch)
    published = [b"p%d" % n for n in range(60)]
    book.enqueue(TOPIC, b"m", published)
    acked: list[bytes] = []
    now = 0.0
    for _ in range(2000):
        if len(acked) == len(published):
            break
        now += 0.5
        for delivery in book.dispatch(now):
            roll = rng.random()
            if roll < 0.6:
                late = book.late_acks
                book.settle(ok(delivery), now)
                if book.late_acks == late:  # not given back by a departure earlier in the turn
                    acked.append(delivery.item.payload)
            elif roll < 0.8:
                book.settle(failed(delivery, rng.choice([0.0, 0.5, 2.0])), now)
            elif roll < 0.9:
                book.unsend(delivery.delivery_id)
            else:
                key = (delivery.identity, delivery.subscription_id)
                book.remove_consumer(key)
                book.settle(ok(delivery), now)  # late: never counted
                book.add_consumer(TOPIC, "workers", key, prefetch=prefetch)
    assert sorted(acked) == sorted(published)
    assert group.counts["acked"] == len(published)
    assert group.counts["retried"] > 0
    assert group.counts["redelivered"] > 0
    assert book.late_acks > 0
    assert group.held == 0
    assert book.in_flight == 0
