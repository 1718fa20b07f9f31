"""The bus secret of a NATS bus, and the signature every payload carries.

Unpickling is code execution. NATS authenticates *connections* (credentials, TLS: pass-through to
nats-py), but anyone allowed to publish on a subject could otherwise make every subscriber of it
unpickle what they sent. So, as jupyter_client signs its messages, every payload is signed with
the bus secret: HMAC-SHA256 over the subject, the message id (with the codec and time), the
reply inbox and the payload (:mod:`ipcbus.nats.envelope`). A receiver checks it, in constant
time, before it unpickles a byte; a message without a valid signature is dropped and counted
(``NatsStatistics.rejected``).

The secret is 64 hex digits in a 0600 key file (the format of a hub's key file). By default it
is ``nats.key`` in the per-user 0700 directory of the temporary directory, created on first use:
every program of this user on this machine shares it. Processes on other machines need a copy
of that file (pass ``key_file=``), or pass ``secret=`` themselves.
"""

from __future__ import annotations

import os
import tempfile

from ..exceptions import PubSubError
from ..wire.paths import ensure_private_directory, open_private_file

__all__ = ["check_secret", "default_key_file", "load_or_create_secret"]

_SECRET_HEX = 64


def default_key_file() -> str:
    """``<tempdir>/ipcbus-<uid>/nats.key``, its directory created (0700) or checked."""
    home = os.path.join(tempfile.gettempdir(), f"ipcbus-{os.getuid()}")
    ensure_private_directory(home)
    return os.path.join(home, "nats.key")


def load_or_create_secret(path: str) -> bytes:
    """The secret in the key file ``path``, which is created (0600) when it does not exist.

    Refuses a symlink or a file that is not this user's private file
    (:class:`~ipcbus.exceptions.InsecurePathError`), and a file that holds no secret.
    """
    try:
        # O_EXCL: never follows a symlink planted where the key file will be.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(_SECRET_HEX // 2).hex().encode())
        finally:
            os.close(fd)
    fd = open_private_file(path, os.O_RDONLY)
    try:
        secret = os.read(fd, 2 * _SECRET_HEX).strip()
    finally:
        os.close(fd)
    return check_secret(secret, f"key file {path}")


def check_secret(secret: bytes | str, what: str = "secret") -> bytes:
    """``secret`` as bytes, when it is 64 hex digits (32 random bytes)."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    try:
        valid = len(raw) == _SECRET_HEX and len(bytes.fromhex(raw.decode())) == _SECRET_HEX // 2
    except ValueError:
        valid = False
    if not valid:
        raise PubSubError(f"{what} does not hold an ipcbus secret (64 hex digits)")
    return raw
