"""The bus secret of a NATS bus, and the signature every payload carries.

Unpickling is code execution. NATS authenticates *connections* (credentials, TLS: pass-through to
nats-py), but anyone allowed to publish on a subject could otherwise make every subscriber of it
unpickle what they sent. So, as jupyter_client signs its messages, every payload is signed with
the bus secret: HMAC-SHA256 over the subject, the message id, the reply inbox and the payload,
each prefixed by its length, in the ``Ipcbus-Sig`` header. A receiver checks it, in constant
time, before it unpickles a byte; a message without a valid signature is dropped and counted
(``NatsStatistics.rejected``).

The secret is 64 hex digits in a 0600 key file (the format of a hub's key file). By default it
is ``nats.key`` in the per-user 0700 directory of the temporary directory, created on first use:
every program of this user on this machine shares it. Processes on other machines need a copy
of that file (pass ``key_file=``), or pass ``secret=`` themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile

from ..exceptions import PubSubError
from ..wire.paths import ensure_private_directory, open_private_file

__all__ = ["SIGNATURE_HEADER", "default_key_file", "load_or_create_secret", "sign", "verify"]

SIGNATURE_HEADER = "Ipcbus-Sig"
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


def _mac(secret: bytes, subject: str, message_id: str, reply: str, payload: bytes) -> str:
    # One call of the one-shot C digest: 1.3 µs for a small message, where an hmac.new()
    # object updated part by part cost 9 µs (measured).
    head = f"{len(subject)}:{subject}{len(message_id)}:{message_id}{len(reply)}:{reply}"
    data = b"%s%d:%s" % (head.encode(), len(payload), payload)
    return hmac.digest(secret, data, hashlib.sha256).hex()


def sign(secret: bytes, subject: str, message_id: str, reply: str, payload: bytes) -> str:
    """The signature of one payload (see the module docstring)."""
    return _mac(secret, subject, message_id, reply, payload)


def verify(
    secret: bytes, subject: str, message_id: str, reply: str, payload: bytes, signature: str
) -> bool:
    """True when ``signature`` was made with ``secret`` over exactly these parts."""
    expected = _mac(secret, subject, message_id, reply, payload)
    return hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace"))
