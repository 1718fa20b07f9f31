"""The fan-out side of a client's I/O thread: its SUB socket's subscriptions and what it reads.

Runs on the I/O thread only. ``subscribe()`` returns to its caller once the hub has the topic
live: after subscribing to the topic, the SUB socket subscribes to a fresh sync topic; XPUB applies
one connection's subscriptions in order, so the hub's answer on the sync topic means the topic is
live (no slow joiner, docs/guarantees.md). Batches go to the dispatcher; when its inbox is full,
the batch is held and the SUB socket is not read until it is taken (backpressure, no drop).

Sync answers carry the hub's message count of each topic they name (``wire.seq_sync_topic``) and
go to the dispatcher in stream order too: a new subscription starts counting there (a baseline),
and a check (the hub said LOSSY, or this client reconnected to the same hub) counts what was
missed, the tail included. An answer can be lost like a batch (after the hub sent without waiting,
ZeroMQ sends nothing to this pipe until it is read again), so a sync unanswered after
``_RESYNC_AFTER`` seconds is asked again, under a fresh topic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from ..wire import protocol as wire

__all__ = ["Subscriptions"]

_BURST = 256
_RESYNC_AFTER = 1.0


@dataclass
class _Sync:
    live: threading.Event | None  # set on the answer (subscribe() and the resync wait for it)
    kind: bytes
    topics: list[bytes]
    asked_at: float


class Subscriptions:
    def __init__(self, client_id: bytes, deliver: Callable[[list[zmq.Frame]], bool]) -> None:
        self._client_id = client_id
        self._deliver = deliver
        self.sub: zmq.Socket[bytes] | None = None  # set once connected
        self.live_topics: set[bytes] = set()
        self._syncs: dict[bytes, _Sync] = {}
        self._sync_ids = iter(range(1, 2**62))
        self.held: list[zmq.Frame] | None = None  # a batch waiting for room in the dispatcher

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        assert self.sub is not None
        self.live_topics.add(topic)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._sync(_Sync(live, wire.SYNC_BASELINE, [topic], 0.0))

    def unsubscribe(self, topic: bytes) -> None:
        assert self.sub is not None
        self.live_topics.discard(topic)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    def resync(self, live: threading.Event, same_hub: bool) -> None:
        """After a reconnect: ``live`` is set once the hub has every live topic, and its counts
        say what was missed meanwhile. The same hub's counts go on; so do those of a new hub
        that restored them from its journal (the dead hub's sends this process never got are
        counted). A new hub without one counts from zero: a count above ours is what it sent
        before this process was subscribed again, also missed. Checks asked of an old hub are
        void."""
        if not same_hub:
            for sync, pending in list(self._syncs.items()):
                if pending.kind == wire.SYNC_CHECK:
                    self._forget(sync)
                    if pending.live is not None:
                        pending.live.set()
        self._sync(_Sync(live, wire.SYNC_CHECK, sorted(self.live_topics), 0.0))

    def check(self) -> None:
        """The hub sent without waiting for some subscriber: count what this one missed."""
        if self.live_topics:
            self._sync(_Sync(None, wire.SYNC_CHECK, sorted(self.live_topics), 0.0))

    def resync_due(self, now: float) -> float | None:
        """Ask again what is unanswered for too long; when the next one is due, if any."""
        due = None
        for sync, pending in list(self._syncs.items()):
            if now - pending.asked_at >= _RESYNC_AFTER:
                self._forget(sync)
                # Topics unsubscribed meanwhile are no longer ours to ask about.
                topics = [topic for topic in pending.topics if topic in self.live_topics]
                if not topics:
                    if pending.live is not None:
                        pending.live.set()
                    continue
                pending.topics = topics
                self._sync(pending)
            again = pending.asked_at + _RESYNC_AFTER
            due = again if due is None else min(due, again)
        return due

    def _sync(self, pending: _Sync) -> None:
        assert self.sub is not None
        if not pending.topics:
            if pending.live is not None:
                pending.live.set()
            return
        sync = wire.seq_sync_topic(
            self._client_id, next(self._sync_ids), pending.kind, pending.topics
        )
        pending.asked_at = time.monotonic()
        self._syncs[sync] = pending
        self.sub.setsockopt(zmq.SUBSCRIBE, sync)

    def _forget(self, sync: bytes) -> None:
        assert self.sub is not None
        del self._syncs[sync]
        self.sub.setsockopt(zmq.UNSUBSCRIBE, sync)  # the hub drops its answer if still queued

    def hand_on_held(self) -> None:
        """Offer the held batch to the dispatcher again."""
        if self.held is not None and self._deliver(self.held):
            self.held = None

    def read(self) -> bool:
        """Read what the SUB socket has, up to a burst; True when a sync answer came (the
        outbox may have waited for it)."""
        sub = self.sub
        assert sub is not None
        synced = False
        for _ in range(_BURST):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            topic = frames[0].bytes
            if wire.is_sync_topic(topic):
                pending = self._syncs.get(topic)
                if pending is None:
                    continue  # asked again meanwhile: that answer will do
                self._forget(topic)
                if pending.live is not None:
                    pending.live.set()
                synced = True
                if len(frames) < 2:
                    continue
            if not self._deliver(frames):
                self.held = frames
                break
        return synced
