"""The process-local broker: set / get / override, and what a forked child gets
(docs/guarantees.md)."""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest

from ipcbus import (
    Broker,
    BrokerNotInitializedError,
    Consumer,
    MemoryBroker,
    NullBroker,
    TestBroker,
    get_message_broker,
    override_message_broker,
    set_message_broker,
)

from .messages import OrderPlaced, OrderShipped, Tick

# -- set / get --------------------------------------------------------------------------------


def test_get_without_a_broker_raises() -> None:
    with pytest.raises(BrokerNotInitializedError, match="set_message_broker"):
        get_message_broker()


def test_set_then_get_returns_the_broker() -> None:
    broker = MemoryBroker()
    set_message_broker(broker)
    assert get_message_broker() is broker
    assert get_message_broker() is broker
    assert not broker.closed


def test_set_replaces_the_broker_without_closing_it() -> None:
    first, second = MemoryBroker(), TestBroker()
    set_message_broker(first)
    set_message_broker(second)
    assert get_message_broker() is second
    assert not first.closed
    assert not second.closed


def test_set_none_uninstalls() -> None:
    broker = NullBroker()
    set_message_broker(broker)
    set_message_broker(None)
    with pytest.raises(BrokerNotInitializedError):
        get_message_broker()
    assert not broker.closed


@pytest.mark.parametrize("not_a_broker", ["memory", object(), MemoryBroker])
def test_set_and_override_reject_non_brokers(not_a_broker: object) -> None:
    with pytest.raises(TypeError, match="Broker"):
        set_message_broker(not_a_broker)  # type: ignore[arg-type]
    with (
        pytest.raises(TypeError, match="Broker"),
        override_message_broker(not_a_broker),  # type: ignore[arg-type]
    ):
        pass
    with pytest.raises(BrokerNotInitializedError):
        get_message_broker()


# -- override ---------------------------------------------------------------------------------


def test_override_yields_the_broker_and_restores_the_previous_one() -> None:
    outer, inner = MemoryBroker(), TestBroker()
    set_message_broker(outer)
    with override_message_broker(inner) as entered:
        assert entered is inner
        assert get_message_broker() is inner
    assert get_message_broker() is outer
    assert not outer.closed
    assert not inner.closed


def test_override_restores_none() -> None:
    inner = TestBroker()
    with override_message_broker(inner):
        assert get_message_broker() is inner
    with pytest.raises(BrokerNotInitializedError):
        get_message_broker()
    assert not inner.closed


def test_override_restores_when_the_block_raises() -> None:
    outer, inner = MemoryBroker(), TestBroker()
    set_message_broker(outer)
    with pytest.raises(ValueError, match="inside"), override_message_broker(inner):
        raise ValueError("inside")
    assert get_message_broker() is outer
    assert not outer.closed
    assert not inner.closed


def test_override_restores_none_when_the_block_raises() -> None:
    inner = NullBroker()
    with pytest.raises(KeyError), override_message_broker(inner):
        raise KeyError("inside")
    with pytest.raises(BrokerNotInitializedError):
        get_message_broker()
    assert not inner.closed


def test_nested_overrides_unwind_in_order() -> None:
    outer, middle, inner = MemoryBroker(), TestBroker(), NullBroker()
    set_message_broker(outer)
    with override_message_broker(middle):
        assert get_message_broker() is middle
        with override_message_broker(inner):
            assert get_message_broker() is inner
        assert get_message_broker() is middle
        with pytest.raises(RuntimeError), override_message_broker(inner):
            raise RuntimeError("nested")
        assert get_message_broker() is middle
    assert get_message_broker() is outer
    assert not any(b.closed for b in (outer, middle, inner))


def test_the_same_broker_may_be_overridden_with_itself() -> None:
    broker = TestBroker()
    set_message_broker(broker)
    with override_message_broker(broker):
        assert get_message_broker() is broker
    assert get_message_broker() is broker
    assert not broker.closed


def test_a_broker_set_inside_an_override_is_replaced_by_the_previous_one() -> None:
    outer, inner, during = MemoryBroker(), TestBroker(), NullBroker()
    set_message_broker(outer)
    with override_message_broker(inner):
        set_message_broker(during)
        assert get_message_broker() is during
    assert get_message_broker() is outer


# -- fork -------------------------------------------------------------------------------------

FORK_TIMEOUT = 30.0


