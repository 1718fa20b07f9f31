"""Queue groups of NatsBroker when handlers and predicates misbehave, in one process or several
(a broker each): a ``BaseException`` from a handler, members that reject, a member cancelled
while it holds deliveries. Against a real ``nats-server -js``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ipcbus import DeadLetter, Message
from ipcbus.nats import NatsBroker

from .conftest import wait_until
from .natstools import SECRET, NatsServer

pytestmark = [pytest.mark.queue_groups, pytest.mark.usefixtures("no_leftovers")]


@dataclass(frozen=True)
class Job(Message):
    token: str
    seq: int = 0


class Boom(BaseException):
    """A BaseException subclass of the user's own."""


RAISED: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "Boom": Boom,
    "CancelledError": asyncio.CancelledError,
}


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
