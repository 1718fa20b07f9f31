"""Queue groups of NatsBroker across processes, what only NatsBroker has: real consumer
processes, kill -9, a real ``nats-server -js``. The cases both brokers share are in
tests/test_queue_groups.py, run on each."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from ipcbus import DeadLetter, QueueInUseError
from ipcbus.nats import NatsBroker

from .conftest import wait_until
from .messages import Tick
from .natstools import SECRET, NatsServer
from .queue_workers import Consumers, NatsSpec

pytestmark = [
    pytest.mark.forks,
    pytest.mark.queue_groups,
    pytest.mark.usefixtures("no_leftovers"),
]

GROUP = "tests.messages.Tick:work"


@pytest.fixture
def namespace(nats_server: NatsServer) -> str:
    return nats_server.namespace()


def _producer(server: NatsServer, namespace: str) -> NatsBroker:
    return NatsBroker(server.url, namespace=namespace, secret=SECRET)


def _consumers(server: NatsServer, namespace: str, directory: Path) -> Consumers:
    return Consumers(NatsSpec(server.url, namespace, SECRET), directory)


def test_a_declared_queue_keeps_jobs_for_workers_that_start_later(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    with _producer(nats_server, namespace) as producer:
        producer.declare_queue(Tick, "work")
        for seq in range(1000):
            producer.publish(Tick(seq))
        producer.flush(30)
        assert producer.statistics().queues[GROUP].held == 1000
    consumers = _consumers(nats_server, namespace, tmp_path)
    try:
        worker = consumers.start(name="late")
        wait_until(lambda: len(consumers.entries(worker)) >= 1000, 60)
    finally:
        consumers.close()
    assert sorted(seq for seq, _ in consumers.entries(worker)) == list(range(1000))


def test_a_group_with_a_member_in_another_process_is_not_deleted(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    consumers = _consumers(nats_server, namespace, tmp_path)
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


def test_a_last_attempt_that_died_with_its_process_is_dead_lettered(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """max_attempts=1 and the consumer is killed in its handler: the message is not silently
    ended at JetStream's max_deliver but comes back once more, and is dead-lettered."""
    consumers = _consumers(nats_server, namespace, tmp_path)
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
