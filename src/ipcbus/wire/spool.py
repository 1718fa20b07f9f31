"""The spool index: which out-of-band buffers of a batch wait in spool files, and which files.

A hub on ``ipc://`` names a spool directory in its WELCOME (private to the user, on a memory
file system). A publisher writes each big out-of-band buffer of a broadcast batch to a file of
its own there and sends the batch with a spooled codec (``CODEC_SPOOL_*``): its frames are
``[payload, index, *buffers]``, where ``index`` lists the spooled buffers and their frames are
empty. A subscriber reads the files back in place of those frames. The hub relays the index as
any frame and never opens a file (docs/architecture.md, "Big payloads").

Each entry: the buffer's position among the buffers (uint16), its size, the file's device and
inode as the writer saw them (uint64 each: the reader checks it reads that very file), and the
file's name as 16 random bytes (written in hexadecimal: a name cannot leave the directory).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass

from .frames import MAX_BUFFERS

__all__ = [
    "SpoolEntry",
    "lock_reader",
    "pack_spool_index",
    "parse_lock_name",
    "reader_lock_name",
    "share_name",
    "topic_directory_name",
    "unpack_spool_index",
]

_ENTRY = struct.Struct("<HQQQ16s")


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    position: int
    size: int
    device: int
    inode: int
    name: bytes  # 16 bytes

    @property
    def file_name(self) -> str:
        return self.name.hex()


def pack_spool_index(entries: list[SpoolEntry]) -> bytes:
    return b"".join(
        _ENTRY.pack(entry.position, entry.size, entry.device, entry.inode, entry.name)
        for entry in entries
    )


def unpack_spool_index(frame: bytes, buffers: int) -> list[SpoolEntry]:
    """The entries of an index frame for a batch of ``buffers`` buffer frames; ``ValueError``
    when it is malformed (a position out of range or listed twice, a truncated entry)."""
    if not frame or len(frame) % _ENTRY.size or len(frame) // _ENTRY.size > MAX_BUFFERS:
        raise ValueError(f"bad spool index of {len(frame)} bytes")
    entries = [SpoolEntry(*fields) for fields in _ENTRY.iter_unpack(frame)]
    positions = {entry.position for entry in entries}
    if len(positions) != len(entries) or not all(0 <= p < buffers for p in positions):
        raise ValueError("bad spool index: positions out of range or repeated")
    return entries


# -- names in a spool directory (the rule both sides follow) ----------------------------------
#
# <name>                 a buffer a publisher is writing (hex of the entry's 16 random bytes);
#                        gone once it is linked to each reader
# <name>.<reader>        a reader's share of it: a hard link the reader opens, then unlinks
# r-<reader>.lock        a reader process, alive while it holds a lock on it (lock_reader)
# t-<topic hash>/<reader>  a reader subscribed to the topic: publishers link one share for each


def reader_lock_name(reader: str) -> str:
    return f"r-{reader}.lock"


def topic_directory_name(topic: bytes) -> str:
    return "t-" + hashlib.sha256(topic).hexdigest()[:32]


def share_name(name: str, reader: str) -> str:
    return f"{name}.{reader}"


def parse_lock_name(file_name: str) -> str | None:
    """The reader of a lock file's name; ``None`` for another name."""
    if file_name.startswith("r-") and file_name.endswith(".lock"):
        return file_name[2:-5] or None
    return None


# struct flock: type, whence, start, len, pid (0 for an open file description lock), padded.
_FLOCK = struct.Struct("hhqqi")
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)


def lock_reader(fd: int) -> bool:
    """Take a reader's lock on the open file ``fd`` without waiting: True when taken, False when
    another open file holds it. An open file description lock (Linux): unlike a POSIX lock it is
    not dropped when the same process closes another descriptor of the file (the hub testing a
    reader of its own process), and unlike ``flock`` on a spool directory it is the reader's own.
    A forked child gets the description too: the client closes it in the child
    (``client.spool``), so the lock ends with the process that took it."""
    if _F_OFD_SETLK is None:
        raise OSError(errno.ENOSYS, "no open file description locks on this system")
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0) + bytes(8)
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True
