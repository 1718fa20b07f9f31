"""The queue journal's segment files (hub process): their names, writing a checkpoint (a new
segment with every live message), and reading the newest complete checkpoint back at start, a
torn tail cut off and corrupt records counted. The journal itself (``journal.py``) appends to
them."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from ..exceptions import JournalError
from ..wire.paths import open_private_file
from . import journal_records as records
from .dead_letters import DeadEntry

if TYPE_CHECKING:
    from .queues import QueueBook

__all__ = [
    "dead_record",
    "replay_newest",
    "segment_numbers",
    "segment_path",
    "sync_directory",
    "write_all",
    "write_checkpoint",
]

logger = logging.getLogger("ipcbus.server.journal")

SUFFIX = ".journal"
_MAX_REPORTED = 10  # corrupt records logged one by one; the rest are counted
_IOV_MAX = 512  # buffers per writev call (Linux allows 1024)


def segment_numbers(directory: str) -> list[int]:
    numbers = []
    for name in os.listdir(directory):
        stem, _, suffix = name.partition(".")
        if "." + suffix == SUFFIX and stem.isdigit():
            numbers.append(int(stem))
    return sorted(numbers)


def segment_path(directory: str, number: int) -> str:
    return os.path.join(directory, f"{number:012d}{SUFFIX}")


def replay_newest(
    directory: str, segments: list[int], counts: dict[str, int]
) -> records.Replay | None:
    """The newest complete checkpoint segment, replayed (a torn tail cut off); ``counts`` gets
    ``torn_bytes`` and ``corrupt_records``."""
    for number in reversed(segments):
        path = segment_path(directory, number)
        try:
            fd = open_private_file(path, os.O_RDWR)
        except OSError as exc:
            raise JournalError(f"cannot read the journal segment {path}: {exc}") from exc
        with os.fdopen(fd, "r+b") as file:
            data = file.read()
            found = records.scan(data)
            replay = records.Replay()
            for kind, body in found.records:
                replay.apply(kind, body)
            if not (replay.began and replay.ended):
                # Only what was read in order, before any search, can prove the checkpoint
                # ended: a search may take a payload's bytes for records.
                in_order = found.records[: found.searched_at]
                ended = any(kind in records.AFTER_CHECKPOINT for kind, _body in in_order)
                if number != segments[0] and not (found.corrupt and ended):
                    # A hub killed while it wrote this checkpoint: the one before is whole.
                    logger.warning("journal: %s is an unfinished checkpoint: not used", path)
                    continue
                # No segment before it (deleted once this checkpoint was on disk), or records
                # that are only written after a checkpoint's end follow: damage, not a kill.
                logger.log(
                    logging.ERROR if found.corrupt else logging.WARNING,
                    "journal: the checkpoint at the start of %s is %s: restored from what can "
                    "be read of it",
                    path,
                    "damaged" if found.corrupt else "incomplete",
                )
            if found.torn_bytes:
                # A hub killed while writing: its last record is incomplete. Cut it off, so
                # the segment ends with good records.
                file.truncate(found.good_end)
                counts["torn_bytes"] += found.torn_bytes
                logger.warning(
                    "journal: cut an incomplete last record (%d bytes) off %s",
                    found.torn_bytes,
                    path,
                )
        corrupt = [*found.corrupt, *["a record not understood"] * replay.bad_records]
        counts["corrupt_records"] += len(corrupt)
        for what in corrupt[:_MAX_REPORTED]:
            logger.error("journal: %s: %s (skipped)", path, what)
        if len(corrupt) > _MAX_REPORTED:
            logger.error("journal: %s: %d more bad records", path, len(corrupt) - _MAX_REPORTED)
        return replay
    if segments:
        logger.error("journal: no complete checkpoint in %s: nothing restored", directory)
        counts["corrupt_records"] += 1
    return None


def write_checkpoint(path: str, book: QueueBook, counts: dict[bytes, int]) -> tuple[int, int, int]:
    """Write a checkpoint of ``book`` to the new segment ``path`` and sync it: the next message
    id, the broadcast ``counts``, the publishers' positions, the dead letters and every live
    message. Returns its descriptor (open for appending), its size and the live messages."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    size = messages = 0
    try:
        parts: list[Any] = records.begin(book.next_id)
        parts += [records.counted(topic, count) for topic, count in counts.items()]
        for publisher, low, high in book.positions.items():
            parts += records.position(publisher, low, high)
        for group in book.groups():
            for entry in group.dead:
                parts += dead_record(group.topic, group.name, entry)
        for group, run in book.live_runs():
            parts += records.enqueued(
                group.topic,
                [(group.name, run.first_id)],
                run.meta,
                run.sizes,
                run.payloads,
                run.attempt,
            )
            messages += run.count
            if len(parts) >= _IOV_MAX:
                size += write_all(fd, parts)
                parts = []
        size += write_all(fd, [*parts, *records.end()])
        os.fdatasync(fd)  # always: the old segment goes next
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd, size, messages


def dead_record(topic: bytes, name: str, entry: DeadEntry) -> list[Any]:
    """The record of a group's dead letter (what ``ipcbus stats`` shows, and its payload)."""
    return records.dead(
        topic,
        name,
        entry.message_id,
        entry.attempts,
        entry.error,
        entry.when,
        entry.meta,
        entry.payload,
    )


def write_all(fd: int, parts: list[Any]) -> int:
    """``writev`` every part, in order, however the kernel splits it; the bytes written."""
    total = 0
    for start in range(0, len(parts), _IOV_MAX):
        chunk = parts[start : start + _IOV_MAX]
        expected = sum(len(part) for part in chunk)
        written = os.writev(fd, chunk)
        if written < expected:  # rare on a regular file: the rest in one piece
            rest = b"".join(bytes(part) for part in chunk)[written:]
            while rest:
                rest = rest[os.write(fd, rest) :]
        total += expected
    return total


def sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
