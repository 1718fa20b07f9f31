"""The journal's records and what replaying them leaves (hub process). Pure: bytes in, bytes out.

A record is a 9-byte header (kind, body length, CRC-32 of kind and body) and its body:

- ``ENQUEUED``: messages of one batch as the publisher sent them (meta, sizes, payloads: opaque,
  never unpickled) and, for each queue group of the topic, the group and the id of its first
  message; the attempt they had (0 for a publish, more for the live messages a checkpoint copies);
- ``DELIVERED``: a range of message ids was handed to a consumer, as attempt N;
- ``SETTLED``: a range of message ids is done (acked, dead-lettered, or dropped after every
  consumer rejected it);
- ``DROPPED``: a queue group was deleted with what it held;
- ``COUNTED``: a broadcast topic's message count, written before the batch that reached it is
  sent, so that a hub restarted with the journal continues the counts and a subscriber counts,
  in ``gaps``, what the dead hub had sent it and it never received;
- ``DEAD``: the hub's record of a dead letter (message id, attempts, error: what ``ipcbus stats``
  shows), so that it outlives a crash too;
- ``POSITION``: a run of a publisher's positions (two positions, then its client id): every
  batch it numbered from the low to the high one was read in a row by the hub
  (``server.positions``); written after each batch's ``ENQUEUED`` (the run up to it) and, for
  every run kept, by a checkpoint;
- ``BEGIN`` / ``END``: a checkpoint: the segment that starts with them holds every live message,
  so older segments are not needed (``BEGIN`` carries the next message id).

``scan`` (``journal_scan``, re-exported here) reads a segment and tells where its good records
end: a torn tail (a record cut short by a kill mid-write) and damaged records in the middle are
reported, never raised.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..wire.protocol import unpack_sizes
from .journal_scan import (
    BEGIN,
    COUNTED,
    DEAD,
    DELIVERED,
    DROPPED,
    END,
    ENQUEUED,
    HEADER,
    POSITION,
    SETTLED,
    Scan,
    scan,
)

__all__ = [
    "BEGIN",
    "COUNTED",
    "DEAD",
    "DELIVERED",
    "DROPPED",
    "END",
    "ENQUEUED",
    "POSITION",
    "SETTLED",
    "LiveRun",
    "Replay",
    "Scan",
    "begin",
    "counted",
    "dead",
    "delivered",
    "dropped",
    "end",
    "enqueued",
    "position",
    "scan",
    "settled",
]

AFTER_CHECKPOINT = frozenset({DELIVERED, SETTLED, DROPPED})  # kinds a checkpoint never writes
MAX_ID = 1 << 62  # message ids beyond: a damaged or foreign record (a hub starts at 1)
_MAX_ERROR = 4096  # bytes of a dead letter's error kept
_MAX_DEAD = 1000  # dead letter records kept per group (as the hub's)
_RANGE = struct.Struct("<QI")  # first message id, count
_ATTEMPT = struct.Struct("<QII")  # first message id, count, attempt
_NAME = struct.Struct("<H")
_ENQUEUED_TAIL = struct.Struct("<IHI")  # attempt, meta length, count
_GROUP_ID = struct.Struct("<Q")
_RUN = struct.Struct("<QQ")  # a run of a publisher's positions: low, high
_WHEN = struct.Struct("<d")  # a dead letter's time.time()


def _record(kind: int, parts: Sequence[Any]) -> list[Any]:
    crc = zlib.crc32(bytes((kind,)))
    length = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
        length += len(part)
    return [HEADER.pack(kind, length, crc), *parts]


def _name(text: bytes) -> bytes:
    return _NAME.pack(len(text)) + text


def enqueued(
    topic: bytes,
    groups: Sequence[tuple[str, int]],
    meta: bytes,
    sizes: Any,
    payloads: Any,
    attempt: int = 0,
) -> list[Any]:
    """The record's parts (header first), for ``os.writev``: the payloads are not copied."""
    head = [_name(topic), _NAME.pack(len(groups))]
    for name, first_id in groups:
        head.append(_name(name.encode()))
        head.append(_GROUP_ID.pack(first_id))
    head.append(_ENQUEUED_TAIL.pack(attempt, len(meta), len(sizes) // 4))
    head.append(meta)
    return _record(ENQUEUED, [b"".join(head), sizes, payloads])


def delivered(first_id: int, count: int, attempt: int) -> list[Any]:
    return _record(DELIVERED, [_ATTEMPT.pack(first_id, count, attempt)])


def settled(first_id: int, count: int) -> list[Any]:
    return _record(SETTLED, [_RANGE.pack(first_id, count)])


def dropped(topic: bytes, name: str) -> list[Any]:
    return _record(DROPPED, [_name(topic) + _name(name.encode())])


def counted(topic: bytes, count: int) -> bytes:
    """One piece (it is written on its own, before a fan-out send)."""
    return b"".join(_record(COUNTED, [_GROUP_ID.pack(count) + topic]))


def dead(
    topic: bytes,
    name: str,
    message_id: str,
    attempts: int,
    error: str,
    when: float,
    meta: bytes,
    payload: Any,
) -> list[Any]:
    """A dead letter with what ``ipcbus requeue`` needs: its batch's meta and its payload
    (opaque bytes, as the hub keeps them)."""
    head = _name(topic) + _name(name.encode()) + _name(message_id.encode())
    head += _ATTEMPT.pack(0, 0, attempts) + _WHEN.pack(when)
    head += _name(error.encode()[:_MAX_ERROR]) + _name(bytes(meta))
    return _record(DEAD, [head, payload])


def position(publisher: bytes, low: int, high: int) -> list[Any]:
    return _record(POSITION, [_RUN.pack(low, high) + publisher])


def begin(next_id: int) -> list[Any]:
    return _record(BEGIN, [_GROUP_ID.pack(next_id)])


def end() -> list[Any]:
    return _record(END, [])


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterRecord:
    """A dead letter as the journal kept it (the fields of ``server.dead_letters.DeadEntry``)."""

    message_id: str
    attempts: int
    error: str
    when: float
    meta: bytes
    payload: bytes


def _read_name(body: memoryview, offset: int) -> tuple[bytes, int]:
    (length,) = _NAME.unpack_from(body, offset)
    offset += _NAME.size
    if offset + length > len(body):
        raise ValueError("a name runs past its record")
    return bytes(body[offset : offset + length]), offset + length


@dataclass(eq=False)
class LiveRun:
    """Messages of one ENQUEUED record for one group, and what later records said of them."""

    topic: bytes
    name: str
    first_id: int
    count: int
    meta: bytes
    sizes: memoryview
    payloads: memoryview
    attempt: int
    attempts: array[int] | None = None  # per message, once a DELIVERED record named some
    settled: bytearray | None = None  # per message, once a SETTLED record named some

    def mark(self, low: int, high: int, attempt: int | None) -> None:
        if attempt is None:
            if self.settled is None:
                self.settled = bytearray(self.count)
            self.settled[low:high] = b"\x01" * (high - low)
        else:
            if self.attempts is None:
                self.attempts = array("I", [self.attempt]) * self.count
            self.attempts[low:high] = array("I", [attempt]) * (high - low)

    def live_parts(self) -> Iterator[tuple[int, int, int]]:
        """(low, high, attempt) of the messages not settled, in order, cut where the attempt
        changes."""
        low = None
        current = 0
        for index in range(self.count):
            alive = self.settled is None or not self.settled[index]
            attempt = self.attempts[index] if self.attempts is not None else self.attempt
            if low is not None and (not alive or attempt != current):
                yield low, index, current
                low = None
            if alive and low is None:
                low, current = index, attempt
        if low is not None:
            yield low, self.count, current


class Replay:
    """Applies a checkpoint segment's records, in order: what is live at the end is what a hub
    restarted with this journal holds."""

    def __init__(self) -> None:
        self.runs: dict[int, LiveRun] = {}  # by first message id
        self._starts: list[int] = []  # sorted first ids
        self.next_id = 1
        self.counts: dict[bytes, int] = {}  # broadcast topic -> its last message count
        # (topic, group) -> its latest dead letters
        self.dead: dict[tuple[bytes, str], deque[DeadLetterRecord]] = {}
        # publisher (client id) -> its runs journaled: low -> the highest high seen with it
        # (a run grows one batch, one record, at a time)
        self.positions: dict[bytes, dict[int, int]] = {}
        self.began = self.ended = False
        self.bad_records = 0  # well-formed on disk (CRC good) but not understood

    def apply(self, kind: int, body: memoryview) -> None:
        try:
            self._apply(kind, body)
        except (ValueError, struct.error, UnicodeDecodeError):
            self.bad_records += 1

    def _apply(self, kind: int, body: memoryview) -> None:
        if kind == BEGIN:
            (next_id,) = _GROUP_ID.unpack_from(body)
            if next_id > MAX_ID:
                raise ValueError(f"a next message id of {next_id}")
            self.next_id = next_id
            self.began = True
        elif kind == END:
            self.ended = True
        elif kind == DEAD:
            topic, offset = _read_name(body, 0)
            group, offset = _read_name(body, offset)
            message_id, offset = _read_name(body, offset)
            attempts = _ATTEMPT.unpack_from(body, offset)[2]
            offset += _ATTEMPT.size
            (when,) = _WHEN.unpack_from(body, offset)
            error, offset = _read_name(body, offset + _WHEN.size)
            meta, offset = _read_name(body, offset)
            kept = self.dead.setdefault((topic, group.decode()), deque(maxlen=_MAX_DEAD))
            kept.append(
                DeadLetterRecord(
                    message_id.decode(),
                    attempts,
                    error.decode(errors="replace"),
                    when,
                    meta,
                    bytes(body[offset:]),
                )
            )
        elif kind == POSITION:
            low, high = _RUN.unpack_from(body)
            publisher = bytes(body[_RUN.size :])
            if not 0 < len(publisher) < 256:  # a ZeroMQ routing id
                raise ValueError(f"a publisher id of {len(publisher)} bytes")
            if not low <= high < 1 << 63:
                raise ValueError(f"a run of positions from {low} to {high}")
            runs = self.positions.pop(publisher, {})
            self.positions[publisher] = runs  # the most recent last
            runs[low] = max(runs.get(low, high), high)
        elif kind == COUNTED:
            (count,) = _GROUP_ID.unpack_from(body)
            self.counts[bytes(body[_GROUP_ID.size :])] = count
        elif kind == ENQUEUED:
            self._enqueued(body)
        elif kind == DELIVERED:
            first, count, attempt = _ATTEMPT.unpack_from(body)
            self._mark(first, count, attempt)
        elif kind == SETTLED:
            first, count = _RANGE.unpack_from(body)
            self._mark(first, count, None)
        elif kind == DROPPED:
            topic, offset = _read_name(body, 0)
            name = _read_name(body, offset)[0].decode()
            self.dead.pop((topic, name), None)
            for first_id in [k for k, r in self.runs.items() if (r.topic, r.name) == (topic, name)]:
                del self.runs[first_id]
                self._starts.remove(first_id)

    def _enqueued(self, body: memoryview) -> None:
        topic, offset = _read_name(body, 0)
        (groups,) = _NAME.unpack_from(body, offset)
        offset += _NAME.size
        targets = []
        for _ in range(groups):
            raw_name, offset = _read_name(body, offset)
            (first_id,) = _GROUP_ID.unpack_from(body, offset)
            offset += _GROUP_ID.size
            targets.append((raw_name.decode(), first_id))
        attempt, meta_length, count = _ENQUEUED_TAIL.unpack_from(body, offset)
        offset += _ENQUEUED_TAIL.size
        meta = bytes(body[offset : offset + meta_length])
        offset += meta_length
        sizes = body[offset : offset + 4 * count]
        payloads = body[offset + 4 * count :]
        if len(sizes) != 4 * count or sum(unpack_sizes(sizes)) != len(payloads):
            raise ValueError("sizes do not match the payloads")
        if any(first_id + count > MAX_ID for _name, first_id in targets):
            raise ValueError("message ids beyond any a hub hands out")
        for name, first_id in targets:
            run = LiveRun(topic, name, first_id, count, meta, sizes, payloads, attempt)
            if first_id in self.runs:
                self._starts.remove(first_id)
            self.runs[first_id] = run
            bisect.insort(self._starts, first_id)
            self.next_id = max(self.next_id, first_id + count)

    def _mark(self, first: int, count: int, attempt: int | None) -> None:
        last = first + count  # exclusive
        if last > MAX_ID:
            raise ValueError(f"message ids up to {last}: more than any hub hands out")
        self.next_id = max(self.next_id, last)  # ids named are used, whatever BEGIN said
        index = bisect.bisect_right(self._starts, first) - 1
        index = max(index, 0)
        while index < len(self._starts) and self._starts[index] < last:
            run = self.runs[self._starts[index]]
            low, high = max(first, run.first_id), min(last, run.first_id + run.count)
            if low < high:
                run.mark(low - run.first_id, high - run.first_id, attempt)
            index += 1

    def live(self) -> Iterator[tuple[LiveRun, int, int, int]]:
        """Every live part: (run, low, high, attempt), in message id order."""
        for first_id in self._starts:
            run = self.runs[first_id]
            for low, high, attempt in run.live_parts():
                yield run, low, high, attempt
