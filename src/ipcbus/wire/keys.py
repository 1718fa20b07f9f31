"""The bus secret: 32 random bytes in a 0600 key file, and how both ends of a socket prove it.

Unpickling is code execution, so a peer that cannot prove it knows the secret gets nothing routed
and nothing unpickled (docs/security.md: the ShadowMQ CVEs are pickle over unauthenticated ZeroMQ).
Authentication goes both ways, on every transport (ipc:// too): every socket uses CURVE, with both
key pairs derived from the secret.

- The hub proves the secret by completing the handshake with the server key pair: a client knows
  the server's public key and refuses a peer that lacks its secret key, before it reads a byte
  (an impostor that took over a socket path gets a failed handshake, not a client).
- A client proves the secret with the client key pair: the hub's ZAP handler admits only the
  derived client key, in constant time, before the hub reads a single message of that peer.
- The secret itself never crosses the wire, and never appears on a command line, in the
  environment or in a log: a worker finds the key file from the hub's address (beside an ipc
  socket; for tcp in a 0700 per-user directory of the temporary directory, to be copied to the
  same place on other machines). Directories and files are checked before they are trusted
  (``paths``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

import zmq
from zmq.utils import z85

from ..exceptions import HubUnavailableError, InsecurePathError
from .address import Address
from .paths import open_private_file

__all__ = [
    "USERNAME",
    "ZAP_DOMAIN",
    "admits",
    "load_or_create_secret",
    "prove",
    "read_bus_secret",
    "read_secret",
    "serve_securely",
]

USERNAME = b"ipcbus"
ZAP_DOMAIN = b"ipcbus"
_SECRET_BYTES = 32


def load_or_create_secret(address: Address) -> bytes:
    """The hub's secret: reused when a previous hub at this address left its key file (so its
    clients reconnect to a restarted hub), else created with mode 0600. Refuses a home directory
    or a key file another user could control (``InsecurePathError``)."""
    address.check_home()
    path = address.key_file
    try:
        # O_EXCL: never follows a symlink planted where the key file will be.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_secret(path)
    secret = os.urandom(_SECRET_BYTES).hex().encode()
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return secret


def read_bus_secret(address: Address) -> bytes:
    """A client's copy of the secret of the hub at ``address``, its home directory checked
    first; ``HubUnavailableError`` when it cannot be had."""
    try:
        address.check_home()
    except InsecurePathError as exc:
        raise HubUnavailableError(f"refusing the hub's directory: {exc}") from exc
    return read_secret(address.key_file)


def read_secret(path: str) -> bytes:
    """The secret in the key file ``path``; ``HubUnavailableError`` when it cannot be had."""
    try:
        fd = open_private_file(path, os.O_RDONLY)
    except InsecurePathError as exc:
        raise HubUnavailableError(f"refusing key file {path}: {exc}") from exc
    except OSError as exc:
        raise HubUnavailableError(
            f"cannot read the hub's key file {path}: {exc.strerror} (is a hub running at this "
            "address, as this user?)"
        ) from exc
    try:
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


def serve_securely(sock: zmq.Socket[Any], secret: bytes) -> None:
    """Make a hub socket prove the secret (the server key pair) and require it of its peers
    (checked by the ZAP handler, see ``admits``)."""
    sock.zap_domain = ZAP_DOMAIN
    sock.curve_server = True
    sock.curve_secretkey = _curve_pair(secret, b"server")[1]


def prove(sock: zmq.Socket[Any], secret: bytes) -> None:
    """Make a client socket prove the secret (the client key pair) and accept only a hub that
    proves it too (the server's public key)."""
    sock.curve_serverkey = _curve_pair(secret, b"server")[0]
    sock.curve_publickey, sock.curve_secretkey = _curve_pair(secret, b"client")


def admits(secret: bytes, mechanism: bytes, credentials: list[bytes]) -> bool:
    """The ZAP decision, in constant time: does this handshake prove the secret? Only CURVE
    with the client key derived from it does (PLAIN would put the secret on the wire)."""
    if mechanism == b"CURVE" and len(credentials) == 1:
        client_key = z85.decode(_curve_pair(secret, b"client")[0])
        return hmac.compare_digest(credentials[0], client_key)
    return False
