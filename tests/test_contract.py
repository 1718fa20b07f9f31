"""The broker contract (docs/guarantees.md), run against every broker through the ``harness``
fixture.

A behaviour that is not stated here is not guaranteed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    DeadLetter,
    Message,
    MessageSerializationError,
    RemoteError,
    RequestTimeoutError,
    Subscription,
)

from .conftest import Harness, wait_until
from .messages import (
    UNSENDABLE,
    BadStr,
    OrderPlaced,
    OrderShipped,
    Ping,
    Pong,
    PriorityOrderPlaced,
    Tick,
    Unpicklable,
    unsendable_fields,
)

# The hub kinds start a hub and, for "hub-split", a publisher process per test.
pytestmark = pytest.mark.usefixtures("no_leftovers")

# -- broadcast --------------------------------------------------------------------------------


def test_each_subscription_receives_each_message_once(harness: Harness) -> None:
    first: list[Message] = []
    second: list[Message] = []
    harness.broker.subscribe(OrderPlaced, first.append)
    harness.broker.subscribe(OrderPlaced, second.append)
    for order_id in range(5):
        harness.broker.publish(OrderPlaced(order_id))
    harness.settle()
    expected = [OrderPlaced(i) for i in range(5)]
    assert first == expected
    assert second == expected


def test_handlers_are_called_in_subscription_order(harness: Harness) -> None:
    calls: list[str] = []
    for name in ("a", "b", "c"):
        harness.broker.subscribe(OrderPlaced, lambda m, name=name: calls.append(name))
    harness.broker.publish(OrderPlaced(1))
    harness.settle()
    assert calls == ["a", "b", "c"]


def test_routing_is_by_exact_type(harness: Harness) -> None:
    base: list[Message] = []
    derived: list[Message] = []
    shipped: list[Message] = []
    harness.broker.subscribe(OrderPlaced, base.append)
    harness.broker.subscribe(PriorityOrderPlaced, derived.append)
    harness.broker.subscribe(OrderShipped, shipped.append)
    harness.broker.publish(PriorityOrderPlaced(1))
    harness.broker.publish(OrderPlaced(2))
    harness.settle()
    assert base == [OrderPlaced(2)]
    assert derived == [PriorityOrderPlaced(1)]
    assert shipped == []


def test_publish_order_is_kept_across_types(harness: Harness) -> None:
    seen: list[tuple[str, int]] = []
    harness.broker.subscribe(OrderPlaced, lambda m: seen.append(("placed", m.order_id)))
    harness.broker.subscribe(OrderShipped, lambda m: seen.append(("shipped", m.order_id)))
    expected = []
    for order_id in range(50):
        harness.broker.publish(OrderPlaced(order_id))
        harness.broker.publish(OrderShipped(order_id))
        expected += [("placed", order_id), ("shipped", order_id)]
    harness.settle()
    assert seen == expected


def test_predicate_filters_in_the_subscriber(harness: Harness) -> None:
    big: list[int] = []
    harness.broker.subscribe(OrderPlaced, lambda m: big.append(m.order_id), lambda m: m.amount > 10)
    for order_id, amount in enumerate([5, 50, 10, 11]):
        harness.broker.publish(OrderPlaced(order_id, amount))
    harness.settle()
    assert big == [1, 3]


def test_a_predicate_that_raises_rejects_and_is_logged(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    rejected: list[Message] = []
    others: list[Message] = []

    def broken(message: OrderPlaced) -> bool:
        raise ValueError("predicate bug")

    harness.broker.subscribe(OrderPlaced, rejected.append, broken)
    harness.broker.subscribe(OrderPlaced, others.append)
    harness.broker.publish(OrderPlaced(1))
    harness.settle()
    assert rejected == []
    assert others == [OrderPlaced(1)]
    assert any(
        "predicate bug" in record.getMessage() or record.exc_info
        for record in errors_logged.records
    )


def test_a_handler_that_raises_is_logged_and_isolated(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    after: list[int] = []

    def explode(message: OrderPlaced) -> None:
        raise RuntimeError(f"boom {message.order_id}")

    harness.broker.subscribe(OrderPlaced, explode)
    harness.broker.subscribe(OrderPlaced, lambda m: after.append(m.order_id))
    harness.broker.publish(OrderPlaced(1))
    harness.broker.publish(OrderPlaced(2))
    harness.settle()
    assert after == [1, 2]
    tracebacks = [r for r in errors_logged.records if r.exc_info is not None]
    assert len(tracebacks) == 2
    assert "boom 2" in str(tracebacks[1].exc_info[1])  # type: ignore[index]


def test_cancel_stops_delivery_and_is_idempotent(harness: Harness) -> None:
    received: list[Message] = []
    subscription = harness.broker.subscribe(OrderPlaced, received.append)
    assert isinstance(subscription, Subscription)
    harness.broker.publish(OrderPlaced(1))
    harness.settle()
    subscription.cancel()
    subscription.cancel()
    harness.broker.publish(OrderPlaced(2))
    harness.settle()
    assert received == [OrderPlaced(1)]
    assert not subscription.active


def test_messages_published_by_handlers_are_delivered(harness: Harness) -> None:
    shipped: list[Message] = []
    harness.broker.subscribe(
        OrderPlaced, lambda m: harness.broker.publish(OrderShipped(m.order_id))
    )
    harness.broker.subscribe(OrderShipped, shipped.append)
    harness.broker.publish(OrderPlaced(7))
    harness.settle()
    harness.settle()  # a cross-process broker delivers the second hop after the first
    assert shipped == [OrderShipped(7)]


def test_lambdas_and_local_classes_travel(harness: Harness) -> None:
    @dataclass(frozen=True)
    class Local(Message):
        value: int

    @dataclass(frozen=True)
    class WithCallable(Message):
        transform: object

    values: list[int] = []
    harness.broker.subscribe(Local, lambda m: values.append(m.value))
    harness.broker.subscribe(WithCallable, lambda m: values.append(m.transform(20)))  # type: ignore[attr-defined]
    harness.broker.publish(Local(1))
    offset = 3
    harness.broker.publish(WithCallable(lambda x: x + offset))
    harness.settle()
    assert values == [1, 23]


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_message", [{"order_id": 1}, "OrderPlaced", None, OrderPlaced])
def test_publishing_a_non_message_is_a_type_error(harness: Harness, not_a_message: object) -> None:
    with pytest.raises(TypeError, match="Message"):
        harness.broker.publish(not_a_message)  # type: ignore[arg-type]


def test_an_unserialisable_message_is_rejected_in_the_caller(harness: Harness) -> None:
    received: list[Message] = []
    harness.broker.subscribe(Unpicklable, received.append)
    message = Unpicklable()
    if not harness.serialises:
        # MemoryBroker never serialises (docs/guarantees.md): the object itself is handed on.
        harness.broker.publish(message)
        harness.settle()
        assert received == [message]
        assert received[0] is message
        return
    with pytest.raises(MessageSerializationError, match="Unpicklable"):
        harness.broker.publish(message)
    harness.settle()
    assert received == []


@pytest.mark.parametrize("bad_type", [dict, OrderPlaced(1), "OrderPlaced", Message.__init__])
def test_subscribing_to_a_non_message_type_is_a_type_error(
    harness: Harness, bad_type: object
) -> None:
    with pytest.raises(TypeError, match="Message subclass"):
        harness.broker.subscribe(bad_type, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Message subclass"):
        harness.broker.subscribe_async(bad_type, print, "q")  # type: ignore[arg-type]


def test_non_callable_handlers_and_predicates_are_type_errors(harness: Harness) -> None:
    with pytest.raises(TypeError, match="handler"):
        harness.broker.subscribe(OrderPlaced, "print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="predicate"):
        harness.broker.subscribe(OrderPlaced, print, predicate=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handler"):
        harness.broker.subscribe_async(OrderPlaced, None, "q")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="queue_name"):
        harness.broker.subscribe_async(OrderPlaced, print, "")


def test_a_coroutine_handler_for_broadcast_is_a_type_error(harness: Harness) -> None:
    async def handler(message: OrderPlaced) -> None:
        pass

    with pytest.raises(TypeError, match="subscribe_async"):
        harness.broker.subscribe(OrderPlaced, handler)


def test_an_object_with_a_coroutine_call_for_broadcast_is_a_type_error(harness: Harness) -> None:
    class Handler:
        async def __call__(self, message: OrderPlaced) -> None:
            pass

    with pytest.raises(TypeError, match="subscribe_async"):
        harness.broker.subscribe(OrderPlaced, Handler())


def _returning_coroutines(returned: list[Any]) -> Callable[[OrderPlaced], Any]:
    """A coroutine function behind a plain decorator: subscribe() cannot tell in advance."""

    async def on_order(message: OrderPlaced) -> None:
        pass

    def wrapper(message: OrderPlaced) -> Any:
        coroutine = on_order(message)
        returned.append(coroutine)
        return coroutine

    return wrapper


def test_a_broadcast_handler_returning_a_coroutine_fails_that_call(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    returned: list[Any] = []
    after: list[int] = []
    harness.broker.subscribe(OrderPlaced, _returning_coroutines(returned))
    harness.broker.subscribe(OrderPlaced, lambda m: after.append(m.order_id))
    harness.broker.publish(OrderPlaced(1))
    harness.settle()
    assert after == [1]
    assert len(returned) == 1
    # Closed, not left to warn "never awaited"; the failure logged, saying what to use.
    assert inspect.getcoroutinestate(returned[0]) == inspect.CORO_CLOSED
    failures = [r.exc_info[1] for r in errors_logged.records if r.exc_info is not None]
    assert len(failures) == 1
    assert isinstance(failures[0], TypeError)
    assert "subscribe_async" in str(failures[0])


def test_a_responder_returning_a_coroutine_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    returned: list[Any] = []
    harness.broker.subscribe(Ping, _returning_coroutines(returned))
    with pytest.raises(RemoteError) as raised:
        harness.broker.request(Ping("async"), timeout=20)
    assert raised.value.remote_type == "TypeError"
    assert "subscribe_async" in raised.value.remote_message
    assert inspect.getcoroutinestate(returned[0]) == inspect.CORO_CLOSED


def test_a_closed_broker_refuses_use_and_close_is_idempotent(harness: Harness) -> None:
    received: list[Message] = []
    harness.broker.subscribe(OrderPlaced, received.append)
    harness.broker.close()
    harness.broker.close()
    assert harness.broker.closed
    with pytest.raises(BrokerClosedError):
        harness.broker.publish(OrderPlaced(1))
    with pytest.raises(BrokerClosedError):
        harness.broker.subscribe(OrderPlaced, received.append)
    with pytest.raises(BrokerClosedError):
        harness.broker.subscribe_async(OrderPlaced, received.append, "q")
    assert received == []


def test_a_broker_is_a_context_manager_that_closes(harness: Harness) -> None:
    with harness.broker as entered:
        assert entered is harness.broker
    assert harness.broker.closed


# -- queue groups -----------------------------------------------------------------------------


@pytest.mark.queue_groups
def test_a_queue_group_delivers_each_message_to_one_member(harness: Harness) -> None:
    calls: Counter[str] = Counter()
    seen: list[int] = []

    def member(name: str):  # type: ignore[no-untyped-def]
        def handle(message: Tick) -> None:
            calls[name] += 1
            seen.append(message.seq)

        return handle

    for name in ("a", "b", "c"):
        harness.broker.subscribe_async(Tick, member(name), "workers")
    for seq in range(30):
        harness.broker.publish(Tick(seq))
    harness.settle()
    assert sorted(seen) == list(range(30))
    assert set(calls) == {"a", "b", "c"}, f"round-robin should reach every member: {calls}"


@pytest.mark.queue_groups
def test_each_queue_group_gets_its_own_copy(harness: Harness) -> None:
    billing: list[int] = []
    audit: list[int] = []
    broadcast: list[int] = []
    harness.broker.subscribe_async(Tick, lambda m: billing.append(m.seq), "billing")
    harness.broker.subscribe_async(Tick, lambda m: billing.append(m.seq), "billing")
    harness.broker.subscribe_async(Tick, lambda m: audit.append(m.seq), "audit")
    harness.broker.subscribe(Tick, lambda m: broadcast.append(m.seq))
    for seq in range(10):
        harness.broker.publish(Tick(seq))
    harness.settle()
    assert sorted(billing) == list(range(10))
    assert sorted(audit) == list(range(10))
    assert broadcast == list(range(10))


@pytest.mark.queue_groups
def test_coroutine_and_plain_queue_handlers_see_their_context(harness: Harness) -> None:
    contexts: list[tuple[str, AsyncMessageContext]] = []

    async def coroutine_handler(message: Tick) -> None:
        await asyncio.sleep(0)
        contexts.append(("coroutine", AsyncMessageContext.current()))

    def plain_handler(message: Tick) -> None:
        contexts.append(("plain", AsyncMessageContext.current()))

    before = time.time()
    harness.broker.subscribe_async(Tick, coroutine_handler, "co")
    harness.broker.subscribe_async(Tick, plain_handler, "plain")
    harness.broker.publish(Tick(1))
    harness.broker.publish(Tick(2))
    harness.settle()
    assert sorted(kind for kind, _ in contexts) == ["coroutine"] * 2 + ["plain"] * 2
    for kind, context in contexts:
        assert context.queue_name == ("co" if kind == "coroutine" else "plain")
        assert context.attempt == 1
        assert before - 1 <= context.published_at <= time.time() + 1
    message_ids = [context.message_id for _, context in contexts]
    assert len(set(message_ids)) == 4, "each delivery of each group has its own id"


def test_async_context_is_unavailable_outside_queue_handlers(harness: Harness) -> None:
    outcome: list[str] = []

    def broadcast_handler(message: Tick) -> None:
        try:
            AsyncMessageContext.current()
        except LookupError:
            outcome.append("lookup error")

    harness.broker.subscribe(Tick, broadcast_handler)
    harness.broker.publish(Tick(1))
    harness.settle()
    assert outcome == ["lookup error"]
    with pytest.raises(LookupError):
        AsyncMessageContext.current()


@pytest.mark.queue_groups
def test_a_failing_queue_handler_is_retried_then_dead_lettered(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []
    dead: list[DeadLetter] = []

    def poison(message: Tick) -> None:
        attempts.append(AsyncMessageContext.current().attempt)
        raise ValueError(f"cannot handle {message.seq}")

    harness.broker.subscribe_async(Tick, poison, "work", max_attempts=3, retry_backoff=0.01)
    harness.broker.subscribe(DeadLetter, dead.append)
    harness.broker.publish(Tick(9))
    harness.settle()
    harness.settle()
    assert attempts == [1, 2, 3]
    assert dead == [DeadLetter("work", Tick(9), 3, "ValueError: cannot handle 9")]


@pytest.mark.queue_groups
def test_a_plain_queue_handler_raising_stop_iteration_is_retried_then_dead_lettered(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    # asyncio cannot hold a StopIteration in a Future: run as such, the delivery never ended.
    attempts: list[int] = []
    dead: list[DeadLetter] = []

    def exhausted(message: Tick) -> None:
        attempts.append(AsyncMessageContext.current().attempt)
        next(iter([]))

    harness.broker.subscribe_async(Tick, exhausted, "work", max_attempts=3, retry_backoff=0.01)
    harness.broker.subscribe(DeadLetter, dead.append)
    harness.broker.publish(Tick(4))
    harness.settle()
    harness.settle()
    assert attempts == [1, 2, 3]
    assert [(d.queue_name, d.message, d.attempts) for d in dead] == [("work", Tick(4), 3)]
    assert "StopIteration" in dead[0].error


@pytest.mark.queue_groups
def test_a_retry_that_succeeds_is_not_dead_lettered(harness: Harness) -> None:
    attempts: list[int] = []
    dead: list[DeadLetter] = []

    async def flaky(message: Tick) -> None:
        attempt = AsyncMessageContext.current().attempt
        attempts.append(attempt)
        if attempt == 1:
            raise ConnectionError("transient")

    harness.broker.subscribe_async(Tick, flaky, "work", retry_backoff=0.0)
    harness.broker.subscribe(DeadLetter, dead.append)
    harness.broker.publish(Tick(1))
    harness.settle()
    assert attempts == [1, 2]
    assert dead == []


@pytest.mark.queue_groups
def test_a_group_member_that_rejects_leaves_the_message_to_another(harness: Harness) -> None:
    evens: list[int] = []
    odds: list[int] = []
    harness.broker.subscribe_async(
        Tick, lambda m: evens.append(m.seq), "q", lambda m: m.seq % 2 == 0
    )
    harness.broker.subscribe_async(
        Tick, lambda m: odds.append(m.seq), "q", lambda m: m.seq % 2 == 1
    )
    for seq in range(10):
        harness.broker.publish(Tick(seq))
    harness.settle()
    assert sorted(evens) == [0, 2, 4, 6, 8]
    assert sorted(odds) == [1, 3, 5, 7, 9]


@pytest.mark.queue_groups
def test_a_message_no_group_member_accepts_is_dropped(harness: Harness) -> None:
    taken: list[int] = []
    harness.broker.subscribe_async(Tick, lambda m: taken.append(m.seq), "q", lambda m: m.seq < 2)
    for seq in range(4):
        harness.broker.publish(Tick(seq))
    harness.settle()
    assert sorted(taken) == [0, 1]


@pytest.mark.queue_groups
def test_a_cancelled_group_member_gets_nothing(harness: Harness) -> None:
    kept: list[int] = []
    gone: list[int] = []
    harness.broker.subscribe_async(Tick, lambda m: kept.append(m.seq), "q")
    harness.broker.subscribe_async(Tick, lambda m: gone.append(m.seq), "q").cancel()
    for seq in range(6):
        harness.broker.publish(Tick(seq))
    harness.settle()
    assert sorted(kept) == list(range(6))
    assert gone == []


def test_a_declared_queue_holds_what_is_published_until_a_consumer_comes(
    harness: Harness,
) -> None:
    broker = harness.broker
    broker.declare_queue(OrderPlaced, "later")
    for order_id in range(20):
        broker.publish(OrderPlaced(order_id))
    broker.flush(20)  # with the broker (the hub: held by the group)
    seen: list[int] = []
    broker.subscribe_async(OrderPlaced, lambda m: seen.append(m.order_id), "later")
    harness.settle()
    assert sorted(seen) == list(range(20))


# -- request / reply --------------------------------------------------------------------------


def test_a_broadcast_handler_replies_by_returning_a_message(harness: Harness) -> None:
    harness.broker.subscribe(Ping, lambda m: Pong(m.token, 1))
    assert harness.broker.request(Ping("a"), timeout=20) == Pong("a", 1)
    assert harness.broker.request(Ping("b"), timeout=20) == Pong("b", 1)
    assert harness.broker.pending_requests == 0


@pytest.mark.queue_groups
def test_plain_and_coroutine_queue_handlers_reply(harness: Harness) -> None:
    async def coroutine(message: Ping) -> Pong:
        await asyncio.sleep(0)
        return Pong(message.token, 2)

    harness.broker.subscribe_async(
        Ping, lambda m: Pong(m.token, 1), "plain", lambda m: m.token == "p"
    )
    harness.broker.subscribe_async(Ping, coroutine, "co", lambda m: m.token == "c")
    assert harness.broker.request(Ping("p"), timeout=20) == Pong("p", 1)
    assert harness.broker.request(Ping("c"), timeout=20) == Pong("c", 2)


def test_a_return_value_that_is_not_a_message_is_no_reply(harness: Harness) -> None:
    harness.broker.subscribe(Ping, lambda m: "not a message")
    harness.broker.subscribe(Ping, lambda m: None)
    with pytest.raises(RequestTimeoutError):
        harness.broker.request(Ping("x"), timeout=0.3)
    assert harness.broker.pending_requests == 0


def test_without_a_responder_a_request_times_out(harness: Harness) -> None:
    with pytest.raises(RequestTimeoutError, match="Ping") as caught:
        harness.broker.request(Ping("nobody"), timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    assert harness.broker.pending_requests == 0


def test_return_values_of_published_messages_are_ignored(harness: Harness) -> None:
    seen: list[str] = []

    def responder(message: Ping) -> Pong:
        seen.append(message.token)
        return Pong(message.token, 1)

    harness.broker.subscribe(Ping, responder)
    harness.broker.publish(Ping("published"))
    harness.settle()
    assert seen == ["published"]
    assert harness.broker.late_replies == 0


def test_the_first_reply_wins_and_the_others_are_counted(harness: Harness) -> None:
    harness.broker.subscribe(Ping, lambda m: Pong(m.token, 1))
    harness.broker.subscribe(Ping, lambda m: Pong(m.token, 2))
    harness.broker.subscribe(Ping, lambda m: None)  # no reply: not counted
    reply = harness.broker.request(Ping("race"), timeout=20)
    assert reply in (Pong("race", 1), Pong("race", 2))
    wait_until(lambda: harness.broker.late_replies == 1, 20)
    harness.settle()
    assert harness.broker.late_replies == 1


def test_a_responder_that_raises_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    def refuse(message: Ping) -> Pong:
        raise LookupError(f"no such token {message.token}")

    harness.broker.subscribe(Ping, refuse)
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("t1"), timeout=20)
    assert caught.value.remote_type == "LookupError"
    assert caught.value.remote_message == "no such token t1"
    assert "LookupError" in str(caught.value)


@pytest.mark.queue_groups
def test_a_queue_responder_is_retried_then_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def flaky(message: Ping) -> Pong:
        attempts.append(AsyncMessageContext.current().attempt)
        raise ValueError(f"attempt {AsyncMessageContext.current().attempt}")

    harness.broker.subscribe_async(Ping, flaky, "work", max_attempts=3, retry_backoff=0.0)
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("r"), timeout=20)
    assert caught.value.remote_type == "ValueError"
    assert caught.value.remote_message == "attempt 3"
    assert attempts == [1, 2, 3]


@pytest.mark.queue_groups
def test_a_retry_that_succeeds_replies(harness: Harness) -> None:
    def flaky(message: Ping) -> Pong:
        attempt = AsyncMessageContext.current().attempt
        if attempt == 1:
            raise ConnectionError("transient")
        return Pong(message.token, attempt)

    harness.broker.subscribe_async(Ping, flaky, "work", retry_backoff=0.0)
    assert harness.broker.request(Ping("again"), timeout=20) == Pong("again", 2)


@pytest.mark.queue_groups
def test_one_member_of_a_queue_group_answers(harness: Harness) -> None:
    calls: Counter[int] = Counter()

    def member(number: int):  # type: ignore[no-untyped-def]
        def handle(message: Ping) -> Pong:
            calls[number] += 1
            return Pong(message.token, number)

        return handle

    for number in range(3):
        harness.broker.subscribe_async(Ping, member(number), "responders")
    for index in range(6):
        assert harness.broker.request(Ping(str(index)), timeout=20).token == str(index)  # type: ignore[attr-defined]
    harness.settle()
    assert sum(calls.values()) == 6, "each request went to one member"
    assert harness.broker.late_replies == 0


@pytest.mark.parametrize("unsendable", UNSENDABLE)
def test_a_reply_that_cannot_be_serialised_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture, unsendable: str
) -> None:
    """Whatever its pickling raises (a BaseException too: it ended the responder's thread, and
    every later request timed out), and the responder goes on answering."""
    field = unsendable_fields()[unsendable]
    harness.broker.subscribe(Ping, _replying_with(field))
    _expect_an_unsendable_reply(harness, unsendable, field)


def _replying_with(field: object) -> Callable[[Ping], Message]:
    """A responder whose answer to ``Ping("bad")`` holds ``field``, which cannot be pickled."""

    def respond(message: Ping) -> Message:
        if message.token == "bad":
            return Unpicklable(field)
        return Pong(message.token, 0)

    return respond


def _expect_an_unsendable_reply(harness: Harness, unsendable: str, field: object) -> None:
    """What ``request(Ping("bad"))`` does when the reply cannot be pickled, per broker; then
    the responder still answers ``Ping("good")``."""
    _expect_the_bad_answer(harness, unsendable, field)
    assert harness.broker.request(Ping("good"), timeout=20) == Pong("good", 0)


def _expect_the_bad_answer(harness: Harness, unsendable: str, field: object) -> None:
    if not harness.serialises:
        # MemoryBroker never serialises (docs/guarantees.md): the reply itself comes back.
        assert harness.broker.request(Ping("bad"), timeout=20) == Unpicklable(field)
        return
    if unsendable in ("system-exit", "keyboard-interrupt") and harness.runs_handlers_in_caller:
        # TestBroker serialises on the main thread, where these end the program, by design
        # (core/failures.py): the caller sees them.
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            harness.broker.request(Ping("bad"), timeout=20)
        return
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("bad"), timeout=20)
    assert caught.value.remote_type == "ipcbus.exceptions.MessageSerializationError"


@pytest.mark.queue_groups
def test_a_queue_responders_reply_whose_pickling_raises_system_exit_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    field = unsendable_fields()["system-exit"]
    harness.broker.subscribe_async(Ping, _replying_with(field), "responders")
    _expect_an_unsendable_reply(harness, "system-exit", field)


def test_a_responder_raising_an_exception_that_cannot_be_shown_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    def refuse(message: Ping) -> Pong:
        raise BadStr()

    harness.broker.subscribe(Ping, refuse)
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("s"), timeout=20)
    assert caught.value.remote_type.endswith("BadStr")
    assert "str() of this BadStr raised ValueError" in caught.value.remote_message


def test_a_responder_raising_an_error_with_a_lone_surrogate_answers_with_a_remote_error(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    """A file name os.fsdecode() made holds lone surrogates, which strict UTF-8 cannot encode:
    on NATS that ended the dispatcher thread (found by review)."""
    name = os.fsdecode(b"r\xe9sum\xe9.txt")

    def refuse(message: Ping) -> Pong:
        raise ValueError(f"cannot parse {name}")

    harness.broker.subscribe(Ping, refuse)
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("s"), timeout=20)
    assert caught.value.remote_type == "ValueError"
    assert caught.value.remote_message.startswith("cannot parse r")
    received: list[Message] = []
    harness.broker.subscribe(Pong, received.append)  # the broker still works
    harness.broker.publish(Pong("after", 0))
    harness.settle()
    wait_until(lambda: received == [Pong("after", 0)], 20)


@pytest.mark.queue_groups
def test_a_queue_handler_raising_an_exception_that_cannot_be_shown_is_retried_then_fails(
    harness: Harness, errors_logged: pytest.LogCaptureFixture
) -> None:
    """Its delivery ends (retried, then dead), never stays in flight: describing the error
    raised, and the delivery stayed with its consumer until it closed."""
    attempts: list[int] = []

    def flaky(message: Ping) -> Pong:
        attempts.append(AsyncMessageContext.current().attempt)
        raise BadStr()

    harness.broker.subscribe_async(Ping, flaky, "work", max_attempts=2, retry_backoff=0.0)
    with pytest.raises(RemoteError) as caught:
        harness.broker.request(Ping("q"), timeout=20)
    assert caught.value.remote_type.endswith("BadStr")
    assert attempts == [1, 2]


def test_request_from_a_handler(harness: Harness) -> None:
    """A handler may request (here from a broadcast handler to a queue responder, which runs
    on another thread than broadcast handlers in every broker)."""
    replies: list[Message] = []
    harness.broker.subscribe_async(Ping, lambda m: Pong(m.token, 7), "responders")

    def on_order(message: OrderPlaced) -> None:
        replies.append(harness.broker.request(Ping(str(message.order_id)), timeout=20))

    harness.broker.subscribe(OrderPlaced, on_order)
    harness.broker.publish(OrderPlaced(5))
    harness.settle()
    wait_until(lambda: len(replies) == 1, 20)
    assert replies == [Pong("5", 7)]


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf")])
def test_a_bad_timeout_is_a_value_error(harness: Harness, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        harness.broker.request(Ping("x"), timeout=timeout)


def test_bad_request_arguments(harness: Harness) -> None:
    with pytest.raises(TypeError, match="Message"):
        harness.broker.request("ping")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout"):
        harness.broker.request(Ping("x"), timeout="5")  # type: ignore[arg-type]
    if harness.serialises:
        with pytest.raises(MessageSerializationError):
            harness.broker.request(Unpicklable(), timeout=1)
    harness.broker.close()
    with pytest.raises(BrokerClosedError):
        harness.broker.request(Ping("x"))
