"""The fan-out side of a client's I/O thread: its SUB socket's subscriptions and what it reads.

Runs on the I/O thread only. ``subscribe()`` returns to its caller once the hub has the topic
live: after subscribing to the topic, the SUB socket subscribes to a fresh sync topic; XPUB applies
one connection's subscriptions in order, so the hub's answer on the sync topic means the topic is
live (no slow joiner, docs/guarantees.md). Batches go to the dispatcher; when its inbox is full,
the batch is held and the SUB socket is not read until it is taken (backpressure, no drop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from ..wire import protocol as wire

__all__ = ["Subscriptions"]

_BURST = 256


class Subscriptions:
    def __init__(self, client_id: bytes, deliver: Callable[[list[zmq.Frame]], bool]) -> None:
        self._client_id = client_id
        self._deliver = deliver
        self.sub: zmq.Socket[bytes] | None = None  # set once connected
        self.live_topics: set[bytes] = set()
        self._syncs: dict[bytes, threading.Event] = {}
        self._sync_ids = iter(range(1, 2**62))
        self.held: list[zmq.Frame] | None = None  # a batch waiting for room in the dispatcher

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        assert self.sub is not None
        self.live_topics.add(topic)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sync(live)

    def unsubscribe(self, topic: bytes) -> None:
        assert self.sub is not None
        self.live_topics.discard(topic)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    def sync(self, live: threading.Event) -> None:
        """``live`` is set once the hub has every earlier subscription of this SUB socket."""
        assert self.sub is not None
        sync = wire.sync_topic(self._client_id, next(self._sync_ids))
        self._syncs[sync] = live
        self.sub.setsockopt(zmq.SUBSCRIBE, sync)

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
            if len(frames) == 1:
                topic = frames[0].bytes
                live = self._syncs.pop(topic, None)
                if live is not None:
                    sub.setsockopt(zmq.UNSUBSCRIBE, topic)
                    live.set()
                    synced = True
                continue
            if not self._deliver(frames):
                self.held = frames
                break
        return synced
