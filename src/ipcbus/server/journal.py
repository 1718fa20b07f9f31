"""The queue journal (hub process): the messages of topics with queue groups, on disk, so that a
hub restarted after a crash delivers again what was not acked (docs/guarantees.md, "Journal").

The directory is this user's alone (created 0700; refused if it is a symlink, another user's, or
open to others) and locked by one hub at a time. It holds one *segment* file at a time: a
checkpoint (every live message, as ``ENQUEUED`` records) followed by what happened since
(``ENQUEUED``, ``DELIVERED``, ``SETTLED``, ``DROPPED``; ``journal_records``). Compaction writes a
new checkpoint segment and deletes the old one, when at most half of what the segment recorded is
still live: disk use stays within about twice the live messages (plus ``_floor``).

Writes are group commits: the queue book's hooks buffer records; the relay calls ``end_of_turn``
once per loop turn, which writes them with one ``writev`` and, with ``fsync``, one
``fdatasync`` when the turn took publishes or a flush waits, then answers the flushes it held
back: ``flush()`` returns once what was published before it is journaled. Payloads stay opaque.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from ..config import HubOptions
from ..exceptions import JournalError
from ..wire.paths import (
    check_ancestors,
    check_directory,
    ensure_private_directory,
    open_private_file,
)
from . import journal_records as records
from .dead_letters import DeadEntry
from .fanout import Fanout
from .journal_segments import (
    dead_record,
    replay_newest,
    segment_numbers,
    segment_path,
    sync_directory,
    write_all,
    write_checkpoint,
)
from .queues import QueueBook
from .runs import Run

__all__ = ["Journal"]

logger = logging.getLogger(__name__)

# A turn reads publishes until it has this many bytes to write (then it commits). Unbounded, a
# turn that read 40 batches of 1 MB wrote and synced 40 MB before it answered a heartbeat again
# (over a second, measured), and overshot journal_max_bytes.
_TURN_BYTES = 4 * 1024 * 1024


class Journal:
    def __init__(self, directory: str, *, fsync: bool = True, max_bytes: int = 1 << 30) -> None:
        self.directory = os.path.abspath(directory)
        self.fsync = fsync
        self.max_bytes = max_bytes
        # Compaction is not worth it below this size; a small journal_max_bytes lowers it.
        self._floor = max(64 * 1024, min(64 * 1024 * 1024, max_bytes // 4))
        self._lock_fd = -1
        self._fd = -1
        self._number = 0
        self._size = 0  # bytes in the current segment
        self._messages = 0  # messages (per group) the current segment recorded as enqueued
        self._next_check = 0  # segment size at which compaction is considered again
        self._pending: list[Any] = []
        self._pending_bytes = 0
        self._unsynced_data = False  # publishes written since the last fdatasync
        self._failing = False  # the last write failed (disk full?): grouped topics held back
        self._answers: list[tuple[zmq.Socket[bytes], list[bytes]]] = []
        self.full = False
        self._rewrite = False  # a checkpoint is due at the end of this turn (rewrite())
        # Broadcast topics' message counts: restored at open (the fan-out continues them), and
        # where a checkpoint reads the current ones (set by the relay).
        self.restored_counts: dict[bytes, int] = {}
        self.count_source: Callable[[], dict[bytes, int]] = lambda: self.restored_counts
        self.counts = {
            "restored": 0,
            "torn_bytes": 0,
            "corrupt_records": 0,
            "checkpoints": 0,
            "fsyncs": 0,
            "write_errors": 0,
        }

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open_for(cls, options: HubOptions, book: QueueBook) -> Journal:
        """The journal ``options`` name, opened (``open``) for ``book``."""
        assert options.journal is not None
        journal = cls(
            options.journal, fsync=options.journal_fsync, max_bytes=options.journal_max_bytes
        )
        journal.open(book)
        return journal

    def count_for(self, fanout: Fanout) -> None:
        """Continue the broadcast counts of the hub before, and write each new one."""
        fanout.restored_seq = self.restored_counts
        fanout.on_count = self.counted
        self.count_source = fanout.counts

    def open(self, book: QueueBook) -> None:
        """Take the directory, restore into ``book`` what the last hub left live, and start a
        fresh checkpoint segment. ``JournalError`` when the directory is not safe or in use."""
        try:
            check_ancestors(self.directory)  # before mkdir: nothing made below another's path
            ensure_private_directory(self.directory)
            check_directory(self.directory)
            self._lock_fd = open_private_file(
                os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT
            )
        except OSError as exc:
            raise JournalError(f"cannot use the journal at {self.directory}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(f"another hub uses the journal at {self.directory}") from None
            raise JournalError(f"cannot lock the journal at {self.directory}: {exc}") from exc
        try:
            segments = self._segments()
            replay = self._replay(segments)
            if replay is not None:
                self._restore(replay, book)
            self._number = max(segments, default=0)
            book.journal = self
            self.checkpoint(book)
        except BaseException:
            book.journal = None
            self.close()
            raise

    def _segments(self) -> list[int]:
        return segment_numbers(self.directory)

    def _path(self, number: int) -> str:
        return segment_path(self.directory, number)

    def _replay(self, segments: list[int]) -> records.Replay | None:
        return replay_newest(self.directory, segments, self.counts)

    def _restore(self, replay: records.Replay, book: QueueBook) -> None:
        restored = 0
        for live, low, high, attempt in replay.live():
            whole = Run(live.meta, live.sizes, live.payloads, live.first_id, live.count, attempt)
            part = whole if (low, high) == (0, live.count) else whole.part(low, high)
            book.restore(live.topic, live.name, part)
            restored += part.count
        for (topic, name), dead in replay.dead.items():
            for kept in dead:
                entry = DeadEntry(
                    kept.message_id, kept.attempts, kept.error, kept.when, kept.meta, kept.payload
                )
                book.restore_dead(topic, name, entry)
        book.reserve_ids(replay.next_id)
        self.restored_counts = replay.counts
        for publisher, runs in replay.positions.items():
            for low, high in runs.items():  # what it journaled is restored already
                book.positions.restore(publisher, low, high)
        self.counts["restored"] = restored
        if restored:
            logger.info("journal: %d queue messages restored from %s", restored, self.directory)

    # -- the queue book's hooks -------------------------------------------------------------

    def enqueued(
        self,
        topic: bytes,
        groups: Sequence[tuple[str, int]],
        meta: bytes,
        sizes: Any,
        data: Any,
        attempt: int = 0,
        publisher: tuple[bytes, int, int] | None = None,
    ) -> None:
        self._add(records.enqueued(topic, groups, meta, sizes, data, attempt))
        if publisher is not None:  # numbered: a copy sent again to the next hub is dropped
            self._add(records.position(*publisher))
        self._messages += len(groups) * (len(sizes) // 4)
        self._unsynced_data = True

    def counted(self, topic: bytes, count: int) -> None:
        """A fan-out send of ``topic`` takes its count to ``count``: on disk before it leaves
        (one small write, no sync: it has to survive a kill of the hub, not a power loss)."""
        record = records.counted(topic, count)
        if not self.write():
            return
        try:
            write_all(self._fd, [record])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self.counts["write_errors"] += 1
            return
        self._size += len(record)

    def delivered(self, first_id: int, count: int, attempt: int) -> None:
        self._add(records.delivered(first_id, count, attempt))

    def settled(self, first_id: int, count: int) -> None:
        self._add(records.settled(first_id, count))

    def dropped(self, topic: bytes, name: str) -> None:
        self._add(records.dropped(topic, name))

    def dead(self, topic: bytes, name: str, entry: DeadEntry) -> None:
        self._add(dead_record(topic, name, entry))

    def rewrite(self) -> None:
        """The book changed in a way no record says (``ipcbus requeue``, ``purge``): write a
        checkpoint of what is live at the end of this turn."""
        self._rewrite = True

    @property
    def turn_done(self) -> bool:
        """Enough publishes for one turn (the relay stops reading them and commits)."""
        return self._pending_bytes >= _TURN_BYTES

    def _add(self, parts: list[Any]) -> None:
        self._pending += parts
        self._pending_bytes += sum(len(part) for part in parts)

    # -- writing ----------------------------------------------------------------------------

    def write(self) -> bool:
        """Write what is buffered (it then survives a kill of the hub, not a power loss)."""
        if not self._pending:
            return True
        try:
            write_all(self._fd, self._pending)
        except OSError as exc:
            # Disk full or failing: take back the half-written part, keep the records, hold
            # the grouped topics back and try again next turn.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            if not self._failing:
                logger.error("journal: cannot write to %s: %s", self.directory, exc)
            self.counts["write_errors"] += 1
            self._failing = self.full = True
            return False
        self._size += self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        if self._failing:
            self._failing = False
            logger.warning("journal: writing to %s again", self.directory)
        return True

    def answer_later(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        """A flush answer, sent once what came before it is journaled (``end_of_turn``)."""
        self._answers.append((router, frames))

    def end_of_turn(self, book: QueueBook) -> None:
        """Group commit: write the turn's records, sync once, answer the flushes held back;
        then compact if it pays, and say whether the journal is full."""
        if not self.write():
            return  # answers wait: what they confirm is not on disk
        if self.fsync and self._unsynced_data:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # EIO: written, perhaps not on disk; the hub serves on
                self.counts["write_errors"] += 1
                logger.error("journal: cannot sync %s: %s", self.directory, exc)
            self.counts["fsyncs"] += 1
            self._unsynced_data = False
        if self._answers:
            answers, self._answers = self._answers, []
            for router, frames in answers:
                with contextlib.suppress(zmq.ZMQError):  # the client left: nobody waits
                    router.send_multipart(frames, zmq.NOBLOCK)
        if self._rewrite:
            self._rewrite = False
            try:
                self.checkpoint(book)
            except OSError as exc:  # disk full: the old segment stays, tried again later
                self._rewrite = True
                self.counts["write_errors"] += 1
                logger.error("journal: cannot compact %s: %s", self.directory, exc)
        # While full, every turn: publishers wait, so the segment grows by acks alone, and the
        # checkpoint that reopens the topics must not wait for growth that cannot come.
        if self.full or (self._size >= self._next_check and self._size > self._floor):
            self._next_check = self._size + self._floor // 8
            live = book.live_messages()
            # Half of what the segment recorded is settled: a checkpoint at least halves it.
            # Over the limit, a quarter is enough (a checkpoint copies what is live: never one
            # per turn for nothing).
            over = self._size > self.max_bytes
            if 2 * live <= self._messages or (over and 4 * live <= 3 * self._messages):
                try:
                    self.checkpoint(book)
                except OSError as exc:  # disk full: the old segment stays, tried again later
                    self.counts["write_errors"] += 1
                    logger.error("journal: cannot compact %s: %s", self.directory, exc)
        self._update_full()

    def _update_full(self) -> None:
        full = self._size > self.max_bytes or (self.full and self._size > self.max_bytes // 2)
        if full != self.full and not self._failing:
            self.full = full
            if full:
                logger.warning(
                    "journal full (%d bytes > %d): topics with queue groups held back",
                    self._size,
                    self.max_bytes,
                )
            else:
                logger.info("journal below half its limit again: topics reopened")

    def checkpoint(self, book: QueueBook) -> None:
        """A new segment with every live message; the old one is deleted once it is on disk."""
        self.write()
        number = self._number + 1
        fd, size, messages = write_checkpoint(self._path(number), book, self.count_source())
        old = self._fd
        self._fd, self._number, self._size, self._messages = fd, number, size, messages
        self._next_check = size + self._floor // 8
        self._unsynced_data = False
        if old >= 0:
            os.close(old)
        for stale in self._segments():
            if stale != number:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(stale))
        sync_directory(self.directory)
        self.counts["checkpoints"] += 1

    def statistics(self) -> dict[str, int]:
        return {**self.counts, "bytes": self._size, "full": int(self.full)}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.write()
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1
