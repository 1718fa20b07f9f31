"""Trusting a path on a shared machine: every directory and file ipcbus uses is checked before use.

Another local user may have been there first: a directory made in advance, a symlink where a file
will be, a file with planted content. So (docs/security.md, "Files and directories"):

- a directory ipcbus creates is made with mode 0700, and one that already exists is accepted
  only if it is a real directory (not a symlink), owned by this user, with no group or other
  permission bits;
- a directory the user names (where a hub's socket lives) must be a real directory owned by this
  user that no other user can write to, on a path whose every component is a real directory (or a
  symlink) owned by this user or root, and writable by others only with the sticky bit (``/tmp``);
- files are opened with ``O_NOFOLLOW`` and accepted only if they are regular files owned by this
  user with no group or other permission bits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ..exceptions import InsecurePathError

__all__ = ["check_ancestors", "check_directory", "ensure_private_directory", "open_private_file"]


def ensure_private_directory(path: str) -> None:
    """Create ``path`` with mode 0700, or accept it only if it is a private directory of ours.
    Callers that must not create anything below a path another user controls check its
    ancestors first (``check_ancestors``)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise InsecurePathError(f"{path} is not a directory (a symlink?): refusing to use it")
    if info.st_uid != os.getuid():
        raise InsecurePathError(f"{path} belongs to uid {info.st_uid}, not to this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise InsecurePathError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700 (this user only)"
        )


def check_directory(path: str) -> None:
    """Accept ``path`` as the home of a hub's files only if no other user can change it."""
    path = os.path.abspath(path)
    info = _lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise InsecurePathError(f"{path} is not a directory (a symlink?): refusing to use it")
    if info.st_uid != os.getuid():
        raise InsecurePathError(f"{path} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o022:
        raise InsecurePathError(
            f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}): use a "
            "directory of your own"
        )
    _check_ancestors(path)


def open_private_file(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that refuses symlinks and files that are not this user's private files."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InsecurePathError(f"{path} is a symbolic link: refusing to follow it") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InsecurePathError(f"{path} is not a regular file")
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise InsecurePathError(
                f"refusing {path}: it must belong to this user with mode 0600 (it has uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_ancestors(path: str) -> None:
    """Accept ``path`` only if no other user can change what it leads to (``_check_ancestors``):
    a shared root such as ``/dev/shm`` (root's, sticky) passes, another user's directory not."""
    _check_ancestors(os.path.abspath(path))


def _check_ancestors(path: str, depth: int = 0) -> None:
    """Every component above ``path``: owned by this user or root, and writable by others only
    with the sticky bit (then nobody else can replace what we own in it). A symlink on the way
    is checked like a component, and so is the path it leads to."""
    if depth > 40:  # as the kernel's ELOOP
        raise InsecurePathError(f"too many symlinks above {path}")
    trusted = {0, os.getuid()}
    current = os.path.dirname(path)
    while True:
        info = _lstat(current)
        if info.st_uid not in trusted:
            raise InsecurePathError(
                f"{current} (above {path}) belongs to uid {info.st_uid}: another user could "
                "change what the path leads to"
            )
        if stat.S_ISLNK(info.st_mode):
            target = os.path.join(os.path.dirname(current), os.readlink(current))
            _check_ancestors(os.path.join(os.path.normpath(target), "."), depth + 1)
        elif info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise InsecurePathError(
                f"{current} (above {path}) is writable by other users without the sticky bit"
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _lstat(path: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise InsecurePathError(f"cannot check {path}: {exc.strerror}") from exc
