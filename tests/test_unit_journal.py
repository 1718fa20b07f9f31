"""The queue journal without a hub process: its records, replay, restore into a queue book,
compaction, the size limit, a torn tail and the directory checks (server/journal.py)."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from ipcbus.config import HubOptions, hub_options_from_env, parse_hub_option
from ipcbus.exceptions import JournalError
from ipcbus.server import journal_records as records
from ipcbus.server.data_path import DataPath
from ipcbus.server.fanout import Fanout
from ipcbus.server.journal import Journal
from ipcbus.server.positions import MAX_RUNS, Positions
from ipcbus.server.queues import QueueBook
from ipcbus.wire import protocol as wire
from ipcbus.wire.protocol import OUTCOME_DEAD, OUTCOME_FAILED, OUTCOME_OK, Ack, pack_sizes

TOPIC = b"tests.Job\x00"
OTHER = b"tests.Other\x00"
KEY = (b"client", b"sub")


def _batch(*payloads: bytes) -> tuple[bytes, bytes]:
    return pack_sizes(map(len, payloads)), b"".join(payloads)


def _book(path: Path, **options: int) -> tuple[QueueBook, Journal]:
    book = QueueBook(os.urandom(8).hex().encode(), max_held=options.pop("max_held", 100_000))
    journal = Journal(str(path), max_bytes=options.pop("max_bytes", 1 << 30))
    journal.open(book)
    return book, journal


def _enqueue(book: QueueBook, *payloads: bytes, topic: bytes = TOPIC) -> None:
    sizes, data = _batch(*payloads)
    book.enqueue_batch(topic, b"meta", sizes, data)


def _held(book: QueueBook) -> dict[str, list[tuple[bytes, int]]]:
    """Each group's messages and attempts, in the order the book would deliver them."""
    found: dict[str, list[tuple[bytes, int]]] = {}
    for group, run in book.live_runs():
        for payload in run.payload_list():
            found.setdefault(group.name, []).append((payload, run.attempt))
    return found


# -- records ----------------------------------------------------------------------------------


def test_records_replay_to_what_is_live() -> None:
    sizes, data = _batch(b"a", b"bb", b"ccc")
    stream = b"".join(
        b"".join(bytes(part) for part in record)
        for record in (
            records.begin(1),
            records.enqueued(TOPIC, [("ga", 1), ("gb", 4)], b"m", sizes, data),
            records.delivered(1, 2, 1),
            records.settled(1, 1),  # ga's "a" acked
            records.delivered(4, 3, 1),
            records.settled(4, 3),  # gb all done
            records.end(),
        )
    )
    found = records.scan(stream)
    assert (found.torn_bytes, found.corrupt, found.good_end) == (0, [], len(stream))
    replay = records.Replay()
    for kind, body in found.records:
        replay.apply(kind, body)
    live = [(run.name, low, high, attempt) for run, low, high, attempt in replay.live()]
    # "bb" was delivered once (attempt 1), "ccc" never: cut where the attempt changes.
    assert live == [("ga", 1, 2, 1), ("ga", 2, 3, 0)]
    assert replay.next_id == 7
    assert replay.began
    assert replay.ended


def test_a_torn_tail_and_a_corrupt_record_are_reported_not_raised() -> None:
    sizes, data = _batch(b"x" * 100)
    good = [records.enqueued(TOPIC, [("g", n)], b"m", sizes, data) for n in (1, 2, 3)]
    blobs = [b"".join(bytes(part) for part in record) for record in good]
    # The middle record's payload is damaged; the last one is cut short.
    middle = bytearray(blobs[1])
    middle[-5] ^= 0xFF
    stream = blobs[0] + bytes(middle) + blobs[2] + blobs[0][:40]
    found = records.scan(stream)
    assert [kind for kind, _ in found.records] == [records.ENQUEUED, records.ENQUEUED]
    assert len(found.corrupt) == 1
    assert "checksum" in found.corrupt[0]
    assert found.torn_bytes == 40
    assert found.good_end == len(stream) - 40


def _stream(*blobs: list[Any]) -> bytes:
    return b"".join(b"".join(bytes(part) for part in record) for record in blobs)


