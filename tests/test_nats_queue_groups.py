"""Queue groups of NatsBroker across processes: real consumer processes, kill -9, a real
``nats-server -js`` (the NATS counterparts of tests/test_queue_groups.py)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, DeadLetter, QueueInUseError
from ipcbus.nats import NatsBroker

from .conftest import wait_until
from .hubtools import BarrierWaiter, reap
from .messages import Tick
from .natstools import SECRET, NatsServer

pytestmark = [
    pytest.mark.forks,
    pytest.mark.queue_groups,
    pytest.mark.usefixtures("no_leftovers"),
]

SPAWN: Any = multiprocessing.get_context("spawn")
GROUP = "tests.messages.Tick:work"


def _consume(
    url: str,
    namespace: str,
    secret: str,
    queue_name: str,
    log_path: str,
    ready: Any,
    stop: Any,
    delay: float,
    prefetch: int,
    max_attempts: int = 3,
) -> None:
    """Consumer process: appends "seq attempt" to its log when a handler completes; returns
    when the parent sends on or closes ``stop``."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Tick) -> None:
        if delay:
            threading_wait(delay)  # the work; a kill -9 lands in the middle of it
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%d %d\n" % (message.seq, attempt))  # one O_APPEND write: atomic

    # ack_wait 1 s: a delivery of a killed consumer comes back after a second, not 30.
    broker = NatsBroker(url, namespace=namespace, secret=secret, ack_wait=1.0)
    broker.subscribe_async(Tick, handle, queue_name, prefetch=prefetch, max_attempts=max_attempts)
    ready.set()
    stop.poll(300)
    broker.close()
    os.close(log)


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


class Consumers:
    """Consumer processes of one queue group, each logging to its own file."""

    def __init__(self, server: NatsServer, namespace: str, directory: Path, queue: str) -> None:
        self.server = server
        self.namespace = namespace
        self.directory = directory
        self.queue_name = queue
        self.processes: list[Any] = []

    def start(
        self,
        delay: float = 0.0,
        prefetch: int = 10,
        name: str | None = None,
        max_attempts: int = 3,
    ) -> Any:
        ready = SPAWN.Event()
        stop, child_stop = SPAWN.Pipe()
        log = self.directory / f"{name or len(self.processes)}-{self.queue_name}.log"
        process = SPAWN.Process(
            target=_consume,
            args=(
                self.server.url,
                self.namespace,
                SECRET,
                self.queue_name,
                str(log),
                ready,
                child_stop,
                delay,
                prefetch,
                max_attempts,
            ),
            daemon=True,
        )
        process.start()
        child_stop.close()
        process.log = log  # type: ignore[attr-defined]
        process.stop = stop  # type: ignore[attr-defined]
        self.processes.append(process)
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
def namespace(nats_server: NatsServer) -> str:
    return nats_server.namespace()


def _producer(server: NatsServer, namespace: str) -> NatsBroker:
    return NatsBroker(server.url, namespace=namespace, secret=SECRET)


