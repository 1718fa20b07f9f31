"""Big payloads through the hub's spool directory, not through the sockets (client process).

Every hub socket is encrypted (CURVE, docs/security.md), and so is every byte of an 8 MB payload
sent through them, twice (publisher -> hub, hub -> subscriber): 82 % of the hub's ZeroMQ thread
was libsodium, and 8 MB payloads ran at 0.35-1x ``multiprocessing.Queue``. A hub on ``ipc://``
names a spool directory in its WELCOME: private to this user (0700, on a memory file system). A
publisher writes each out-of-band buffer of at least ``SPOOL_MIN`` bytes of a broadcast batch to
a file there, links one share of it for each process subscribed to the topic, and sends the batch
with a spool index instead of the bytes (``wire.spool``); each subscriber opens its share, unlinks
it and reads it, one copy. The memory is free once every subscriber has read it; the hub never
touches the bytes. What protects them is what protects the bus secret: the directory's owner and
mode (docs/security.md, "The spool").

A process says it reads a topic before its subscription is live (a file per topic it subscribes
to, and a lock file it holds while it lives), so a message published after ``subscribe()``
returned always has a share for it. A batch nobody registered for, or one that cannot be spooled
(the file system short of space, a failed write), goes inline, as without a spool: never lost
for it. A share the subscriber cannot open (it lagged more than the hub's ``spool_linger``, it
subscribed while the batch was on its way) drops the batch, counted as undecodable and logged
(docs/guarantees.md, "Big payloads").
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import threading
import time
from typing import Any

from ..exceptions import SpoolError
from ..wire import protocol as wire
from ..wire.spool import (
    SpoolEntry,
    lock_reader,
    pack_spool_index,
    reader_lock_name,
    share_name,
    topic_directory_name,
    unpack_spool_index,
)
from .spool_counts import SpoolCounts, SpoolStatistics

__all__ = ["SPOOL_MIN", "Spool", "SpoolStatistics", "read_spooled"]

logger = logging.getLogger(__name__)

# Buffers this large go to the spool. Below it, the files' system calls and page faults gain
# little on encrypting the bytes.
SPOOL_MIN = 1024 * 1024
# A spool file is written only while the file system keeps this share of its size free after it:
# the spool never takes the machine's last memory (a container's /dev/shm may be 64 MB).
_FREE_SHARE = 0.25
# After a write failed for want of space, batches go inline for this long before trying again.
_BACKOFF = 1.0
_CODECS = {
    wire.CODEC_DATACLASS: wire.CODEC_SPOOL_DATACLASS,
    wire.CODEC_OBJECTS: wire.CODEC_SPOOL_OBJECTS,
}
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# A spooled fan-out batch: [head, payload, index, *buffers].
_BUFFERS = 3


# Readers' lock files open in this process. A forked child inherits their open file
# descriptions, which would keep a dead parent's lock alive: the child closes its copies.
_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class Spool:
    """The spool directory one hub named, as one client process uses it (any thread)."""

    def __init__(
        self, path: str, max_size: int, reader: str, lock_fd: int, counts: SpoolCounts
    ) -> None:
        self.path = path
        self.max_size = max_size  # the hub's max_message_size: no file may claim more
        self.reader = reader  # this process's client id: the name of its shares
        self._lock_fd = lock_fd  # locked while this process lives (the hub sweeps the dead)
        self._pid = os.getpid()
        self._topics: set[bytes] = set()
        self._guard = threading.Lock()
        self.counts = counts
        self._retry_at = 0.0

    @classmethod
    def open(
        cls, path: str, max_size: int, reader: str, counts: SpoolCounts | None = None
    ) -> Spool | None:
        """This process's use of the spool at ``path``, if that is a private directory of this
        user; ``None`` (big payloads go inline) when ``path`` is empty or not one."""
        if not path:
            return None
        try:
            info = os.lstat(path)
            if (
                not stat.S_ISDIR(info.st_mode)
                or info.st_uid != os.geteuid()
                or stat.S_IMODE(info.st_mode) & 0o077
            ):
                raise SpoolError(
                    f"not a private directory of this user (uid {info.st_uid}, mode "
                    f"{stat.S_IMODE(info.st_mode):04o})"
                )
            # Locked under a name of its own, then renamed: the hub never sees it unlocked (it
            # would take this process for a dead one).
            making = os.path.join(path, reader_lock_name(reader) + ".new")
            lock = os.open(making, _WRITE_FLAGS, 0o600)
            try:
                if not lock_reader(lock):
                    raise SpoolError(f"{making} is locked by another process")
                os.rename(making, os.path.join(path, reader_lock_name(reader)))
                _locks.add(lock)
            except BaseException:
                os.close(lock)
                with contextlib.suppress(OSError):
                    os.unlink(making)
                raise
        except (OSError, SpoolError) as exc:  # another mount namespace than the hub's, say
            logger.warning("big payloads go inline: the hub's spool %s: %s", path, exc)
            return None
        return cls(path, max_size, reader, lock, SpoolCounts() if counts is None else counts)

    def statistics(self) -> SpoolStatistics:
        return self.counts.statistics(self.path)

    # -- registration --------------------------------------------------------------------------

    def register(self, topic: bytes) -> None:
        """This process reads ``topic`` from now on: publishers link a share for it. Called
        before the subscription goes live."""
        if topic.startswith(wire.REPLY_PREFIX):
            return  # replies never travel through the spool
        directory = os.path.join(self.path, topic_directory_name(topic))
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            os.close(
                os.open(os.path.join(directory, self.reader), _WRITE_FLAGS & ~os.O_EXCL, 0o600)
            )
        except OSError as exc:
            logger.warning("cannot register for big payloads of %r in the spool: %s", topic, exc)
            return
        with self._guard:
            self._topics.add(topic)

    def unregister(self, topic: bytes) -> None:
        with self._guard:
            self._topics.discard(topic)
        self._remove_registration(topic)

    def _remove_registration(self, topic: bytes) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.path, topic_directory_name(topic), self.reader))

    def close(self) -> None:
        """Leave: registrations and lock file go (the hub removes shares left unread)."""
        if os.getpid() != self._pid:
            return  # a forked child's copy: the spool is its parent's
        with self._guard:
            topics, self._topics = self._topics, set()
        for topic in topics:
            self._remove_registration(topic)
        self._remove(reader_lock_name(self.reader))
        _locks.discard(self._lock_fd)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    # -- publishing ----------------------------------------------------------------------------

    def store(self, topic: bytes, codec: bytes, frames: list[Any]) -> tuple[bytes, list[Any]]:
        """``(codec, frames)`` of a broadcast batch (``[payload, *buffers]``) with its big
        buffers in files, a share for each registered reader: ``[payload, index, *buffers]``
        under a spooled codec. The batch unchanged when it has none, when nobody registered
        for the topic, or when they cannot be written."""
        spooled = _CODECS.get(codec)
        if spooled is None or len(frames) < 2:
            return codec, frames
        big = [index for index, frame in enumerate(frames[1:]) if _nbytes(frame) >= SPOOL_MIN]
        if not big:
            return codec, frames
        readers = self._readers(topic)
        if (
            not readers
            or time.monotonic() < self._retry_at
            or not self._room_for(sum(_nbytes(frames[1 + i]) for i in big))
        ):
            self.counts.inline += len(big)
            return codec, frames
        entries: list[SpoolEntry] = []
        try:
            entries.extend(self._write(position, frames[1 + position], readers) for position in big)
        except OSError as exc:
            self._take_back(entries, readers)
            self.counts.inline += len(big)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
                self._retry_at = time.monotonic() + _BACKOFF
            logger.warning("a big payload goes inline: cannot write it to the spool: %s", exc)
            return codec, frames
        if not self._room_for(0):
            # Others wrote meanwhile (the look above is no lock across processes): the reserve
            # holds once each write is done, and this batch goes inline after all.
            self._take_back(entries, readers)
            self.counts.inline += len(big)
            return codec, frames
        self.counts.stored += len(entries)
        buffers = list(frames[1:])
        for entry in entries:
            buffers[entry.position] = b""
        return spooled, [frames[0], pack_spool_index(entries), *buffers]

    def _take_back(self, entries: list[SpoolEntry], readers: list[str]) -> None:
        """Remove the shares of a batch that goes inline after all."""
        for entry in entries:
            for reader in readers:
                self._remove(share_name(entry.file_name, reader))

    def _readers(self, topic: bytes) -> list[str]:
        try:
            return os.listdir(os.path.join(self.path, topic_directory_name(topic)))
        except OSError:
            return []

    def _room_for(self, size: int) -> bool:
        """A quarter of the file system stays free after ``size`` more bytes, and a quarter of
        the machine's memory: ``/dev/shm`` is often the size of the memory itself, and what
        waits there for a stopped subscriber is memory."""
        try:
            fs = os.statvfs(self.path)
        except OSError:
            return False
        if (fs.f_bavail * fs.f_frsize - size) < fs.f_blocks * fs.f_frsize * _FREE_SHARE:
            return False
        memory = _memory()
        return memory is None or memory[1] - size >= memory[0] * _FREE_SHARE

    def _write(self, position: int, buffer: Any, readers: list[str]) -> SpoolEntry:
        """The buffer in a new file, linked once per reader; the file's own name is gone."""
        name = secrets.token_bytes(16)
        path = os.path.join(self.path, name.hex())
        fd = os.open(path, _WRITE_FLAGS, 0o600)
        try:
            with memoryview(buffer) as view, view.cast("B") as data:
                size, written = data.nbytes, 0
                while written < size:
                    written += os.write(fd, data[written:])
            info = os.fstat(fd)
            linked = []
            try:
                for reader in readers:
                    share = os.path.join(self.path, share_name(name.hex(), reader))
                    os.link(path, share)
                    linked.append(share)
            except OSError:
                for share in linked:
                    with contextlib.suppress(OSError):
                        os.unlink(share)
                raise
        finally:
            os.close(fd)
            self._remove(name.hex())
        return SpoolEntry(position, size, info.st_dev, info.st_ino, name)

    def _remove(self, file_name: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.path, file_name))

    # -- subscribing ---------------------------------------------------------------------------

    def fill(self, frames: list[Any]) -> list[Any]:
        """The frames of a spooled fan-out batch (``[head, payload, index, *buffers]``) with
        this process's share of each spooled buffer read back, as ``bytes``; a buffer that
        cannot be read becomes the ``SpoolError`` saying why (decoding the batch raises it)."""
        buffers = frames[_BUFFERS:]
        try:
            entries = unpack_spool_index(frames[_BUFFERS - 1].bytes, len(buffers))
        except ValueError as exc:
            return [*frames[:_BUFFERS], *(SpoolError(str(exc)) for _ in buffers)]
        filled = list(frames)
        for entry in entries:
            filled[_BUFFERS + entry.position] = self._read(entry)
        return filled

    def _read(self, entry: SpoolEntry) -> bytes | SpoolError:
        path = os.path.join(self.path, share_name(entry.file_name, self.reader))
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as exc:
            self.counts.missing += 1
            why = exc.strerror
            if exc.errno == errno.ENOENT:
                why = (
                    "no share for this process (it lagged more than the hub's spool_linger, or "
                    "subscribed while the message was on its way)"
                )
            return SpoolError(f"big payload {path} ({entry.size} bytes): {why}")
        try:
            os.unlink(path)  # open, the file stays ours; its memory goes once all have read
            info = os.fstat(fd)
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.geteuid()
                or entry.size > self.max_size
                or (info.st_dev, info.st_ino, info.st_size)
                != (entry.device, entry.inode, entry.size)
            ):
                self.counts.missing += 1
                return SpoolError(f"big payload {path}: not the file its publisher wrote")
            data = _read_all(fd, entry.size)
        except OSError as exc:
            self.counts.missing += 1
            return SpoolError(f"big payload {path}: {exc.strerror}")
        finally:
            os.close(fd)
        self.counts.read += 1
        return data


