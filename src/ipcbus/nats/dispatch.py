"""Broadcast delivery in a NatsBroker's process: one dispatcher thread calls the handlers.

nats-py gives each subscription a pending queue and, with a callback, a task of its own; tasks of
different subjects then run in any order, and a process would see two types in another order
than they were published. So the broadcast subscriptions of a broker have no callback: their
pending queue is an :class:`Inbox` that hands each message, as the client reads it, to one
dispatcher queue in arrival order. The server keeps a publisher's order on one connection, so
handlers see messages in publish order across types, as with the hub.

The dispatcher queue is bounded by ``pending_msgs_limit`` messages and ``pending_bytes_limit``
bytes (the limits nats-py applies per subscription, here for all of them): past either, the
client drops the message as a slow consumer. Nothing is dropped silently: each drop is counted
(``NatsStatistics.dropped``) and the first of each burst logged at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from ..client.threads import OnDeath, start_thread
from ..core.failures import check_sync_result, is_handler_failure
from ..core.routing import RouteTable
from ..message import Message
from .envelope import Envelope, Signer, open_envelope
from .statistics import Counters

__all__ = ["Dispatcher", "Inbox", "call_returning"]

logger = logging.getLogger(__name__)

# Called with the envelope of a request and what its handler returned or raised.
Answer = Callable[[Envelope, Any, BaseException | None], None]


def call_returning(subscription: Any, message: Message) -> tuple[Any, BaseException | None]:
    """Call a broadcast handler: ``(result, None)``, or ``(None, exc)`` with ``exc`` logged
    (the rule of :func:`ipcbus.core.handlers.call_handler`, keeping what it returned)."""
    try:
        result = subscription.handler(message)
        check_sync_result(subscription.handler, result)
        return result, None
    except Exception as exc:
        logger.exception("handler %r raised on %r", subscription.handler, message)
        return None, exc
    except BaseException as exc:
        if not is_handler_failure(exc):
            raise
        logger.error("handler %r raised on %r", subscription.handler, message, exc_info=exc)
        return None, exc


class Inbox(asyncio.Queue[Msg]):
    """The pending queue of one broadcast subscription: forwards to the dispatcher. Holds
    nothing itself, so nats-py's own checks of it (``empty()``, ``join()``) pass through."""

    def __init__(self, topic: str, dispatcher: Dispatcher, subscription: Any) -> None:
        super().__init__()
        self._topic = topic
        self._dispatcher = dispatcher
        self._subscription = subscription

    def put_nowait(self, item: Msg) -> None:
        # nats-py adds every payload to the subscription's pending size and subtracts it only
        # when its own consumer takes it: ours never does, so it is reset (its limit is off).
        self._subscription._pending_size = 0
        if not self._dispatcher.offer(self._topic, item):
            raise asyncio.QueueFull


class Dispatcher:
    """The ``ipcbus-nats-dispatch`` thread: check, decode, filter, call, answer; in order."""

    def __init__(
        self,
        signer: Signer,
        routes: RouteTable,
        counters: Counters,
        *,
        max_msgs: int,
        max_bytes: int,
        answer: Answer,
        on_death: OnDeath,
    ) -> None:
        self._signer = signer
        self._routes = routes
        self._counters = counters
        self._max_msgs = max_msgs
        self._max_bytes = max_bytes
        self._answer = answer
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._msgs = 0
        self._bytes = 0
        self._dropping = False
        self._abandoned = False
        self.thread = start_thread("ipcbus-nats-dispatch", self._run, on_death, handlers=True)

    def offer(self, topic: str, msg: Msg) -> bool:
        """Queue ``msg`` (the client's loop thread); False (counted, logged) when full."""
        size = len(msg.data)
        with self._lock:
            if self._msgs >= self._max_msgs or self._bytes + size > self._max_bytes:
                first = not self._dropping
                self._dropping = True
                held = (self._msgs, self._bytes)
            else:
                self._msgs += 1
                self._bytes += size
                self._dropping = False
                first = None
        if first is None:
            self._queue.put((topic, msg))
            return True
        count = self._counters.add("dropped")
        if first:
            logger.error(
                "broadcast handlers of this process fell behind (%d messages, %d bytes "
                "waiting): dropping messages of %s as a slow consumer (%d dropped so far; see "
                "NatsStatistics.dropped)",
                held[0],
                held[1],
                topic,
                count,
            )
        return False

    def barrier(self, timeout: float | None) -> bool:
        """Wait until everything queued before this call was handled."""
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def abandon(self) -> None:
        """``close()`` in a handler: no handler runs after this one."""
        self._abandoned = True

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            if callable(item):
                item()
                continue
            topic, msg = item
            with self._lock:
                self._msgs -= 1
                self._bytes -= len(msg.data)
            if not self._abandoned:
                self._deliver(topic, msg)

    def _deliver(self, topic: str, msg: Msg) -> None:
        envelope = open_envelope(self._signer, msg.subject, msg.data)
        if envelope is None:
            count, log = self._counters.add_logged("rejected")
            if log:
                logger.error(
                    "dropped a message on %s without a valid signature (forged, altered, or "
                    "from another bus secret): not unpickled (%d rejected so far)",
                    msg.subject,
                    count,
                )
            return
        subscriptions = self._routes.broadcast(topic)
        if not subscriptions:
            return
        try:
            message = envelope.decode(subscriptions[0].message_type)
        except Exception as exc:
            count, log = self._counters.add_logged("undecodable")
            if log:
                logger.error(
                    "dropped a message of %s this process cannot decode (%s: %s; %d so far)",
                    topic,
                    type(exc).__name__,
                    exc,
                    count,
                )
            return
        for subscription in subscriptions:
            if self._abandoned:
                return
            if subscription.accepts(message):
                result, failure = call_returning(subscription, message)
                if envelope.reply:
                    self._answer(envelope, result, failure)
