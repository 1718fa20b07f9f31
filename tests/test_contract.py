"""The broker contract (docs/guarantees.md), run against every broker through the ``harness``
fixture.

A behaviour that is not stated here is not guaranteed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    DeadLetter,
    Message,
    MessageSerializationError,
    Subscription,
)

from .conftest import Harness
from .messages import OrderPlaced, OrderShipped, PriorityOrderPlaced, Tick, Unpicklable

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
    if not harness.serialises:
        pytest.skip("MemoryBroker never serialises (docs/guarantees.md); nothing to reject")
    received: list[Message] = []
    harness.broker.subscribe(Unpicklable, received.append)
    with pytest.raises(MessageSerializationError, match="Unpicklable"):
        harness.broker.publish(Unpicklable())
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
