"""The ipcbus pytest plugin, registered through the ``pytest11`` entry point: installing ipcbus
makes these fixtures available to every test suite (docs/testing.md).

- ``ipcbus_hub``: a private hub for the test, stopped afterwards (``ipcbus_session_hub``: one
  for the whole session). Nothing is left behind: no process, socket, directory or environment
  variable.
- ``ipcbus_broker``: a ``HubBroker`` connected to ``ipcbus_hub``, installed as the process broker
  for the test and closed afterwards.
- ``ipcbus_test_broker``: a ``TestBroker`` installed as the process broker for the test.
- ``ipcbus_worker``: ``ipcbus_worker(function, *args, start_method="spawn", timeout=60.0)`` runs
  ``function(*args)`` in a worker process whose process broker is connected to ``ipcbus_hub``,
  and returns its result or raises its exception (with the worker's traceback).
- ``ipcbus_isolated``: no process broker during the test, and ``Consumer`` declarations made in
  the test forgotten afterwards (the broker fixtures include it).

The start method of the hubs is the ini option ``ipcbus_hub_start_method`` (default ``spawn``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from .config import ENV_ADDRESS

R = TypeVar("R")

_START_METHOD = "ipcbus_hub_start_method"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _START_METHOD,
        "start method of the hubs of the ipcbus fixtures: spawn, fork or forkserver",
        default="spawn",
    )


def _start_hub(config: pytest.Config) -> Iterator[Any]:
    from .hub import Hub

    saved = os.environ.get(ENV_ADDRESS)
    hub = Hub(start_method=str(config.getini(_START_METHOD)))
    try:
        with hub:
            yield hub
    finally:
        # Hub.start() sets IPCBUS_ADDRESS when it is unset: a stopped hub's address must not
        # outlive it in this process.
        if saved is None:
            os.environ.pop(ENV_ADDRESS, None)
        else:
            os.environ[ENV_ADDRESS] = saved


@pytest.fixture
def ipcbus_hub(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A hub of this test's own (``ipcbus.Hub``), stopped after it."""
    yield from _start_hub(request.config)


@pytest.fixture(scope="session")
def ipcbus_session_hub(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One hub for the whole session (queue groups live as long as their hub: tests that use
    groups may prefer ``ipcbus_hub``)."""
    yield from _start_hub(request.config)


@pytest.fixture
def ipcbus_isolated() -> Iterator[None]:
    """No process broker inside the test; afterwards the previous one is back and the
    ``Consumer`` declarations made in the test are forgotten."""
    from .core.registry import isolated_registry

    with isolated_registry():
        yield


@pytest.fixture
def ipcbus_broker(ipcbus_hub: Any, ipcbus_isolated: None) -> Iterator[Any]:
    """A ``HubBroker`` connected to ``ipcbus_hub``, this process's broker during the test."""
    from .client.broker import HubBroker
    from .core.registry import override_message_broker

    with HubBroker(ipcbus_hub.address) as broker, override_message_broker(broker):
        yield broker


@pytest.fixture
def ipcbus_test_broker(ipcbus_isolated: None) -> Iterator[Any]:
    """A ``TestBroker``, this process's broker during the test (module-level ``Consumer``
    declarations bind to it): publish, then ``process_messages()``."""
    from .brokers.testing import TestBroker
    from .core.registry import override_message_broker

    with TestBroker() as broker, override_message_broker(broker):
        yield broker


@pytest.fixture
def ipcbus_worker(ipcbus_hub: Any) -> Callable[..., Any]:
    """Run a function in a worker process connected to ``ipcbus_hub``; see ``run_in_worker``."""
    from .testing import run_in_worker

    def run(
        function: Callable[..., R],
        *args: Any,
        start_method: str = "spawn",
        timeout: float | None = 60.0,
    ) -> R:
        return run_in_worker(
            function, *args, address=ipcbus_hub.address, start_method=start_method, timeout=timeout
        )

    return run