def _run_in_fork(child_body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; the child runs ``child_body`` and reports its result (or its traceback) as JSON
    through a pipe, then leaves with ``os._exit``. The parent waits with a deadline."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_fd)
            try:
                report: dict[str, Any] = {"ok": True, "result": child_body()}
            except BaseException:
                report = {"ok": False, "traceback": traceback.format_exc()}
            data = json.dumps(report).encode()
            while data:
                written = os.write(write_fd, data)
                data = data[written:]
        except BaseException:
            status = 1
        finally:
            os._exit(status)

    os.close(write_fd)
    deadline = time.monotonic() + FORK_TIMEOUT
    chunks: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([read_fd], [], [], remaining)
            if not readable:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        exit_status = _wait_for_child(pid, deadline)
    assert exit_status is not None, f"child {pid} did not exit within {FORK_TIMEOUT} s: killed"
    assert os.waitstatus_to_exitcode(exit_status) == 0, "the child failed to report"
    assert chunks, "the child reported nothing"
    report = json.loads(b"".join(chunks))
    assert report["ok"], "the child raised:\n" + report["traceback"]
    result: dict[str, Any] = report["result"]
    return result


def _wait_for_child(pid: int, deadline: float) -> int | None:
    """The child's wait status, or None after killing it at the deadline."""
    while time.monotonic() < deadline:
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _deliver(broker: Broker) -> None:
    if isinstance(broker, TestBroker):
        broker.process_messages()
    else:
        broker.flush(10)


@pytest.mark.forks
@pytest.mark.parametrize("broker_type", [MemoryBroker, TestBroker])
def test_a_forked_child_gets_a_fresh_broker_of_the_same_class(
    broker_type: type[MemoryBroker | TestBroker],
) -> None:
    parent_broker = broker_type()
    set_message_broker(parent_broker)
    parent_seen: list[int] = []
    consumer_seen: list[int] = []
    parent_broker.subscribe(OrderPlaced, lambda m: parent_seen.append(m.order_id))
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    @orders.on_message
    def record(message: OrderPlaced) -> None:
        consumer_seen.append(message.order_id)

    parent_broker.publish(OrderPlaced(1))
    _deliver(parent_broker)
    assert parent_seen == [1]
    assert consumer_seen == [1]
    if isinstance(parent_broker, TestBroker):
        parent_broker.publish(OrderPlaced(2))  # pending in the parent at fork time

    def child() -> dict[str, Any]:
        broker = get_message_broker()
        again = get_message_broker()
        report: dict[str, Any] = {
            "same_instance": broker is parent_broker,
            "stable": broker is again,
            "class": type(broker).__name__,
        }
        if isinstance(broker, TestBroker):
            report["published_before"] = len(broker.published)
            report["pending_before"] = broker.pending
        broker.publish(OrderPlaced(100))
        if isinstance(broker, TestBroker):
            report["calls"] = broker.process_messages()
            report["published_after"] = [m.order_id for m in broker.published]  # type: ignore[attr-defined]
        else:
            broker.flush(10)
        report["parent_seen"] = parent_seen
        report["consumer_seen"] = consumer_seen
        report["parent_broker_closed"] = parent_broker.closed
        return report

    report = _run_in_fork(child)

    assert report["same_instance"] is False
    assert report["stable"] is True
    assert report["class"] == broker_type.__name__
    assert report["parent_seen"] == [1], "the parent's subscription must not be inherited"
    assert report["consumer_seen"] == [1, 100], "the Consumer binds to the child's broker"
    assert report["parent_broker_closed"] is False
    if broker_type is TestBroker:
        assert report["published_before"] == 0
        assert report["pending_before"] == 0
        assert report["calls"] == 1
        assert report["published_after"] == [100]

    # The parent's broker is untouched and still works, with its own messages only.
    assert get_message_broker() is parent_broker
    assert not parent_broker.closed
    parent_broker.publish(OrderPlaced(3))
    _deliver(parent_broker)
    if isinstance(parent_broker, TestBroker):
        assert [m.order_id for m in parent_broker.published] == [1, 2, 3]  # type: ignore[attr-defined]
        assert parent_seen == [1, 2, 3]
        assert consumer_seen == [1, 2, 3]
    else:
        assert parent_seen == [1, 3]
        assert consumer_seen == [1, 3]


@pytest.mark.forks
def test_a_forked_child_does_not_inherit_queue_subscriptions() -> None:
    parent_broker = TestBroker()
    set_message_broker(parent_broker)
    parent_queue: list[int] = []
    consumer_queue: list[int] = []
    parent_broker.subscribe_async(OrderShipped, lambda m: parent_queue.append(m.order_id), "q")
    shipping: Consumer[OrderShipped] = Consumer(OrderShipped)

    @shipping.on_message(queue_name="q")
    def ship(message: OrderShipped) -> None:
        consumer_queue.append(message.order_id)

    def child() -> dict[str, Any]:
        broker = get_message_broker()
        assert isinstance(broker, TestBroker)
        for order_id in range(4):
            broker.publish(OrderShipped(order_id))
        calls = broker.process_messages()
        return {"calls": calls, "parent": parent_queue, "consumer": consumer_queue}

    report = _run_in_fork(child)
    # Alone in its group in the child, the Consumer gets every message.
    assert report == {"calls": 4, "parent": [], "consumer": [0, 1, 2, 3]}


@pytest.mark.forks
def test_a_forked_child_runs_queue_consumers_on_its_own_loop() -> None:
    parent_broker = MemoryBroker()
    set_message_broker(parent_broker)
    handled: list[tuple[int, int]] = []  # (pid, seq)
    workers: Consumer[Tick] = Consumer(Tick)

    @workers.on_message(queue_name="workers")
    async def work(message: Tick) -> None:
        handled.append((os.getpid(), message.seq))

    try:
        parent_broker.publish(Tick(1))
        parent_broker.flush(10)  # the parent's broker now runs its own loop thread
        assert handled == [(os.getpid(), 1)]

        def child() -> dict[str, Any]:
            broker = get_message_broker()
            broker.publish(Tick(2))
            broker.flush(10)
            broker.close()
            return {
                "fresh": broker is not parent_broker,
                "handled": handled,
                "pid": os.getpid(),
                "parent_closed": parent_broker.closed,
            }

        report = _run_in_fork(child)
        assert report["fresh"] is True
        assert report["parent_closed"] is False
        assert report["handled"] == [[os.getpid(), 1], [report["pid"], 2]]

        parent_broker.publish(Tick(3))
        parent_broker.flush(10)
        assert handled == [(os.getpid(), 1), (os.getpid(), 3)]
    finally:
        parent_broker.close()


@pytest.mark.forks
def test_fork_inside_an_override_block() -> None:
    outer, inner = MemoryBroker(), TestBroker()
    set_message_broker(outer)
    seen: list[tuple[str, int]] = []
    orders: Consumer[OrderPlaced] = Consumer(OrderPlaced)

    @orders.on_message
    def record(message: OrderPlaced) -> None:
        seen.append((type(get_message_broker()).__name__, message.order_id))

    inner_seen: list[int] = []
    outer_seen: list[int] = []
    inner.subscribe(OrderPlaced, lambda m: inner_seen.append(m.order_id))
    outer.subscribe(OrderPlaced, lambda m: outer_seen.append(m.order_id))

    with ExitStack() as stack:
        stack.enter_context(override_message_broker(inner))

        def child() -> dict[str, Any]:
            inside = get_message_broker()
            inside.publish(OrderPlaced(1))
            assert isinstance(inside, TestBroker)
            calls_inside = inside.process_messages()
            stack.close()  # leave the override block, in the child only
            after = get_message_broker()
            after.publish(OrderPlaced(2))
            after.flush(10)
            return {
                "inside_is_inner": inside is inner,
                "inside_class": type(inside).__name__,
                "inside_published": len(inside.published),
                "calls_inside": calls_inside,
                "after_is_outer": after is outer,
                "after_is_inside": after is inside,
                "after_class": type(after).__name__,
                "seen": seen,
                "inner_seen": inner_seen,
                "outer_seen": outer_seen,
                "closed": [outer.closed, inner.closed],
            }

        report = _run_in_fork(child)
        assert get_message_broker() is inner

    assert report == {
        "inside_is_inner": False,
        "inside_class": "TestBroker",
        "inside_published": 1,
        "calls_inside": 1,
        "after_is_outer": False,
        "after_is_inside": False,
        "after_class": "MemoryBroker",
        "seen": [["TestBroker", 1], ["MemoryBroker", 2]],
        "inner_seen": [],
        "outer_seen": [],
        "closed": [False, False],
    }
    # The parent left its block normally and is back on its own, untouched, outer broker.
    assert get_message_broker() is outer
    outer.publish(OrderPlaced(3))
    assert outer_seen == [3]
    assert seen == [("MemoryBroker", 3)]


@pytest.mark.forks
def test_a_child_without_a_broker_still_has_none() -> None:
    def child() -> dict[str, Any]:
        try:
            get_message_broker()
        except BrokerNotInitializedError:
            return {"raised": True}
        return {"raised": False}

    assert _run_in_fork(child) == {"raised": True}


@pytest.mark.forks
def test_a_consumer_declared_in_a_forked_child_binds_to_the_childs_broker() -> None:
    parent_broker = TestBroker()
    set_message_broker(parent_broker)
    seen: list[int] = []

    def child() -> dict[str, Any]:
        late: Consumer[OrderPlaced] = Consumer(OrderPlaced)
        late.on_message(lambda m: seen.append(m.order_id))
        broker = get_message_broker()
        assert isinstance(broker, TestBroker)
        broker.publish(OrderPlaced(5))
        return {
            "calls": broker.process_messages(),
            "seen": seen,
            "is_parent": broker is parent_broker,
        }

    assert _run_in_fork(child) == {"calls": 1, "seen": [5], "is_parent": False}
    # The declaration happened in the child only: the parent's broker has no handler for it.
    parent_broker.publish(OrderPlaced(6))
    assert parent_broker.process_messages() == 0
