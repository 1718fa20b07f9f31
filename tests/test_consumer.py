"""Consumer[T]: declared once, bound once to every broker that becomes the process's broker."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    BrokerNotInitializedError,
    Consumer,
    ConsumerAlreadyRegisteredError,
    MemoryBroker,
    Message,
    TestBroker,
    get_message_broker,
    override_message_broker,
    set_message_broker,
)

from .messages import OrderPlaced, PriorityOrderPlaced, Tick

# -- declaration ------------------------------------------------------------------------------


def test_bare_decorator_returns_the_function() -> None:
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    def handle(message: OrderPlaced) -> None:
        pass

    assert orders.on_message(handle) is handle
    assert orders.handler is handle
    assert orders.predicate is None
    assert orders.queue_name is None


def test_decorator_with_arguments_returns_the_function() -> None:
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    def big(message: OrderPlaced) -> bool:
        return message.amount > 10

    @orders.on_message(predicate=big, queue_name="billing")
    async def handle(message: OrderPlaced) -> None:
        pass

    assert asyncio.iscoroutinefunction(handle)
    assert orders.handler is handle
    assert orders.predicate is big
    assert orders.queue_name == "billing"


def test_decorator_with_empty_parentheses_returns_the_function() -> None:
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    @orders.on_message()
    def handle(message: OrderPlaced) -> None:
        pass

    assert orders.handler is handle
    assert orders.queue_name is None


@pytest.mark.parametrize("second_form", ["bare", "with_arguments"])
def test_a_second_registration_raises(second_form: str) -> None:
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    @orders.on_message
    def first(message: OrderPlaced) -> None:
        pass

    def second(message: OrderPlaced) -> None:
        pass

    register = orders.on_message if second_form == "bare" else orders.on_message(queue_name="q")
    with pytest.raises(ConsumerAlreadyRegisteredError, match="OrderPlaced"):
        register(second)
    assert orders.handler is first
    assert orders.queue_name is None


def test_a_second_registration_does_not_bind_the_second_handler() -> None:
    broker = TestBroker()
    set_message_broker(broker)
    calls: list[str] = []
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)
    orders.on_message(lambda m: calls.append("first"))
    with pytest.raises(ConsumerAlreadyRegisteredError):
        orders.on_message(lambda m: calls.append("second"))
    broker.publish(OrderPlaced(1))
    assert broker.process_messages() == 1
    assert calls == ["first"]


@pytest.mark.parametrize("not_a_type", [dict, OrderPlaced(1), "OrderPlaced", None, Message()])
def test_consumer_of_a_non_message_type_is_a_type_error(not_a_type: object) -> None:
    with pytest.raises(TypeError, match="Message subclass"):
        Consumer(not_a_type)  # type: ignore[arg-type]


def test_bad_handler_predicate_or_queue_name_fail_at_declaration() -> None:
    with pytest.raises(TypeError, match="predicate"):
        Consumer(OrderPlaced).on_message(predicate=True)(print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="queue_name"):
        Consumer(OrderPlaced).on_message(queue_name="")(print)
    with pytest.raises(TypeError, match="handler"):
        Consumer(OrderPlaced).on_message("print")


def test_declaring_without_a_broker_is_fine() -> None:
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)
    seen: list[Message] = []
    assert orders.on_message(seen.append) == seen.append
    assert seen == []


# -- binding ----------------------------------------------------------------------------------


def test_binds_at_once_when_a_broker_is_installed() -> None:
    broker = TestBroker()
    set_message_broker(broker)
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    broker.publish(OrderPlaced(1))
    broker.process_messages()
    assert seen == [OrderPlaced(1)]


def test_binds_later_through_set_message_broker() -> None:
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    broker = TestBroker()
    broker.publish(OrderPlaced(1))
    broker.process_messages()
    assert seen == [], "not installed yet: not bound"
    set_message_broker(broker)
    broker.publish(OrderPlaced(2))
    broker.process_messages()
    assert seen == [OrderPlaced(2)]


def test_binds_inside_override_message_broker() -> None:
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    with override_message_broker(TestBroker()) as broker:
        assert isinstance(broker, TestBroker)
        broker.publish(OrderPlaced(1))
        assert seen == [], "TestBroker delivers only in process_messages()"
        assert broker.process_messages() == 1
    assert seen == [OrderPlaced(1)]


def test_binds_to_every_broker_installed_in_turn() -> None:
    seen: list[tuple[str, int]] = []
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)
    first, second = TestBroker(), MemoryBroker()
    set_message_broker(first)
    orders.on_message(lambda m: seen.append(("handler", m.order_id)))
    set_message_broker(second)
    second.publish(OrderPlaced(2))
    first.publish(OrderPlaced(1))
    first.process_messages()
    assert seen == [("handler", 2), ("handler", 1)]


def test_a_closed_broker_is_refused_and_not_installed() -> None:
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    current = TestBroker()
    set_message_broker(current)
    closed = TestBroker()
    closed.close()
    with pytest.raises(BrokerClosedError):
        set_message_broker(closed)
    with pytest.raises(BrokerClosedError), override_message_broker(closed):
        pass
    assert get_message_broker() is current
    Consumer(Tick).on_message(seen.append)  # declarations still bind, to the installed broker
    current.publish(OrderPlaced(1))
    current.publish(Tick(2))
    assert current.process_messages() == 2
    assert seen == [OrderPlaced(1), Tick(2)]


def test_a_closed_broker_is_refused_with_no_consumer_declared() -> None:
    closed = MemoryBroker()
    closed.close()
    with pytest.raises(BrokerClosedError):
        set_message_broker(closed)
    with pytest.raises(BrokerNotInitializedError):
        get_message_broker()


def test_binds_once_per_broker() -> None:
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    broker = TestBroker()
    set_message_broker(broker)
    set_message_broker(broker)
    with override_message_broker(broker):
        set_message_broker(broker)
    other = TestBroker()
    set_message_broker(other)
    set_message_broker(broker)
    broker.publish(OrderPlaced(1))
    assert broker.process_messages() == 1
    assert seen == [OrderPlaced(1)]


def test_binds_once_per_broker_with_memory_broker() -> None:
    seen: list[Message] = []
    broker = MemoryBroker()
    set_message_broker(broker)
    Consumer(OrderPlaced).on_message(seen.append)
    set_message_broker(broker)
    with override_message_broker(broker):
        pass
    broker.publish(OrderPlaced(1))
    assert seen == [OrderPlaced(1)]


def test_each_consumer_binds_its_own_handler() -> None:
    seen: list[str] = []
    Consumer(OrderPlaced).on_message(lambda m: seen.append("a"))
    Consumer(OrderPlaced).on_message(lambda m: seen.append("b"))
    Consumer(Tick).on_message(lambda m: seen.append("tick"))
    with override_message_broker(TestBroker()) as broker:
        broker.publish(OrderPlaced(1))
        assert broker.process_messages() == 2
    assert seen == ["a", "b"]


def test_a_consumer_routes_by_exact_type() -> None:
    seen: list[Message] = []
    Consumer(OrderPlaced).on_message(seen.append)
    with override_message_broker(TestBroker()) as broker:
        broker.publish(PriorityOrderPlaced(1))
        broker.publish(OrderPlaced(2))
        assert broker.process_messages() == 1
    assert seen == [OrderPlaced(2)]


def test_a_consumer_predicate_filters() -> None:
    seen: list[int] = []
    Consumer(OrderPlaced).on_message(predicate=lambda m: m.amount > 10)(
        lambda m: seen.append(m.order_id)
    )
    with override_message_broker(TestBroker()) as broker:
        for order_id, amount in enumerate([5, 50, 10, 11]):
            broker.publish(OrderPlaced(order_id, amount))
        broker.process_messages()
    assert seen == [1, 3]


def test_a_broadcast_consumer_is_not_a_queue_handler() -> None:
    outcome: list[str] = []

    @Consumer(Tick).on_message
    def handle(message: Tick) -> None:
        try:
            AsyncMessageContext.current()
        except LookupError:
            outcome.append("broadcast")
        else:
            outcome.append("queue")

    with override_message_broker(TestBroker()) as broker:
        broker.publish(Tick(1))
        broker.process_messages()
    assert outcome == ["broadcast"]


# -- queue groups -----------------------------------------------------------------------------


def test_a_queue_consumer_joins_the_queue_group() -> None:
    contexts: list[AsyncMessageContext] = []

    @Consumer(Tick).on_message(queue_name="workers")
    async def handle(message: Tick) -> None:
        await asyncio.sleep(0)
        contexts.append(AsyncMessageContext.current())

    with override_message_broker(TestBroker()) as broker:
        broker.publish(Tick(1))
        assert broker.process_messages() == 1
    assert [(c.queue_name, c.attempt) for c in contexts] == [("workers", 1)]


def test_queue_consumers_in_the_same_group_share_the_messages() -> None:
    calls: Counter[str] = Counter()
    seen: list[int] = []
    broadcast: list[int] = []

    def member(name: str):  # type: ignore[no-untyped-def]
        def handle(message: Tick) -> None:
            calls[name] += 1
            seen.append(message.seq)

        return handle

    Consumer(Tick).on_message(queue_name="workers")(member("a"))
    Consumer(Tick).on_message(queue_name="workers")(member("b"))
    Consumer(Tick).on_message(lambda m: broadcast.append(m.seq))
    with override_message_broker(TestBroker()) as broker:
        for seq in range(10):
            broker.publish(Tick(seq))
        assert broker.process_messages() == 20
    assert sorted(seen) == list(range(10)), "each message to exactly one member"
    assert calls["a"] > 0
    assert calls["b"] > 0
    assert calls["a"] + calls["b"] == 10
    assert broadcast == list(range(10))


def test_queue_consumers_in_different_groups_each_get_a_copy() -> None:
    billing: list[int] = []
    audit: list[int] = []
    Consumer(Tick).on_message(queue_name="billing")(lambda m: billing.append(m.seq))
    Consumer(Tick).on_message(queue_name="audit")(lambda m: audit.append(m.seq))
    with override_message_broker(TestBroker()) as broker:
        for seq in range(3):
            broker.publish(Tick(seq))
        broker.process_messages()
    assert billing == [0, 1, 2]
    assert audit == [0, 1, 2]


def test_a_queue_consumer_with_memory_broker_runs_on_its_loop() -> None:
    seen: list[int] = []

    @Consumer(Tick).on_message(queue_name="workers")
    async def handle(message: Tick) -> None:
        seen.append(message.seq)

    with MemoryBroker() as broker, override_message_broker(broker):
        for seq in range(3):
            broker.publish(Tick(seq))
        broker.flush(10)
        assert sorted(seen) == [0, 1, 2]
