"""The queue journal's segment files (hub process): their names, and reading the newest
complete checkpoint back at start, a torn tail cut off and corrupt records counted. The journal
itself (``journal.py``) writes them."""

from __future__ import annotations

import logging
import os

from ..exceptions import JournalError
from ..wire.paths import open_private_file
from . import journal_records as records

__all__ = ["replay_newest", "segment_numbers", "segment_path"]

logger = logging.getLogger("ipcbus.server.journal")

SUFFIX = ".journal"
_MAX_REPORTED = 10  # corrupt records logged one by one; the rest are counted


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