@pytest.mark.parametrize("damage", [1, -1, 7], ids=["one-over", "one-short", "seven-over"])
def test_a_damaged_length_in_the_middle_skips_to_the_next_good_record(damage: int) -> None:
    sizes, data = _batch(b"y" * 50)
    blobs = [
        b"".join(bytes(p) for p in records.enqueued(TOPIC, [("g", n)], b"m", sizes, data))
        for n in (1, 2, 3, 4)
    ]
    second = bytearray(blobs[1])
    (length,) = struct.unpack_from("<I", second, 1)
    struct.pack_into("<I", second, 1, length + damage)
    stream = blobs[0] + bytes(second) + blobs[2] + blobs[3]
    found = records.scan(stream)
    replay = records.Replay()
    for kind, body in found.records:
        replay.apply(kind, body)
    # Not a torn tail (which the journal would cut off the file): the two after it are read.
    assert found.torn_bytes == 0
    assert [run.first_id for run in replay.runs.values()] == [1, 3, 4]
    assert len(found.corrupt) == 1
    assert found.good_end == len(stream)


def test_a_torn_tail_after_damage_in_the_middle_is_still_a_torn_tail() -> None:
    sizes, data = _batch(b"z" * 50)
    blobs = [
        b"".join(bytes(p) for p in records.enqueued(TOPIC, [("g", n)], b"m", sizes, data))
        for n in (1, 2, 3)
    ]
    second = bytearray(blobs[1])
    struct.pack_into("<I", second, 1, struct.unpack_from("<I", second, 1)[0] + 1)
    stream = blobs[0] + bytes(second) + blobs[2] + blobs[2][:30]
    found = records.scan(stream)
    assert [bytes(body) for _kind, body in found.records] == [blobs[0][9:], blobs[2][9:]]
    assert found.torn_bytes == 30
    assert len(found.corrupt) == 1


def test_a_torn_tail_is_never_searched_for_records_its_payload_may_hold() -> None:
    """A torn last record's payload is a publisher's bytes: records shaped inside it (here a
    SETTLED of everything, and a DELIVERED naming ids no hub hands out) are not applied (found
    by review: applied, they dropped the queue, or kept the hub from opening its journal)."""
    sizes, data = _batch(b"job")
    good = _stream(records.begin(1), records.enqueued(TOPIC, [("g", 1)], b"m", sizes, data))
    forged = _stream(records.settled(1, (1 << 32) - 1), records.delivered((1 << 64) - 1, 1, 1))
    hostile = forged + b"\x01\xff\xff\xff\xff" * 4
    sizes, data = _batch(hostile)
    torn = _stream(records.enqueued(TOPIC, [("g", 2)], b"m", sizes, data))[:-5]
    found = records.scan(good + torn)
    assert found.torn_bytes == len(torn)
    assert (found.corrupt, found.searched_at) == ([], None)
    assert [kind for kind, _ in found.records] == [records.BEGIN, records.ENQUEUED]


def test_ranges_of_ids_no_hub_hands_out_are_bad_records_not_applied() -> None:
    replay = records.Replay()
    for record in (
        records.begin(1),
        records.delivered((1 << 64) - 10, 5, 1),
        records.settled(1 << 63, 1),
    ):
        ((kind, body),) = records.scan(_stream(record)).records
        replay.apply(kind, body)
    assert (replay.bad_records, replay.next_id) == (2, 1)


# -- a journal under a queue book -------------------------------------------------------------


