"""Fan-out inside the hub process: the XPUB socket, its subscriptions, and what happens when a
subscriber's pipe is full.

The XPUB socket has ``XPUB_NODROP``: a full subscriber pipe makes ``send`` fail with EAGAIN instead
of silently dropping (docs/guarantees.md, "Broadcast"). The hub then holds that one batch and stops
reading publishes until the subscriber drains: backpressure reaches publishers through their
DEALER high-water marks. A subscriber that accepts nothing for ``stall_timeout`` seconds (stopped,
deadlocked) must not hold the bus forever: the hub then sends without waiting for full pipes
(each such send counted in ``stall_drops``) for as long as sends keep stalling.

What that costs a subscriber is counted by the subscriber, exactly, in messages: every batch
carries its topic's message count (``wire.fanout``), and once the hub has stopped sending without
waiting it tells every client (LOSSY, through the control plane), whose answer is a check sync:
the hub answers it with the counts of the topics it names, in the same pipe as the batches. That
answer, not a marker sent once, is what makes the tail of a loss visible: measured, after one send
without waiting (``stall_drops == 1``) a SIGSTOPped subscriber's pipe got none of the next 1 975
messages nor the gap marker sent after them (ZeroMQ takes a pipe that refused a message out of the
fan-out until its reader catches up), and the subscriber counted nothing of that tail.

Counts are kept only for topics some subscriber holds (XPUB reports when the last one leaves):
before, one entry per topic ever published stayed for good (200 000 topics: +23 MiB). A subscriber
starts from the count the hub has when it subscribes (a baseline sync), so a count that started
again from zero is never taken for a gap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..wire import protocol as wire
from ..wire.sockets import send_frames

__all__ = ["Fanout"]

logger = logging.getLogger(__name__)

# How many subscription events one loop turn reads before it polls again.
_BURST = 256


class Fanout:
    """Owns the sends on the hub's XPUB socket (the serving loop owns the socket itself)."""

    def __init__(self, xpub: zmq.Socket[bytes], stall_timeout: float) -> None:
        self._xpub = xpub
        self._stall_timeout = stall_timeout
        self.topics: dict[bytes, int] = {}  # topic -> live subscriptions, as XPUB reports them
        self.stalled: list[Any] | None = None  # the batch a full pipe refused, to send first
        # Sync topics to answer, in order (a dict as an ordered set: an unsubscribed one goes).
        self._sync_backlog: dict[bytes, None] = {}
        self._topic_seq: dict[bytes, int] = {}  # messages relayed, of topics someone holds
        self._stalled_since = 0.0
        self._lossy_until = 0.0
        self._lossy = False  # sent without waiting since the clients were last told
        self.stalls = 0  # sends refused by a full pipe (each then waited)
        self.stall_drops = 0  # sends made without waiting for a stalled subscriber
        # With a journal: the counts a previous hub reached (continued when a topic is
        # subscribed again, so a subscriber counts what the dead hub sent it and it never got),
        # and where each new count is written before its batch leaves.
        self.restored_seq: dict[bytes, int] = {}
        self.on_count: Callable[[bytes, int], None] | None = None

    @property
    def retrying(self) -> bool:
        """True while a send waits for room (the loop then polls on a short period: XPUB_NODROP
        gives no POLLOUT event for a full pipe)."""
        return self.stalled is not None or bool(self._sync_backlog)

    @property
    def sequenced_topics(self) -> int:
        """How many topics the hub keeps a message count for."""
        return len(self._topic_seq)

    def relay(
        self, topic: bytes, meta: bytes, count: int, payload: list[Any], publisher: bytes = b""
    ) -> None:
        """Send one batch of ``count`` messages to the topic's subscribers, numbered and with
        its publisher's client id; held if a pipe is full."""
        if topic in self.topics:
            seq = self._topic_seq[topic] = self._topic_seq.get(topic, 0) + count
            if self.on_count is not None:
                self.on_count(topic, seq)
        else:
            # Nobody holds it (as far as XPUB told us yet): no count is kept. A subscriber
            # whose subscription XPUB applied before we read of it starts from its baseline.
            seq = count
        frames = wire.fanout(topic, meta, seq, payload, publisher)
        if not self._send(frames):
            self.stalled = frames

    def retry(self) -> bool:
        """Send what waits (the held batch, sync answers); True when nothing holds the publish
        path any more."""
        if self._sync_backlog:
            self._send_sync_replies()
        if self.stalled is not None:
            if not self._send(self.stalled):
                return False
            self.stalled = None
        return True

    def lossy_ended(self) -> bool:
        """True once, when the hub has stopped sending without waiting (no such send for
        ``stall_timeout``): the clients are to be told (LOSSY)."""
        if self._lossy and time.monotonic() >= self._lossy_until:
            self._lossy = False
            return True
        return False

    def read_subscriptions(self) -> None:
        """Apply what XPUB reports: (un)subscriptions, and sync topics to answer."""
        for _ in range(_BURST):
            try:
                event = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event:
                continue
            subscribe, topic = event[0] == 1, event[1:]
            if wire.is_sync_topic(topic):
                if subscribe:
                    self._sync_backlog[topic] = None
                else:  # its client asked again, or gave up: answering would reach no one
                    self._sync_backlog.pop(topic, None)
                continue
            if subscribe:
                self.topics[topic] = self.topics.get(topic, 0) + 1
                if topic in self.restored_seq and topic not in self._topic_seq:
                    self._topic_seq[topic] = self.restored_seq.pop(topic)
            elif topic in self.topics:
                del self.topics[topic]
                self._topic_seq.pop(topic, None)

    def counts(self) -> dict[bytes, int]:
        """Every topic's message count, restored ones not subscribed again included."""
        return {**self.restored_seq, **self._topic_seq}

    def _send_sync_replies(self) -> None:
        for sync in list(self._sync_backlog):
            asked = wire.parse_seq_sync(sync)
            if asked is None:
                frames = [sync]
            else:
                frames = wire.sync_reply(sync, (self._topic_seq.get(t, 0) for t in asked[1]))
            try:
                self._xpub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                continue  # that subscriber's pipe is full: it drains, then gets its answer
            del self._sync_backlog[sync]

    def _send(self, frames: list[Any]) -> bool:
        xpub = self._xpub
        if send_frames(xpub, frames):
            return True
        now = time.monotonic()
        if self.stalled is None:
            self.stalls += 1
            self._stalled_since = now
        if now < self._lossy_until or now - self._stalled_since >= self._stall_timeout:
            if now >= self._lossy_until:
                logger.error(
                    "a subscriber accepted nothing for %.0f s: sending without waiting for it",
                    now - self._stalled_since,
                )
            # Without NODROP a full pipe drops this message instead of refusing it.
            xpub.setsockopt(zmq.XPUB_NODROP, 0)
            try:
                xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
            finally:
                xpub.setsockopt(zmq.XPUB_NODROP, 1)
            self.stall_drops += 1
            self._lossy_until = now + self._stall_timeout
            self._lossy = True
            return True
        return False
