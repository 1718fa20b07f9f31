"""What this client sent and no hub has confirmed yet (worker process, I/O thread only).

A hub killed with SIGKILL takes with it what it had read and not yet relayed or journaled, and what
was still on its way to it. So the client keeps what it sent since the hub last confirmed, and asks
for confirmations itself (a FLUSH of its own, every ``_ASK_EVERY`` batches that hold
``_ASK_MESSAGES`` messages in all, or ``_ASK_AFTER`` seconds while something is unconfirmed: about
one small request per 32 batches under load, one per 0.25 s on a quiet bus). On a quiet bus every
message is a batch of its own, and asking every 32 of them put a confirmation, and its answer waking
the I/O thread, into 1 round trip in 32 of each process: 30-60 % of the slowest 1 % of round trips
fell on it, measured. The hub answers a FLUSH after what came before it (relayed, and journaled when
it has a journal). When a *different* hub welcomes the client (the previous one died), what the
previous one did not confirm is (docs/guarantees.md, "Hub kill -9"):

- for topics with queue groups, sent again, first, flagged as such (``wire.sent_again``): the
  new hub drops the copies of batches it has (out of this client's pipe, or journaled by the
  dead hub), and delivers the others with ``attempt`` 2 (the dead hub may have delivered them);
- broadcast, counted per type in ``in_doubt`` and logged at WARNING: it may have reached its
  subscribers or not, and sending it again could duplicate it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any

from ..wire import protocol as wire

__all__ = ["Unconfirmed"]

logger = logging.getLogger(__name__)

_ASK_EVERY = 32  # batches sent since the last request for a confirmation...
_ASK_MESSAGES = 1024  # ...holding at least this many messages
_ASK_AFTER = 0.25  # seconds the oldest unconfirmed batch waits before one is asked


class Unconfirmed:
    def __init__(self) -> None:
        # (position after it: messages sent up to and including it, topic, count, request if
        # its topic has queue groups: kept to send again)
        self.window: deque[tuple[int, bytes, int, list[Any] | None]] = deque()
        self.resend: deque[list[Any]] = deque()  # to send first, to a new hub
        self.in_doubt: dict[str, int] = {}  # per type: broadcast messages a dead hub took
        self._batches = self._messages = 0  # sent since the last ask
        self._oldest = 0.0  # when the first unconfirmed batch was sent
        self.asking = False  # a confirmation is asked and not answered
        self._tokens = itertools.count(1)

    def sent(self, position: int, topic: bytes, count: int, request: list[Any] | None) -> None:
        """A request left (``request`` kept only for a topic with queue groups)."""
        if not self.window:
            self._oldest = time.monotonic()
        self.window.append((position, topic, count, request))
        self._batches += 1
        self._messages += count

    def confirmed(self, position: int) -> None:
        """The hub confirmed every message sent before ``position``."""
        window = self.window
        while window and window[0][0] <= position:
            window.popleft()
        self.asking = False
        self._batches = self._messages = 0
        if window:
            self._oldest = time.monotonic()

    def ask(self, now: float, at_once: bool = False) -> bytes | None:
        """A token to confirm with (a FLUSH after what was sent), when one is due (``at_once``:
        now, if none is asked). Never while requests wait to go again: a confirmation asked
        before them would cover them unsent."""
        if self.asking or self.resend:
            return None
        if not at_once and (
            not self.window
            or (
                (self._batches < _ASK_EVERY or self._messages < _ASK_MESSAGES)
                and now - self._oldest < _ASK_AFTER
            )
        ):
            return None
        self.asking = True
        self._batches = self._messages = 0
        return b"c%d" % next(self._tokens)

    def due_at(self) -> float | None:
        """When to ask for a confirmation of what waits, if nothing else comes (the I/O thread
        wakes then: an idle publisher's last batches are confirmed within ~0.25 s)."""
        if self.asking or not self.window:
            return None
        return self._oldest + _ASK_AFTER

    def replaced(self) -> None:
        """A different hub welcomed this client: the previous one is gone with what it did not
        confirm."""
        window, self.window = self.window, deque()
        self.resend.clear()  # what waited to go again is in the window too
        self.asking = False
        doubtful: dict[str, int] = {}
        again = 0
        for _position, topic, count, request in window:
            if request is not None:
                wire.sent_again(request)  # flagged: the new hub may know it, or deliver it as
                self.resend.append(request)  # delivered once (attempt 2)
                again += count
            else:
                name = wire.unique_name_of(topic)
                doubtful[name] = doubtful.get(name, 0) + count
        # Sent again at their old positions: any later confirmation covers them.
        self.window.extend(entry for entry in window if entry[3] is not None)
        for name, count in doubtful.items():
            self.in_doubt[name] = self.in_doubt.get(name, 0) + count
        if doubtful:
            logger.warning(
                "the hub was replaced before it confirmed %d broadcast messages (%s): they may "
                "or may not have reached their subscribers (counted in in_doubt)",
                sum(doubtful.values()),
                ", ".join(f"{name}: {count}" for name, count in sorted(doubtful.items())),
            )
        if again:
            logger.warning(
                "the hub was replaced before it confirmed %d queue messages: sent again to the "
                "new hub (at least once)",
                again,
            )

    @property
    def in_doubt_total(self) -> int:
        return sum(self.in_doubt.values())
