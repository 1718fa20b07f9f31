"""Broadcast dispatch in a client process: one thread calls the subscribe() handlers, in order.

An idle dispatcher reads the SUB socket itself (``Subscriptions.take``: no hand-off between
threads on the way from the socket to a handler). While a sync waits for its answer the I/O thread
reads too, and hands each fan-out batch to the dispatcher's bounded inbox; a full inbox makes the
I/O thread stop reading its SUB socket (backpressure reaches the hub, never a drop here). The
dispatcher decodes a batch with this process's classes, checks the hub's per-topic message count
(a skip is a gap: the hub stopped waiting for this process), and calls every accepting
subscription's handler. The hub's answers to this client's syncs come the same way, in order: they
set where a new subscription starts counting, or count the messages missed since the last batch.

Handlers never end the thread: what they raise, ``BaseException`` included, is logged
(:func:`~ipcbus.core.handlers.call_handler`). A message this process cannot decode (it holds an
instance of a class this process cannot import) is left out of its batch alone, counted in
``undecodable`` and logged with its type; a batch that cannot be decoded at all is counted with
the number of messages its meta frame announced, and one whose head cannot be read at all as
one message (how many it held is unknown).
"""

from __future__ import annotations

import logging
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from ..core import codec
from ..core.contract import Subscription
from ..core.handlers import call_handler
from ..core.requests import ReplyTo, call_responder
from ..message import Message
from ..wire import protocol as wire
from .threads import OnDeath, start_thread
from .waker import Waker

if TYPE_CHECKING:
    from .subscriptions import Subscriptions

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)