def test_load_is_balanced_and_every_group_gets_every_message(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    count = 3000
    work = Consumers(nats_server, namespace, tmp_path, "work")
    audit = Consumers(nats_server, namespace, tmp_path, "audit")
    try:
        members = [work.start() for _ in range(3)]
        audit.start()
        with _producer(nats_server, namespace) as producer:
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


@pytest.mark.slow
def test_consumers_killed_mid_handler_lose_nothing(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """SIGKILL consumers in the middle of handlers, again and again, while 2 000 messages are
    published: every message is still processed to completion at least once."""
    count, rounds = 2000, 10
    per_round = count // rounds
    consumers = Consumers(nats_server, namespace, tmp_path, "work")
    rng = random.Random(7)
    kills = 0
    try:
        for _ in range(3):
            consumers.start(delay=0.002)
        with _producer(nats_server, namespace) as producer:
            producer.declare_queue(Tick, "work")  # exists already: its statistics, here
            for round_ in range(rounds):
                for seq in range(round_ * per_round, (round_ + 1) * per_round):
                    producer.publish(Tick(seq))
                producer.flush(30)
                victim = rng.choice([p for p in consumers.processes if p.is_alive()])
                before = len(consumers.entries(victim))
                wait_until(lambda v=victim, b=before: len(consumers.entries(v)) > b, 30)
                os.kill(victim.pid, signal.SIGKILL)
                victim.join(10)
                kills += 1
                consumers.start(delay=0.002)
            wait_until(lambda: len(consumers.done()) == count, 120)
            wait_until(lambda: producer.statistics().queues[GROUP].in_flight == 0, 30)
            group = producer.statistics().queues[GROUP]
    finally:
        consumers.close()
    entries = consumers.entries()
    assert kills == rounds
    assert consumers.done() == set(range(count)), "lost messages"
    assert group.held == 0
    redelivered_done = sum(1 for _, attempt in entries if attempt > 1)
    assert redelivered_done > 0, "kills mid-handler must cause redeliveries"
    print(
        f"\nNATS crash test: {kills} kills, {count} messages, {len(entries) - count} duplicate "
        f"completions, {redelivered_done} completed on a later attempt, lost 0"
    )


def _always_fails(message: Tick) -> None:
    raise ValueError(f"poison {message.seq}")


def _poison_consumer(url: str, namespace: str, secret: str, ready: Any, stop: Any) -> None:
    with NatsBroker(url, namespace=namespace, secret=secret) as broker:
        broker.subscribe_async(Tick, _always_fails, "poison", max_attempts=4, retry_backoff=0.01)
        ready.set()
        stop.wait(60)


def test_a_poison_message_is_tried_max_attempts_times_then_dead_lettered(
    nats_server: NatsServer, namespace: str
) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    consumer = SPAWN.Process(
        target=_poison_consumer, args=(nats_server.url, namespace, SECRET, ready, stop)
    )
    consumer.start()
    try:
        assert ready.wait(60)
        with _producer(nats_server, namespace) as broker:
            dead: list[DeadLetter] = []
            broker.subscribe(DeadLetter, dead.append)
            broker.publish(Tick(13))
            broker.flush(10)
            wait_until(lambda: len(dead) == 1, 30)
            BarrierWaiter(broker).wait(broker, 10)
    finally:
        stop.set()
        hung = reap([consumer])
    assert hung == []
    assert dead == [DeadLetter("poison", Tick(13), 4, "ValueError: poison 13")]


def test_a_declared_queue_keeps_jobs_for_workers_that_start_later(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    with _producer(nats_server, namespace) as producer:
        producer.declare_queue(Tick, "work")
        for seq in range(1000):
            producer.publish(Tick(seq))
        producer.flush(30)
        assert producer.statistics().queues[GROUP].held == 1000
    consumers = Consumers(nats_server, namespace, tmp_path, "work")
    try:
        worker = consumers.start(name="late")
        wait_until(lambda: len(consumers.entries(worker)) >= 1000, 60)
    finally:
        consumers.close()
    assert sorted(seq for seq, _ in consumers.entries(worker)) == list(range(1000))


def test_a_group_with_a_member_in_another_process_is_not_deleted(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    consumers = Consumers(nats_server, namespace, tmp_path, "work")
    with _producer(nats_server, namespace) as producer:
        try:
            member = consumers.start(name="member")
            with pytest.raises(QueueInUseError, match="work"):
                producer.delete_queue(Tick, "work")
            consumers.stop(member)
            assert member.exitcode == 0
        finally:
            consumers.close()
        for seq in range(5):
            producer.publish(Tick(seq))
        producer.flush(10)
        assert producer.delete_queue(Tick, "work") == 5
        assert producer.delete_queue(Tick, "work") == 0
        producer.publish(Tick(6))  # no stream stores the type any more
        producer.flush(10)
        assert producer.statistics().store_failures == 0


def test_a_fast_consumer_takes_most_work_from_a_slow_one_with_prefetch_one(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    consumers = Consumers(nats_server, namespace, tmp_path, "work")
    try:
        slow = consumers.start(delay=0.05, prefetch=1, name="slow")
        fast = consumers.start(delay=0.0, prefetch=1, name="fast")
        with _producer(nats_server, namespace) as producer:
            for seq in range(300):
                producer.publish(Tick(seq))
            producer.flush(30)
        wait_until(lambda: len(consumers.done()) == 300, 60)
    finally:
        consumers.close()
    slow_share, fast_share = len(consumers.entries(slow)), len(consumers.entries(fast))
    assert slow_share + fast_share == 300
    assert fast_share > 4 * slow_share, f"fast {fast_share}, slow {slow_share}"


def test_a_last_attempt_that_died_with_its_process_is_dead_lettered(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """max_attempts=1 and the consumer is killed in its handler: the message is not silently
    ended at JetStream's max_deliver but comes back once more, and is dead-lettered."""
    consumers = Consumers(nats_server, namespace, tmp_path, "work")
    try:
        with _producer(nats_server, namespace) as producer:
            dead: list[DeadLetter] = []
            producer.subscribe(DeadLetter, dead.append)
            doomed = consumers.start(delay=60.0, max_attempts=1, name="doomed")
            producer.declare_queue(Tick, "work")  # exists: for its statistics here
            producer.publish(Tick(1))
            producer.flush(10)
            wait_until(lambda: producer.statistics().queues[GROUP].in_flight == 1, 20)
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.join(10)
            heir = consumers.start(max_attempts=1, name="heir")
            wait_until(lambda: dead != [], 30)
            wait_until(lambda: producer.statistics().queues[GROUP].in_flight == 0, 20)
    finally:
        consumers.close()
    assert consumers.entries(heir) == [], "the dead letter is not handled again"
    assert dead == [
        DeadLetter(
            "work",
            Tick(1),
            1,
            "ConsumerDiedError: the process that ran its last attempt died before acknowledging it",
        )
    ]
