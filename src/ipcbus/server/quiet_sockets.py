"""The hub's quiet sockets (hub process): its ZAP handler and its sockets' handshake monitors,
polled by their ``ZMQ_FD`` instead of as sockets.

``zmq_poll`` asks every socket it polls for ``ZMQ_EVENTS`` before it sleeps and again when it
wakes (two system calls or more each): for these four sockets, which see traffic only when a
client connects, that was ~1 us per socket per pass on every relayed batch, measured. Their
descriptor signals when something arrives, once a read found the socket empty: each of them is
read until ZeroMQ says there is nothing (``zmq.Again``, which arms the descriptor again), first
of all before the first poll, and one left readable (a burst cut short) is looked at again on
the next turn, without waiting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import zmq

from ..wire.sockets import readable

__all__ = ["QuietSockets"]

Socket = zmq.Socket[bytes]


class QuietSockets:
    def __init__(self, sockets: Iterable[Socket]) -> None:
        self._by_fd = {cast(int, sock.getsockopt(zmq.FD)): sock for sock in sockets}
        # Each is read once first: ZeroMQ signals a pipe's reader only after a read found it
        # empty (a socket never read, its descriptor never signals).
        self._again: list[Socket] = list(self._by_fd.values())

    def register(self, poller: zmq.Poller) -> None:
        for fd in self._by_fd:
            poller.register(fd, zmq.POLLIN)

    @property
    def pending(self) -> bool:
        """One was left readable: the next poll must not wait."""
        return bool(self._again)

    def ready(self, events: dict[object, int]) -> list[Socket]:
        """The sockets to read this turn: those whose descriptor signalled, and those left
        readable last turn."""
        ready, self._again = self._again, []
        for fd, sock in self._by_fd.items():
            if fd in events and sock not in ready:
                ready.append(sock)
        return ready

    def read(self, sock: Socket) -> None:
        """``sock`` was read: if something is left (a burst cut short), look again next turn."""
        if readable(sock):
            self._again.append(sock)