def test_what_was_not_acked_comes_back_with_its_attempts(tmp_path: Path) -> None:
    book, journal = _book(tmp_path / "j")
    book.declare(TOPIC, "g")
    _enqueue(book, b"one", b"two", b"three", b"four" * 1000)  # a size over 255 bytes too
    book.add_consumer(TOPIC, "g", KEY, prefetch=2)
    deliveries = book.dispatch(0.0)
    assert [d.run.count for d in deliveries] == [2]
    stream = deliveries[0].stream
    book.settle(Ack(stream, 1, 1, OUTCOME_OK, 0.0, ""), 0.0)  # "one" acked
    book.settle(Ack(stream, 2, 2, OUTCOME_DEAD, 0.0, "poison"), 0.0)  # "two" dead-lettered
    (_delivery,) = book.dispatch(0.0)  # "three", "four": in flight, not acked
    journal.end_of_turn(book)
    journal.close()  # as a kill would leave it: no checkpoint at the end

    again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"three", 1), (b"four" * 1000, 1)]}
        assert journal.statistics()["restored"] == 2
        # The dead letter's record (ipcbus stats) outlives the hub too.
        (group,) = again.groups()
        assert [(r.attempts, r.error) for r in group.dead] == [(1, "poison")]
        # Redelivered with attempt + 1; new ids never collide with the restored ones.
        again.add_consumer(TOPIC, "g", KEY, prefetch=10)
        (redelivery,) = again.dispatch(0.0)
        assert redelivery.run.attempt == 2
        _enqueue(again, b"five")
        ids = [run.first_id for _, run in again.live_runs()]
        assert len(set(ids)) == len(ids)
    finally:
        journal.close()


def _numbered(publisher: bytes, position: int, again: bool, *payloads: bytes) -> list[zmq.Frame]:
    """A split batch as the hub's data socket receives it: identity first."""
    meta = wire.pack_meta(wire.CODEC_SPLIT_OBJECTS, len(payloads), 0.0)
    request = wire.publish_numbered(TOPIC, meta, list(_batch(*payloads)), position)
    if again:
        wire.sent_again(request)
    return [zmq.Frame(publisher), *(zmq.Frame(part) for part in request)]


def test_a_copy_sent_again_is_dropped_if_journaled_and_flagged_if_not(tmp_path: Path) -> None:
    """After a kill, a publisher sends again what the dead hub did not confirm: the new hub
    drops the batches the journal holds (restored already), and holds the others as delivered
    once, so that a job that comes twice comes the second time with attempt 2."""
    with zmq.Context() as context, context.socket(zmq.XPUB) as xpub:
        xpub.linger = 0
        xpub.bind("inproc://journal-dedupe")

        def hub(book: QueueBook, journal: Journal) -> DataPath:
            path = DataPath(book)
            path.fanout, path.journal = Fanout(xpub, 30.0), journal
            return path

        book, journal = _book(tmp_path / "j")
        book.declare(TOPIC, "g")
        first = hub(book, journal)
        first.handle(xpub, _numbered(b"A", 2, False, b"a1", b"a2"))
        first.handle(xpub, _numbered(b"A", 4, False, b"a3", b"a4"))
        journal.end_of_turn(book)
        journal.close()  # killed before it confirmed either batch

        book, journal = _book(tmp_path / "j")
        second = hub(book, journal)
        second.handle(xpub, _numbered(b"A", 2, True, b"a1", b"a2"))  # journaled: dropped
        second.handle(xpub, _numbered(b"A", 4, True, b"a3", b"a4"))  # journaled: dropped
        second.handle(xpub, _numbered(b"A", 6, True, b"a5", b"a6"))  # read, never journaled
        second.handle(xpub, _numbered(b"B", 4, True, b"b1"))  # another publisher's position
        second.handle(xpub, _numbered(b"A", 7, False, b"a7"))  # a new publish
        assert second.duplicates == 4
        assert _held(book) == {
            "g": [
                *[(b"a1", 0), (b"a2", 0), (b"a3", 0), (b"a4", 0)],  # restored
                *[(b"a5", 1), (b"a6", 1), (b"b1", 1)],  # as delivered once
                (b"a7", 0),
            ]
        }
        book.add_consumer(TOPIC, "g", KEY, prefetch=100)
        delivered = [(p, d.run.attempt) for d in book.dispatch(0.0) for p in d.run.payload_list()]
        assert delivered == [
            *[(b"a1", 1), (b"a2", 1), (b"a3", 1), (b"a4", 1)],
            *[(b"a5", 2), (b"a6", 2), (b"b1", 2)],
            (b"a7", 1),
        ]
        journal.checkpoint(book)  # the positions outlive compaction
        journal.close()

        book, journal = _book(tmp_path / "j")
        try:
            positions = book.positions
            assert [positions.taken(*at) for at in [(b"A", 7), (b"B", 4)]] == [True, True]
            assert [positions.taken(*at) for at in [(b"A", 8), (b"C", 1)]] == [False, False]
        finally:
            journal.close()


