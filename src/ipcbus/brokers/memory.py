"""In-process brokers: MemoryBroker (real delivery) and NullBroker (delivers nothing)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from contextvars import ContextVar

from ..core.contract import AsyncMessageContext, Broker, Subscription
from ..core.failures import is_handler_failure
from ..core.handlers import call_handler, is_cancellation, run_queue_handler
from ..core.requests import (
    Failure,
    LocalReply,
    ReplyTo,
    answer,
    call_responder,
    result_of,
)
from ..core.retry import after_failure, publish_dead_letter
from ..core.routing import RouteTable
from ..exceptions import PublishTimeoutError, RequestTimeoutError
from ..message import Message, get_unique_name_for_message
from .memory_deliveries import Deliveries, Job

__all__ = ["MemoryBroker", "NullBroker"]

logger = logging.getLogger(__name__)

# The broker whose queue delivery this context runs (a coroutine handler's task, a plain
# handler's thread): close() there must not wait for that very delivery.
_delivering: ContextVar[MemoryBroker | None] = ContextVar("ipcbus_memory_delivering", default=None)


class MemoryBroker(Broker):
    """Delivers within this process.

    ``subscribe`` handlers are called synchronously inside ``publish()``, in subscription order.
    ``subscribe_async`` handlers run on an event loop: the running loop of the publishing thread if
    there is one, else a loop this broker owns on a thread of its own. ``flush(timeout)`` waits for
    the deliveries on both (retries included), but those on the caller's own running loop;
    ``close()`` waits for them at most ``linger`` seconds, then cancels what is left (from one of
    its handlers it returns at once, and lingers on a thread). A delivery whose publisher's loop
    ends first is handed over to the owned loop, or, once the broker is closed, counted in
    ``undelivered`` and logged. A queue group without members (declared, or
    whose members left) holds what is published, up to ``max_held`` messages (then ``publish()``
    raises ``PublishTimeoutError``), and hands it out when a member subscribes.

    ``request()`` delivers like ``publish()``: broadcast responders answer before the delivery
    returns, queue responders on their loop. When the only responders would run on the caller's
    own running event loop, which ``request()`` would block, it raises ``RequestTimeoutError``
    at once instead of waiting out ``timeout``.
    """

    def __init__(self, *, linger: float = 5.0, max_held: int = 100_000) -> None:
        super().__init__()
        self._linger = linger
        self._max_held = max_held
        self._routes = RouteTable()
        self._ids = itertools.count(1)
        self._deliveries = Deliveries(self._deliver)

    def _for_child(self) -> MemoryBroker:
        return type(self)(linger=self._linger, max_held=self._max_held)

    # -- broker hooks ------------------------------------------------------------------------

    def _publish(self, message: Message) -> None:
        self._route(message, None)

    def _request(self, message: Message, timeout: float | None) -> Message:
        pending = self._requests.open()
        try:
            elsewhere = self._route(message, LocalReply(self._requests, pending.request_id))
        except BaseException:
            self._requests.forget(pending.request_id)
            raise
        if not elsewhere and not pending.done.is_set():
            # Every responder left runs on this thread's event loop: waiting would block it.
            self._requests.forget(pending.request_id)
            raise RequestTimeoutError(
                f"no reply to the {get_unique_name_for_message(message)} request: its broadcast "
                "responders ran without answering, and no queue responder can answer (there is "
                "none, or it runs on the event loop of this very thread, which request() would "
                "block: call request() through asyncio.to_thread)"
            )
        got, outcome = self._requests.wait(pending, timeout)
        return result_of(message, got, outcome, timeout)

    def _route(self, message: Message, reply_to: ReplyTo | None) -> bool:
        """Deliver ``message``; False when every queue delivery it made was scheduled on the
        caller's running loop (which a waiting requester would block)."""
        topic = get_unique_name_for_message(message)
        for subscription in self._routes.broadcast(topic):
            if subscription.accepts(message):
                if reply_to is None:
                    call_handler(subscription, message)
                else:
                    call_responder(subscription, message, reply_to)
        queue_names = self._routes.queue_names(topic)
        if not queue_names:
            return False
        published_at = time.time()
        elsewhere = False
        for queue_name in queue_names:
            message_id = f"{os.getpid()}-{next(self._ids)}"
            member = self._routes.pick(topic, queue_name, message)
            if member is not None:
                elsewhere |= not self._schedule(member, message, message_id, published_at, reply_to)
            elif not self._routes.has_members(topic, queue_name):
                # A declared group without members holds it until one comes.
                elsewhere = True
                item = (message, message_id, published_at, reply_to)
                if not self._routes.hold(topic, queue_name, item, self._max_held):
                    raise PublishTimeoutError(
                        f"queue group {queue_name!r} of {topic} holds max_held={self._max_held} "
                        "messages and has no member"
                    )
            else:
                logger.debug("no member of queue %r accepted %r: dropped", queue_name, message)
        return elsewhere

    def _subscribe(self, subscription: Subscription) -> None:
        self._routes.add(subscription)
        if subscription.queue_name is not None:
            self._hand_out_held(subscription.topic, subscription.queue_name)

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        self._routes.declare(get_unique_name_for_message(message_type), queue_name)

    def _hand_out_held(self, topic: str, queue_name: str) -> None:
        for message, message_id, published_at, reply_to in self._routes.take_held(
            topic, queue_name
        ):
            member = self._routes.pick(topic, queue_name, message)
            if member is None:
                logger.debug("no member of queue %r accepted %r: dropped", queue_name, message)
                continue
            self._schedule(member, message, message_id, published_at, reply_to)

    def _cancel(self, subscription: Subscription) -> None:
        self._routes.remove(subscription)

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        dropped = self._routes.delete_group(get_unique_name_for_message(message_type), queue_name)
        if dropped is None:
            raise self._refuse_deletion(message_type, queue_name)
        if dropped:
            logger.warning("queue group %r deleted: %d held messages dropped", queue_name, dropped)
        return dropped

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queue delivery has finished (retries included): on the owned loop
        and on the publishers' loops, except the caller's own running loop."""
        if not self._deliveries.wait_idle(timeout):
            raise PublishTimeoutError(
                f"{self._deliveries.in_flight} queue deliveries still running after {timeout} s"
            )

    @property
    def undelivered(self) -> int:
        """Queue deliveries lost because their event loop (a publisher's) ended them after this
        broker closed, when they could no longer be handed over to its own loop."""
        return self._deliveries.undelivered

    def _close(self) -> None:
        if _delivering.get() is self:
            # From one of our handlers: waiting here would wait for the very delivery that
            # called (and, on the owned loop, block it). The linger runs on a thread instead.
            threading.Thread(
                target=self._finish_closing, name="ipcbus-memory-close", daemon=True
            ).start()
            return
        self._finish_closing()

    def _finish_closing(self) -> None:
        if not self._deliveries.wait_idle(self._linger):
            logger.warning(
                "closing MemoryBroker with %d deliveries still running", self._deliveries.in_flight
            )
        self._deliveries.stop(self._linger)
        self._routes.clear()

    # -- queue deliveries --------------------------------------------------------------------

    def _schedule(
        self,
        member: Subscription,
        message: Message,
        message_id: str,
        published_at: float,
        reply_to: ReplyTo | None,
    ) -> bool:
        """Start a delivery; True when it runs on the caller's own running loop."""
        return self._deliveries.schedule(Job(member, message, message_id, published_at, reply_to))

    async def _deliver(self, job: Job) -> None:
        _delivering.set(self)  # this task's context, copied to a plain handler's thread
        queue_name = job.member.queue_name
        assert queue_name is not None
        message, reply_to = job.message, job.reply_to
        current: Subscription | None = job.member
        while current is not None:
            job.member = current
            context = AsyncMessageContext(queue_name, job.message_id, job.attempt, job.published_at)
            token = AsyncMessageContext._current.set(context)
            try:
                result = await run_queue_handler(current, message)
            except BaseException as exc:
                # A BaseException is a failure like any other: let through, SystemExit or
                # KeyboardInterrupt would stop the loop (asyncio re-raises them from run_forever)
                # and every delivery with it. Only our own cancellation (close) ends the task.
                # A run handed over to another loop ends here (closed when its task is
                # collected, in another context: the token cannot be reset).
                if job.abandoned or is_cancellation(exc) or not is_handler_failure(exc):
                    raise
                error = exc
            else:
                if reply_to is not None:
                    answer(reply_to, result)
                return
            finally:
                if not job.abandoned:
                    AsyncMessageContext._current.reset(token)
            verdict = after_failure(
                current.policy, queue_name, current.handler, message, job.attempt, error
            )
            if not verdict.retry:
                publish_dead_letter(self.publish, queue_name, message, job.attempt, error)
                if reply_to is not None:
                    reply_to.fail(Failure.of(error))
                return
            job.attempt += 1
            await asyncio.sleep(verdict.delay)
            current = self._routes.pick(current.topic, queue_name, message)
        logger.warning("queue %r has no member left for %r: dropped", queue_name, message)


class NullBroker(Broker):
    """Accepts everything (argument checks included) and delivers nothing; ``request()`` raises
    ``RequestTimeoutError`` at once (no reply can come)."""

    def _request(self, message: Message, timeout: float | None) -> Message:
        raise RequestTimeoutError(
            f"NullBroker delivers nothing: no reply to {get_unique_name_for_message(message)}"
        )

    def _publish(self, message: Message) -> None:
        pass

    def _subscribe(self, subscription: Subscription) -> None:
        pass

    def _cancel(self, subscription: Subscription) -> None:
        pass
