"""Unit tests of a client's queue runner (ipcbus.client.runner) and its acks (ipcbus.client.acks).

Runs are handed over as the I/O thread hands them (a DELIVER body), and the acks are kept as the
I/O thread would send them: merged into ranges (``coalesce``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ipcbus import DeadLetter, Message, NullBroker
from ipcbus.client.acks import coalesce
from ipcbus.client.runner import QueueRunner
from ipcbus.core import codec
from ipcbus.core.contract import AsyncMessageContext, Subscription
from ipcbus.core.retry import QueuePolicy
from ipcbus.wire import protocol as wire
from ipcbus.wire.protocol import OUTCOME_DEAD, OUTCOME_FAILED, OUTCOME_OK, OUTCOME_REJECTED, Ack

from .conftest import wait_until
from .messages import Tick

pytestmark = pytest.mark.usefixtures("no_leftovers")

TOPIC = wire.topic_for("tests.messages.Tick")
STREAM = b"hub.1"


class Harness:
    """A runner, the subscriptions it knows, and what it answered."""

    def __init__(self) -> None:
        self.subscriptions: dict[bytes, Subscription] = {}
        self.sent: list[Ack] = []
        self.published: list[Message] = []
        self.deaths: list[str] = []
        self._lock = threading.Lock()
        self.runner = QueueRunner(
            self.subscriptions.get,
            self._send,
            self.published.append,
            lambda name, exc: self.deaths.append(name),
        )

    def _send(self, answers: list[Ack]) -> None:
        with self._lock:
            self.sent += answers

    def subscribe(
        self,
        handler: Callable[[Any], Any],
        predicate: Callable[[Any], bool] | None = None,
        max_attempts: int = 3,
    ) -> bytes:
        subscription_id = b"%d" % (len(self.subscriptions) + 1)
        policy = QueuePolicy(max_attempts=max_attempts, retry_backoff=0.5)
        self.subscriptions[subscription_id] = Subscription(
            NullBroker(), Tick, handler, predicate, "work", policy
        )
        return subscription_id

    def acks(self) -> list[Ack]:
        with self._lock:
            return coalesce(list(self.sent))

    def settled(self) -> int:
        return sum(ack.count for ack in self.acks())


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.runner.stop(10)
    assert made.deaths == []


def run_body(
    subscription_id: bytes, first_seq: int, payloads: list[bytes], attempt: int = 1
) -> list[bytes]:
    """A DELIVER body of one run of ``payloads`` (split Tick pickles)."""
    run = wire.Deliver(
        subscription_id,
        STREAM,
        first_seq,
        attempt,
        b"hub",
        40 + first_seq,
        TOPIC,
        wire.pack_meta(codec.SPLIT_DATACLASS, len(payloads), 123.5),
        wire.pack_sizes(map(len, payloads)),
        b"".join(payloads),
    )
    body: list[bytes] = wire.deliver(b"id", [run])[2:]
    return body


def ticks(*seqs: int) -> list[bytes]:
    _codec, (sizes, payloads) = codec.encode_split(Tick, [Tick(seq) for seq in seqs])
    return [bytes(part) for part in wire.split_payloads(sizes, payloads)]


def test_a_run_runs_in_order_on_one_thread_and_is_acked_in_one_entry(harness: Harness) -> None:
    seen: list[tuple[int, int, str, int]] = []

    def handle(message: Tick) -> None:
        context = AsyncMessageContext.current()
        seen.append((message.seq, threading.get_ident(), context.message_id, context.attempt))

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(50)), attempt=2))
    assert harness.runner.wait_idle(10)
    harness.runner.flush_acks()
    assert [seq for seq, _, _, _ in seen] == list(range(50))
    assert len({thread for _, thread, _, _ in seen}) == 1
    assert [message_id for _, _, message_id, _ in seen] == [f"hub-{41 + n}" for n in range(50)]
    assert {attempt for _, _, _, attempt in seen} == {2}
    assert harness.acks() == [Ack(STREAM, 1, 50, OUTCOME_OK)]


def test_failures_rejections_and_dead_letters_are_answered_apart(harness: Harness) -> None:
    def handle(message: Tick) -> None:
        if message.seq in (3, 7):
            raise ValueError(f"poison {message.seq}")

    subscription_id = harness.subscribe(handle, predicate=lambda m: m.seq != 5)
    last_try = harness.subscribe(handle, max_attempts=2)
    payloads = ticks(*range(10))
    payloads[8] = b"not a pickle"
    harness.runner.submit(run_body(subscription_id, 1, payloads))
    harness.runner.submit(run_body(last_try, 11, ticks(7), attempt=2))
    assert harness.runner.wait_idle(10)
    harness.runner.flush_acks()
    acks = harness.acks()
    assert [(ack.first, ack.last, ack.outcome) for ack in acks] == [
        (1, 3, OUTCOME_OK),
        (4, 4, OUTCOME_FAILED),
        (5, 5, OUTCOME_OK),
        (6, 6, OUTCOME_REJECTED),
        (7, 7, OUTCOME_OK),
        (8, 8, OUTCOME_FAILED),
        (9, 9, OUTCOME_DEAD),
        (10, 10, OUTCOME_OK),
        (11, 11, OUTCOME_DEAD),
    ]
    assert acks[1].error == "ValueError: poison 3"
    assert acks[1].retry_delay == 0.5
    assert acks[6].error.startswith("undecodable: ")
    assert harness.runner.undecodable == 1
    (letter,) = harness.published
    assert isinstance(letter, DeadLetter)
    assert (letter.message, letter.attempts) == (Tick(7), 2)


def test_a_run_for_a_cancelled_subscription_is_rejected_whole(harness: Harness) -> None:
    calls: list[int] = []
    subscription_id = harness.subscribe(lambda message: calls.append(message.seq))
    harness.subscriptions[subscription_id].cancel()
    harness.runner.submit(run_body(subscription_id, 5, ticks(1, 2, 3)))
    harness.runner.submit(run_body(b"unknown", 9, ticks(4)))
    assert harness.runner.wait_idle(10)
    assert harness.acks() == [
        Ack(STREAM, 5, 7, OUTCOME_REJECTED),
        Ack(STREAM, 9, 9, OUTCOME_REJECTED),
    ]
    assert calls == []


def test_slow_handlers_are_shared_by_the_worker_threads(harness: Harness) -> None:
    """A handler that waits (I/O, a sleep) must not hold up the rest of its run: the other
    workers take parts of it, as they took one message each before runs."""
    threads: set[int] = set()

    def handle(message: Tick) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.005)

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(40))))
    assert harness.runner.wait_idle(20)
    harness.runner.flush_acks()
    assert len(threads) > 1
    assert harness.acks() == [Ack(STREAM, 1, 40, OUTCOME_OK)]  # each once, none left out
    # Known slow now: the next run is shared from its start.
    threads.clear()
    harness.runner.submit(run_body(subscription_id, 41, ticks(*range(8))))
    assert harness.runner.wait_idle(20)
    assert len(threads) > 1


def test_a_long_run_of_fast_handlers_acks_as_it_goes(harness: Harness) -> None:
    acked_during: list[int] = []

    def handle(message: Tick) -> None:
        if message.seq == 1999:
            acked_during.append(harness.settled())

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(2000))))
    assert harness.runner.wait_idle(20)
    harness.runner.flush_acks()
    assert harness.acks() == [Ack(STREAM, 1, 2000, OUTCOME_OK)]
    # 2 000 handler calls take well over the ack period (~1 ms) anywhere: the hub got its
    # credit back before the run ended.
    assert acked_during[0] > 0


def test_coroutine_handlers_run_as_tasks_and_are_acked(harness: Harness) -> None:
    running = 0
    most = 0

    async def handle(message: Tick) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        if message.seq == 4:
            raise ValueError("four")

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(10))))
    assert harness.runner.wait_idle(10)
    wait_until(lambda: harness.settled() == 10, 10)
    assert [(ack.first, ack.last, ack.outcome) for ack in harness.acks()] == [
        (1, 4, OUTCOME_OK),
        (5, 5, OUTCOME_FAILED),
        (6, 10, OUTCOME_OK),
    ]
    assert most == 10  # concurrently, a task each


def test_a_run_stopped_midway_leaves_the_rest_to_the_hub(harness: Harness) -> None:
    """close() from a handler stops the runner: the rest of the run is not handled (the hub
    hands it to another consumer after the goodbye)."""
    seen: list[int] = []

    def handle(message: Tick) -> None:
        seen.append(message.seq)
        if message.seq == 2:
            harness.runner.stop(5)

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(10))))
    wait_until(lambda: harness.settled() == 3, 10)
    time.sleep(0.05)
    assert seen == [0, 1, 2]
    assert harness.acks() == [Ack(STREAM, 1, 3, OUTCOME_OK)]


def test_waiting_for_idle_from_a_handler_does_not_wait_for_its_own_run(harness: Harness) -> None:
    """close() in a handler waits for the deliveries in hand, except those of its own thread:
    the rest of its run cannot go on before the handler returns."""
    idle: list[bool] = []

    def handle(message: Tick) -> None:
        if message.seq == 3:
            idle.append(harness.runner.wait_idle(5))

    subscription_id = harness.subscribe(handle)
    harness.runner.submit(run_body(subscription_id, 1, ticks(*range(10))))
    assert harness.runner.wait_idle(10)
    assert idle == [True]


def test_coalesce_merges_neighbouring_answers_of_one_stream_and_outcome() -> None:
    answers = [
        Ack(b"s", 4, 6, OUTCOME_OK),
        Ack(b"t", 1, 1, OUTCOME_OK),
        Ack(b"s", 1, 3, OUTCOME_OK),
        Ack(b"s", 7, 7, OUTCOME_FAILED, 0.5, "E"),
        Ack(b"s", 8, 8, OUTCOME_FAILED, 0.5, "E"),
        Ack(b"s", 9, 9, OUTCOME_FAILED, 0.5, "other"),
        Ack(b"s", 11, 12, OUTCOME_OK),
        Ack(b"t", 2, 2, OUTCOME_REJECTED),
    ]
    assert coalesce(answers) == [
        Ack(b"s", 1, 6, OUTCOME_OK),
        Ack(b"s", 7, 8, OUTCOME_FAILED, 0.5, "E"),
        Ack(b"s", 9, 9, OUTCOME_FAILED, 0.5, "other"),
        Ack(b"s", 11, 12, OUTCOME_OK),  # 10 is not theirs to answer
        Ack(b"t", 1, 1, OUTCOME_OK),
        Ack(b"t", 2, 2, OUTCOME_REJECTED),
    ]
    assert coalesce([]) == []