def test_a_copy_of_what_came_through_the_pipe_is_dropped_without_a_journal() -> None:
    """ZeroMQ hands what was in a client's pipe when its hub died to the next hub, and the
    client sends the same batches again: the hub takes the first and drops the copies."""
    with zmq.Context() as context, context.socket(zmq.XPUB) as xpub:
        xpub.linger = 0
        xpub.bind("inproc://pipe-dedupe")
        book = QueueBook(b"hub", max_held=100)
        book.declare(TOPIC, "g")
        path = DataPath(book)
        path.fanout = Fanout(xpub, 30.0)
        path.handle(xpub, _numbered(b"A", 2, False, b"a1", b"a2"))  # out of the pipe
        path.handle(xpub, _numbered(b"A", 2, True, b"a1", b"a2"))  # sent again
        path.handle(xpub, _numbered(b"A", 3, True, b"a3"))  # sent again, never came
        assert path.duplicates == 2
        # A copy of a batch it has, whose payload is not what its meta says: malformed (the
        # serving loop counts it so), not two more duplicates.
        bad = _numbered(b"A", 2, True, b"a1", b"a2")
        bad[-1] = zmq.Frame(b"a1")
        with pytest.raises(ValueError):
            path.handle(xpub, bad)
        assert path.duplicates == 2
        assert _held(book) == {"g": [(b"a1", 0), (b"a2", 0), (b"a3", 1)]}


def _read(positions: Positions, publisher: bytes, position: int) -> tuple[int, int]:
    """What the data path does with a batch it reads: its run, noted."""
    run = positions.run(publisher, position)
    positions.note(publisher, run)
    return run


def test_positions_keep_the_publishers_that_published_last() -> None:
    positions = Positions(limit=2)
    _read(positions, b"A", 10)
    _read(positions, b"B", 5)
    _read(positions, b"A", 3)  # back: a run of its own (copies sent again), A the most recent
    _read(positions, b"A", 4)  # the run goes on
    _read(positions, b"C", 1)  # B published least recently: forgotten
    assert list(positions.items()) == [(b"A", 3, 4), (b"A", 10, 10), (b"C", 1, 1)]
    assert [positions.taken(b"A", at) for at in (2, 3, 4, 5, 9, 10, 11)] == [
        *(False, True, True, False),  # 5 to 9: never read in a row with what this hub had
        *(False, True, False),
    ]
    assert not positions.taken(b"B", 5)


def test_runs_of_positions_merge_and_are_bounded() -> None:
    positions = Positions()
    positions.restore(b"A", 20, 30)  # journaled by the hub before
    positions.restore(b"A", 5, 9)
    positions.restore(b"A", 8, 21)  # overlaps both: one run
    assert list(positions.items()) == [(b"A", 5, 30)]
    positions.restore(b"A", 7, 3)  # not a run: ignored
    assert positions.run(b"A", 40) == (40, 40)  # this hub read nothing of A yet
    assert _read(positions, b"A", 40) == (40, 40)
    assert _read(positions, b"A", 50) == (40, 50)
    assert _read(positions, b"A", 45) == (45, 45)  # back: a run of its own, in the one before
    assert list(positions.items()) == [(b"A", 5, 30), (b"A", 40, 50)]
    lowest = 10_000 - 10 * (2 * MAX_RUNS - 1)
    for at in range(10_000, lowest - 1, -10):  # each goes back: a run of its own
        _read(positions, b"B", at)
    runs = [(low, high) for publisher, low, high in positions.items() if publisher == b"B"]
    assert len(runs) == MAX_RUNS
    assert runs[-1] == (10_000, 10_000)
    assert not positions.taken(b"B", lowest)  # forgotten: its copy comes with attempt 2


