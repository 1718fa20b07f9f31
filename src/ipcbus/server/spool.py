"""The hub's spool directory (hub process): where big payloads wait for their subscribers.

A hub on ``ipc://`` makes a directory of its own, ``<root>/ipcbus-<uid>/<hub_id>`` (root: the
``spool`` option, ``/dev/shm`` by default: memory, never a disk), names it in WELCOME, and holds an
``flock`` on it while it serves. Publishers write big out-of-band buffers there, one share (hard
link) for each process registered for the topic, and each subscriber unlinks its share as it
reads it (``client.spool``, names in ``wire.spool``): the memory is free once all have read. The
hub never opens a buffer. It sweeps every 0.5 s: a reader whose lock is free
is dead, and its registrations and unread shares go; a share older than ``spool_linger`` goes (its
reader lags that much: it drops the message, counted); so do half-written files of publishers
that died, and the directories of hubs that are gone (their flock is free). A file's age is
counted from the sweep that first saw it, on the monotonic clock (``_Ages``): the wall clock set
forward does not expire what waits, nor set back keep it. At stop it removes
its own directory and everything in it.

Another user may have been there first (docs/security.md, "The spool"): ``<root>/ipcbus-<uid>``
is accepted only as a directory of this user with mode 0700, not a symlink; else the hub serves
without a spool (big payloads inline, encrypted, as before) and says why at WARNING. Nothing in it
is followed: every file is handled relative to a directory descriptor, without following links.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import time
from dataclasses import dataclass

from ..exceptions import InsecurePathError
from ..wire.paths import check_ancestors, ensure_private_directory
from ..wire.spool import lock_reader, parse_lock_name, reader_lock_name

__all__ = ["HubSpool", "SpoolStatistics"]

logger = logging.getLogger(__name__)

# A hub's directory while it is made (see create()); one left by a hub that died then is
# swept once it is this old.
_MAKING = "making-"
_MAKING_GRACE = 60.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# How long a stopping hub keeps removing what publishers still write into its spool.
_CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class SpoolStatistics:
    directory: str
    files: int  # in the directory at the last sweep
    bytes: int
    expired: int  # shares and half-written files removed for their age (spool_linger)
    readers_gone: int  # reader processes found dead: their registrations and shares removed
    hubs_swept: int  # directories of hubs that were gone, removed


class HubSpool:
    """The spool directory of one hub while it serves."""

    def __init__(self, path: str, fd: int, linger: float) -> None:
        self.path = path
        self._fd = fd  # holds the flock: this hub is alive
        self._base = os.path.dirname(path)
        self._linger = linger
        # A sweep is a few system calls per reader and per file. Every 0.5 s: until a dead
        # reader is found, publishers link shares for it that nobody will read.
        self._period = min(0.5, max(0.05, linger / 10))
        self._next_sweep = 0.0
        self._ages = _Ages()
        self._files = self._bytes = self._expired = self._readers_gone = self._hubs_swept = 0

    @classmethod
    def create(cls, root: str, hub_id: str, linger: float) -> HubSpool | None:
        """The spool of hub ``hub_id`` under ``root``; ``None`` when it cannot be made safely
        (then big payloads go inline: the hub serves as without one)."""
        base = os.path.join(root, f"ipcbus-{os.getuid()}")
        path = os.path.join(base, hub_id)
        try:
            if not os.path.isdir(root):
                raise InsecurePathError(f"{root} is not a directory")
            # The owner of a directory may rename what is in it: under a root of another
            # user's, our directory could be swapped for one of theirs while we serve.
            check_ancestors(base)
            ensure_private_directory(base)
            # Made and locked under a name of its own, then renamed: another hub's sweep
            # never sees it unlocked under a hub's name (it would take it for a gone hub's).
            making = os.path.join(base, f"{_MAKING}{hub_id}")
            os.mkdir(making, 0o700)
            fd = os.open(making, _DIR_FLAGS)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(making, path)
        except (InsecurePathError, OSError) as exc:
            logger.warning("serving without a spool: big payloads go inline, encrypted (%s)", exc)
            return None
        logger.info("big payloads wait in %s (at most %.0f s)", path, linger)
        return cls(path, fd, linger)

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(
            self.path,
            self._files,
            self._bytes,
            self._expired,
            self._readers_gone,
            self._hubs_swept,
        )

    def sweep(self) -> None:
        """Remove what is dead or older than ``spool_linger``, here and in gone hubs'
        directories. Cheap to call every loop turn: it works once a period."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._period
        self._ages.start(now, self._linger)
        swept = _sweep(self._fd, self._ages)
        self._files, self._bytes = swept.files, swept.bytes
        self._expired += swept.expired
        self._readers_gone += swept.readers_gone
        self._sweep_gone_hubs()
        self._ages.finish()

    def close(self) -> None:
        """Remove every file and the directory itself; release the lock."""
        # One listing while publishers and readers create and remove names misses some (half
        # the shares, measured): again until the directory goes. Once the registrations are
        # gone publishers send inline, so only writes already under way add files; a
        # deadline all the same (what stays, the next hub of this root sweeps).
        # A failure (out of descriptors: EMFILE) is tried again until then too; the lock is
        # released whatever happens.
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        try:
            while True:
                try:
                    _remove_all(self._fd)
                    os.rmdir(self.path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        logger.warning("left the spool %s behind: %s", self.path, exc)
                        break
                    time.sleep(0.01)
        finally:
            os.close(self._fd)

    def _sweep_gone_hubs(self) -> None:
        try:
            base = os.open(self._base, _DIR_FLAGS)
        except OSError:
            return
        try:
            for entry in os.scandir(base):
                if entry.name == os.path.basename(self.path):
                    continue
                try:
                    if entry.name.startswith(_MAKING) and _younger(entry, _MAKING_GRACE):
                        continue  # a hub making its directory (it renames it next)
                    fd = os.open(entry.name, _DIR_FLAGS, dir_fd=base)
                except OSError:  # not a directory (or a symlink): not ours to touch
                    continue
                try:
                    info = os.fstat(fd)
                    if info.st_uid != os.getuid():
                        continue
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # its hub serves
                    # Its readers move to the next hub and leave it; until then, shares they
                    # may still read stay (as here, for spool_linger).
                    swept = _sweep(fd, self._ages)
                    self._expired += swept.expired
                    if swept.files == 0 and swept.live_readers == 0:
                        _remove_all(fd)
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.name, dir_fd=base)
                            self._hubs_swept += 1
                finally:
                    os.close(fd)
        finally:
            os.close(base)


