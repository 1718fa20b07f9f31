"""The bus secret: 32 random bytes in a 0600 key file beside the hub's socket.

Unpickling is code execution, so a peer that cannot prove it knows the secret gets nothing routed
and nothing unpickled (DESIGN.md §3: the ShadowMQ CVEs are pickle over unauthenticated ZeroMQ).
Every hub socket is a ZeroMQ PLAIN server whose ZAP handler compares the password with the secret
in constant time during the handshake, before the hub reads a single message of that peer. Over
``ipc://`` nothing else is needed: only this user can reach the 0700 directory. The secret never
appears on a command line, in the environment or in a log: a worker started by hand finds the
key file from the hub's address.
"""

from __future__ import annotations

import hmac
import os
import stat

from .exceptions import HubUnavailableError

__all__ = ["USERNAME", "check_password", "key_path_for", "load_or_create_secret", "read_secret"]

USERNAME = b"ipcbus"
_SECRET_BYTES = 32


def key_path_for(endpoint: str) -> str:
    """``ipc:///dir/hub`` → ``/dir/hub.key``."""
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"no key file for {endpoint!r}: only ipc:// addresses have one")
    return endpoint[len("ipc://") :] + ".key"


def load_or_create_secret(path: str) -> bytes:
    """The hub's secret: reused when a previous hub at this address left its key file (so its
    clients reconnect to a restarted hub), else created with mode 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path)
    secret = os.urandom(_SECRET_BYTES).hex().encode()
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return secret


def read_secret(path: str) -> bytes:
    """A client's copy of the secret; ``HubUnavailableError`` when it cannot be had."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise HubUnavailableError(
            f"cannot read the hub's key file {path}: {exc.strerror} (is a hub running at this "
            "address, as this user?)"
        ) from exc
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise HubUnavailableError(
                f"refusing key file {path}: it must belong to this user with mode 0600"
            )
        secret = os.read(fd, 4 * _SECRET_BYTES).strip()
    finally:
        os.close(fd)
    if len(secret) != 2 * _SECRET_BYTES:
        raise HubUnavailableError(f"key file {path} does not hold an ipcbus secret")
    return secret


def check_password(secret: bytes, username: bytes, password: bytes) -> bool:
    """Constant-time check of a PLAIN handshake's credentials."""
    return hmac.compare_digest(username, USERNAME) & hmac.compare_digest(password, secret)
