"""The fan-out side of a client: its SUB socket's subscriptions and what it reads.

Two threads use the SUB socket, one at a time under ``lock``. The I/O thread subscribes, asks
syncs, and reads while a sync waits for its answer (so ``subscribe()`` returns even while a
handler runs long). The dispatcher, whenever it is idle, reads the socket itself (``take``): a
batch that reaches an idle process goes from the socket to its handlers on one thread, without a
hand-off (measured: the hand-off from the I/O thread to the dispatcher was ~50-85 µs of a round
trip's p50 on the loaded 2-core machine, and often a second wake-up, for the GIL). Both poll the
socket's ``ZMQ_FD`` (edge-triggered), never the socket, and whoever used the socket last looks at
``ZMQ_EVENTS`` and wakes the other when it leaves something to read.

``subscribe()`` returns to its caller once the hub has the topic
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import zmq

from ..wire import protocol as wire
from ..wire.sockets import readable, recv_frames
from .spool import Spool, read_spooled

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
    def __init__(
        self,
        client_id: bytes,
        deliver: Callable[[list[zmq.Frame]], bool],
        wake_io: Callable[[], None],
    ) -> None:
        self._client_id = client_id
        self._deliver = deliver
        self._wake_io = wake_io
        self.wake_reader: Callable[[], None] = _nothing  # the dispatcher's, once it reads here
        self.lock = threading.Lock()
        self.sub: zmq.Socket[bytes] | None = None  # set once connected
        self.fd = -1  # its ZMQ_FD
        self.live_topics: set[bytes] = set()
        self._syncs: dict[bytes, _Sync] = {}
        self._sync_ids = iter(range(1, 2**62))
        self.held: list[zmq.Frame] | None = None  # a batch waiting for room in the dispatcher
        self._orphaned = False  # the dispatcher reads no more (close() in a handler, stop)
        # request()s waiting for a reply: the I/O thread reads too, as the dispatcher may be
        # the requester (a handler that asks), or busy in a long handler while a reply waits.
        self.awaited = 0
        # The dispatcher reads the socket now (idle, between batches), rather than running
        # handlers or stopping: a reply awaited meanwhile is its to take, and the I/O thread
        # need not wake for it (a wake-up, and a second reader woken by the same batch).
        self.dispatcher_reads = False
        self.spool: Spool | None = None  # the hub's, from its WELCOME: big payloads read here

    def attach(self, sub: zmq.Socket[bytes]) -> None:
        with self.lock:
            self.sub = sub
            self.fd = cast(int, sub.getsockopt(zmq.FD))
        self.wake_reader()

    def close(self) -> None:
        """Close the SUB socket (I/O thread, at its end); the dispatcher reads no more."""
        with self.lock:
            sub, self.sub, self.fd = self.sub, None, -1
            if sub is not None:
                sub.close()
        self.wake_reader()  # it may poll the closed descriptor: let it look again

    def orphan(self) -> None:
        """The dispatcher ended: the I/O thread reads from now on. After close() in a handler
        what comes is dropped there; unread, it would fill the pipe and hold the hub's fan-out
        (and the FLUSHED that close() waits for) until the socket closes."""
        self._orphaned = True
        self._wake_io()

    @property
    def reading(self) -> bool:
        """True while the I/O thread reads the socket too: a sync waits for its answer, a
        request() its reply while the dispatcher runs handlers (it may be the requester, or in
        a long handler), or the dispatcher is gone."""
        return (
            self._orphaned or bool(self._syncs) or (self.awaited > 0 and not self.dispatcher_reads)
        ) and self.held is None

    def await_reply(self, waiting: bool) -> None:
        """A request() begins (``True``) or ends waiting for its reply (any thread)."""
        with self.lock:
            self.awaited += 1 if waiting else -1
        # Written, then the other's flag read, here and in the dispatcher (handling()): one of
        # the two sees the other, and the I/O thread is woken whenever the reply may otherwise
        # wait for a handler to return.
        if waiting and not self.dispatcher_reads:
            self._wake_io()  # it polls the SUB socket from now on

    def handling(self) -> None:
        """Dispatcher: it runs handlers (or stops) and reads nothing until ``idle()``."""
        self.dispatcher_reads = False
        if self.awaited:
            self._wake_io()  # a reply awaited: the I/O thread reads it meanwhile

    def idle(self) -> None:
        """Dispatcher: it reads the socket again."""
        self.dispatcher_reads = True

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        with self.lock:
            assert self.sub is not None
            self.live_topics.add(topic)
            if self.spool is not None:  # before it is live: every later message has a share
                self.spool.register(topic)
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
            self._sync(_Sync(live, wire.SYNC_BASELINE, [topic], 0.0))
            self._used()

    def unsubscribe(self, topic: bytes) -> None:
        with self.lock:
            assert self.sub is not None
            self.live_topics.discard(topic)
            if self.spool is not None:
                self.spool.unregister(topic)
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self._used()

    def resync(self, live: threading.Event, same_hub: bool) -> None:
        """After a reconnect: ``live`` is set once the hub has every live topic, and its counts
        say what was missed meanwhile. The same hub's counts go on; so do those of a new hub
        that restored them from its journal (the dead hub's sends this process never got are
        counted). A new hub without one counts from zero: a count above ours is what it sent
        before this process was subscribed again, also missed. Checks asked of an old hub are
        void."""
        with self.lock:
            self._resync(live, same_hub)
            self._used()

    def _resync(self, live: threading.Event, same_hub: bool) -> None:
        if not same_hub:
            for sync, pending in list(self._syncs.items()):
                if pending.kind == wire.SYNC_CHECK:
                    self._forget(sync)
                    if pending.live is not None:
                        pending.live.set()
        self._sync(_Sync(live, wire.SYNC_CHECK, sorted(self.live_topics), 0.0))

    def check(self) -> None:
        """The hub sent without waiting for some subscriber: count what this one missed."""
        with self.lock:
            if self.live_topics:
                self._sync(_Sync(None, wire.SYNC_CHECK, sorted(self.live_topics), 0.0))
                self._used()

    def resync_due(self, now: float) -> float | None:
        """Ask again what is unanswered for too long; when the next one is due, if any."""
        if not self._syncs:
            return None
        with self.lock:
            due = self._resync_due(now)
            self._used()
        return due

    def _resync_due(self, now: float) -> float | None:
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
        if self.sub is None:
            return  # closed meanwhile
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
        del self._syncs[sync]
        if self.sub is not None:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, sync)  # the hub drops its answer if queued

    def _used(self) -> None:
        """After the I/O thread used the socket (lock held): it may have consumed the edge of
        a batch that waits, and it does not read it itself; the dispatcher does."""
        if self.sub is not None and not self.reading and readable(self.sub):
            self.wake_reader()

    def hand_over(self) -> None:
        """I/O thread, which looked at the socket and reads no more: wake the dispatcher if
        something waits (``_used``)."""
        with self.lock:
            self._used()

    def hand_on_held(self) -> None:
        """Offer the held batch to the dispatcher again."""
        if self.held is not None:
            with self.lock:
                if self.held is not None and self._deliver(self.held):
                    self.held = None

    def read(self) -> bool:
        """I/O thread: read what the SUB socket has, up to a burst, into the dispatcher's
        inbox; True when a sync answer came (the outbox may have waited for it)."""
        synced = False
        with self.lock:
            for _ in range(_BURST):
                frames, answered = self._next()
                synced |= answered
                if frames is None:
                    break
                if not self._deliver(frames):
                    self.held = frames
                    break
            self._used()
        return synced

    def take(self, inbox: deque[list[zmq.Frame]]) -> list[zmq.Frame] | None:
        """Dispatcher: the next batch or sync answer, in stream order (what the I/O thread
        read before it first: ``inbox``, then the held batch); ``None`` when there is none."""
        with self.lock:
            if inbox:
                return inbox.popleft()
            held = self.held
            if held is not None:
                self.held = None
                return held
            frames, answered = self._next()
            if answered or (self._syncs and self.sub is not None and readable(self.sub)):
                self._wake_io()  # the pump waits for the answer, or one may wait behind this
            return frames

    def readable(self) -> bool:
        """Dispatcher, before it sleeps: is there something to read after all?"""
        with self.lock:
            return self.held is not None or (self.sub is not None and readable(self.sub))

    def _next(self) -> tuple[list[zmq.Frame] | None, bool]:
        """The next frames to dispatch from the socket (lock held), and whether a sync was
        answered on the way."""
        sub = self.sub
        answered = False
        # Looking first costs a zmq_poll; a receive that finds nothing raises zmq.Again, which
        # costs ~3x that, and ends every read of an idle socket.
        while sub is not None and readable(sub):
            frames = recv_frames(sub)
            topic = frames[0].bytes
            if wire.is_sync_topic(topic):
                pending = self._syncs.get(topic)
                if pending is None:
                    continue  # asked again meanwhile: that answer will do
                self._forget(topic)
                if pending.live is not None:
                    pending.live.set()
                answered = True
                if len(frames) < 2:
                    continue
            elif len(frames) > 3:  # out-of-band buffers: a spooled batch reads its files now
                frames = read_spooled(self.spool, frames)
            return frames, answered
        return None, answered


def _nothing() -> None:
    pass
