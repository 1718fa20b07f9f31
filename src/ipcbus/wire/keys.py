"""The bus secret: 32 random bytes in a 0600 key file, and how sockets prove it.

Unpickling is code execution, so a peer that cannot prove it knows the secret gets nothing routed
and nothing unpickled (docs/security.md: the ShadowMQ CVEs are pickle over unauthenticated ZeroMQ).
The hub's ZAP handler checks every connection to every hub socket during its handshake, in
constant time, before the hub reads a single message of that peer:

- ``ipc://``: PLAIN, the password being the secret. Nothing more is needed: only this user can
  reach the 0700 directory, and the traffic never leaves the kernel.
- ``tcp://``: CURVE (encrypted and authenticated). Both key pairs are derived from the secret, so
  holding the key file is what it takes; the ZAP handler admits only the derived client key.

The secret never appears on a command line, in the environment or in a log: a worker finds the
key file from the hub's address (beside an ipc socket; for tcp in a 0700 per-user directory of the
temporary directory, to be copied to the same place on other machines).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from typing import Any

import zmq
from zmq.utils import z85

from ..exceptions import HubUnavailableError
from .address import Address

__all__ = [
    "USERNAME",
    "ZAP_DOMAIN",
    "admits",
    "load_or_create_secret",
    "prove",
    "read_secret",
    "serve_securely",
]

USERNAME = b"ipcbus"
ZAP_DOMAIN = b"ipcbus"
_SECRET_BYTES = 32


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


def _curve_pair(secret: bytes, role: bytes) -> tuple[bytes, bytes]:
    """A CURVE key pair (public, secret; Z85) derived from the bus secret for ``role``."""
    secret_key = z85.encode(hashlib.sha256(role + b":" + secret).digest())
    return zmq.curve_public(secret_key), secret_key


def serve_securely(sock: zmq.Socket[Any], address: Address, secret: bytes) -> None:
    """Make a hub socket require the secret (checked by the ZAP handler, see ``admits``)."""
    sock.zap_domain = ZAP_DOMAIN
    if address.is_tcp:
        sock.curve_server = True
        sock.curve_secretkey = _curve_pair(secret, b"server")[1]
    else:
        sock.plain_server = True


def prove(sock: zmq.Socket[Any], address: Address, secret: bytes) -> None:
    """Make a client socket prove the secret in its handshake with the hub at ``address``."""
    if address.is_tcp:
        sock.curve_serverkey = _curve_pair(secret, b"server")[0]
        sock.curve_publickey, sock.curve_secretkey = _curve_pair(secret, b"client")
    else:
        sock.plain_username = USERNAME
        sock.plain_password = secret


def admits(secret: bytes, mechanism: bytes, credentials: list[bytes]) -> bool:
    """The ZAP decision, in constant time: does this handshake prove the secret?"""
    if mechanism == b"PLAIN" and len(credentials) == 2:
        username, password = credentials
        return hmac.compare_digest(username, USERNAME) & hmac.compare_digest(password, secret)
    if mechanism == b"CURVE" and len(credentials) == 1:
        client_key = z85.decode(_curve_pair(secret, b"client")[0])
        return hmac.compare_digest(credentials[0], client_key)
    return False
