"""Reading a journal segment back (hub process, at start): which records are good, where they
end, and what is damaged. Pure: bytes in, a ``Scan`` out. The records themselves are
``journal_records``'s.

A record of a known kind that runs past the end is a torn tail (a kill in the middle of a
write), and nothing in it is searched: its payload is a publisher's bytes, which may hold
anything shaped like records. A damaged record in the middle is skipped and reported, and reading
goes on at the next good record: where it said it ends, or, when that is no record (its length
was damaged), found by a bounded search.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field

__all__ = ["HEADER", "KINDS", "Scan", "scan"]

# The kinds of records (what each holds: journal_records), defined here, where reading needs
# them, and imported there.
ENQUEUED, DELIVERED, SETTLED, DROPPED, BEGIN, END, COUNTED, DEAD, POSITION = range(1, 10)
KINDS = frozenset(range(ENQUEUED, POSITION + 1))
HEADER = struct.Struct("<BII")  # kind, body length, crc32(kind byte + body)
_LENGTH = struct.Struct("<I")


@dataclass
class Scan:
    """What a segment holds: its good records, where they end, and what was wrong."""

    records: list[tuple[int, memoryview]] = field(default_factory=list)
    good_end: int = 0  # the offset just after the last good record
    torn_bytes: int = 0  # an incomplete record at the end (kill mid-write): cut off
    corrupt: list[str] = field(default_factory=list)  # records skipped, and why
    # The index in ``records`` of the first record found by a search (``_resync``), if any: a
    # payload's bytes may have been taken for it, so it proves less than one read in order.
    searched_at: int | None = None


def scan(data: bytes) -> Scan:
    """The records of one segment. A record of a known kind that runs past the end is a torn
    tail (a kill in the middle of a write), and nothing in it is searched: its payload is a
    publisher's bytes, which may hold anything shaped like records. A damaged record in the middle
    is skipped and reported, and reading goes on at the next good record: where it said it
    ends, or, when that is no record (its length was damaged), found by a bounded search
    (``_resync``). Records read after a search are counted from ``searched_at``."""
    view = memoryview(data)
    result = Scan()
    offset, size = 0, len(data)
    while offset < size:
        if size - offset < HEADER.size:
            result.torn_bytes = size - offset
            break
        kind, length, _crc = HEADER.unpack_from(view, offset)
        stop = offset + HEADER.size + length
        if _good(view, offset) is not None:
            result.records.append((kind, view[offset + HEADER.size : stop]))
            offset = result.good_end = stop
            continue
        if kind in KINDS and stop >= size:
            result.torn_bytes = size - offset  # the last record, cut short while being written
            break
        if kind in KINDS and _good(view, stop) is not None:
            # The body was damaged, not its length: the next record starts where it said.
            result.corrupt.append(f"record at byte {offset} ({length} bytes): checksum mismatch")
            offset = stop
            continue
        found, searched = _resync(view, offset + 1)
        if found is None:
            what = "garbage" if searched else "damage, not searched further,"
            result.corrupt.append(f"{what} at byte {offset}: {size - offset} bytes skipped")
            break
        result.corrupt.append(
            f"damage at byte {offset}: {found - offset} bytes skipped to the next good record"
        )
        if result.searched_at is None:
            result.searched_at = len(result.records)
        offset = found
    return result


def _good(view: memoryview, offset: int) -> int | None:
    """The end of the record at ``offset`` if it is whole and its checksum matches."""
    if len(view) - offset < HEADER.size:
        return None
    kind, length, crc = HEADER.unpack_from(view, offset)
    stop: int = offset + HEADER.size + length
    if kind not in KINDS or stop > len(view):
        return None
    if zlib.crc32(view[offset + HEADER.size : stop], zlib.crc32(bytes((kind,)))) != crc:
        return None
    return stop


_KIND_BYTE = re.compile(b"[%c-%c]" % (min(KINDS), max(KINDS)))  # a header's first byte
# What a search for the next good record may cost at most (a damaged length in a large segment):
# candidate offsets looked at, and bytes checksummed. Past either it gives up (a few seconds).
_RESYNC_CANDIDATES = 2_000_000
_RESYNC_BYTES = 1 << 30


def _resync(view: memoryview, start: int) -> tuple[int | None, bool]:
    """The offset of the first good record at or after ``start`` that is followed by another,
    by a torn tail or by the end of the segment, and whether the search reached the end
    (``False``: it gave up, past its budget)."""
    size = len(view)
    hashed = 0
    for looked, match in enumerate(_KIND_BYTE.finditer(view, start)):
        if looked >= _RESYNC_CANDIDATES:
            return None, False
        offset = match.start()
        if size - offset < HEADER.size:
            break
        (length,) = _LENGTH.unpack_from(view, offset + 1)
        stop = offset + HEADER.size + length
        if stop > size or (stop < size and view[stop] not in KINDS):
            continue  # cheap tests first: the checksum is what costs
        hashed += length
        if hashed > _RESYNC_BYTES:
            return None, False
        if _good(view, offset) is not None and _ends_or_goes_on(view, stop):
            return offset, True
    return None, True


def _ends_or_goes_on(view: memoryview, offset: int) -> bool:
    """After a record the search found: the end, a good record, or a torn tail. (A payload may
    hold bytes shaped like that too; the search runs only for damage in the middle, never
    inside a torn tail.)"""
    size = len(view)
    if size - offset < HEADER.size:
        return True  # the end, or a header cut short
    kind, length, _crc = HEADER.unpack_from(view, offset)
    if kind in KINDS and offset + HEADER.size + length > size:
        return True
    return _good(view, offset) is not None
