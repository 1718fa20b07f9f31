"""Fork, spawn and forkserver children of a process with a live HubBroker
(docs/architecture.md, "Fork")."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from ipcbus import (
    BrokerClosedError,
    Hub,
    HubBroker,
    connect,
    get_message_broker,
    set_message_broker,
)

from .conftest import wait_until
from .hubtools import reap
from .messages import Ping, Pong, Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]


def _wait_for_child(pid: int, timeout: float) -> int:
    """waitpid with a deadline; SIGKILL and fail past it. Returns the exit status code."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child {pid} hung")
        time.sleep(0.01)


def _forked_child_body(index: int, parent_broker: HubBroker, write_fd: int) -> None:
    report: dict[str, Any] = {"index": index}
    broker = get_message_broker()
    report["own_broker"] = broker is not parent_broker and isinstance(broker, HubBroker)
    try:
        parent_broker.publish(Tick(-1, "from-child-through-parent"))
        report["parent_refused"] = False
    except BrokerClosedError:
        report["parent_refused"] = True
    received = threading.Event()
    name = f"child-{index}"
    broker.subscribe(Tick, lambda m: received.set(), lambda m: m.source == name)
    broker.publish(Tick(index, name))
    report["received_own"] = received.wait(20)
    broker.close()
    os.write(write_fd, json.dumps(report).encode())


def test_fifty_os_fork_children_each_get_their_own_broker(hub: Hub) -> None:
    parent_broker = HubBroker(hub.address)
    set_message_broker(parent_broker)
    seen: list[Tick] = []
    parent_broker.subscribe(Tick, seen.append)
    # Keep the parent's I/O and dispatch threads busy while it forks: a child must cope with
    # being forked in the middle of a publish.
    stop = threading.Event()
    background = 0

    def publish_in_background() -> None:
        nonlocal background
        while not stop.is_set():
            parent_broker.publish(Tick(background, "parent-background"))
            background += 1

    publisher = threading.Thread(target=publish_in_background)
    publisher.start()
    children: list[tuple[int, int]] = []
    try:
        for index in range(50):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                status = 1  # any exception in the child is a non-zero exit status
                try:
                    os.close(read_fd)
                    _forked_child_body(index, parent_broker, write_fd)
                    status = 0
                finally:
                    os._exit(status)
            os.close(write_fd)
            children.append((pid, read_fd))
        reports = []
        statuses = []
        while children:
            pid, read_fd = children.pop(0)
            with os.fdopen(read_fd, "rb") as pipe:
                statuses.append(_wait_for_child(pid, 60))
                reports.append(json.loads(pipe.read() or b"{}"))
        stop.set()
        publisher.join(30)
        assert statuses == [0] * 50
        assert len(reports) == 50
        for report in reports:
            assert report.get("own_broker") is True, report
            assert report.get("parent_refused") is True, report
            assert report.get("received_own") is True, report
        # The parent keeps working, and got what every child published through its own broker.
        parent_broker.publish(Tick(0, "after"))
        parent_broker.flush(30)
        wait_until(lambda: any(m.source == "after" for m in seen), 30)
        from_children = sorted(m.seq for m in seen if m.source.startswith("child-"))
        assert from_children == list(range(50))
        assert not any(m.source == "from-child-through-parent" for m in seen)
        background_seqs = [m.seq for m in seen if m.source == "parent-background"]
        assert background_seqs == list(range(background)), "parent lost or reordered while forking"
    finally:
        stop.set()
        publisher.join(30)
        for pid, read_fd in children:  # only after a failure: reap and close what is left
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                os.close(read_fd)
        parent_broker.close()


def _ping_worker(address: str, installed_by_parent: bool, ready: Any, stop: Any) -> None:
    """Worker: a module-level Consumer (tests.workers) answers Ping with Pong."""
    if installed_by_parent:
        get_message_broker()  # a forked child: its own broker to the parent's hub
    else:
        assert os.environ.get("IPCBUS_ADDRESS") == address, "children find the hub by the env"
        set_message_broker(connect())
    from . import workers  # noqa: F401 - declares the Consumer, which binds at once

    ready.set()
    stop.wait(120)
    get_message_broker().close()


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_children_bind_consumers_and_talk_through_the_hub(
    hub: Hub, start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IPCBUS_ADDRESS", hub.address)
    context: Any = multiprocessing.get_context(start_method)
    broker = HubBroker(hub.address)
    set_message_broker(broker)
    pongs: list[Pong] = []
    broker.subscribe(Pong, pongs.append)
    stop = context.Event()
    workers = []
    try:
        for _ in range(3):
            ready = context.Event()
            worker = context.Process(
                target=_ping_worker, args=(hub.address, start_method == "fork", ready, stop)
            )
            worker.start()
            workers.append(worker)
            assert ready.wait(60), f"{start_method} worker did not start"
        broker.publish(Ping(start_method))
        wait_until(lambda: len(pongs) >= 3, 30)
    finally:
        stop.set()
        hung = reap(workers)
        broker.close()
    assert hung == []
    assert {p.pid for p in pongs if p.token == start_method} == {w.pid for w in workers}
    assert len(pongs) == 3
    assert [w.exitcode for w in workers] == [0, 0, 0]


_FORK_AND_EXIT = """
import os, sys
from ipcbus import Hub, connect, set_message_broker, get_message_broker
from tests.messages import Tick

if __name__ == "__main__":
    with Hub() as hub:
        broker = connect(hub.address)
        set_message_broker(broker)
        pid = os.fork()
        if pid == 0:  # a careless child: publishes, then returns the usual way (atexit runs)
            get_message_broker().publish(Tick(1, "child"))
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        print("hub alive", hub._process is not None and hub._process.is_alive())
        broker.publish(Tick(2, "parent"))
        broker.flush(20)
        print("parent flushed")
        broker.close()
"""


def test_a_forked_child_that_exits_normally_leaves_its_parents_hub_running() -> None:
    """multiprocessing's exit handler in an os.fork() child terminated the daemonic processes
    it inherited in its list of children: the parent's hub (found by an adversarial review)."""
    script = subprocess.Popen(
        [sys.executable, "-c", _FORK_AND_EXIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        start_new_session=True,  # on a hang, its hub and forked child go with it
    )
    try:
        stdout, stderr = script.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(script.pid, signal.SIGKILL)
        stdout, stderr = script.communicate()
    assert stdout.splitlines() == ["child 0", "hub alive True", "parent flushed"], stdout + stderr
    assert script.returncode == 0, stderr
