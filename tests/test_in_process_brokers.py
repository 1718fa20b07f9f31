"""What TestBroker, MemoryBroker and NullBroker do beyond the shared contract
(docs/guarantees.md)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    DeadLetter,
    MemoryBroker,
    Message,
    MessageSerializationError,
    NullBroker,
    PublishTimeoutError,
    Subscription,
    TestBroker,
)

from .conftest import wait_until
from .messages import OrderPlaced, OrderShipped, Tick, Unpicklable

WAIT = 10.0  # seconds: the bound of every wait in this module

# == TestBroker ===============================================================================


def test_published_lists_everything_in_order_including_handler_publishes(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    broker = TestBroker(fail_fast=False)  # retries and dead letters
    broker.subscribe(OrderPlaced, lambda m: broker.publish(OrderShipped(m.order_id)))

    def poison(message: OrderShipped) -> None:
        raise ValueError("no")

    broker.subscribe_async(OrderShipped, poison, "ship", max_attempts=1)
    broker.publish(OrderPlaced(1))
    broker.publish(OrderPlaced(2))
    assert broker.published == [OrderPlaced(1), OrderPlaced(2)]
    broker.process_messages()
    assert broker.published == [
        OrderPlaced(1),
        OrderPlaced(2),
        OrderShipped(1),
        OrderShipped(2),
        DeadLetter("ship", OrderShipped(1), 1, "ValueError: no"),
        DeadLetter("ship", OrderShipped(2), 1, "ValueError: no"),
    ]


def test_published_records_messages_nobody_subscribed_to() -> None:
    broker = TestBroker()
    broker.publish(Tick(1))
    broker.publish(OrderPlaced(2))
    assert broker.process_messages() == 0
    assert broker.published == [Tick(1), OrderPlaced(2)]


def test_nothing_is_delivered_before_process_messages() -> None:
    broker = TestBroker()
    broadcast: list[Message] = []
    queued: list[Message] = []
    broker.subscribe(Tick, broadcast.append)
    broker.subscribe_async(Tick, queued.append, "q")
    broker.publish(Tick(1))
    broker.publish(Tick(2))
    assert broadcast == []
    assert queued == []
    assert broker.pending == 2
    assert broker.process_messages() == 4
    assert broadcast == [Tick(1), Tick(2)]
    assert queued == [Tick(1), Tick(2)]
    assert broker.pending == 0
    assert broker.process_messages() == 0


def test_process_messages_counts_handler_calls_including_retries(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    broker = TestBroker(fail_fast=False)  # retries and dead letters
    attempts: list[int] = []
    dead: list[DeadLetter] = []

    def poison(message: Tick) -> None:
        attempts.append(AsyncMessageContext.current().attempt)
        raise ValueError("poison")

    broker.subscribe_async(Tick, poison, "work", max_attempts=3)
    broker.subscribe(DeadLetter, dead.append)
    broker.publish(Tick(1))
    assert broker.process_messages() == 4  # 3 attempts + 1 DeadLetter broadcast
    assert attempts == [1, 2, 3]
    assert dead == [DeadLetter("work", Tick(1), 3, "ValueError: poison")]


def test_process_messages_does_not_count_rejected_deliveries() -> None:
    broker = TestBroker()
    seen: list[int] = []
    broker.subscribe(Tick, lambda m: seen.append(m.seq), lambda m: m.seq > 1)
    broker.subscribe_async(Tick, lambda m: seen.append(-m.seq), "q", lambda m: m.seq > 2)
    for seq in range(4):
        broker.publish(Tick(seq))
    assert broker.process_messages() == 3
    assert seen == [2, 3, -3]


def test_a_handler_that_publishes_forever_hits_max_deliveries() -> None:
    broker = TestBroker(max_deliveries=100)
    calls: list[int] = []

    def echo(message: Tick) -> None:
        calls.append(message.seq)
        broker.publish(Tick(message.seq + 1))

    broker.subscribe(Tick, echo)
    broker.publish(Tick(0))
    with pytest.raises(RuntimeError, match="100 handler calls"):
        broker.process_messages()
    assert calls == list(range(100))


def test_max_deliveries_is_not_reached_by_a_finite_cascade() -> None:
    broker = TestBroker(max_deliveries=100)
    calls: list[int] = []

    def countdown(message: Tick) -> None:
        calls.append(message.seq)
        if message.seq > 1:
            broker.publish(Tick(message.seq - 1))

    broker.subscribe(Tick, countdown)
    broker.publish(Tick(100))
    assert broker.process_messages() == 100
    assert calls == list(range(100, 0, -1))


def test_coroutine_handlers_work_when_called_from_a_running_loop(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    broker = TestBroker(fail_fast=False)  # retries and dead letters
    handled: list[int] = []
    failed_once: set[int] = set()
    followups: list[Message] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0)
        handled.append(message.seq)
        if message.seq == 2 and message.seq not in failed_once:
            failed_once.add(message.seq)
            raise ConnectionError("transient")
        broker.publish(OrderShipped(message.seq))

    broker.subscribe_async(Tick, handler, "q", retry_backoff=0.0)
    broker.subscribe(OrderShipped, followups.append)

    async def main() -> int:
        broker.publish(Tick(1))
        broker.publish(Tick(2))
        return broker.process_messages()

    assert asyncio.run(main()) == 5  # Tick 1, Tick 2 (fails), 2 OrderShipped, Tick 2 retried
    assert handled == [1, 2, 2]
    assert followups == [OrderShipped(1), OrderShipped(2)]


def test_async_context_is_available_when_called_from_a_running_loop(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    broker = TestBroker()
    contexts: list[tuple[str, int]] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0)
        context = AsyncMessageContext.current()
        contexts.append((context.queue_name, context.attempt))

    broker.subscribe_async(Tick, handler, "q")

    async def main() -> int:
        broker.publish(Tick(1))
        return broker.process_messages()

    calls = asyncio.run(main())
    assert contexts == [("q", 1)]
    assert calls == 1


def test_coroutine_handlers_work_without_a_running_loop() -> None:
    broker = TestBroker()
    handled: list[int] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0)
        handled.append(message.seq)

    broker.subscribe_async(Tick, handler, "q")
    broker.publish(Tick(1))
    assert broker.process_messages() == 1
    assert handled == [1]


def test_an_unpicklable_message_is_rejected_and_not_recorded() -> None:
    broker = TestBroker()
    received: list[Message] = []
    broker.subscribe(Unpicklable, received.append)
    broker.publish(Tick(1))
    with pytest.raises(MessageSerializationError, match="Unpicklable"):
        broker.publish(Unpicklable())
    assert broker.published == [Tick(1)]
    assert broker.pending == 1
    assert broker.process_messages() == 0
    assert received == []


def test_process_messages_on_a_closed_test_broker_raises() -> None:
    broker = TestBroker()
    broker.close()
    with pytest.raises(BrokerClosedError):
        broker.process_messages()


# == MemoryBroker =============================================================================


def test_broadcast_handlers_run_synchronously_inside_publish() -> None:
    local = threading.local()
    seen: list[tuple[bool, int]] = []

    def handler(message: Tick) -> None:
        seen.append((getattr(local, "publishing", False), threading.get_ident()))

    with MemoryBroker() as broker:
        broker.subscribe(Tick, handler)
        local.publishing = True
        broker.publish(Tick(1))
        local.publishing = False
        assert seen == [(True, threading.get_ident())]  # already there: no flush needed


def test_broadcast_handlers_run_in_each_publishing_thread() -> None:
    idents: list[int] = []
    lock = threading.Lock()

    def handler(message: Tick) -> None:
        with lock:
            idents.append(threading.get_ident())

    all_started = threading.Barrier(4, timeout=WAIT)  # all alive at once: distinct idents

    def publisher(broker: MemoryBroker, ident_out: list[int]) -> None:
        ident_out.append(threading.get_ident())
        all_started.wait()
        for seq in range(50):
            broker.publish(Tick(seq))

    with MemoryBroker() as broker:
        broker.subscribe(Tick, handler)
        publisher_idents: list[int] = []
        threads = [
            threading.Thread(target=publisher, args=(broker, publisher_idents)) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in threads)
    assert len(idents) == 200
    assert set(idents) == set(publisher_idents)
    assert len(set(publisher_idents)) == 4


def test_async_handlers_run_on_the_publishers_running_loop() -> None:
    broker = MemoryBroker()

    async def main() -> tuple[asyncio.AbstractEventLoop, list[tuple[Any, int, int]]]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        record: list[tuple[Any, int, int]] = []

        async def handler(message: Tick) -> None:
            await asyncio.sleep(0)
            record.append(
                (
                    asyncio.get_running_loop(),
                    threading.get_ident(),
                    AsyncMessageContext.current().attempt,
                )
            )
            done.set()

        broker.subscribe_async(Tick, handler, "q")
        broker.publish(Tick(1))
        assert record == [], "a queue handler is not run inside publish()"
        await asyncio.wait_for(done.wait(), WAIT)
        return loop, record

    try:
        loop, record = asyncio.run(main())
        assert record == [(loop, threading.get_ident(), 1)]
    finally:
        broker.close()


def test_async_handlers_run_on_a_broker_thread_without_a_running_loop() -> None:
    record: list[tuple[int, asyncio.AbstractEventLoop]] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0.05)
        record.append((threading.get_ident(), asyncio.get_running_loop()))

    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, handler, "q")
        broker.publish(Tick(1))
        broker.publish(Tick(2))
        broker.flush(WAIT)  # waits for completion
        assert len(record) == 2
        (ident_1, loop_1), (ident_2, loop_2) = record
        assert ident_1 == ident_2 != threading.get_ident()
        assert loop_1 is loop_2


def test_plain_queue_handlers_do_not_run_in_the_publishing_thread() -> None:
    idents: list[int] = []
    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, lambda m: idents.append(threading.get_ident()), "q")
        broker.publish(Tick(1))
        broker.flush(WAIT)
    assert len(idents) == 1
    assert idents[0] != threading.get_ident()


def test_flush_waits_for_retries() -> None:
    attempts: list[int] = []

    async def flaky(message: Tick) -> None:
        attempt = AsyncMessageContext.current().attempt
        attempts.append(attempt)
        if attempt < 3:
            raise ConnectionError("again")

    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, flaky, "q", max_attempts=3, retry_backoff=0.05)
        broker.publish(Tick(1))
        broker.flush(WAIT)
        assert attempts == [1, 2, 3]


def test_flush_waits_for_queue_deliveries_published_by_coroutine_handlers() -> None:
    shipped: list[int] = []

    async def place(message: OrderPlaced) -> None:
        await asyncio.sleep(0)
        broker.publish(OrderShipped(message.order_id))

    async def ship(message: OrderShipped) -> None:
        await asyncio.sleep(0.5)
        shipped.append(message.order_id)

    with MemoryBroker() as broker:
        broker.subscribe_async(OrderPlaced, place, "placing")
        broker.subscribe_async(OrderShipped, ship, "shipping")
        broker.publish(OrderPlaced(1))
        broker.flush(WAIT)  # also waits for the delivery the handler's publish() started
        assert shipped == [1]


def test_flush_waits_for_dead_letter_queue_deliveries(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    dead: list[DeadLetter] = []

    def poison(message: Tick) -> None:
        raise ValueError("poison")

    async def dead_letter_queue(message: DeadLetter) -> None:
        await asyncio.sleep(0.5)
        dead.append(message)

    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, poison, "work", max_attempts=1)
        broker.subscribe_async(DeadLetter, dead_letter_queue, "dlq")
        broker.publish(Tick(1))
        broker.flush(WAIT)  # also waits for the DeadLetter's queue delivery
        assert dead == [DeadLetter("work", Tick(1), 1, "ValueError: poison")]


def test_close_waits_for_in_flight_deliveries() -> None:
    done: list[str] = []
    gate = threading.Event()  # the handlers' work lasts until it opens

    def slow_plain(message: Tick) -> None:
        gate.wait(WAIT)
        done.append("plain")

    async def slow_coroutine(message: Tick) -> None:
        await asyncio.to_thread(gate.wait, WAIT)
        done.append("coroutine")

    broker = MemoryBroker()
    try:
        broker.subscribe_async(Tick, slow_plain, "plain")
        broker.subscribe_async(Tick, slow_coroutine, "coroutine")
        broker.publish(Tick(1))
        assert done == []
        # The work ends while close() is (most likely) already waiting; either way close()
        # returns only once both deliveries are done.
        threading.Timer(0.1, gate.set).start()
        broker.close()
        assert sorted(done) == ["coroutine", "plain"]
        assert broker.closed
    finally:
        gate.set()
        broker.close()


def test_close_gives_up_after_linger_and_cancels_what_is_left() -> None:
    started = threading.Event()
    cancelled = threading.Event()

    async def stuck(message: Tick) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    broker = MemoryBroker(linger=0.1)
    try:
        broker.subscribe_async(Tick, stuck, "q")
        broker.publish(Tick(1))
        assert started.wait(WAIT)
        begun = time.monotonic()
        broker.close()
        assert time.monotonic() - begun < WAIT
        assert cancelled.wait(WAIT)
    finally:
        broker.close()


def test_flush_raises_publish_timeout_when_a_handler_outlives_it() -> None:
    started = threading.Event()
    release = threading.Event()
    finished: list[int] = []

    def blocked(message: Tick) -> None:
        started.set()
        if release.wait(WAIT):
            finished.append(message.seq)

    broker = MemoryBroker()
    try:
        broker.subscribe_async(Tick, blocked, "q")
        broker.publish(Tick(1))
        assert started.wait(WAIT)
        with pytest.raises(PublishTimeoutError, match="1 queue deliveries"):
            broker.flush(0.05)
        with pytest.raises(TimeoutError):
            broker.flush(0.0)
        assert finished == []
        release.set()
        broker.flush(WAIT)
        assert finished == [1]
    finally:
        release.set()
        broker.close()


def test_flush_without_queue_deliveries_returns_at_once() -> None:
    with MemoryBroker() as broker:
        seen: list[Message] = []
        broker.subscribe(Tick, seen.append)
        broker.publish(Tick(1))
        broker.flush(0.0)
        assert seen == [Tick(1)]


def test_memory_broker_passes_messages_by_reference() -> None:
    # MemoryBroker never serialises (docs/guarantees.md): handlers get the very object published.
    with MemoryBroker() as broker:
        seen: list[Message] = []
        broker.subscribe(Unpicklable, seen.append)
        message = Unpicklable()
        broker.publish(message)
        assert len(seen) == 1
        assert seen[0] is message


def test_a_memory_broker_closes_its_loop_thread() -> None:
    before = {thread.ident for thread in threading.enumerate()}
    broker = MemoryBroker()
    try:
        broker.subscribe_async(Tick, lambda m: None, "q")
        broker.publish(Tick(1))
        broker.flush(WAIT)
        started = [t for t in threading.enumerate() if t.ident not in before]
        names = [t.name for t in started if t.name == "ipcbus-memory-loop"]
        assert names == ["ipcbus-memory-loop"]
    finally:
        broker.close()
    wait_until(lambda: not any(t.is_alive() for t in started), WAIT)
    with pytest.raises(BrokerClosedError):
        broker.publish(Tick(2))


def _memory_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ipcbus-memory")]


def test_deliveries_on_a_publishers_loop_that_ends_are_handed_to_the_brokers_loop() -> None:
    done: list[int] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0.01)
        done.append(message.seq)

    async def main() -> None:
        for seq in range(5):
            broker.publish(Tick(seq))

    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, handler, "q")
        asyncio.run(main())  # returns before the deliveries ran: it cancels them
        broker.flush(WAIT)
        assert sorted(done) == [0, 1, 2, 3, 4]
        assert broker.undelivered == 0


def test_deliveries_on_a_closed_publishers_loop_are_handed_to_the_brokers_loop() -> None:
    done: list[int] = []

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0)
        done.append(message.seq)

    async def main() -> None:
        broker.publish(Tick(1))

    with MemoryBroker() as broker:
        broker.subscribe_async(Tick, handler, "q")
        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        loop.close()  # without running or cancelling the delivery
        broker.flush(WAIT)
        assert done == [1]


def test_flush_waits_for_deliveries_on_a_loop_of_another_thread() -> None:
    done: list[int] = []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()

    async def handler(message: Tick) -> None:
        await asyncio.sleep(0.05)
        done.append(message.seq)

    async def publish() -> None:
        broker.publish(Tick(7))

    try:
        with MemoryBroker() as broker:
            broker.subscribe_async(Tick, handler, "q")
            asyncio.run_coroutine_threadsafe(publish(), loop).result(WAIT)
            broker.flush(WAIT)
            assert done == [7]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def test_deliveries_lost_with_their_loop_after_close_are_counted_and_logged(
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    async def handler(message: Tick) -> None:
        await asyncio.Event().wait()  # until its loop ends

    async def main() -> None:
        broker.publish(Tick(1))
        broker.publish(Tick(2))
        await asyncio.sleep(0)
        broker.close()  # from this loop: it cannot wait for the deliveries on it

    broker = MemoryBroker()
    broker.subscribe_async(Tick, handler, "q")
    asyncio.run(main())
    assert broker.undelivered == 2
    assert sum("Tick" in r.getMessage() for r in errors_logged.records) == 2


@pytest.mark.parametrize("kind", ["plain", "coroutine"])
def test_close_from_a_queue_handler_returns_without_waiting_for_it(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipcbus")
    outcome: list[str] = []
    finished = threading.Event()
    broker = MemoryBroker(linger=1.0)

    def plain(message: Tick) -> None:
        try:
            broker.close()
        except BaseException as exc:
            outcome.append(repr(exc))
        else:
            outcome.append("closed")
        finished.set()

    async def coroutine(message: Tick) -> None:
        plain(message)

    broker.subscribe_async(Tick, plain if kind == "plain" else coroutine, "q")
    broker.publish(Tick(1))
    assert finished.wait(WAIT)
    assert outcome == ["closed"]
    assert broker.closed
    wait_until(lambda: not _memory_threads(), WAIT)
    # It did not wait out the linger for the very delivery that called it.
    assert [r.getMessage() for r in caplog.records] == []


# == NullBroker ===============================================================================


def test_null_broker_accepts_everything_and_delivers_nothing() -> None:
    received: list[Message] = []
    with NullBroker() as broker:
        broadcast = broker.subscribe(Tick, received.append)
        queued = broker.subscribe_async(Tick, received.append, "q")
        filtered = broker.subscribe(Tick, received.append, lambda m: True)
        assert all(isinstance(s, Subscription) for s in (broadcast, queued, filtered))
        for seq in range(3):
            broker.publish(Tick(seq))
        broker.publish(Unpicklable())
        broker.flush(0.0)
        broadcast.cancel()
        broadcast.cancel()
        assert not broadcast.active
        assert queued.active
    assert received == []
    assert broker.closed


def test_null_broker_still_checks_its_arguments() -> None:
    broker = NullBroker()
    with pytest.raises(TypeError, match="Message"):
        broker.publish({"seq": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Message subclass"):
        broker.subscribe(dict, print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handler"):
        broker.subscribe(Tick, "print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="predicate"):
        broker.subscribe(Tick, print, predicate=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="queue_name"):
        broker.subscribe_async(Tick, print, "")
    with pytest.raises(TypeError, match="Message subclass"):
        broker.subscribe_async(Tick(1), print, "q")  # type: ignore[arg-type]


def test_null_broker_refuses_use_after_close() -> None:
    broker = NullBroker()
    broker.close()
    broker.close()
    assert broker.closed
    with pytest.raises(BrokerClosedError):
        broker.publish(Tick(1))
    with pytest.raises(BrokerClosedError):
        broker.subscribe(Tick, print)
    with pytest.raises(BrokerClosedError):
        broker.subscribe_async(Tick, print, "q")
    with pytest.raises(TypeError):
        broker.publish("not a message")  # type: ignore[arg-type]


# -- TestBroker fails loudly --------------------------------------------------------------------


def test_a_failing_assert_in_a_handler_fails_process_messages() -> None:
    """By default a handler's exception propagates, so a failing assert fails the test; the
    note names the handler and the message."""
    broker = TestBroker()

    def check(message: OrderPlaced) -> None:
        assert message.amount > 0, "orders must have an amount"

    broker.subscribe(OrderPlaced, check)
    broker.publish(OrderPlaced(7, 0.0))
    with pytest.raises(AssertionError, match="orders must have an amount") as raised:
        broker.process_messages()
    notes = "\n".join(raised.value.__notes__)
    assert "check" in notes
    assert "OrderPlaced(order_id=7" in notes
    assert [failure.message for failure in broker.failures] == [OrderPlaced(7, 0.0)]


def test_a_failing_queue_handler_propagates_at_its_first_attempt() -> None:
    broker = TestBroker()
    calls: list[int] = []

    async def ship(message: OrderPlaced) -> None:
        calls.append(AsyncMessageContext.current().attempt)
        raise ValueError(f"cannot ship {message.order_id}")

    broker.subscribe_async(OrderPlaced, ship, "shipping")
    broker.publish(OrderPlaced(3))
    with pytest.raises(ValueError, match="cannot ship 3") as raised:
        broker.process_messages()
    assert calls == [1]
    assert "queue 'shipping', attempt 1" in "\n".join(raised.value.__notes__)
    assert not [m for m in broker.published if isinstance(m, DeadLetter)]


def test_messages_not_delivered_before_a_failure_stay_pending() -> None:
    broker = TestBroker()
    seen: list[int] = []

    def handle(message: OrderPlaced) -> None:
        if message.order_id == 2:
            raise RuntimeError("two")
        seen.append(message.order_id)

    broker.subscribe(OrderPlaced, handle)
    for order_id in (1, 2, 3):
        broker.publish(OrderPlaced(order_id))
    with pytest.raises(RuntimeError):
        broker.process_messages()
    assert seen == [1]
    assert broker.pending == 1
    assert broker.process_messages() == 1
    assert seen == [1, 3]


def test_collecting_failures_records_each_attempt_and_dead_letters() -> None:
    broker = TestBroker(fail_fast=False)

    def poison(message: OrderPlaced) -> None:
        raise ValueError("poison")

    broker.subscribe_async(OrderPlaced, poison, "q", max_attempts=3)
    broker.publish(OrderPlaced(9))
    assert broker.process_messages() == 3
    assert [(f.queue_name, f.attempt) for f in broker.failures] == [("q", 1), ("q", 2), ("q", 3)]
    dead = [m for m in broker.published if isinstance(m, DeadLetter)]
    assert [(d.message, d.attempts) for d in dead] == [(OrderPlaced(9), 3)]


def test_keyboard_interrupt_in_a_handler_always_propagates() -> None:
    broker = TestBroker(fail_fast=False)

    def interrupted(message: OrderPlaced) -> None:
        raise KeyboardInterrupt

    broker.subscribe_async(OrderPlaced, interrupted, "q")
    broker.publish(OrderPlaced(1))
    with pytest.raises(KeyboardInterrupt):
        broker.process_messages()


def test_a_broadcast_handler_returning_a_coroutine_fails_process_messages() -> None:
    broker = TestBroker()
    got: list[int] = []

    def traced(function: Any) -> Any:
        def wrapper(message: OrderPlaced) -> Any:
            return function(message)

        return wrapper

    @traced
    async def on_order(message: OrderPlaced) -> None:
        got.append(message.order_id)

    broker.subscribe(OrderPlaced, on_order)
    broker.publish(OrderPlaced(1))
    with pytest.raises(TypeError, match="subscribe_async") as raised:
        broker.process_messages()
    assert got == []
    assert "wrapper" in "\n".join(raised.value.__notes__)  # the handler subscribed


def test_the_rest_of_a_failing_messages_deliveries_stays_pending() -> None:
    broker = TestBroker()
    seen: list[str] = []

    def first(message: OrderPlaced) -> None:
        seen.append(f"first {message.order_id}")
        if message.order_id == 1:
            raise RuntimeError("one")

    broker.subscribe(OrderPlaced, first)
    broker.subscribe(OrderPlaced, lambda m: seen.append(f"second {m.order_id}"))
    broker.subscribe_async(OrderPlaced, lambda m: seen.append(f"queue a {m.order_id}"), "a")
    broker.subscribe_async(OrderPlaced, lambda m: seen.append(f"queue b {m.order_id}"), "b")
    broker.publish(OrderPlaced(1))
    broker.publish(OrderPlaced(2))
    with pytest.raises(RuntimeError, match="one"):
        broker.process_messages()
    assert seen == ["first 1"]
    assert broker.process_messages() == 3 + 4
    assert seen == [
        "first 1",
        "second 1",
        "queue a 1",
        "queue b 1",
        "first 2",
        "second 2",
        "queue a 2",
        "queue b 2",
    ]


def test_the_rest_of_a_messages_queue_groups_stays_pending_after_a_queue_failure() -> None:
    broker = TestBroker()
    seen: list[str] = []

    def failing(message: OrderPlaced) -> None:
        raise ValueError("a fails")

    broker.subscribe_async(OrderPlaced, failing, "a")
    broker.subscribe_async(OrderPlaced, lambda m: seen.append(f"b {m.order_id}"), "b")
    broker.publish(OrderPlaced(1))
    with pytest.raises(ValueError, match="a fails"):
        broker.process_messages()
    assert broker.pending == 1
    assert broker.process_messages() == 1
    assert seen == ["b 1"]
