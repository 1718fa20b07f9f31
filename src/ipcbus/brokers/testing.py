"""TestBroker: a real broker for tests, deterministic and single-threaded."""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..core.codec import encode_batch
from ..core.contract import AsyncMessageContext, Broker, Subscription
from ..core.failures import check_sync_result
from ..core.handlers import call_handler, call_to_completion
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
from ..exceptions import MessageSerializationError, RequestTimeoutError
from ..message import Message, get_unique_name_for_message

__all__ = ["HandlerFailure", "TestBroker"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Retry:
    """A queue delivery to attempt again (TestBroker skips the backoff: it is deterministic)."""

    topic: str
    queue_name: str
    message: Message
    message_id: str
    published_at: float
    attempt: int
    reply_to: ReplyTo | None = None


@dataclass(frozen=True)
class _Rest:
    """What is left of a message's deliveries when a handler failed with ``fail_fast``: the
    broadcast subscriptions not called yet, then the queue groups, delivered by the next
    ``process_messages()``."""

    message: Message
    reply_to: ReplyTo | None
    broadcast: tuple[Subscription, ...]
    queue_names: tuple[str, ...]


@dataclass(frozen=True)
class _Requested:
    """A message sent by ``request()``: its responders answer through ``reply_to``."""

    message: Message
    reply_to: ReplyTo


class _CheckedReply(LocalReply):
    """A reply must be serialisable, as production needs it: one that is not answers with the
    ``MessageSerializationError`` (a ``RemoteError`` in the requester), as across processes."""

    __slots__ = ()

    def reply(self, message: Message) -> None:
        try:
            encode_batch(type(message), [message])
        except MessageSerializationError as exc:
            logger.error("the reply %r cannot be serialised: %s", message, exc)
            self.fail(Failure.of(exc))
            return
        super().reply(message)


@dataclass(frozen=True)
class HandlerFailure:
    """A handler call that raised, as ``TestBroker.failures`` records it."""

    message: Message
    handler: Any
    exception: BaseException
    queue_name: str | None  # None for a broadcast handler
    attempt: int


class TestBroker(Broker):
    """Records what is published; ``process_messages()`` delivers it.

    ``publish()`` checks that the message can be serialised, as production would, records it in
    ``published`` and queues it; nothing is delivered until :meth:`process_messages`, which runs
    broadcast and queue handlers (awaiting coroutines to completion, in this thread), and
    messages those handlers publish, until nothing is pending.

    Handlers fail loudly by default (``fail_fast=True``, as dramatiq's ``join(fail_fast=True)``):
    the first exception a handler raises propagates from ``process_messages()``, with a note that
    names the handler and the message, so a failing ``assert`` in a handler fails the test. With
    ``fail_fast=False`` handlers fail as they would in production (logged; queue handlers retried
    at once, then dead-lettered) and every failure is recorded in ``failures``: for tests that
    expect retries and dead letters. ``KeyboardInterrupt`` always propagates.

    ``request()`` is deterministic: it queues the request, runs ``process_messages()`` itself
    (so everything pending before it is delivered too), and returns the first reply, or raises
    ``RequestTimeoutError`` at once when no responder replied (whatever ``timeout``: once
    ``process_messages()`` returns, no reply can come). With ``fail_fast`` a responder's
    exception propagates from ``request()`` itself, as from ``process_messages()``; with
    ``fail_fast=False`` it answers as ``RemoteError`` (after the last attempt, for a queue
    responder), as in production.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, *, fail_fast: bool = True, max_deliveries: int = 1_000_000) -> None:
        super().__init__()
        self.published: list[Message] = []
        self.failures: list[HandlerFailure] = []
        self.fail_fast = fail_fast
        self._pending: deque[Message | _Retry | _Requested | _Rest] = deque()
        self._routes = RouteTable()
        self._ids = itertools.count(1)
        self._max_deliveries = max_deliveries

    def _for_child(self) -> TestBroker:
        return type(self)(fail_fast=self.fail_fast, max_deliveries=self._max_deliveries)

    def _publish(self, message: Message) -> None:
        # MessageSerializationError here, exactly where and when the hub proxy would raise it.
        encode_batch(type(message), [message])
        self.published.append(message)
        self._pending.append(message)

    def _request(self, message: Message, timeout: float | None) -> Message:
        encode_batch(type(message), [message])  # as publish(): MessageSerializationError here
        pending = self._requests.open()
        self.published.append(message)
        self._pending.append(_Requested(message, _CheckedReply(self._requests, pending.request_id)))
        try:
            self.process_messages()
        except BaseException:
            self._requests.forget(pending.request_id)
            raise
        got, outcome = self._requests.wait(pending, 0)
        if not got:
            raise RequestTimeoutError(
                f"no reply to the {get_unique_name_for_message(message)} request: "
                "process_messages() ran every responder and none replied"
            )
        return result_of(message, got, outcome, timeout)

    def _subscribe(self, subscription: Subscription) -> None:
        self._routes.add(subscription)
        if subscription.queue_name is not None:
            # What the group held while it had no member: delivered by process_messages().
            self._pending.extend(
                self._routes.take_held(subscription.topic, subscription.queue_name)
            )

    def _cancel(self, subscription: Subscription) -> None:
        self._routes.remove(subscription)

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        self._routes.declare(get_unique_name_for_message(message_type), queue_name)

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        dropped = self._routes.delete_group(get_unique_name_for_message(message_type), queue_name)
        if dropped is None:
            raise self._refuse_deletion(message_type, queue_name)
        return dropped

    @property
    def pending(self) -> int:
        """How many publishes and retries wait for ``process_messages()`` (what a failure left
        of a message's deliveries counts as one)."""
        return len(self._pending)

    def process_messages(self) -> int:
        """Deliver everything pending, including what handlers publish meanwhile.

        Returns the number of handler calls made, retries included (a predicate that rejects is
        no call). With ``fail_fast`` a handler's exception propagates (what was not delivered yet
        stays pending, the failing message's later handlers and queue groups first). Raises
        ``RuntimeError`` past ``max_deliveries`` calls, which only a handler that publishes
        forever reaches.
        """
        self._check_open()
        calls = 0
        while self._pending:
            if calls >= self._max_deliveries:
                raise RuntimeError(
                    f"process_messages() made {calls} handler calls and messages are still "
                    "pending: do handlers publish in a cycle?"
                )
            item = self._pending.popleft()
            if isinstance(item, _Retry):
                calls += self._attempt(item)
                continue
            if not isinstance(item, _Rest):
                item = self._deliveries(item)
            calls += self._deliver(item)
        return calls

    def _deliveries(self, item: Message | _Requested) -> _Rest:
        """Every delivery of a message: its broadcast subscriptions, then its queue groups."""
        reply_to: ReplyTo | None = None
        if isinstance(item, _Requested):
            reply_to = item.reply_to
            item = item.message
        topic = get_unique_name_for_message(item)
        broadcast = tuple(self._routes.broadcast(topic))
        return _Rest(item, reply_to, broadcast, tuple(self._routes.queue_names(topic)))

    def _deliver(self, rest: _Rest) -> int:
        """Make ``rest``'s deliveries in order; when one raises (``fail_fast``), what is left of
        them goes back to the front of the pending messages before the exception propagates."""
        message, reply_to = rest.message, rest.reply_to
        calls = 0
        for index, subscription in enumerate(rest.broadcast):
            if subscription.active and subscription.accepts(message):
                calls += 1
                try:
                    self._call(subscription, message, reply_to)
                except BaseException:
                    self._keep(
                        _Rest(message, reply_to, rest.broadcast[index + 1 :], rest.queue_names)
                    )
                    raise
        topic = get_unique_name_for_message(message)
        published_at = time.time()
        for index, queue_name in enumerate(rest.queue_names):
            message_id = f"test-{next(self._ids)}"
            try:
                calls += self._attempt(
                    _Retry(topic, queue_name, message, message_id, published_at, 1, reply_to)
                )
            except BaseException:
                self._keep(_Rest(message, reply_to, (), rest.queue_names[index + 1 :]))
                raise
        return calls

    def _keep(self, rest: _Rest) -> None:
        """``rest`` back to the front of what is pending, unless nothing is left of it."""
        if rest.broadcast or rest.queue_names:
            self._pending.appendleft(rest)

    def _call(self, subscription: Subscription, message: Message, reply_to: ReplyTo | None) -> None:
        if not self.fail_fast:
            # Logs what it raises, as production does (a responder's failure answers).
            if reply_to is None:
                call_handler(subscription, message)
            else:
                call_responder(subscription, message, reply_to)
            return
        try:
            result = subscription.handler(message)
            check_sync_result(subscription.handler, result)
        except BaseException as exc:
            self._fail(exc, subscription.handler, message, None, 1)
            raise
        if reply_to is not None:
            answer(reply_to, result)

    def _fail(
        self, exc: BaseException, handler: Any, message: Message, queue: str | None, attempt: int
    ) -> None:
        self.failures.append(HandlerFailure(message, handler, exc, queue, attempt))
        if self.fail_fast:
            where = "broadcast" if queue is None else f"queue {queue!r}, attempt {attempt}"
            exc.add_note(
                f"raised by handler {handler!r} ({where}) on {message!r} in "
                "TestBroker.process_messages(); use TestBroker(fail_fast=False) to have it "
                "retried and dead-lettered instead"
            )

    def _attempt(self, delivery: _Retry) -> int:
        member = self._routes.pick(delivery.topic, delivery.queue_name, delivery.message)
        if member is None:
            if not self._routes.has_members(delivery.topic, delivery.queue_name):
                # A declared group without members holds it until one subscribes.
                self._routes.hold(delivery.topic, delivery.queue_name, delivery, 2**62)
                return 0
            logger.debug("no member of %r accepted %r", delivery.queue_name, delivery.message)
            return 0
        context = AsyncMessageContext(
            delivery.queue_name, delivery.message_id, delivery.attempt, delivery.published_at
        )
        try:
            result = call_to_completion(member, delivery.message, context)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._fail(exc, member.handler, delivery.message, delivery.queue_name, delivery.attempt)
            if self.fail_fast:
                raise
            verdict = after_failure(
                member.policy,
                delivery.queue_name,
                member.handler,
                delivery.message,
                delivery.attempt,
                exc,
            )
            if verdict.retry:  # at once: TestBroker skips the delay, it is deterministic
                self._pending.append(
                    _Retry(
                        delivery.topic,
                        delivery.queue_name,
                        delivery.message,
                        delivery.message_id,
                        delivery.published_at,
                        delivery.attempt + 1,
                        delivery.reply_to,
                    )
                )
            else:
                publish_dead_letter(
                    self.publish, delivery.queue_name, delivery.message, delivery.attempt, exc
                )
                if delivery.reply_to is not None:
                    delivery.reply_to.fail(Failure.of(exc))
        else:
            if delivery.reply_to is not None:
                answer(delivery.reply_to, result)
        return 1
