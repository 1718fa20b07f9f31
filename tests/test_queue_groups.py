"""Queue groups across processes (docs/guarantees.md): real consumer processes, kill -9."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, DeadLetter, Hub, HubBroker, connect

from .conftest import wait_until
from .hubtools import reap
from .messages import Barrier, Tick

pytestmark = [
    pytest.mark.hub,
    pytest.mark.forks,
    pytest.mark.queue_groups,
    pytest.mark.usefixtures("no_leftovers"),
]

SPAWN: Any = multiprocessing.get_context("spawn")


def _consume(
    address: str,
    queue_name: str,
    log_path: str,
    ready: Any,
    stop: Any,
    delay: float,
    prefetch: int,
) -> None:
    """``stop`` is this process's end of a pipe: it returns when the parent sends or closes."""
    """Consumer process: appends "seq attempt" to its log when a handler completes."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Tick) -> None:
        if delay:
            time.sleep(delay)  # the work; a kill -9 lands in the middle of it
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%d %d\n" % (message.seq, attempt))  # one O_APPEND write: atomic

    broker = connect(address)
    broker.subscribe_async(Tick, handle, queue_name, prefetch=prefetch)
    ready.set()
    stop.poll(300)
    broker.close()
    os.close(log)


class Consumers:
    """Starts consumer processes of one queue group, each logging to its own file."""

    def __init__(self, address: str, directory: Path, queue_name: str = "work") -> None:
        self.address = address
        self.directory = directory
        self.queue_name = queue_name
        # One pipe per process, not a shared Event: setting a multiprocessing.Event waits for
        # every sleeper to wake, and a consumer killed while waiting never does.
        self.processes: list[Any] = []

    def start(self, delay: float = 0.0, prefetch: int = 10, name: str | None = None) -> Any:
        ready = SPAWN.Event()
        stop, child_stop = SPAWN.Pipe()
        log = self.directory / f"{name or len(self.processes)}-{self.queue_name}.log"
        process = SPAWN.Process(
            target=_consume,
            args=(self.address, self.queue_name, str(log), ready, child_stop, delay, prefetch),
            daemon=True,
        )
        process.start()
        child_stop.close()
        process.log = log  # type: ignore[attr-defined]
        process.stop = stop  # type: ignore[attr-defined]
        self.processes.append(process)  # before waiting: close() stops it whatever happens
        assert ready.wait(60), "consumer did not subscribe in time"
        return process

    def entries(self, process: Any | None = None) -> list[tuple[int, int]]:
        paths = [process.log] if process else self.directory.glob(f"*-{self.queue_name}.log")
        found = []
        for path in paths:
            if Path(path).exists():
                for line in Path(path).read_text().splitlines():
                    seq, attempt = line.split()
                    found.append((int(seq), int(attempt)))
        return found

    def done(self) -> set[int]:
        return {seq for seq, _ in self.entries()}

    def stop(self, process: Any) -> None:
        process.stop.close()
        process.join(30)

    def close(self) -> None:
        for process in self.processes:
            process.stop.close()
        reap(self.processes)


@pytest.fixture
def queue_hub() -> Any:
    # Kill -9 detection: a consumer silent for 1 s is gone and its deliveries go to others.
    with Hub(heartbeat_interval=0.2, heartbeat_timeout=1.0) as hub:
        yield hub


def test_load_is_balanced_and_every_group_gets_every_message(
    queue_hub: Hub, tmp_path: Path
) -> None:
    count = 10_000
    work = Consumers(queue_hub.address, tmp_path, "work")
    audit = Consumers(queue_hub.address, tmp_path, "audit")
    try:
        members = [work.start() for _ in range(3)]
        audit.start()
        with HubBroker(queue_hub.address) as producer:
            for seq in range(count):
                producer.publish(Tick(seq))
            producer.flush(60)
        wait_until(lambda: len(work.entries()) >= count and len(audit.entries()) >= count, 120)
    finally:
        work.close()
        audit.close()
    assert sorted(seq for seq, _ in work.entries()) == list(range(count)), "each exactly once"
    assert sorted(seq for seq, _ in audit.entries()) == list(range(count))
    shares = [len(work.entries(member)) for member in members]
    assert all(share > 0 for share in shares), f"every member takes a share: {shares}"


def test_consumers_killed_mid_handler_lose_nothing(queue_hub: Hub, tmp_path: Path) -> None:
    """SIGKILL consumers in the middle of handlers, again and again, while 5 000 messages are
    published: every message is still processed to completion at least once."""
    count, rounds = 5000, 25
    per_round = count // rounds
    consumers = Consumers(queue_hub.address, tmp_path)
    rng = random.Random(7)
    kills = 0
    try:
        for _ in range(3):
            consumers.start(delay=0.002)
        with HubBroker(queue_hub.address) as producer:
            for round_ in range(rounds):
                for seq in range(round_ * per_round, (round_ + 1) * per_round):
                    producer.publish(Tick(seq))
                producer.flush(30)
                # Kill a consumer that is busy with this round's messages, then replace it.
                victim = rng.choice([p for p in consumers.processes if p.is_alive()])
                before = len(consumers.entries(victim))
                wait_until(lambda v=victim, b=before: len(consumers.entries(v)) > b, 30)
                os.kill(victim.pid, signal.SIGKILL)
                victim.join(10)
                kills += 1
                consumers.start(delay=0.002)
        wait_until(lambda: len(consumers.done()) == count, 120)
        statistics = queue_hub.statistics()
    finally:
        consumers.close()
    entries = consumers.entries()
    assert kills >= 20
    assert consumers.done() == set(range(count)), "lost messages"
    group = statistics.queues["tests.messages.Tick/work"]
    assert group["redelivered"] > 0, "kills mid-handler must cause redeliveries"
    assert statistics.clients_lost >= kills
    redelivered_done = sum(1 for _, attempt in entries if attempt > 1)
    print(
        f"\ncrash test: {kills} kills, {count} messages, {group['redelivered']} redeliveries, "
        f"{len(entries) - count} duplicate completions, {redelivered_done} completed on a "
        f"later attempt, lost 0"
    )


def _always_fails(message: Tick) -> None:
    raise ValueError(f"poison {message.seq}")


def _poison_consumer(address: str, ready: Any, stop: Any) -> None:
    with connect(address) as broker:
        broker.subscribe_async(Tick, _always_fails, "poison", max_attempts=4, retry_backoff=0.01)
        ready.set()
        stop.wait(60)


def test_a_poison_message_is_tried_max_attempts_times_then_dead_lettered(
    queue_hub: Hub,
) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    consumer = SPAWN.Process(target=_poison_consumer, args=(queue_hub.address, ready, stop))
    consumer.start()
    try:
        assert ready.wait(60)
        with HubBroker(queue_hub.address) as broker:
            dead: list[DeadLetter] = []
            broker.subscribe(DeadLetter, dead.append)
            broker.publish(Tick(13))
            broker.flush(10)
            wait_until(lambda: len(dead) == 1, 30)
            broker.publish(Barrier("after"))
            broker.flush(10)
            statistics = queue_hub.statistics()
    finally:
        stop.set()
        hung = reap([consumer])
    assert hung == []
    assert dead == [DeadLetter("poison", Tick(13), 4, "ValueError: poison 13")]
    group = statistics.queues["tests.messages.Tick/poison"]
    assert group["delivered"] == 4
    assert group["retried"] == 3
    assert group["dead_lettered"] == 1
    assert group["dead_letters_kept"] == 1
    (record,) = statistics.dead_letters["tests.messages.Tick/poison"]
    assert record["attempts"] == 4
    assert record["error"] == "ValueError: poison 13"


def test_messages_wait_for_an_absent_consumer(queue_hub: Hub, tmp_path: Path) -> None:
    consumers = Consumers(queue_hub.address, tmp_path)
    try:
        first = consumers.start(name="first")
        consumers.stop(first)  # the only consumer leaves; the group stays
        assert first.exitcode == 0
        with HubBroker(queue_hub.address) as producer:
            for seq in range(1000):
                producer.publish(Tick(seq))
            producer.flush(30)
        held = queue_hub.statistics().queues["tests.messages.Tick/work"]["held"]
        assert held == 1000
        second = consumers.start(name="second")
        wait_until(lambda: len(consumers.entries(second)) >= 1000, 60)
    finally:
        consumers.close()
    assert sorted(seq for seq, _ in consumers.entries(second)) == list(range(1000))


def test_a_fast_consumer_takes_most_work_from_a_slow_one_with_prefetch_one(
    queue_hub: Hub, tmp_path: Path
) -> None:
    consumers = Consumers(queue_hub.address, tmp_path)
    try:
        slow = consumers.start(delay=0.05, prefetch=1, name="slow")
        fast = consumers.start(delay=0.0, prefetch=1, name="fast")
        with HubBroker(queue_hub.address) as producer:
            for seq in range(300):
                producer.publish(Tick(seq))
            producer.flush(30)
        wait_until(lambda: len(consumers.done()) == 300, 60)
    finally:
        consumers.close()
    slow_share, fast_share = len(consumers.entries(slow)), len(consumers.entries(fast))
    assert slow_share + fast_share == 300
    assert fast_share > 4 * slow_share, f"fast {fast_share}, slow {slow_share}"


def test_a_consumer_killed_by_sigterm_returns_its_deliveries_at_once(tmp_path: Path) -> None:
    """SIGTERM (unhandled) ends a worker without a goodbye; the hub notices the closed
    connection and redelivers what the worker held long before any heartbeat timeout."""
    with Hub(heartbeat_timeout=60.0) as hub:
        consumers = Consumers(hub.address, tmp_path)
        try:
            doomed = consumers.start(delay=30.0, prefetch=1, name="doomed")
            with HubBroker(hub.address) as producer:
                producer.publish(Tick(1))
                producer.flush(10)
                group = "tests.messages.Tick/work"
                wait_until(lambda: hub.statistics().queues[group]["in_flight"] == 1, 10)
                survivor = consumers.start(name="survivor")
                doomed.terminate()  # SIGTERM
                doomed.join(10)
                started = time.monotonic()
                wait_until(lambda: consumers.entries(survivor) == [(1, 2)], 10)
                returned_after = time.monotonic() - started
        finally:
            consumers.close()
    assert returned_after < 5.0, f"redelivered only after {returned_after:.1f} s (timeout 60 s)"
