"""What every client of the hub must be told, and what each has confirmed (hub process).

- **Grouped topics** (GROUPS, confirmed by GROUPS_ACK): publishers encode a grouped topic
  differently (split batches), so a CONSUME or DECLARE that gives a topic its first group is
  answered only once every client confirmed the new version, or after ``heartbeat_timeout``.
- **Full topics** (FULL): sent to every client when the set changes, and after each WELCOME.
- **LOSSY**: the fan-out sent without waiting for a stalled subscriber; every client checks what
  it missed.
- **STOPPING**: the hub is going; clients reconnect at once.

A notice whose client's pipe is full is retried on each turn that does the control plane's work
(at least every 100 ms), never dropped (``send_to_each``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import zmq

from ..wire import protocol as wire
from .sending import send_reply, send_to_each

__all__ = ["Notices"]

logger = logging.getLogger(__name__)

Socket = zmq.Socket[Any]


class Notices:
    def __init__(self, heartbeat_timeout: float) -> None:
        self._heartbeat_timeout = heartbeat_timeout
        self.groups_version = 0
        self._acked: dict[bytes, int] = {}  # client -> the groups version it confirmed
        # Answers waiting for every client to know their topic is grouped:
        # (the answer, groups version, deadline)
        self._waiting: list[tuple[list[bytes], int, float]] = []
        # Topics a full queue group holds back, as last announced, and the clients still to be
        # told.
        self._full_version = 0
        self._full_pending: set[bytes] = set()
        self._lossy_pending: set[bytes] = set()
        self.loss_notices = 0

    # -- clients -------------------------------------------------------------------------------

    def joined(self, identity: bytes, anything_full: bool) -> None:
        """A client said HELLO; its WELCOME names the grouped topics and clears its full ones."""
        self._acked[identity] = self.groups_version
        if anything_full:
            self._full_pending.add(identity)  # after the WELCOME, which clears the list

    def left(self, identity: bytes) -> None:
        self._acked.pop(identity, None)
        self._full_pending.discard(identity)
        self._lossy_pending.discard(identity)

    def groups_acked(self, identity: bytes, version: int) -> None:
        self._acked[identity] = version

    # -- announcements -------------------------------------------------------------------------

    def answer_once_grouped(
        self,
        control: Socket,
        clients: Iterable[bytes],
        answer: list[bytes],
        grouped_topics: list[bytes] | None,
        now: float,
    ) -> None:
        """Answer at once, or, when ``grouped_topics`` is given (a topic just got its first
        group), tell every client the new list and answer once all know: what they published
        unsplit could not be held for the group."""
        if grouped_topics is None:
            send_reply(control, answer)
            return
        self.groups_changed(control, clients, grouped_topics)
        deadline = now + self._heartbeat_timeout
        self._waiting.append((answer, self.groups_version, deadline))

    def groups_changed(
        self, control: Socket, clients: Iterable[bytes], grouped_topics: list[bytes]
    ) -> None:
        """A topic got its first group or lost its last: every client learns the new list."""
        self.groups_version += 1
        for client in list(clients):
            send_reply(control, wire.groups(client, self.groups_version, grouped_topics))

    def full_changed(self, clients: Iterable[bytes]) -> None:
        self._full_version += 1
        self._full_pending = set(clients)

    def lossy(self, clients: Iterable[bytes]) -> None:
        self._lossy_pending = set(clients)
        self.loss_notices += 1

    @staticmethod
    def stopping(control: Socket, clients: Iterable[bytes]) -> None:
        for client in list(clients):
            send_reply(control, [client, wire.header(wire.STOPPING)])

    # -- every loop turn -------------------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def answer_waiting(self, control: Socket, clients: Iterable[bytes], now: float) -> None:
        clients = list(clients)
        still_waiting = []
        for answer, version, deadline in self._waiting:
            everyone_knows = all(self._acked.get(client, 0) >= version for client in clients)
            if everyone_knows or now >= deadline:
                if not everyone_knows:
                    logger.warning("not every client confirmed the queue groups; going on")
                send_reply(control, answer)
            else:
                still_waiting.append((answer, version, deadline))
        self._waiting = still_waiting

    def send_pending(self, control: Socket, full_topics: Iterable[bytes]) -> None:
        if self._full_pending:
            topics = sorted(full_topics)
            version = self._full_version
            send_to_each(control, self._full_pending, lambda c: wire.full(c, version, topics))
        if self._lossy_pending:
            send_to_each(control, self._lossy_pending, wire.lossy)