class _Ages:
    """How long ago a sweep first saw each file, on the monotonic clock: a file's modification
    time follows the wall clock, which may be set forward (every share would expire at once)
    or back (none would for as long). Forgets the files a sweep no longer finds."""

    def __init__(self) -> None:
        self._first: dict[tuple[int, int, str], float] = {}  # (device, inode, name) -> seen
        self._found: dict[tuple[int, int, str], float] = {}
        self._now = 0.0
        self._linger = 0.0

    def start(self, now: float, linger: float) -> None:
        self._now, self._linger, self._found = now, linger, {}

    def expired(self, info: os.stat_result, name: str) -> bool:
        key = (info.st_dev, info.st_ino, name)
        first = self._found[key] = self._first.get(key, self._now)
        if self._now - first <= self._linger:
            return False
        del self._found[key]  # removed now: a new file that reuses the inode starts afresh
        return True

    def finish(self) -> None:
        self._first = self._found


@dataclass
class _Swept:
    files: int = 0  # buffers left (distinct files: a buffer's shares are one file)
    bytes: int = 0
    expired: int = 0  # shares and half-written files removed for their age
    readers_gone: int = 0  # readers found dead (their lock free)
    live_readers: int = 0


def _sweep(directory: int, ages: _Ages) -> _Swept:
    """One sweep of a spool directory (a descriptor): dead readers, their registrations and
    shares; shares and files first seen more than ``spool_linger`` ago (``ages``)."""
    swept = _Swept()
    live: set[str] = set()
    entries = list(os.scandir(directory))
    for entry in entries:
        reader = parse_lock_name(entry.name)
        if reader is None:
            continue
        if _alive(directory, entry.name):
            live.add(reader)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.name, dir_fd=directory)
            swept.readers_gone += 1
    swept.live_readers = len(live)
    # A reader that took its lock after the listing above registers (and gets shares) before
    # the loops below look: asked again, not taken for a dead one (its registration removed,
    # every big message of the topic was dropped for it from then on).
    late = _Late(directory, live)
    inodes: set[int] = set()
    for entry in entries:
        name = entry.name
        if parse_lock_name(name) is not None or name.endswith(".lock.new"):
            continue  # a lock being made: its reader renames it next
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and name.startswith("t-"):
            _drop_registrations(directory, name, late)
            continue
        _, dot, reader = name.partition(".")
        if not stat.S_ISREG(info.st_mode) or (dot and not late.alive(reader)):
            _unlink(directory, name)  # not ours to keep, or the share of a dead reader
        elif ages.expired(info, name):
            _unlink(directory, name)
            swept.expired += 1
        elif info.st_ino not in inodes:
            inodes.add(info.st_ino)
            swept.files += 1
            swept.bytes += info.st_size
    return swept


def _alive(directory: int, lock_name: str) -> bool:
    """A reader's lock file is locked (by its process)."""
    try:
        fd = os.open(lock_name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return False
    try:
        return not lock_reader(fd)  # taken: nobody holds it (closing the file releases it)
    except OSError:
        return True  # cannot tell: leave it
    finally:
        os.close(fd)


class _Late:
    """Whether a reader lives: those of the sweep's listing, or asked of its lock file (once)."""

    def __init__(self, directory: int, live: set[str]) -> None:
        self._directory = directory
        self._known = dict.fromkeys(live, True)

    def alive(self, reader: str) -> bool:
        known = self._known.get(reader)
        if known is None:
            known = self._known[reader] = _alive(self._directory, reader_lock_name(reader))
        return known


def _drop_registrations(directory: int, name: str, late: _Late) -> None:
    try:
        topic = os.open(name, _DIR_FLAGS, dir_fd=directory)
    except OSError:
        return
    try:
        for entry in os.scandir(topic):
            if not late.alive(entry.name):
                _unlink(topic, entry.name)
    finally:
        os.close(topic)


def _remove_all(directory: int) -> None:
    """Everything in a spool directory: files, and registration directories with theirs."""
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            try:
                inner = os.open(entry.name, _DIR_FLAGS, dir_fd=directory)
            except OSError:
                continue
            try:
                for item in os.scandir(inner):
                    _unlink(inner, item.name)
            finally:
                os.close(inner)
            with contextlib.suppress(OSError):
                os.rmdir(entry.name, dir_fd=directory)
        else:
            _unlink(directory, entry.name)


def _unlink(directory: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=directory)


def _younger(entry: os.DirEntry[str], seconds: float) -> bool:
    return time.time() - entry.stat(follow_symlinks=False).st_mtime < seconds
