from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Broker, Hub, HubBroker, MemoryBroker, TestBroker
from ipcbus.client.admin import request_statistics
from ipcbus.config import ENV_ADDRESS, HubOptions
from ipcbus.nats import NatsBroker
from ipcbus.testing import isolated_registry

from .hubtools import BarrierWaiter, SplitBroker, Workers
from .natstools import SECRET, NatsServer, require_nats_server

pytest_plugins = ["pytester"]


class Harness:
    """A broker under contract test, plus the one thing brokers do differently: when delivery
    has happened. ``settle()`` returns once every handler call caused by what was published so far
    (retries included) has finished."""

    def __init__(self, kind: str, broker: Broker) -> None:
        self.kind = kind
        self.broker = broker
        self._barrier: BarrierWaiter | None = None
        if isinstance(broker, HubBroker | NatsBroker):
            self._barrier = BarrierWaiter(broker)
        elif isinstance(broker, SplitBroker):
            self._barrier = BarrierWaiter(broker.local)

    def settle(self, timeout: float = 20.0) -> int | None:
        if isinstance(self.broker, TestBroker):
            return self.broker.process_messages()
        self.broker.flush(timeout)
        if isinstance(self.broker, NatsBroker):
            assert self._barrier is not None
            self._barrier.wait(self.broker, timeout)
            wait_until(lambda: nats_idle(self.broker), timeout)  # type: ignore[arg-type]
            return None
        if self._barrier is not None:
            self._barrier.wait(self.broker, timeout)
            wait_until(lambda: queues_idle(self.address), timeout)
        return None

    @property
    def address(self) -> str:
        broker = self.broker.local if isinstance(self.broker, SplitBroker) else self.broker
        assert isinstance(broker, HubBroker)
        return broker.address

    @property
    def serialises(self) -> bool:
        """MemoryBroker never serialises, so it need not reject unpicklable messages."""
        return not isinstance(self.broker, MemoryBroker)

    @property
    def runs_handlers_in_caller(self) -> bool:
        """TestBroker runs handlers (and serialises their replies) in the thread that calls
        ``process_messages()``: there ``SystemExit`` and ``KeyboardInterrupt`` on the main
        thread end the program, by design (ipcbus.core.failures)."""
        return isinstance(self.broker, TestBroker)


