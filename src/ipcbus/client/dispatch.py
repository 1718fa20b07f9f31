"""Broadcast dispatch in a client process: one thread calls the subscribe() handlers, in order.

The I/O thread hands each fan-out batch to the dispatcher's bounded inbox; a full inbox makes the
I/O thread stop reading its SUB socket (backpressure reaches the hub, never a drop here). The
dispatcher decodes a batch with this process's classes, checks the hub's per-topic message count
(a skip is a gap: the hub stopped waiting for this process), and calls every accepting
subscription's handler. The hub's answers to this client's syncs come the same way, in order: they
set where a new subscription starts counting, or count the messages missed since the last batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import zmq

from ..core import codec
from ..core.contract import Subscription
from ..core.handlers import call_handler
from ..message import Message
from ..wire import protocol as wire

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)


class Dispatcher:
    """The broadcast subscriptions of one client, by topic, and the thread that serves them."""

    def __init__(self, capacity: int) -> None:
        self._lock = threading.Lock()
        self.subscriptions: dict[str, tuple[Subscription, ...]] = {}
        self._types: dict[str, type[Message]] = {}
        # Per topic, the hub's message count at the last batch seen (a skip is a gap).
        self._last_seq: dict[str, int] = {}
        self.gaps = 0  # messages the hub dropped for this process (see HubOptions.stall_timeout)
        self._inbox: queue.Queue[list[zmq.Frame] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="ipcbus-dispatch", daemon=True)
        self._thread.start()

    # -- subscriptions (any thread) ------------------------------------------------------------

    def add(self, subscription: Subscription) -> bool:
        """Add a subscription; True when it is the topic's first (subscribe at the hub)."""
        topic = subscription.topic
        with self._lock:
            self._types[topic] = subscription.message_type
            existing = self.subscriptions.get(topic, ())
            self.subscriptions[topic] = (*existing, subscription)
            return not existing

    def remove(self, subscription: Subscription) -> bool:
        """Remove a subscription; True when it was the topic's last (unsubscribe at the hub)."""
        topic = subscription.topic
        with self._lock:
            existing = self.subscriptions.get(topic, ())
            remaining = tuple(s for s in existing if s is not subscription)
            self.subscriptions[topic] = remaining
            if remaining or not existing:
                return False
            self._last_seq.pop(topic, None)
            return True

    # -- the I/O thread ------------------------------------------------------------------------

    def put(self, frames: list[zmq.Frame]) -> bool:
        try:
            self._inbox.put_nowait(frames)
        except queue.Full:
            return False  # the I/O thread stops reading the SUB socket: backpressure
        return True

    # -- the dispatcher thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            frames = self._inbox.get()
            if frames is None:
                return
            try:
                self._dispatch(frames)
            except Exception:
                logger.exception("ipcbus could not dispatch a batch; it is dropped")

    def _dispatch(self, frames: list[Any]) -> None:
        if wire.is_sync_topic(frames[0].bytes):
            self._synced(wire.SyncReply.parse(frames))
            return
        batch = wire.Fanout.parse(frames)
        topic = wire.unique_name_of(batch.topic)
        subscriptions = self.subscriptions.get(topic)
        if not subscriptions:
            return
        codec_id, count, _published_at = batch.meta
        last = self._last_seq.get(topic)
        self._last_seq[topic] = batch.seq
        if last is not None and batch.seq - count > last:
            self._missed(topic, batch.seq - count - last)
        messages = codec.decode_batch(codec_id, batch.payload, self._types.get(topic))
        for message in messages:
            for subscription in subscriptions:
                if subscription.accepts(message):
                    call_handler(subscription, message)

    def _synced(self, reply: wire.SyncReply) -> None:
        """The hub's message counts, in stream order: where a subscription starts (baseline),
        or how many messages it missed since the last batch seen (check)."""
        for topic_frame, seq in reply.seqs:
            topic = wire.unique_name_of(topic_frame)
            if not self.subscriptions.get(topic):
                continue
            last = self._last_seq.get(topic)
            self._last_seq[topic] = seq
            if reply.kind == wire.SYNC_CHECK and last is not None and seq > last:
                self._missed(topic, seq - last)

    def _missed(self, topic: str, count: int) -> None:
        self.gaps += count
        logger.error(
            "missed %d messages of %s: this process accepted nothing for so long that the hub "
            "stopped waiting for it",
            count,
            topic,
        )

    # -- stop ------------------------------------------------------------------------------------

    def stop(self, timeout: float) -> None:
        try:
            self._inbox.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("the dispatcher is stuck in a handler; not waiting for it")
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
