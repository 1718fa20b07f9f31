"""Unit tests of the hub's dead letters and queue administration (ipcbus.server.dead_letters,
ipcbus.server.queue_admin): pure bookkeeping, time passed in, payloads opaque bytes."""

from __future__ import annotations

import pytest

from ipcbus.server.dead_letters import DeadLetters
from ipcbus.server.queue_admin import QueueAdmin
from ipcbus.server.queues import QueueBook
from ipcbus.wire import queue_admin as admin_wire
from ipcbus.wire.protocol import OUTCOME_DEAD, OUTCOME_OK, Ack, header, pack_meta

from .test_unit_queues import TOPIC, A, dispatch, ok

META = pack_meta(b"d", 4, 0.0)


def _dead_book(count: int, **kwargs: int) -> QueueBook:
    """A book whose group ``app.Order/workers`` dead-lettered ``count`` messages p0, p1, ..."""
    book = QueueBook(b"hub", **kwargs)
    book.add_consumer(TOPIC, "workers", A, prefetch=1000)
    book.enqueue(TOPIC, META, [b"p%d" % n for n in range(count)])
    for msg in dispatch(book, now=0.0):
        book.settle(
            Ack(msg.delivery.stream, msg.seq, msg.seq, OUTCOME_DEAD, 0.0, f"E{msg.index}"), 0.0
        )
    return book


# -- the store --------------------------------------------------------------------------------


def test_dead_letters_keep_their_payload_meta_and_error() -> None:
    book = _dead_book(2)
    group = next(book.groups())
    first, second = list(group.dead)
    assert (first.message_id, first.attempts, first.error, first.payload) == (
        "hub-1",
        1,
        "E0",
        b"p0",
    )
    assert second.payload == b"p1"
    assert first.meta == META
    assert isinstance(first.payload, bytes), "a view would pin the whole batch"
    assert first.when > 0


def test_the_count_bound_evicts_the_oldest_and_counts_them() -> None:
    store = DeadLetters(max_count=3, max_bytes=1000)
    for n in range(5):
        store.add(f"hub-{n}", 1, "E", META, b"x", when=float(n))
    assert [entry.message_id for entry in store] == ["hub-2", "hub-3", "hub-4"]
    assert (len(store), store.bytes, store.evicted) == (3, 3, 2)


def test_the_byte_bound_evicts_the_oldest_and_a_payload_larger_than_it_is_not_kept() -> None:
    store = DeadLetters(max_count=100, max_bytes=10)
    store.add("a", 1, "E", META, b"1234", when=0.0)
    store.add("b", 1, "E", META, b"1234", when=0.0)
    store.add("c", 1, "E", META, b"1234", when=0.0)  # 12 bytes: "a" goes
    assert [entry.message_id for entry in store] == ["b", "c"]
    assert (store.bytes, store.evicted) == (8, 1)
    store.add("huge", 1, "E", META, b"x" * 11, when=0.0)
    assert [entry.message_id for entry in store] == ["b", "c"]
    assert store.evicted == 2


def test_take_removes_the_named_entries_or_all_and_reports_the_missing() -> None:
    store = DeadLetters(max_count=10, max_bytes=100)
    for name in "abc":
        store.add(name, 2, "E", META, name.encode(), when=0.0)
    taken, missing = store.take(["c", "a", "zz"])
    assert [entry.message_id for entry in taken] == ["a", "c"]  # oldest first
    assert missing == ["zz"]
    assert [entry.message_id for entry in store] == ["b"]
    assert store.bytes == 1
    taken, missing = store.take(None)
    assert [entry.message_id for entry in taken] == ["b"]
    assert (missing, len(store), store.bytes) == ([], 0, 0)


def test_the_hub_statistics_keep_their_shape() -> None:
    book = _dead_book(1)
    (record,) = book.dead_letters()["app.Order/workers"]
    assert (record.message_id, record.attempts, record.error) == ("hub-1", 1, "E0")
    assert not hasattr(record, "payload"), "the STATS reply carries no payloads"


# -- requeue, purge, delete, list -------------------------------------------------------------


def _ask(admin: QueueAdmin, *frames: bytes, now: float = 0.0) -> admin_wire.Reply:
    return admin_wire.Reply.parse(admin.handle(list(frames), now, admin_book(admin).delete)[1:])


def admin_book(admin: QueueAdmin) -> QueueBook:
    return admin._book


def test_requeue_puts_dead_letters_back_with_their_attempt_reset() -> None:
    book = _dead_book(3)
    admin = QueueAdmin(book)
    reply = _ask(admin, admin_wire.REQUEUE, TOPIC, b"workers", b"hub-1 hub-3 hub-9")
    assert reply.status == admin_wire.STATUS_OK
    assert reply.body == {"requeued": 2, "missing": ["hub-9"]}
    group = next(book.groups())
    assert [entry.message_id for entry in group.dead] == ["hub-2"]
    assert group.held == 2
    again = dispatch(book, now=0.0)
    assert [(msg.payload, msg.attempt, msg.message_id) for msg in again] == [
        (b"p0", 1, "hub-1"),
        (b"p2", 1, "hub-3"),
    ]
    for msg in again:
        book.settle(ok(msg), now=0.0)
    assert group.counts["acked"] == 2
    assert book.in_flight == 0