class Dispatcher:
    """The broadcast subscriptions of one client, by topic, and the thread that serves them."""

    def __init__(
        self,
        capacity: int,
        on_death: OnDeath,
        reply_to: Callable[[wire.Route], ReplyTo] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._reply_to = reply_to  # how a handler's answer to a request goes back
        # Takes a reply to this process's request() out of a batch read here (ReplyRoute.take),
        # once this process has asked one (expect_replies).
        self.take_reply: Callable[[list[zmq.Frame]], bool] | None = None
        self.subscriptions: dict[str, tuple[Subscription, ...]] = {}
        self._types: dict[str, type[Message]] = {}
        # Per topic, the hub's message count at the last batch seen (a skip is a gap).
        self._last_seq: dict[str, int] = {}
        self.gaps = 0  # messages the hub dropped for this process (see HubOptions.stall_timeout)
        self.undecodable = 0  # messages received that this process could not decode
        # Filled by the I/O thread under the SUB side's lock (its order is the socket's).
        self._inbox: deque[list[zmq.Frame]] = deque()
        self._capacity = capacity
        self._waker = Waker()  # a batch in the inbox, something to read on the SUB socket, stop
        self._source: Subscriptions | None = None  # the SUB side, read when idle
        self._stopping = False
        # Set by close() called from a handler: this thread ends after that handler, and what
        # arrives meanwhile is dropped rather than held (held, it would stall the hub's fan-out
        # while close() waits for the hub to confirm a flush).
        self._abandoned = False
        self._thread = start_thread("ipcbus-dispatch", self._run, on_death, handlers=True)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def read_from(self, source: Subscriptions) -> None:
        """Read ``source``'s SUB socket whenever idle (from then on, any thread)."""
        source.wake_reader = self._waker.wake
        self._source = source
        source.idle()
        self._waker.wake()

    def expect_replies(self, take: Callable[[list[zmq.Frame]], bool]) -> Callable[[], None]:
        """What makes the dispatcher hand replies to ``take`` (``ReplyRoute.take``): called
        once its reply topic is subscribed. Until then no batch is a reply, and none is asked."""

        def expect() -> None:
            self.take_reply = take

        return expect

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
        if self._abandoned:
            return True
        if len(self._inbox) >= self._capacity:
            return False  # the I/O thread stops reading the SUB socket: backpressure
        self._inbox.append(frames)
        self._waker.wake()
        return True

    # -- the dispatcher thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._waker.close()
            if self._source is not None:
                self._source.orphan()

    def _serve(self) -> None:
        # Plain descriptors only (the waker, the SUB socket's ZMQ_FD): select.poll costs a third
        # of zmq.Poller's ~2.3 us a call, measured.
        poller = select.poll()
        waker = self._waker.fd
        poller.register(waker, select.POLLIN)
        polled = -1  # the SUB socket's descriptor in the poller, if any
        inbox = self._inbox
        while not self._abandoned:
            # The next batch: what the I/O thread read before, or what the SUB socket has.
            looked = False
            if inbox:
                frames: list[zmq.Frame] | None = inbox.popleft()
            elif self._source is None or self._stopping:
                frames = None  # stopping: what the I/O thread read is handled, nothing more
            else:
                looked = True
                frames = self._source.take(inbox)
            if frames is None:
                if self._stopping:
                    return
                source = self._source
                fd = -1 if source is None else source.fd
                if fd != polled:
                    if polled >= 0:
                        poller.unregister(polled)
                    if fd >= 0:
                        poller.register(fd, select.POLLIN)
                    polled = fd
                    looked = False
                # take() just looked (ZMQ_EVENTS, consuming the edge) and found nothing: a
                # batch that comes now signals the descriptor again, and the I/O thread wakes
                # us when it consumes an edge itself (Subscriptions._used). Looking a second
                # time cost a lock and a look per batch (~5 µs of a leg, measured).
                if not looked and source is not None and source.readable():
                    continue  # the edge was consumed before we looked: never sleep on it
                for ready, _event in poller.poll():
                    if ready == waker:
                        self._waker.clear()
                continue
            if self._abandoned:
                return
            try:
                self._dispatch(frames)
            except Exception:
                logger.exception("ipcbus could not dispatch a batch; it is dropped")

    def _dispatch(self, frames: list[Any]) -> None:
        take_reply = self.take_reply
        if take_reply is not None and take_reply(frames):
            return
        if wire.is_sync_topic(frames[0].bytes):
            self._synced(wire.SyncReply.parse(frames))
            return
        # wire.Fanout.parse without its record (~2 µs a batch): the publisher is not needed.
        head = frames[0].bytes
        try:
            topic_bytes, seq, _publisher, meta_bytes = wire.parse_fanout_head(head)
            topic = wire.unique_name_of(topic_bytes)
            subscriptions = self.subscriptions.get(topic)
            if not subscriptions:
                return
            meta = wire.unpack_meta(meta_bytes)
        except ValueError as exc:
            # A batch the hub sent malformed: dropped, and counted as one message (at least
            # one of its unknown number).
            self.undecodable += 1
            logger.error("dropped a batch whose head cannot be read: %s", exc)
            return
        count = meta[1]
        last = self._last_seq.get(topic)
        self._last_seq[topic] = seq
        if last is not None and seq - count > last:
            self._missed(topic, seq - count - last)
        messages = self._decode(topic, meta, frames[1:])
        reply_to = None
        if len(meta_bytes) != wire.META_LEN and self._reply_to is not None:  # a request
            route = wire.route_of(meta_bytes)
            if route is not None and route.kind == wire.ROUTE_REQUEST:
                reply_to = self._reply_to(route)
        source = self._source
        if source is not None:
            source.handling()  # a reply awaited meanwhile is the I/O thread's to read
        try:
            for message in messages:
                if self._abandoned:
                    return  # closed by a handler: no handler call after close() returned
                for subscription in subscriptions:
                    if subscription.accepts(message):
                        if reply_to is None:
                            call_handler(subscription, message)
                        else:
                            call_responder(subscription, message, reply_to)
        finally:
            if source is not None and not self._stopping:
                source.idle()

    def _decode(self, topic: str, meta: wire.Meta, payload: Any) -> list[Message]:
        codec_id, count, _published_at = meta
        undecodable: list[str] = []
        try:
            messages = codec.decode_batch(codec_id, payload, self._types.get(topic), undecodable)
        except BaseException as exc:
            # Unpickling runs code of the message's classes: even a SystemExit there is only
            # this batch's failure, never the end of this thread.
            self.undecodable += count
            logger.error(
                "dropped a batch of %d %s messages that this process cannot decode: %s: %s",
                count,
                topic,
                type(exc).__name__,
                exc,
            )
            return []
        if undecodable:
            self.undecodable += len(undecodable)
            logger.error(
                "dropped %d of %d %s messages: they hold instances of classes this process "
                "cannot import (%s)",
                len(undecodable),
                count,
                topic,
                "; ".join(sorted(set(undecodable))),
            )
        return messages

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

    def abandon(self) -> None:
        """Called from a handler on this thread (close() in a handler): end after it."""
        self._abandoned = True

    def stop(self, timeout: float) -> None:
        if not self._thread.is_alive():
            return
        if threading.current_thread() is self._thread:
            # Called from a handler: this thread ends once the handler returns. Never join
            # ourselves, never wait for room in our own inbox.
            self._abandoned = True
            return
        self._stopping = True  # it ends once nothing is left to read
        if self._source is not None:
            self._source.handling()  # requests still waiting: the I/O thread reads for them
        self._waker.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the dispatcher is stuck in a handler; not waiting for it")