def test_broadcast_counts_are_continued(tmp_path: Path) -> None:
    """The fan-out's message counts, written before each send, come back (the last one wins),
    through a checkpoint too."""
    book, journal = _book(tmp_path / "j")
    journal.counted(TOPIC, 10)
    journal.counted(TOPIC, 25)
    journal.counted(OTHER, 3)
    journal.close()
    for _ in range(2):  # each start is a checkpoint: the counts are copied into it
        _, journal = _book(tmp_path / "j")
        assert journal.restored_counts == {TOPIC: 25, OTHER: 3}
        journal.close()
    book, journal = _book(tmp_path / "j")
    journal.count_source = lambda: {TOPIC: 30}
    journal.checkpoint(book)
    journal.close()
    _, journal = _book(tmp_path / "j")
    try:
        assert journal.restored_counts == {TOPIC: 30}
    finally:
        journal.close()


def test_a_deleted_group_and_retried_messages(tmp_path: Path) -> None:
    book, journal = _book(tmp_path / "j")
    book.declare(TOPIC, "g")
    book.declare(OTHER, "gone")
    _enqueue(book, b"retry-me")
    _enqueue(book, b"dropped", topic=OTHER)
    book.add_consumer(TOPIC, "g", KEY, prefetch=5)
    (delivery,) = book.dispatch(0.0)
    book.settle(Ack(delivery.stream, 1, 1, OUTCOME_FAILED, 60.0, "later"), 0.0)
    assert book.delete(OTHER, "gone") == 1
    journal.end_of_turn(book)
    journal.close()
    again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"retry-me", 1)]}  # waiting for its retry: held again
    finally:
        journal.close()


def test_a_torn_tail_is_cut_off_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book, journal = _book(tmp_path / "j")
    book.declare(TOPIC, "g")
    _enqueue(book, b"kept")
    journal.end_of_turn(book)
    _enqueue(book, b"torn")
    journal.end_of_turn(book)
    journal.close()
    (segment,) = (tmp_path / "j").glob("*.journal")
    os.truncate(segment, segment.stat().st_size - 3)  # the last record, cut mid-write
    with caplog.at_level(logging.WARNING, logger="ipcbus.server.journal"):
        again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"kept", 0)]}
        assert journal.statistics()["torn_bytes"] > 0
        assert "incomplete last record" in caplog.text
    finally:
        journal.close()


def test_a_corrupt_record_in_the_middle_is_reported_and_the_rest_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book, journal = _book(tmp_path / "j")
    book.declare(TOPIC, "g")
    for payload in (b"first-payload", b"middle-payload", b"last-payload"):
        _enqueue(book, payload)
        journal.end_of_turn(book)
    journal.close()
    (segment,) = (tmp_path / "j").glob("*.journal")
    data = bytearray(segment.read_bytes())
    data[data.index(b"middle-payload")] ^= 0xFF
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="ipcbus.server.journal"):
        again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"first-payload", 0), (b"last-payload", 0)]}
        assert journal.statistics()["corrupt_records"] == 1
        assert "checksum mismatch" in caplog.text
    finally:
        journal.close()


def test_compaction_keeps_the_journal_bounded(tmp_path: Path) -> None:
    """100 MB through a journal whose live part is at most ~100 KB: its file stays small."""
    max_bytes = 2 * 1024 * 1024
    book, journal = _book(tmp_path / "j", max_bytes=max_bytes)
    try:
        book.declare(TOPIC, "g")
        book.add_consumer(TOPIC, "g", KEY, prefetch=100)
        largest = 0
        payload = b"p" * 1000
        for _ in range(1000):
            _enqueue(book, *[payload] * 100)
            for delivery in book.dispatch(0.0):
                book.settle(
                    Ack(delivery.stream, delivery.first_seq, delivery.last_seq, OUTCOME_OK, 0, ""),
                    0,
                )
            journal.end_of_turn(book)
            largest = max(largest, sum(p.stat().st_size for p in (tmp_path / "j").iterdir()))
        assert journal.statistics()["checkpoints"] > 10
        assert largest <= max_bytes, largest
        assert not journal.full
    finally:
        journal.close()