def test_a_requeue_into_a_full_group_goes_past_max_held_by_its_dead_letters_and_reports_full() -> (
    None
):
    # Documented bound (guarantees.md, requeue): not refused, at most what the dead letters held.
    book = _dead_book(3, max_held=2)
    book.remove_consumer(A)  # nothing dispatched: the group holds what comes back
    book.enqueue(TOPIC, META, [b"n0", b"n1"])
    group = next(book.groups())
    assert group.held == 2
    book.update_full()
    assert TOPIC in book.full_topics
    dead = len(group.dead)
    reply = _ask(QueueAdmin(book), admin_wire.REQUEUE, TOPIC, b"workers", b"")
    assert reply.body == {"requeued": 3, "missing": []}
    assert group.held == 2 + dead == 5
    book.update_full()
    assert TOPIC in book.full_topics


def test_purge_drops_what_is_held_and_delayed_but_not_what_is_in_flight() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "workers", A, prefetch=2)
    book.enqueue(TOPIC, META, [b"p%d" % n for n in range(5)])
    first, _second = dispatch(book, now=0.0)
    book.settle(Ack(first.delivery.stream, first.seq, first.seq, b"failed", 60.0, "E"), 0.0)
    admin = QueueAdmin(book)
    reply = _ask(admin, admin_wire.PURGE, TOPIC, b"workers")
    assert reply.body == {"purged": 4}  # three held, one waiting out its retry delay
    group = next(book.groups())
    assert (group.held, group.in_flight, book.in_flight) == (0, 1, 1)
    assert dispatch(book, now=1000.0) == []
    assert _ask(admin, admin_wire.QUEUES).body[0]["purged"] == 4


def test_unknown_queues_are_answered_as_such() -> None:
    admin = QueueAdmin(QueueBook(b"hub"))
    for op in (admin_wire.DEAD_LETTERS, admin_wire.PURGE, admin_wire.DELETE):
        frames = [op, TOPIC, b"nobody"] + ([b"10", b"1"] if op == admin_wire.DEAD_LETTERS else [])
        assert _ask(admin, *frames).status == admin_wire.STATUS_UNKNOWN
    assert _ask(admin, admin_wire.REQUEUE, TOPIC, b"nobody", b"").status == (
        admin_wire.STATUS_UNKNOWN
    )


def test_delete_refuses_a_group_in_use() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "workers", A, prefetch=2)
    admin = QueueAdmin(book)
    assert _ask(admin, admin_wire.DELETE, TOPIC, b"workers").status == admin_wire.STATUS_IN_USE
    book.remove_consumer(A)
    book.enqueue(TOPIC, META, [b"a", b"b"])
    reply = _ask(admin, admin_wire.DELETE, TOPIC, b"workers")
    assert (reply.status, reply.body) == (admin_wire.STATUS_OK, {"dropped": 2})


def test_dead_letters_are_listed_latest_last_with_their_payloads() -> None:
    book = _dead_book(3)
    admin = QueueAdmin(book)
    reply = _ask(admin, admin_wire.DEAD_LETTERS, TOPIC, b"workers", b"2", b"1")
    assert [record["message_id"] for record in reply.body["dead_letters"]] == ["hub-2", "hub-3"]
    assert reply.payloads == [b"p1", b"p2"]
    assert reply.body["kept"] == 3
    without = _ask(admin, admin_wire.DEAD_LETTERS, TOPIC, b"workers", b"0", b"0")
    assert len(without.body["dead_letters"]) == 3
    assert without.payloads == []


def test_queues_reports_counts_and_rates_per_group() -> None:
    book = QueueBook(b"hub")
    book.add_consumer(TOPIC, "workers", A, prefetch=1000)
    admin = QueueAdmin(book)
    admin.sample(0.0)
    book.enqueue(TOPIC, META, [b"p%d" % n for n in range(100)])
    for delivery in book.dispatch(0.0):
        book.settle(
            Ack(delivery.stream, delivery.first_seq, delivery.last_seq, OUTCOME_OK), now=0.0
        )
    (queue,) = _ask(admin, admin_wire.QUEUES, now=2.0).body
    assert queue["queue"] == "app.Order/workers"
    assert (queue["consumers"], queue["held"], queue["in_flight"], queue["acked"]) == (1, 0, 0, 100)
    assert queue["ack_rate"] == pytest.approx(50.0)
    assert queue["publish_rate"] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"nonsense"],
        [admin_wire.QUEUES, b"extra"],
        [admin_wire.PURGE, TOPIC],
        [admin_wire.PURGE, TOPIC[:-1], b"workers"],
        [admin_wire.PURGE, TOPIC, b""],
        [admin_wire.PURGE, TOPIC, b"\xff"],
        [admin_wire.DEAD_LETTERS, TOPIC, b"workers", b"-1", b"1"],
        [admin_wire.DEAD_LETTERS, TOPIC, b"workers", b"x", b"1"],
        [admin_wire.DEAD_LETTERS, TOPIC, b"workers", b"1", b"2"],
        [admin_wire.REQUEUE, TOPIC, b"workers", b"x" * (admin_wire.MAX_IDS_BYTES + 1)],
    ],
)
def test_malformed_requests_raise_value_error(frames: list[bytes]) -> None:
    book = _dead_book(1)
    admin = QueueAdmin(book)
    with pytest.raises((ValueError, IndexError)):
        admin.handle(frames, 0.0, book.delete)
    assert len(next(book.groups()).dead) == 1


def test_the_request_header_is_the_wire_kind() -> None:
    assert admin_wire.request(admin_wire.QUEUES)[0] == header(admin_wire.QUEUE_ADMIN)
