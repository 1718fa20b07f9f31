"""Issue 9, the hub's share: no silent loss, no hang (docs/guarantees.md).

- acks never cross a hub restart: delivery ids are unique across hubs, stale acks are counted;
- a retry policy at its extremes (no backoff, a thousand attempts) finishes, nothing stuck;
- a full queue group holds back its own topic only, and can be deleted;
- what the stall_timeout policy drops is counted exactly, per subscriber, in messages;
- the hub's per-topic sequence table keeps only topics someone subscribes to.

Unit tests on the hub's pure parts sit next to the cross-process tests that prove the same
behaviour between real processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, Hub, HubBroker, connect
from ipcbus.server.queues import QueueBook
from ipcbus.wire import protocol as wire

from .conftest import wait_until
from .messages import Ping

pytestmark = [pytest.mark.usefixtures("no_leftovers")]

SPAWN: Any = multiprocessing.get_context("spawn")
# A client silent for 1 s is gone (and a hub silent for 1 s is gone for its clients).
HEARTBEAT: dict[str, float] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
START_TIMEOUT = 60.0
PING_TOPIC = wire.topic_for("tests.messages.Ping")


# -- worker processes ------------------------------------------------------------------------


class Workers:
    """Spawned worker processes; each gets a ready pipe and a stop pipe of its own."""

    def __init__(self) -> None:
        self.processes: list[Any] = []

    def start(self, target: Callable[..., None], *args: Any) -> Any:
        ready, child_ready = SPAWN.Pipe(duplex=False)
        child_stop, stop = SPAWN.Pipe(duplex=False)
        process = SPAWN.Process(target=target, args=(*args, child_ready, child_stop), daemon=True)
        process.start()
        child_ready.close()
        child_stop.close()
        self.processes.append(process)
        process.stop_pipe = stop
        try:
            assert ready.poll(START_TIMEOUT), f"{target.__name__} did not start"
            assert ready.recv() == "ready"
        finally:
            ready.close()
        return process

    def stop(self, process: Any, timeout: float = 30.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # in case the test left it stopped
        process.stop_pipe.close()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(10)

    def close(self) -> None:
        for process in self.processes:
            self.stop(process)


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    try:
        yield started
    finally:
        started.close()


def _log_line(log: int, *fields: object) -> None:
    """One ``O_APPEND`` write per line: atomic, readable by the parent at any time."""
    os.write(log, " ".join(str(field) for field in fields).encode() + b"\n")


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def _gated_ping_consumer(
    address: str,
    log_path: str,
    gate_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer of Ping in group "work": logs ``start``/``done`` with token and attempt;
    the handler of token ``m1`` finishes only once ``gate_path`` exists."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Ping) -> None:
        attempt = AsyncMessageContext.current().attempt
        _log_line(log, "start", message.token, attempt)
        if message.token == "m1":
            deadline = time.monotonic() + 120
            while not os.path.exists(gate_path) and time.monotonic() < deadline:
                time.sleep(0.01)
        _log_line(log, "done", message.token, attempt)

    broker = connect(address)
    broker.subscribe_async(Ping, handle, "work", prefetch=1)
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


def _stuck_ping_consumer(
    address: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer of Ping in group "work" whose handler never finishes (until it is
    killed): what it holds must go to another consumer when it dies."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Ping) -> None:
        _log_line(log, "start", message.token, AsyncMessageContext.current().attempt)
        stop.poll(300)

    broker = connect(address)
    broker.subscribe_async(Ping, handle, "work", prefetch=1)
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


# -- case 2: acks across a hub restart -------------------------------------------------------


def _one_delivery(book: QueueBook, identity: bytes) -> bytes:
    book.add_consumer(PING_TOPIC, "work", (identity, b"1"), prefetch=10)
    book.enqueue(PING_TOPIC, b"meta", [b"payload"])
    (delivery,) = book.dispatch(time.monotonic())
    return delivery.delivery_id


def test_an_ack_from_another_hub_settles_nothing_and_is_counted_stale() -> None:
    old, new = QueueBook(b"0123456789abcdef"), QueueBook(b"fedcba9876543210")
    old_id = _one_delivery(old, b"consumer-a")
    new_id = _one_delivery(new, b"consumer-b")
    assert old_id != new_id, "two hubs handed out the same delivery id"
    new.settle(wire.Ack(old_id, wire.OUTCOME_OK), time.monotonic())
    assert new.in_flight == 1, "an ack for the old hub's delivery settled the new hub's"
    assert new.stale_acks == 1
    assert new.late_acks == 0
    # The new hub's own delivery is still settled by its own id.
    new.settle(wire.Ack(new_id, wire.OUTCOME_OK), time.monotonic())
    assert new.in_flight == 0
    assert next(iter(new.statistics().values()))["acked"] == 1


@pytest.mark.hub
@pytest.mark.forks
@pytest.mark.queue_groups
def test_an_ack_for_the_old_hubs_delivery_does_not_settle_the_new_hubs(
    tmp_path: Path, workers: Workers
) -> None:
    """Consumer A holds m1 from the first hub through its SIGKILL and a restart; meanwhile the
    new hub hands m2 to consumer B. A's late ack (its delivery id from the old hub) must not
    settle B's delivery: when B dies, m2 goes to A."""
    address = f"ipc://{tmp_path}/hub"
    log_a, log_b, gate = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "gate"
    group = "tests.messages.Ping/work"
    hub = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
    restarted: Hub | None = None

    def seen(path: Path, what: str, token: str) -> bool:
        return any(fields[:2] == [what, token] for fields in _lines(path))

    try:
        consumer_a = workers.start(_gated_ping_consumer, address, str(log_a), str(gate))
        with HubBroker(address) as publisher:
            publisher.publish(Ping("m1"))
            wait_until(lambda: seen(log_a, "start", "m1"), 10)
            os.kill(consumer_a.pid, signal.SIGSTOP)  # holds m1 through the restart
            try:
                assert hub.pid is not None
                os.kill(hub.pid, signal.SIGKILL)
                assert hub.stop() == -signal.SIGKILL
                restarted = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
                consumer_b = workers.start(_stuck_ping_consumer, address, str(log_b))
                publisher.publish(Ping("m2"))
                wait_until(lambda: seen(log_b, "start", "m2"), 10)
            finally:
                gate.touch()
                os.kill(consumer_a.pid, signal.SIGCONT)
            wait_until(lambda: seen(log_a, "done", "m1"), 10)

            def a_answered() -> bool:
                statistics = restarted.statistics()
                queue = statistics.queues[group]
                # Before the fix, A's ack settled B's delivery (both had id 1).
                return queue["in_flight"] == 0 or statistics.stale_acks >= 1

            wait_until(a_answered, 10)
            wait_until(lambda: restarted.statistics().queues[group]["consumers"] == 2, 10)
            consumer_b.kill()
            consumer_b.join(10)
            wait_until(lambda: seen(log_a, "done", "m2"), 10)
            final = restarted.statistics()
    finally:
        workers.close()
        hub.stop()
        if restarted is not None:
            restarted.stop()
    assert final.stale_acks == 1
    assert final.late_acks == 0