def test_a_full_journal_holds_grouped_topics_back(tmp_path: Path) -> None:
    book, journal = _book(tmp_path / "j", max_bytes=256 * 1024)
    try:
        book.declare(TOPIC, "g")
        book.declare(OTHER, "h")
        for _ in range(10):  # nobody consumes: everything stays live
            _enqueue(book, b"x" * 40_000)
            journal.end_of_turn(book)
        assert journal.full
        assert book.update_full()
        assert book.full_topics == {TOPIC, OTHER}
        # Consumers take and ack it all: compaction shrinks the journal, the topics reopen.
        book.add_consumer(TOPIC, "g", KEY, prefetch=100)
        for delivery in book.dispatch(0.0):
            book.settle(
                Ack(delivery.stream, delivery.first_seq, delivery.last_seq, OUTCOME_OK, 0, ""), 0
            )
        journal._next_check = 0  # as the next turns would, once the segment grows on
        journal.end_of_turn(book)
        assert not journal.full
        assert book.update_full()
        assert book.full_topics == frozenset()
    finally:
        journal.close()


# -- the directory ----------------------------------------------------------------------------


def test_the_journal_directory_is_private_and_locked(tmp_path: Path) -> None:
    _, journal = _book(tmp_path / "j")
    try:
        assert (tmp_path / "j").stat().st_mode & 0o777 == 0o700
        with pytest.raises(JournalError, match="another hub uses"):
            _book(tmp_path / "j")
    finally:
        journal.close()
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(JournalError, match="mode 0755"):
        _book(tmp_path / "open")
    (tmp_path / "target").mkdir(mode=0o700)
    os.symlink(tmp_path / "target", tmp_path / "link")
    with pytest.raises(JournalError, match="symlink"):
        _book(tmp_path / "link")


def test_journal_options_from_the_environment_and_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IPCBUS_HUB_JOURNAL", "/somewhere")
    monkeypatch.setenv("IPCBUS_HUB_JOURNAL_FSYNC", "no")
    options = hub_options_from_env()
    assert (options.journal, options.journal_fsync) == ("/somewhere", False)
    assert HubOptions().journal is None
    assert HubOptions().journal_fsync
    assert parse_hub_option("journal_max_bytes", "1024") == 1024
    with pytest.raises(ValueError, match="yes/no"):
        parse_hub_option("journal_fsync", "maybe")


def _offset_of(segment: bytes, wanted: Callable[[int, memoryview], bool]) -> int:
    """Where the first record of ``segment`` that is ``wanted`` starts (its header)."""
    offset = 0
    for kind, body in records.scan(segment).records:
        if wanted(kind, body):
            return offset
        offset += records.HEADER.size + len(body)
    raise AssertionError("no such record")


def _two_turns_of_three(path: Path) -> None:
    book, journal = _book(path)
    book.declare(TOPIC, "g")
    for payload in (b"one", b"two", b"three"):
        _enqueue(book, payload)
        journal.end_of_turn(book)
    journal.close()


def test_a_damaged_checkpoint_end_in_the_only_segment_still_restores_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an adversarial review: one flipped byte of END lost every message, and the
    # segment was deleted by the next checkpoint.
    _two_turns_of_three(tmp_path / "j")
    (segment,) = (tmp_path / "j").glob("*.journal")
    data = bytearray(segment.read_bytes())
    offset = _offset_of(bytes(data), lambda kind, _body: kind == records.END)
    data[offset + 5] ^= 0xFF  # END's checksum
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="ipcbus.server.journal"):
        again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"one", 0), (b"two", 0), (b"three", 0)]}
        assert journal.statistics()["corrupt_records"] == 1
        assert "is damaged" in caplog.text
    finally:
        journal.close()


def test_a_damaged_length_in_a_segment_is_not_cut_off_as_a_torn_tail(tmp_path: Path) -> None:
    _two_turns_of_three(tmp_path / "j")
    (segment,) = (tmp_path / "j").glob("*.journal")
    data = bytearray(segment.read_bytes())
    first = _offset_of(bytes(data), lambda kind, body: b"one" in bytes(body))
    struct.pack_into("<I", data, first + 1, struct.unpack_from("<I", data, first + 1)[0] + 1)
    segment.write_bytes(bytes(data))
    again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"two", 0), (b"three", 0)]}
        stats = journal.statistics()
        assert (stats["torn_bytes"], stats["corrupt_records"]) == (0, 1)
    finally:
        journal.close()


