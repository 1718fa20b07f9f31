"""Limits before authentication, for hubs on tcp (hub process).

ZeroMQ accepts every tcp connection and keeps it for up to ``handshake_timeout`` while the peer
(maybe) authenticates. Measured on the previous version: 1,100 idle connections pinned the hub at
its file-descriptor limit for the whole handshake window, and authenticated clients waited. So:

- the hub raises its soft ``RLIMIT_NOFILE`` to the hard limit when it starts;
- it counts connections that have not shown they know the hub's public key, and when there are
  more than ``max_pending_handshakes``, it shuts the oldest of them down.

How a connection shows it: CURVE's HELLO command is encrypted to the hub's public key (derived
from the bus secret), and ZeroMQ drops a connection whose HELLO does not decrypt. A connection
still open that has sent the greeting and HELLO (264 bytes, read from the kernel's ``TCP_INFO``)
therefore belongs to a peer that holds the key; one that has sent less is pending. Authenticated
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

# ZMTP 3 greeting (64 bytes) + CURVE HELLO command (200 bytes).
_PROVEN_BYTES = 64 + 200
# struct tcp_info (linux/tcp.h): tcpi_bytes_received is a u64 at offset 128 (Linux >= 4.1).
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_OFFSET = 128
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
    """The tcp connections accepted and not yet proven, oldest first."""

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
        """Forget proven connections; shut down the oldest pending ones over the limit."""
        if len(self._accepted) <= self.limit:
            return
        for fd in list(self._accepted):
            if _proven(fd, self._port) is not False:
                del self._accepted[fd]  # proven, or not ours any more
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


def _proven(fd: int, port: int) -> bool | None:
    """True if the peer sent a greeting and a HELLO; None if ``fd`` is no connection of ours."""
    sock = _peer(fd, port)
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.close()
    if len(info) < _BYTES_RECEIVED_OFFSET + _BYTES_RECEIVED.size:
        return True  # an old kernel: never shed what cannot be told apart
    (received,) = _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFFSET)
    return bool(received >= _PROVEN_BYTES)


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
