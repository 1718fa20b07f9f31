"""Queue groups of NatsBroker when handlers and predicates misbehave, in one process or several
(a broker each): a ``BaseException`` from a handler, members that reject, a member cancelled
while it holds deliveries. Against a real ``nats-server -js``."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats
import pytest

from ipcbus import AsyncMessageContext, DeadLetter, Message
from ipcbus.message import get_unique_name_for_message
from ipcbus.nats import NatsBroker
from ipcbus.nats.subjects import consumer_name, stream_name

from .conftest import nats_idle, wait_until
from .messages import RAISED
from .natstools import SECRET, NatsServer

pytestmark = [pytest.mark.queue_groups, pytest.mark.usefixtures("no_leftovers")]


@dataclass(frozen=True)
class Job(Message):
    token: str
    seq: int = 0


@pytest.fixture
def open_broker(nats_server: NatsServer) -> Any:
    """Brokers on one namespace of the test's own, each closed after the test."""
    namespace = nats_server.namespace()
    opened: list[NatsBroker] = []

    def make() -> NatsBroker:
        broker = NatsBroker(nats_server.url, namespace=namespace, secret=SECRET)
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        broker.close()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["plain", "coroutine"])
def test_a_base_exception_in_a_queue_handler_is_a_failure_of_that_call(
    open_broker: Callable[[], NatsBroker], asynchronous: bool
) -> None:
    """It was let through to the handler loop's run_forever: no later message was handled,
    nothing dead-lettered, and close() raised 'Event loop is closed'."""
    broker = open_broker()
    handled: list[str] = []
    dead: list[DeadLetter] = []

    def handle(job: Job) -> None:
        if job.token in RAISED:
            raise RAISED[job.token](job.token)
        handled.append(job.token)

    async def handle_async(job: Job) -> None:
        handle(job)

    broker.subscribe(DeadLetter, dead.append)
    broker.subscribe_async(
        Job, handle_async if asynchronous else handle, "jobs", max_attempts=2, retry_backoff=0.01
    )
    for token in RAISED:
        broker.publish(Job(token))
    wait_until(lambda: len(dead) == len(RAISED), 20)
    for seq in range(5):
        broker.publish(Job("ok", seq))
    wait_until(lambda: len(handled) == 5, 20)
    broker.close()  # raised RuntimeError('Event loop is closed')
    assert sorted(letter.message.token for letter in dead) == sorted(RAISED)  # type: ignore[attr-defined]
    for letter in dead:
        assert letter.attempts == 2
        assert letter.error.startswith(f"{letter.message.token}: ")  # type: ignore[attr-defined]


def test_a_message_one_member_rejects_goes_to_a_member_in_another_process(
    open_broker: Callable[[], NatsBroker],
) -> None:
    """A rejection used up an attempt (JetStream counts deliveries): a fast member that rejects
    everything burnt the budget of what the slow one accepts, and the messages were dropped."""
    rejecting, accepting, publisher = open_broker(), open_broker(), open_broker()
    rejected: list[int] = []
    got: list[tuple[int, int]] = []

    def reject(job: Job) -> bool:
        rejected.append(job.seq)
        return False

    def handle(job: Job) -> None:
        time.sleep(0.005)
        got.append((job.seq, AsyncMessageContext.current().attempt))

    rejecting.subscribe_async(Job, lambda job: None, "g", predicate=reject)
    accepting.subscribe_async(Job, handle, "g", predicate=lambda job: True, prefetch=1)
    for seq in range(100):
        publisher.publish(Job("job", seq))
    publisher.flush(10)
    wait_until(lambda: nats_idle(accepting), 60)
    assert rejected, "the rejecting member had some"
    assert sorted(seq for seq, _ in got) == list(range(100))
    assert {attempt for _, attempt in got} == {1}, "a rejection is no attempt"


def test_a_message_every_member_rejects_is_dropped_after_each_process_had_it(
    open_broker: Callable[[], NatsBroker],
) -> None:
    first, second, publisher = open_broker(), open_broker(), open_broker()
    seen: dict[str, list[int]] = {"first": [], "second": []}

    def rejecter(name: str) -> Callable[[Job], bool]:
        def predicate(job: Job) -> bool:
            seen[name].append(job.seq)
            return False

        return predicate

    first.subscribe_async(Job, lambda job: None, "g", predicate=rejecter("first"))
    second.subscribe_async(Job, lambda job: None, "g", predicate=rejecter("second"))
    for seq in range(5):
        publisher.publish(Job("job", seq))
    publisher.flush(10)
    wait_until(lambda: nats_idle(first), 60)
    assert set(seen["first"]) == set(seen["second"]) == set(range(5))