def read_spooled(spool: Spool | None, frames: list[Any]) -> list[Any]:
    """A fan-out batch as received (``[head, payload, ...]``), with the buffers of a spooled
    one read back (``Spool.fill``); any other batch as it is. A process without a share (no
    spool, ``ipcbus tail``) gets a ``SpoolError`` in their place."""
    if len(frames) <= _BUFFERS:
        return frames
    try:
        codec = wire.parse_fanout_head(frames[0].bytes)[3][:1]
    except ValueError:
        return frames  # whoever parses it next drops it as malformed
    if codec not in wire.SPOOL_CODECS:
        return frames
    if spool is None:
        why = SpoolError("big payloads in the hub's spool, for the processes subscribed to them")
        return [*frames[:_BUFFERS], *(why for _ in frames[_BUFFERS:])]
    return spool.fill(frames)


def _read_all(fd: int, size: int) -> bytes:
    data = os.read(fd, size)  # one read, one copy: tmpfs gives all of it
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        part = os.read(fd, size - got)
        if not part:
            raise OSError(errno.EIO, f"the file ends after {got} of {size} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _nbytes(frame: Any) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    with memoryview(frame) as view:
        return view.nbytes


def _memory() -> tuple[int, int] | None:
    """The machine's total and available memory in bytes (Linux), else ``None``."""
    try:
        with open("/proc/meminfo", "rb") as file:
            text = file.read(4096)
    except OSError:
        return None
    found: dict[bytes, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(b":")
        if name in (b"MemTotal", b"MemAvailable"):
            found[name] = int(rest.split()[0]) * 1024
    if len(found) != 2:
        return None
    return found[b"MemTotal"], found[b"MemAvailable"]
