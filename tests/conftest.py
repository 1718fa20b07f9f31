from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ipcbus import Broker, MemoryBroker, TestBroker, _registry


class Harness:
    """A broker under contract test, plus the one thing brokers do differently: when delivery
    has happened. ``settle()`` returns once every handler call caused by what was published so far
    (retries included) has finished."""

    def __init__(self, kind: str, broker: Broker) -> None:
        self.kind = kind
        self.broker = broker

    def settle(self, timeout: float = 10.0) -> int | None:
        if isinstance(self.broker, TestBroker):
            return self.broker.process_messages()
        self.broker.flush(timeout)
        return None

    @property
    def serialises(self) -> bool:
        """MemoryBroker never serialises, so it need not reject unpicklable messages."""
        return not isinstance(self.broker, MemoryBroker)


BROKER_KINDS = ["memory", "test"]


def make_broker(kind: str) -> Broker:
    if kind == "memory":
        return MemoryBroker()
    if kind == "test":
        return TestBroker()
    raise ValueError(kind)


@pytest.fixture(params=BROKER_KINDS)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    broker = make_broker(request.param)
    try:
        yield Harness(request.param, broker)
    finally:
        broker.close()


@pytest.fixture(autouse=True)
def isolated_registry() -> Iterator[None]:
    """Each test starts with no process broker and leaves the Consumer declarations it made."""
    saved = _registry._current
    _registry._current = None
    with _registry.isolated_consumers():
        yield
    _registry._current = saved


def wait_until(
    condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005
) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.ERROR, logger="ipcbus")
    return caplog