# "hub": publisher and subscribers share one HubBroker; "hub-split": they are in two processes;
# "nats": one NatsBroker on the session's nats-server.
BROKER_KINDS = ["memory", "test", "hub", "hub-split", "nats"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One ``nats-server -js`` for the session; each test takes a namespace of its own
    (``nats_server.namespace()``), so its streams and groups start empty."""
    with NatsServer(require_nats_server()) as server:
        yield server


def nats_idle(broker: NatsBroker) -> bool:
    """No queue group of ``broker`` holds a message or waits for an ack, and its handlers hold
    nothing: asked twice, so that a delivery given back in between is not missed."""
    for _ in range(2):
        statistics = broker.statistics()
        if statistics.in_hand or any(q.held or q.in_flight for q in statistics.queues.values()):
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session")
def hub() -> Iterator[Hub]:
    """One hub process for the session (forked test processes connect to it too)."""
    with Hub() as running:
        yield running


def _ipcbus_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ipcbus-") and t.is_alive()}


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """After the test: no new child process (a session hub is one from before), no new ipcbus
    thread, no socket file in tmp_path; IPCBUS_ADDRESS as it was (Hub.start() and connect() set
    it when unset). Modules that start processes use it through ``usefixtures``."""
    children_before = set(multiprocessing.active_children())
    threads_before = _ipcbus_threads()
    saved_address = os.environ.get(ENV_ADDRESS)
    yield
    if saved_address is None:
        os.environ.pop(ENV_ADDRESS, None)
    else:
        os.environ[ENV_ADDRESS] = saved_address
    children = [p for p in multiprocessing.active_children() if p not in children_before]
    for child in children:
        child.kill()
        child.join(10)
    assert children == [], f"child processes left running: {children}"
    threads = _ipcbus_threads() - threads_before
    assert threads == set(), f"ipcbus threads left running: {threads}"
    sockets = [p for p in tmp_path.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]
    assert sockets == [], f"socket files left behind: {sockets}"


@pytest.fixture(scope="session", autouse=True)
def no_tcp_key_directory_left() -> Iterator[None]:
    """tcp hubs keep their key files in a per-user directory of the temporary directory; the
    tests remove their key files, and this removes the directory if the session created it."""
    directory = os.path.join(tempfile.gettempdir(), f"ipcbus-{os.getuid()}")
    existed = os.path.isdir(directory)
    before = set(os.listdir(directory)) if existed else set()
    yield
    if not os.path.isdir(directory):
        return
    # A stopped hub leaves its lock file (removing a lock file others may flock is a race,
    # server/claim.py), and NatsBroker its default key file: the session's own go now.
    for name in set(os.listdir(directory)) - before:
        if name.endswith(".lock") or name == "nats.key":
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
    if not existed:
        with contextlib.suppress(OSError):  # not empty: something else uses it
            os.rmdir(directory)


@pytest.fixture(scope="session", autouse=True)
def no_spool_directory_left() -> Iterator[None]:
    """Hubs on ipc:// make their spool under the default root (/dev/shm) and remove it when
    they stop; a hub the tests kill -9 leaves its directory for the next hub to sweep. The
    session sweeps those of its own (their flock is free), and the per-user directory if it
    made it."""
    root = HubOptions().spool
    if root is None:
        yield
        return
    base = os.path.join(root, f"ipcbus-{os.getuid()}")
    existed = os.path.isdir(base)
    before = set(os.listdir(base)) if existed else set()
    yield
    if not os.path.isdir(base):
        return
    for name in set(os.listdir(base)) - before:
        path = os.path.join(base, name)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a hub still serves there (not the session's)
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
    if not existed:
        with contextlib.suppress(OSError):
            os.rmdir(base)


@pytest.fixture
def fresh_hub() -> Iterator[Hub]:
    """A hub of the test's own: queue groups live as long as their hub and hold messages for
    absent consumers, so tests that use them must not share one. Forked: it starts in ~10 ms."""
    with Hub(start_method="fork") as running:
        yield running


@pytest.fixture(params=BROKER_KINDS)
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    kind = request.param
    broker: Broker
    if kind == "memory":
        broker = MemoryBroker()
    elif kind == "test":
        broker = TestBroker(fail_fast=False)  # the contract: handler failures are isolated
    elif kind == "nats":
        server = request.getfixturevalue("nats_server")
        broker = NatsBroker(server.url, namespace=server.namespace(), secret=SECRET)
    else:
        address = request.getfixturevalue("fresh_hub").address
        broker = HubBroker(address) if kind == "hub" else SplitBroker(address)
    try:
        yield Harness(kind, broker)
    finally:
        broker.close()


@pytest.fixture(autouse=True)
def isolated() -> Iterator[None]:
    """Each test starts with no process broker and leaves the Consumer declarations it made
    (the public API the ipcbus_isolated fixture of the plugin uses too)."""
    with isolated_registry():
        yield


def queues_idle(address: str) -> bool:
    """The hub holds no queue message and waits for no ack (every handler call has finished)."""
    queues = request_statistics(address).queues
    return all(q["held"] == 0 and q["in_flight"] == 0 for q in queues.values())


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


@pytest.fixture
def raw_peers() -> Iterator[Any]:
    """Raw ZeroMQ peers of a hub (test_security.RawPeers: with or without the secret), all
    closed afterwards."""
    from .test_security import RawPeers

    peers = RawPeers()
    try:
        yield peers
    finally:
        peers.close()


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Spawned worker processes of the test (see hubtools.Workers), all stopped afterwards."""
    started = Workers()
    try:
        yield started
    finally:
        started.close()
