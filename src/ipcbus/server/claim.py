"""One hub per address: a hub holds an ``flock`` on a lock file beside its socket for its whole
life, and removes only the socket files it created itself.

Two hubs racing for one address used to both start; when the loser stopped it unlinked the
winner's sockets and new clients got ``HubUnavailableError``. Now the second hub gets
``HubAddressError``, and a hub that stops unlinks a socket file only if it is still the very file
(device and inode) it bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat

from ..exceptions import HubAddressError, InsecurePathError
from ..wire.address import Address
from ..wire.paths import open_private_file

__all__ = ["AddressClaim", "remove_stale_socket_files"]

logger = logging.getLogger(__name__)


class AddressClaim:
    """Held while a hub serves at ``address``. ``acquire()`` raises ``HubAddressError`` when
    another hub holds it or the address's directory is not safe."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self._fd: int | None = None
        self._bound: dict[str, tuple[int, int]] = {}  # socket file -> (device, inode)

    def acquire(self) -> None:
        path = self.address.hub_file(".lock")
        try:
            self.address.check_home()
            fd = open_private_file(path, os.O_RDWR | os.O_CREAT)
        except InsecurePathError as exc:
            raise HubAddressError(f"cannot serve at {self.address}: {exc}") from exc
        except OSError as exc:  # a directory where the lock should be, no permission, ...
            raise HubAddressError(f"cannot serve at {self.address}: {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HubAddressError(f"another hub already serves {self.address}") from None
        self._fd = fd
        # Holding the lock, no other hub serves here: socket files left behind are stale.
        _remove_own_sockets(self.address)

    def bound(self) -> None:
        """Record the socket files just bound, to remove exactly these at release."""
        for path in self.address.socket_files():
            info = os.lstat(path)
            self._bound[path] = (info.st_dev, info.st_ino)

    def release(self) -> None:
        for path, identity in self._bound.items():
            with contextlib.suppress(FileNotFoundError):
                info = os.lstat(path)
                if (info.st_dev, info.st_ino) == identity:
                    os.unlink(path)
                else:
                    logger.warning("not removing %s: it is no longer the socket we bound", path)
        self._bound.clear()
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the lock file itself stays (no race)
            self._fd = None


def remove_stale_socket_files(address: Address) -> None:
    """After a hub was killed: remove its socket files if no hub holds the address now."""
    claim = AddressClaim(address)
    try:
        claim.acquire()  # removes the stale files
    except HubAddressError:
        return  # a hub serves here (started since), or the place is not ours: leave it
    claim.release()


def _remove_own_sockets(address: Address) -> None:
    uid = os.getuid()
    for path in address.socket_files():
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode) and info.st_uid == uid:
                os.unlink(path)