def test_a_rejected_message_with_one_attempt_reaches_the_accepting_member(
    open_broker: Callable[[], NatsBroker],
) -> None:
    """With max_attempts=1 a rejection was the last delivery: never offered to another."""
    rejecting, accepting, publisher = open_broker(), open_broker(), open_broker()
    got: list[int] = []
    rejected: list[int] = []

    def reject(job: Job) -> bool:
        rejected.append(job.seq)
        return False

    rejecting.subscribe_async(Job, lambda job: None, "g", predicate=reject, max_attempts=1)
    accepting.subscribe_async(Job, lambda job: got.append(job.seq), "g", max_attempts=1, prefetch=1)
    for seq in range(20):
        publisher.publish(Job("job", seq))
    publisher.flush(10)
    wait_until(lambda: nats_idle(accepting), 60)
    assert rejected, "the rejecting member had some"
    assert sorted(got) == list(range(20))


@pytest.mark.parametrize("asynchronous", [False, True], ids=["plain", "coroutine"])
def test_a_cancelled_member_is_not_called_again(
    open_broker: Callable[[], NatsBroker], asynchronous: bool
) -> None:
    """Deliveries were bound to a member when fetched: after cancel() they still ran on it.
    What it had not begun goes back to the group, no attempt used, for a later member."""
    broker = open_broker()
    cancelled = threading.Event()
    late: list[int] = []
    started: list[int] = []

    def handle(job: Job) -> None:
        if cancelled.is_set():
            late.append(job.seq)
        started.append(job.seq)
        time.sleep(0.005)

    async def handle_async(job: Job) -> None:
        handle(job)  # blocks the loop: one at a time, as the plain ones run a few at a time

    subscription = broker.subscribe_async(Job, handle_async if asynchronous else handle, "g")
    for seq in range(300):
        broker.publish(Job("job", seq))
    broker.flush(10)
    wait_until(lambda: len(started) >= 10, 20)
    subscription.cancel()
    cancelled.set()
    handled = len(started)
    again: list[tuple[int, int]] = []
    broker.subscribe_async(
        Job, lambda job: again.append((job.seq, AsyncMessageContext.current().attempt)), "g"
    )
    wait_until(lambda: len(started) + len(again) >= 300, 30)
    wait_until(lambda: nats_idle(broker), 30)
    assert late == []
    assert sorted([*started, *(seq for seq, _ in again)]) == list(range(300))
    assert len(started) <= handled + 1  # at most the one under way at cancel()
    assert {attempt for _, attempt in again} == {1}


def test_unsigned_rejection_notes_change_no_attempt(
    nats_server: NatsServer, open_broker: Callable[[], NatsBroker]
) -> None:
    """Rejection notes lower a delivery's attempt (a rejection is no attempt); unsigned, anyone
    allowed to publish on the server could send them and keep a failing message from ever
    reaching its last attempt. Notes without the bus secret's signature are ignored."""
    broker = open_broker()
    calls: list[int] = []
    dead: list[DeadLetter] = []

    def fail(job: Job) -> None:
        calls.append(AsyncMessageContext.current().attempt)
        raise ValueError("always")

    broker.subscribe(DeadLetter, dead.append)
    broker.subscribe_async(Job, fail, "forged", max_attempts=3, retry_backoff=0.05)
    stream = stream_name(broker.namespace, get_unique_name_for_message(Job))
    subject = f"{broker.namespace}.rejected.{stream}.{consumer_name('forged')}"
    stop = threading.Event()

    async def forge() -> None:
        client = await nats.connect(nats_server.url)
        try:
            while not stop.is_set():
                for seq in range(1, 4):
                    await client.publish(subject, f"{seq} attacker".encode())
                await client.flush()
                await asyncio.sleep(0.005)
        finally:
            await client.close()

    forger = threading.Thread(target=lambda: asyncio.run(forge()))
    forger.start()
    try:
        broker.publish(Job("poison"))
        wait_until(lambda: len(dead) == 1, 30)
    finally:
        stop.set()
        forger.join(30)
    assert dead[0].attempts == 3
    assert calls == [1, 2, 3]
