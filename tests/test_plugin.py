"""The pytest plugin, used as a user's project would use it: test files in a fresh directory,
run by pytest in a subprocess (``pytester``), also under ``pytest --forked``
(docs/testing.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

# Message types the user's tests share, importable in spawned workers (pytester puts the test
# directory on sys.path of the run; the workers inherit it through PYTHONPATH below).
MESSAGES = """
from dataclasses import dataclass
from ipcbus import Message

@dataclass(frozen=True)
class Order(Message):
    order_id: int
    amount: float = 0.0

@dataclass(frozen=True)
class Shipped(Message):
    order_id: int
"""

HANDLERS = """
from ipcbus import Consumer, get_message_broker
from user_messages import Order, Shipped

orders = Consumer(Order)

@orders.on_message(predicate=lambda m: m.amount > 0)
def ship(message: Order) -> None:
    get_message_broker().publish(Shipped(message.order_id))
"""

USER_TESTS = """
import os
import threading

import pytest

from ipcbus import Consumer, HubBroker, TestBroker, get_message_broker
from user_messages import Order, Shipped
import user_handlers  # module-level Consumer declarations


def test_the_test_broker_runs_module_consumers(ipcbus_test_broker):
    assert get_message_broker() is ipcbus_test_broker
    ipcbus_test_broker.publish(Order(1, 10.0))
    ipcbus_test_broker.publish(Order(2, 0.0))
    assert ipcbus_test_broker.process_messages() == 1
    assert Shipped(1) in ipcbus_test_broker.published


def test_a_failing_assert_in_a_handler_fails_the_test(ipcbus_test_broker):
    def check(message):
        assert message.amount < 5, "too big"

    ipcbus_test_broker.subscribe(Order, check)
    ipcbus_test_broker.publish(Order(3, 9.0))
    ipcbus_test_broker.process_messages()


def test_a_consumer_declared_in_a_test(ipcbus_test_broker):
    seen = []
    Consumer(Shipped).on_message(lambda m: seen.append(m.order_id))
    ipcbus_test_broker.publish(Shipped(5))
    ipcbus_test_broker.process_messages()
    assert seen == [5]


def test_the_consumer_of_the_previous_test_is_gone(ipcbus_test_broker):
    ipcbus_test_broker.publish(Shipped(6))
    assert ipcbus_test_broker.process_messages() == 0


def test_the_hub_broker_is_the_process_broker(ipcbus_broker, ipcbus_hub):
    assert isinstance(ipcbus_broker, HubBroker)
    assert get_message_broker() is ipcbus_broker
    assert ipcbus_broker.address == ipcbus_hub.address
    got = threading.Event()
    ipcbus_broker.subscribe(Shipped, lambda m: got.set())
    ipcbus_broker.publish(Order(7, 1.0))  # user_handlers.ship republishes it as Shipped
    assert got.wait(20)


def publish_orders(count):
    broker = get_message_broker()
    for order_id in range(count):
        broker.publish(Order(order_id, 1.0))
    broker.flush(20)
    return os.getpid()


def fail_in_worker():
    raise ValueError("failed in the worker")


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_worker_publishes_to_the_test(ipcbus_broker, ipcbus_worker, start_method):
    received = []
    done = threading.Event()

    def on_order(message):
        received.append(message.order_id)
        if len(received) == 20:
            done.set()

    ipcbus_broker.subscribe(Order, on_order)
    pid = ipcbus_worker(publish_orders, 20, start_method=start_method)
    assert pid != os.getpid()
    assert done.wait(20)
    assert received == list(range(20))


def test_a_worker_exception_is_raised_here_with_its_traceback(ipcbus_worker):
    with pytest.raises(ValueError, match="failed in the worker") as raised:
        ipcbus_worker(fail_in_worker)
    assert "fail_in_worker" in str(raised.value.__cause__)


def test_a_lambda_runs_in_a_worker(ipcbus_worker):
    assert ipcbus_worker(lambda a, b: a * b, 6, 7) == 42


def test_a_worker_past_its_timeout_is_killed(ipcbus_worker):
    import time

    with pytest.raises(TimeoutError):
        ipcbus_worker(time.sleep, 60, timeout=1.0)


def test_the_session_hub_serves(ipcbus_session_hub):
    with HubBroker(ipcbus_session_hub.address) as broker:
        got = threading.Event()
        broker.subscribe(Shipped, lambda m: got.set())
        broker.publish(Shipped(1))
        assert got.wait(20)
"""


@pytest.fixture
def scratch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The run's temporary directory (the hubs' private directories go there), checked empty
    afterwards. Short: socket paths in it (the forkserver's too) must fit AF_UNIX's limit."""
    directory = Path(tempfile.mkdtemp(prefix="ipb-"))
    monkeypatch.setenv("TMPDIR", str(directory))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def user_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makepyfile(user_messages=MESSAGES, user_handlers=HANDLERS, test_user=USER_TESTS)
    # Spawned workers import the user's modules by name.
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    return pytester


def _hub_directories(scratch: Path) -> list[str]:
    return sorted(path.name for path in scratch.iterdir() if "ipcbus" in path.name)


@pytest.mark.parametrize("forked", [False, True], ids=["plain", "forked"])
def test_a_user_suite_uses_every_fixture(
    user_project: pytest.Pytester, scratch: Path, forked: bool
) -> None:
    args = ["-p", "no:cacheprovider", "-v"] + (["--forked"] if forked else [])
    result = user_project.runpytest_subprocess(*args, timeout=240)
    outcomes = result.parseoutcomes()
    # Every test passes but the one whose handler assert fails: that one must fail.
    assert outcomes.get("failed") == 1, result.stdout.str()
    assert outcomes.get("passed") == 11, result.stdout.str()
    result.stdout.fnmatch_lines(["*test_a_failing_assert_in_a_handler_fails_the_test FAILED*"])
    result.stdout.fnmatch_lines(["*AssertionError: too big*"])
    # The fixtures leave no hub directory behind (their sockets, keys and locks are in it).
    assert _hub_directories(scratch) == []


def test_the_fixtures_are_registered_by_the_entry_point(pytester: pytest.Pytester) -> None:
    """A fresh directory with no conftest: the fixtures come from the installed package."""
    result = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    for name in (
        "ipcbus_hub",
        "ipcbus_session_hub",
        "ipcbus_broker",
        "ipcbus_test_broker",
        "ipcbus_worker",
        "ipcbus_isolated",
    ):
        result.stdout.fnmatch_lines([f"{name}*"])


def test_the_hub_start_method_is_configurable(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nipcbus_hub_start_method = fork\n")
    pytester.makepyfile(
        test_fork="""
import multiprocessing

def test_hub(ipcbus_hub):
    assert ipcbus_hub._start_method == "fork"
    assert ipcbus_hub.statistics().pid == ipcbus_hub.pid
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_no_environment_variable_is_left_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_env="""
import os

def test_uses_a_hub(ipcbus_hub):
    assert os.environ["IPCBUS_ADDRESS"] == ipcbus_hub.address

def test_after(request):
    assert "IPCBUS_ADDRESS" not in os.environ
"""
    )
    env_before = os.environ.pop("IPCBUS_ADDRESS", None)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    finally:
        if env_before is not None:
            os.environ["IPCBUS_ADDRESS"] = env_before
    result.assert_outcomes(passed=2)
