"""Limits before authentication, for hubs on tcp (hub process).

ZeroMQ accepts every tcp connection and keeps it for up to ``handshake_timeout`` while the peer
(maybe) authenticates. Measured on the previous version: 1,100 idle connections pinned the hub at
its file-descriptor limit for the whole handshake window, and authenticated clients waited. So:

- the hub raises its soft ``RLIMIT_NOFILE`` to the hard limit when it starts;
- it counts connections that have not completed their handshake, and when there are
  more than ``max_pending_handshakes``, it shuts the oldest of them down.

How the hub tells a completed handshake: by what it sent the peer, never by what the peer sent.
ZeroMQ answers a CURVE HELLO with WELCOME only if the HELLO decrypts with the hub's secret key,
and sends READY only once the INITIATE that follows proved the client's key and the ZAP handler
admitted it (a refused peer gets a short ERROR and is closed). So a connection to which the hub
has sent, and whose peer has acknowledged, the greeting, WELCOME and at least the smallest READY
(266 bytes, ``tcpi_bytes_acked`` of the kernel's ``TCP_INFO``) has completed its handshake; any
other is pending. Bytes received proved nothing: a peer without the key reached any count by
announcing a long command frame and sending part of it (ZeroMQ waits for the rest until
``handshake_timeout``). ZeroMQ's own HANDSHAKE_SUCCEEDED monitor event does not name the
connection (its value is 0, libzmq 4.3), so it cannot tell which one succeeded. Authenticated
clients finish their handshake in about a millisecond, so they are never the oldest pending.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import struct
import time
from collections import OrderedDict

__all__ = ["PendingHandshakes", "raise_fd_limit"]

logger = logging.getLogger(__name__)

# What the hub sends a client that completes the handshake, at least: the ZMTP 3 greeting (64
# bytes), WELCOME (a short command frame: 2 + 168 bytes) and READY (2 + 6 + an 8-byte nonce + a
# 16-byte MAC, and its metadata). A refused peer gets the greeting, WELCOME and ERROR
# (2 + 6 + 1 + a 3-byte status: 246 bytes in all), then is closed.
_AUTHENTICATED_BYTES = 64 + (2 + 168) + (2 + 6 + 8 + 16)
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked is a u64 at offset 120 (Linux >= 4.1).
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
_TCP_INFO_LEN = 256


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return soft, hard
    return soft, soft


class PendingHandshakes:
    """The tcp connections accepted and not yet authenticated, oldest first."""

    def __init__(self, limit: int, port: int) -> None:
        self.limit = limit
        self._port = port
        self._accepted: OrderedDict[int, float] = OrderedDict()  # fd -> when accepted
        self.shed = 0  # connections shut down for being over the limit

    def accepted(self, fd: int) -> None:
        self._accepted[fd] = time.monotonic()
        self._accepted.move_to_end(fd)

    def closed(self, fd: int) -> None:
        self._accepted.pop(fd, None)

    def enforce(self) -> None:
        """Forget authenticated connections; shut down the oldest pending ones over the limit."""
        if len(self._accepted) <= self.limit:
            return
        for fd in list(self._accepted):
            if _authenticated(fd, self._port) is not False:
                del self._accepted[fd]  # authenticated, or not ours any more
        excess = len(self._accepted) - self.limit
        for fd in list(self._accepted)[: max(0, excess)]:
            del self._accepted[fd]
            if _shut_down(fd, self._port):
                self.shed += 1
        if excess > 0:
            logger.warning(
                "%d tcp connections had not authenticated; shut down the %d oldest",
                self.limit + excess,
                excess,
            )


def _peer(fd: int, port: int) -> socket.socket | None:
    """A duplicate of ``fd`` if it still is a tcp connection to our ``port`` (an fd number may
    have been reused since ZeroMQ reported it)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise OSError("not a tcp socket")
        if sock.getsockname()[1] != port:
            raise OSError("not a connection to the hub's port")
    except OSError:
        sock.close()
        return None
    return sock


def _authenticated(fd: int, port: int) -> bool | None:
    """True if the hub sent the peer READY (its handshake succeeded); None if ``fd`` is no
    connection of ours."""
    sock = _peer(fd, port)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.close()
    if len(info) < _BYTES_ACKED_OFFSET + _BYTES_ACKED.size:
        return True  # an old kernel: never shed what cannot be told apart
    (acked,) = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)
    return bool(acked >= _AUTHENTICATED_BYTES)


def _shut_down(fd: int, port: int) -> bool:
    sock = _peer(fd, port)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)  # ZeroMQ sees the connection end and closes its fd
    except OSError:
        return False
    finally:
        sock.close()
    return True
