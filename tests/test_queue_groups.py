"""Queue groups across processes (docs/guarantees.md): real consumer processes, kill -9, on
both brokers that serve groups across processes: a hub, and NatsBroker on a real
``nats-server -js`` (one suite: the same cases, the same answers). What only one of them has is
at the end, and in tests/test_nats_queue_groups.py."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from ipcbus import Broker, DeadLetter, Hub, HubBroker
from ipcbus.nats import NatsBroker

from .conftest import nats_idle, queues_idle, wait_until
from .hubtools import reap
from .messages import Tick
from .natstools import SECRET
from .queue_workers import SPAWN, Consumers, HubSpec, NatsSpec, Spec

pytestmark = [
    pytest.mark.forks,
    pytest.mark.queue_groups,
    pytest.mark.usefixtures("no_leftovers"),
]


@dataclass
class Backend:
    """A broker the shared cases run on. JetStream acknowledges each message on its own, so the
    NATS cases publish fewer (``scale`` divides the counts)."""

    spec: Spec
    scale: int
    kill_rounds: int
    hub: Hub | None = None

    def producer(self) -> Broker:
        return self.spec.connect()

    def idle(self, producer: Broker) -> bool:
        """Nothing held, nothing waiting for an ack."""
        if isinstance(self.spec, HubSpec):
            return queues_idle(self.spec.address)
        return nats_idle(cast(NatsBroker, producer))


@pytest.fixture(params=[pytest.param("hub", marks=pytest.mark.hub), "nats"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "hub":
        # Kill -9 detection: a consumer silent for 1 s is gone, its deliveries go to others.
        with Hub(heartbeat_interval=0.2, heartbeat_timeout=1.0) as hub:
            yield Backend(HubSpec(hub.address), scale=1, kill_rounds=25, hub=hub)
    else:
        server = request.getfixturevalue("nats_server")
        yield Backend(NatsSpec(server.url, server.namespace(), SECRET), scale=3, kill_rounds=10)


def test_load_is_balanced_and_every_group_gets_every_message(
    backend: Backend, tmp_path: Path
) -> None:
    count = 10_000 // backend.scale
    work = Consumers(backend.spec, tmp_path, "work")
    audit = Consumers(backend.spec, tmp_path, "audit")
    try:
        members = [work.start() for _ in range(3)]
        audit.start()
        with backend.producer() as producer:
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


def test_consumers_killed_mid_handler_lose_nothing(backend: Backend, tmp_path: Path) -> None:
    """SIGKILL consumers in the middle of handlers, again and again, while messages are
    published: every message is still processed to completion at least once. (NatsBroker
    counts a delivery whose consumer died as an attempt, docs/guarantees.md: with 3 attempts, a
    message in the hands of three victims in a row was dead-lettered, 2 of 1 660 in one CI run.
    The consumers get an attempt per kill, so none runs out.)"""
    rounds = backend.kill_rounds
    per_round = 5000 // backend.scale // rounds
    count = per_round * rounds
    consumers = Consumers(backend.spec, tmp_path)
    rng = random.Random(7)
    kills = 0
    attempts = rounds + 1
    try:
        for _ in range(3):
            consumers.start(delay=0.002, max_attempts=attempts)
        with backend.producer() as producer:
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
                consumers.start(delay=0.002, max_attempts=attempts)
            wait_until(lambda: len(consumers.done()) == count, 120)
            wait_until(lambda: backend.idle(producer), 30)  # nothing held or unacked left
    finally:
        consumers.close()
    entries = consumers.entries()
    assert kills == rounds
    assert consumers.done() == set(range(count)), "lost messages"
    redelivered_done = sum(1 for _, attempt in entries if attempt > 1)
    assert redelivered_done > 0, "kills mid-handler must cause redeliveries"
    if backend.hub is not None:
        statistics = backend.hub.statistics()
        assert statistics.queues["tests.messages.Tick/work"]["redelivered"] > 0
        assert statistics.clients_lost >= kills
    print(
        f"\ncrash test ({type(backend.spec).__name__}): {kills} kills, {count} messages, "
        f"{len(entries) - count} duplicate completions, {redelivered_done} completed on a "
        "later attempt, lost 0"
    )


def _always_fails(message: Tick) -> None:
    raise ValueError(f"poison {message.seq}")


def _poison_consumer(spec: Spec, ready: Any, stop: Any) -> None:
    with spec.connect() as broker:
        broker.subscribe_async(Tick, _always_fails, "poison", max_attempts=4, retry_backoff=0.01)
        ready.set()
        stop.wait(60)


def test_a_poison_message_is_tried_max_attempts_times_then_dead_lettered(
    backend: Backend,
) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    consumer = SPAWN.Process(target=_poison_consumer, args=(backend.spec, ready, stop))
    consumer.start()
    try:
        assert ready.wait(60)
        with backend.producer() as broker:
            dead: list[DeadLetter] = []
            broker.subscribe(DeadLetter, dead.append)
            broker.publish(Tick(13))
            broker.flush(10)
            wait_until(lambda: len(dead) == 1, 30)
            wait_until(lambda: backend.idle(broker), 30)
    finally:
        stop.set()
        hung = reap([consumer])
    assert hung == []
    assert dead == [DeadLetter("poison", Tick(13), 4, "ValueError: poison 13")]
    if backend.hub is not None:  # the hub keeps the record, and counts
        statistics = backend.hub.statistics()
        group = statistics.queues["tests.messages.Tick/poison"]
        assert group["delivered"] == 4
        assert group["retried"] == 3
        assert group["dead_lettered"] == 1
        assert group["dead_letters_kept"] == 1
        (record,) = statistics.dead_letters["tests.messages.Tick/poison"]
        assert record["attempts"] == 4
        assert record["error"] == "ValueError: poison 13"


def test_a_fast_consumer_takes_most_work_from_a_slow_one_with_prefetch_one(
    backend: Backend, tmp_path: Path
) -> None:
    consumers = Consumers(backend.spec, tmp_path)
    try:
        slow = consumers.start(delay=0.05, prefetch=1, name="slow")
        fast = consumers.start(delay=0.0, prefetch=1, name="fast")
        with backend.producer() as producer:
            for seq in range(300):
                producer.publish(Tick(seq))
            producer.flush(30)
        wait_until(lambda: len(consumers.done()) == 300, 60)
    finally:
        consumers.close()
    slow_share, fast_share = len(consumers.entries(slow)), len(consumers.entries(fast))
    assert slow_share + fast_share == 300
    assert fast_share > 4 * slow_share, f"fast {fast_share}, slow {slow_share}"


# -- the hub only ------------------------------------------------------------------------------


@pytest.fixture
def queue_hub() -> Iterator[Hub]:
    with Hub(heartbeat_interval=0.2, heartbeat_timeout=1.0) as hub:
        yield hub


@pytest.mark.hub
def test_messages_wait_for_an_absent_consumer(queue_hub: Hub, tmp_path: Path) -> None:
    consumers = Consumers(HubSpec(queue_hub.address), tmp_path)
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


@pytest.mark.hub
def test_a_consumer_killed_by_sigterm_returns_its_deliveries_at_once(tmp_path: Path) -> None:
    """SIGTERM (unhandled) ends a worker without a goodbye; the hub notices the closed
    connection and redelivers what the worker held long before any heartbeat timeout."""
    with Hub(heartbeat_timeout=60.0) as hub:
        consumers = Consumers(HubSpec(hub.address), tmp_path)
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
