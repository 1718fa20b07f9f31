"""The data DEALER of a client (worker process): PUBLISH and FLUSH out, FLUSHED back.

Two threads may send on it, one at a time under ``lock``: the I/O thread, which pumps the outbox,
and a publisher that finds the bus quiet and sends its message at once (``send_at_once``). The
second saves the hand-off to the I/O thread (an eventfd write and a thread wake-up, measured
~50 µs of a round trip's p50 on a loaded 2-core machine); under load, messages still queue in the
outbox and leave in batches.

ZeroMQ sockets are not thread-safe, but one may move between threads behind a full memory barrier,
which the lock is. The I/O thread therefore polls the socket's ``ZMQ_FD`` (a plain file
descriptor, edge-triggered) instead of the socket: the poll never touches the socket itself. An
edge-triggered descriptor can be consumed by whichever thread uses the socket, so every use of the
socket ends by looking at ``ZMQ_EVENTS``: the I/O thread reads what is there, a publisher wakes
the I/O thread when something is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from ..message import Message
from ..wire import protocol as wire
from ..wire.sockets import readable, send_frames
from .outbox import Outbox, Prepared
from .session import Session

__all__ = ["DataChannel"]

_BURST = 4
# A publish that follows the previous one by less than this goes through the outbox: the
# publisher is busy, and batches (~1 µs a message) beat a send per message (~15 µs).
_QUIET_S = 0.0001

Socket = zmq.Socket[bytes]

# Plain ints: pyzmq's are enums, whose `&` is a Python call.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class DataChannel:
    """The data DEALER, its lock, the request waiting for room, and the replies."""

    def __init__(
        self,
        outbox: Outbox,
        session: Session,
        on_space: Callable[[], None],
        wake: Callable[[], None],
        max_unconfirmed: int,
    ) -> None:
        self.lock = threading.Lock()
        # Messages sent and not confirmed by the hub at most (ClientOptions.max_pending): past
        # it nothing more is sent until the hub confirms. It bounds what one publisher has on
        # its way to the hub, and so what a full queue group takes before the publisher learns
        # (a fast publisher put 20x a group's max_held into it through the pipes).
        self._max_unconfirmed = max_unconfirmed
        self.socket: Socket | None = None
        self.fd = -1  # the socket's ZMQ_FD, polled by the I/O thread
        self._outbox = outbox
        self._session = session
        self._on_space = on_space
        self._wake = wake
        self.waiting: list[Any] | None = None  # a request waiting for room in the pipe
        self._last_publish = 0.0

    def attach(self, socket: Socket) -> None:
        with self.lock:
            self.socket = socket
            self.fd = cast(int, socket.getsockopt(zmq.FD))

    def close(self) -> None:
        """Close the socket (I/O thread, at its end); publishers queue from then on."""
        with self.lock:
            socket, self.socket = self.socket, None
            if socket is not None:
                socket.close()

    # -- a publisher's thread ------------------------------------------------------------------

    def send_at_once(self, message: Message | Prepared) -> bool:
        """Send ``message`` (or a prepared request or reply) now if the bus is quiet and
        nothing is queued before it; False when it is for the outbox (the caller appends it and
        wakes the I/O thread)."""
        now = time.monotonic()
        quiet = now - self._last_publish >= _QUIET_S
        self._last_publish = now
        outbox = self._outbox
        if (
            not quiet
            or outbox.items
            or outbox.sent - outbox.confirmed >= self._max_unconfirmed
            or not self.lock.acquire(blocking=False)
        ):
            return False
        try:
            socket, session = self.socket, self._session
            if (
                socket is None
                or self.waiting is not None
                or outbox.items
                or outbox.confirm.resend  # what a dead hub did not confirm goes first
                or not session.hub_alive
                or not session.resynced.is_set()
            ):
                return False
            # take_items() encodes, counts and rejects exactly as take() on the I/O thread.
            outbox.items.append(message)
            request = outbox.take_items()
            if request is not None and not send_frames(socket, request):
                self.waiting = request
                self._wake()  # the I/O thread waits for room
            else:
                # A confirmation due goes after the message (it covers it too), from here:
                # asked first, as take() does, it handed the message to the I/O thread, a
                # wake-up on the way of one publish in 32.
                token = outbox.confirm.ask(now)
                if token is not None:
                    confirmation = outbox.confirmation(token)
                    if not send_frames(socket, confirmation):
                        self.waiting = confirmation
                        self._wake()
            if outbox.items or (outbox.flushes and readable(socket)):
                # Others queued meanwhile, or this send consumed the edge that would have
                # told the I/O thread of a reply. The only replies are FLUSHED: with no flush
                # unanswered there is none to miss, and the look is skipped (a zmq_poll,
                # ~8 µs of a leg on the 2-core machine).
                self._wake()
            return True
        finally:
            self.lock.release()

    # -- the I/O thread ------------------------------------------------------------------------

    def pump(self) -> bool:
        """Send what the outbox holds until it is empty or the pipe is full, then read the
        replies; at most ``_BURST`` requests a call, so that the I/O thread reads what the hub
        says in between (a FULL notice waited behind a publisher that kept the outbox from
        emptying: a group took 20x its max_held). True when there is more to send at once.
        While the hub is unreachable nothing is sent: the outbox holds what is published (up
        to ``max_pending``) until a hub says WELCOME again."""
        with self.lock:
            socket = self.socket
            if socket is None:
                return False
            session, outbox = self._session, self._outbox
            budget = _BURST
            for _ in range(_BURST):
                sending = session.hub_alive and session.resynced.is_set()
                if sending:
                    budget = self._send_queued(socket, budget)
                # Edge-triggered: whatever used the socket may have consumed the edge of a
                # reply or of room in the pipe, so look before polling again.
                events = _events(socket)
                if events & _POLLIN:
                    self._read_replies(socket)
                    continue
                if not sending:
                    return False
                if self.waiting is not None:  # room in the pipe again: send on
                    more = bool(events & _POLLOUT)
                else:  # the burst ended, not the outbox
                    more = budget <= 0 and bool(outbox.items or outbox.confirm.resend)
                if not more or budget <= 0:
                    return more
            return True

    def _send_queued(self, socket: Socket, budget: int) -> int:
        """Send up to ``budget`` requests; returns what is left of it."""
        outbox = self._outbox
        while budget > 0:
            if self.waiting is not None:
                if not send_frames(socket, self.waiting):
                    return budget
                self.waiting = None
                budget -= 1
            if not outbox.items and not outbox.confirm.resend:
                token = outbox.confirm.ask(time.monotonic())  # idle: what is unconfirmed
                if token is None:
                    return budget
                self.waiting = outbox.confirmation(token)
                continue
            if (
                outbox.sent - outbox.confirmed >= self._max_unconfirmed
                and not outbox.confirm.resend  # sent again to a new hub: counted already
            ):
                # Enough on its way: ask the hub to confirm it, and send on once it has.
                token = outbox.confirm.ask(time.monotonic(), at_once=True)
                if token is None:
                    return budget  # asked already: its FLUSHED wakes the I/O thread
                self.waiting = outbox.confirmation(token)
                continue
            # A batch takes no more than the room left below the bound.
            self.waiting = outbox.take(self._max_unconfirmed - (outbox.sent - outbox.confirmed))
            self._on_space()
        return budget

    def _read_replies(self, socket: Socket) -> None:
        outbox = self._outbox
        for _ in range(_BURST):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)  # rare: FLUSHED
            except zmq.Again:
                return
            answer = wire.parse_flushed(frames)
            # Only the hub that welcomed this client confirms: a FLUSH still in the pipe when
            # the hub died reaches the next one first, and its answer would confirm what the
            # dead hub lost (it is asked again, under a new token, once the new hub welcomed
            # this client: Outbox.resend_flushes).
            if answer is not None and answer[1] == self._session.hub_id:
                outbox.flushed(answer[0])


def _events(socket: Socket) -> int:
    return cast(int, socket.getsockopt(zmq.EVENTS))
