"""request() on NatsBroker: a handler answers by returning a Message (written to fold into the
contract suite once every broker has request())."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, BrokerClosedError, PubSubError
from ipcbus.nats import NatsBroker, RemoteError, RequestTimeoutError

from .conftest import wait_until
from .hubtools import BarrierWaiter, reap
from .messages import OrderPlaced, OrderShipped, Tick
from .natstools import SECRET, NatsServer

pytestmark = pytest.mark.usefixtures("no_leftovers")

SPAWN: Any = multiprocessing.get_context("spawn")


@pytest.fixture
def namespace(nats_server: NatsServer) -> str:
    return nats_server.namespace()


@pytest.fixture
def broker(nats_server: NatsServer, namespace: str) -> Iterator[NatsBroker]:
    with NatsBroker(nats_server.url, namespace=namespace, secret=SECRET) as opened:
        yield opened


def test_a_handler_answers_by_returning_a_message(broker: NatsBroker) -> None:
    broker.subscribe(OrderPlaced, lambda m: OrderShipped(m.order_id))
    assert broker.request(OrderPlaced(7), timeout=10) == OrderShipped(7)


def test_a_queue_group_member_answers_once(broker: NatsBroker) -> None:
    answered_by: list[str] = []

    def member(name: str) -> Any:
        async def handle(message: OrderPlaced) -> OrderShipped:
            assert AsyncMessageContext.current().attempt == 1
            answered_by.append(name)
            return OrderShipped(message.order_id)

        return handle

    broker.subscribe_async(OrderPlaced, member("a"), "shipping")
    broker.subscribe_async(OrderPlaced, member("b"), "shipping")
    answers = [broker.request(OrderPlaced(i), timeout=10) for i in range(10)]
    assert answers == [OrderShipped(i) for i in range(10)]
    assert len(answered_by) == 10
    assert broker.statistics().replies_dropped == 0


def test_with_several_responders_the_first_answer_wins_and_the_rest_are_counted(
    broker: NatsBroker,
) -> None:
    broker.subscribe(Tick, lambda m: Tick(m.seq, "first"))
    broker.subscribe(Tick, lambda m: Tick(m.seq, "second"))
    assert broker.request(Tick(1), timeout=10) == Tick(1, "first")
    wait_until(lambda: broker.statistics().replies_dropped == 1, 10)


def test_without_a_responder_a_request_times_out(broker: NatsBroker) -> None:
    broker.subscribe(Tick, lambda m: None)  # a subscriber that does not answer
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError) as caught:
        broker.request(Tick(1), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert isinstance(caught.value, PubSubError)
    assert isinstance(caught.value, TimeoutError)


def test_a_responders_exception_travels_back(broker: NatsBroker) -> None:
    def refuse(message: OrderPlaced) -> OrderShipped:
        raise LookupError(f"no order {message.order_id}")

    broker.subscribe(OrderPlaced, refuse)
    with pytest.raises(RemoteError) as caught:
        broker.request(OrderPlaced(3), timeout=10)
    assert caught.value.remote_type == "LookupError"
    assert caught.value.remote_message == "no order 3"


def test_a_return_value_outside_a_request_is_ignored(broker: NatsBroker) -> None:
    seen: list[Tick] = []
    broker.subscribe(Tick, lambda m: Tick(m.seq + 1))
    broker.subscribe(Tick, seen.append)
    broker.publish(Tick(1))
    BarrierWaiter(broker).wait(broker, 10)
    assert seen == [Tick(1)]
    assert broker.statistics().replies_dropped == 0


def test_nothing_is_kept_per_request(broker: NatsBroker) -> None:
    broker.subscribe(Tick, lambda m: m)
    with pytest.raises(RequestTimeoutError):  # the first of a type asks JetStream, once
        broker.request(OrderPlaced(0), timeout=0.05)
    subscriptions_before = len(broker._conn.client._subs)
    for seq in range(200):
        assert broker.request(Tick(seq), timeout=10) == Tick(seq)
    with pytest.raises(RequestTimeoutError):
        broker.request(OrderPlaced(1), timeout=0.05)
    assert broker._answers_to_me._waiting == {}
    assert len(broker._conn.client._subs) == subscriptions_before


def test_close_wakes_a_waiting_requester(broker: NatsBroker) -> None:
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            broker.request(Tick(1), timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.2)
    started = time.monotonic()
    broker.close()
    asker.join(10)
    assert time.monotonic() - started < 10
    assert len(outcome) == 1
    assert isinstance(outcome[0], BrokerClosedError)


def _responder(url: str, namespace: str, secret: str, ready: Any, stop: Any) -> None:
    with NatsBroker(url, namespace=namespace, secret=secret) as broker:
        broker.subscribe(OrderPlaced, lambda m: OrderShipped(m.order_id * 10))
        ready.set()
        stop.wait(60)


@pytest.mark.forks
def test_a_responder_in_another_process_answers(nats_server: NatsServer, namespace: str) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    responder = SPAWN.Process(
        target=_responder, args=(nats_server.url, namespace, SECRET, ready, stop)
    )
    responder.start()
    try:
        assert ready.wait(60)
        with NatsBroker(nats_server.url, namespace=namespace, secret=SECRET) as broker:
            assert broker.request(OrderPlaced(4), timeout=10) == OrderShipped(40)
    finally:
        stop.set()
        hung = reap([responder])
    assert hung == []


def test_closing_a_responder_while_its_handler_answers_kills_no_thread(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer comes after close() stopped the connection's loop: it is counted as unsent,
    not a dead dispatcher logged at CRITICAL (found by an adversarial review)."""
    answering, closed = threading.Event(), threading.Event()

    def slow(message: OrderPlaced) -> OrderShipped:
        answering.set()
        closed.wait(20)  # answers once close() has returned
        return OrderShipped(message.order_id)

    def close() -> None:
        answering.wait(20)
        responder.close()
        closed.set()

    responder = NatsBroker(nats_server.url, namespace=namespace, secret=SECRET, linger=0.2)
    with NatsBroker(nats_server.url, namespace=namespace, secret=SECRET) as requester:
        responder.subscribe(OrderPlaced, slow)
        closer = threading.Thread(target=close)
        closer.start()
        with pytest.raises(RequestTimeoutError):
            requester.request(OrderPlaced(1), timeout=3)
        closer.join(20)
    wait_until(lambda: not responder._dispatcher.thread.is_alive(), 20)
    assert [r for r in caplog.records if r.levelname == "CRITICAL"] == []
    assert responder._counters.snapshot(queues={}, in_hand=0).unsent >= 1
