"""Fan-out inside the hub process: the XPUB socket, its subscriptions, and what happens when a
subscriber's pipe is full.

The XPUB socket has ``XPUB_NODROP``: a full subscriber pipe makes ``send`` fail with EAGAIN instead
of silently dropping (docs/guarantees.md, "Broadcast"). The hub then holds that one batch and stops
reading publishes until the subscriber drains: backpressure reaches publishers through their
DEALER high-water marks. A subscriber that accepts nothing for ``stall_timeout`` seconds (stopped,
deadlocked) must not hold the bus forever: the hub then sends without waiting for full pipes
(counted in ``stall_drops``) for as long as sends keep stalling. Subscribers learn what they
missed from the per-topic sequence number of every batch, and from a gap marker per topic once
sends stop stalling.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import zmq

from ..wire import protocol as wire

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
        self._sync_backlog: deque[bytes] = deque()
        self._topic_seq: dict[bytes, int] = {}
        self._stalled_since = 0.0
        self._lossy_until = 0.0
        # Topics sent without waiting: once sends stop stalling, each gets a marker carrying its
        # latest sequence number, so a subscriber that missed the tail learns of it too.
        self._lossy_topics: set[bytes] = set()
        self.stalls = 0  # sends refused by a full pipe (each then waited)
        self.stall_drops = 0  # sends made without waiting for a stalled subscriber

    @property
    def retrying(self) -> bool:
        """True while a send waits for room (the loop then polls on a short period: XPUB_NODROP
        gives no POLLOUT event for a full pipe)."""
        return self.stalled is not None or bool(self._sync_backlog)

    def relay(self, topic: bytes, meta: Any, payload: list[Any]) -> None:
        """Send one batch to the topic's subscribers, numbered; held if a pipe is full."""
        seq = self._topic_seq[topic] = self._topic_seq.get(topic, 0) + 1
        frames = wire.fanout(topic, meta, seq, payload)
        if not self._send(frames):
            self.stalled = frames

    def retry(self) -> bool:
        """Send what waits (the held batch, sync answers, gap markers); True when nothing
        holds the publish path any more."""
        self._send_sync_replies()
        if self.stalled is not None:
            if not self._send(self.stalled):
                return False
            self.stalled = None
        if self._lossy_topics and time.monotonic() >= self._lossy_until:
            self._send_gap_markers()
        return True

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
                    self._sync_backlog.append(topic)
                continue
            if subscribe:
                self.topics[topic] = self.topics.get(topic, 0) + 1
            elif topic in self.topics:
                del self.topics[topic]

    def _send_sync_replies(self) -> None:
        while self._sync_backlog:
            try:
                self._xpub.send(self._sync_backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # that subscriber's pipe is full: it drains, then gets its answer
            self._sync_backlog.popleft()

    def _send(self, frames: list[Any]) -> bool:
        xpub = self._xpub
        try:
            xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass
        else:
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
            self._lossy_topics.add(frames[0])
            return True
        return False

    def _send_gap_markers(self) -> None:
        """``[topic, b"", seq]`` for each topic sent without waiting, now that nothing stalls."""
        for topic in list(self._lossy_topics):
            try:
                self._xpub.send_multipart(
                    wire.gap_marker(topic, self._topic_seq[topic]), zmq.NOBLOCK
                )
            except zmq.Again:
                return  # still full: next turn
            self._lossy_topics.discard(topic)