def test_an_unfinished_checkpoint_gives_way_to_the_segment_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _two_turns_of_three(tmp_path / "j")
    (segment,) = (tmp_path / "j").glob("*.journal")
    # A hub killed while writing its checkpoint: a newer segment with BEGIN and no END.
    newer = segment.with_name(f"{int(segment.stem) + 1:012d}.journal")
    newer.write_bytes(_stream(records.begin(1)))
    newer.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="ipcbus.server.journal"):
        again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"one", 0), (b"two", 0), (b"three", 0)]}
        assert "unfinished checkpoint" in caplog.text
    finally:
        journal.close()


def test_records_a_search_found_do_not_prove_an_unfinished_checkpoint_ended(
    tmp_path: Path,
) -> None:
    """A newer segment with BEGIN, damage, then SETTLED records found by searching past it:
    they may be a payload's bytes, so the checkpoint counts as unfinished and the complete
    segment before it is used (found by review: the newer one was used, nothing restored)."""
    _two_turns_of_three(tmp_path / "j")
    (segment,) = (tmp_path / "j").glob("*.journal")
    newer = segment.with_name(f"{int(segment.stem) + 1:012d}.journal")
    newer.write_bytes(
        _stream(records.begin(1))
        + b"\x00" * 20
        + _stream(records.settled(1, 3), records.settled(1, 3))
    )
    newer.chmod(0o600)
    again, journal = _book(tmp_path / "j")
    try:
        assert _held(again) == {"g": [(b"one", 0), (b"two", 0), (b"three", 0)]}
    finally:
        journal.close()


def test_a_copy_sent_again_below_what_came_through_the_pipe_is_not_taken_for_one(
    tmp_path: Path,
) -> None:
    """The batches a killed hub never read (lost in the socket buffers) come to the next hub
    only as copies sent again, after the later batches ZeroMQ handed over from the pipe: their
    positions are below the pipe's, and yet the hub never had them. They must be held (as
    delivered once), not dropped; and a later hub restored from the journal must know the same."""
    with zmq.Context() as context, context.socket(zmq.XPUB) as xpub:
        xpub.linger = 0
        xpub.bind("inproc://pipe-below")
        book, journal = _book(tmp_path / "j")
        book.declare(TOPIC, "g")
        path = DataPath(book)
        path.fanout, path.journal = Fanout(xpub, 30.0), journal
        path.handle(xpub, _numbered(b"A", 6, False, b"a5", b"a6"))  # out of the pipe
        path.handle(xpub, _numbered(b"A", 2, True, b"a1", b"a2"))  # lost in the buffers
        path.handle(xpub, _numbered(b"A", 4, True, b"a3", b"a4"))  # lost in the buffers
        path.handle(xpub, _numbered(b"A", 6, True, b"a5", b"a6"))  # came through the pipe
        assert path.duplicates == 2
        expected = {
            "g": [(b"a5", 0), (b"a6", 0), *[(b"a1", 1), (b"a2", 1), (b"a3", 1), (b"a4", 1)]]
        }
        assert _held(book) == expected
        journal.end_of_turn(book)
        journal.close()  # killed before it confirmed anything

        # Killed again: the next hub restores the runs it journaled, and nothing more.
        book, journal = _book(tmp_path / "j")
        try:
            positions = book.positions
            assert [positions.taken(b"A", at) for at in (2, 4, 6)] == [True, True, True]
            assert [positions.taken(b"A", at) for at in (7, 8)] == [False, False]
        finally:
            journal.close()

        # A hub that journaled only what came through the pipe: the lower copies are news.
        book, journal = _book(tmp_path / "k")
        book.declare(TOPIC, "g")
        path = DataPath(book)
        path.fanout, path.journal = Fanout(xpub, 30.0), journal
        path.handle(xpub, _numbered(b"A", 6, False, b"a5", b"a6"))  # out of the pipe
        journal.end_of_turn(book)
        journal.checkpoint(book)  # compaction keeps what it knows, no more
        journal.close()
        book, journal = _book(tmp_path / "k")
        try:
            positions = book.positions
            assert [positions.taken(b"A", at) for at in (2, 4, 6)] == [False, False, True]
        finally:
            journal.close()
