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
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from ipcbus import AsyncMessageContext, DeadLetter, Hub, HubBroker, connect
from ipcbus.server.control import ControlPlane
from ipcbus.server.queues import QueueBook
from ipcbus.wire import protocol as wire

from .conftest import queues_idle, wait_until
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


# -- case 8: retry arithmetic ----------------------------------------------------------------

# Past 1 025 attempts, the old hub's backoff (retry_backoff * 2 ** attempt) no longer fit a float.
MANY_ATTEMPTS = 1100


def _failing_ping_consumer(
    address: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer without backoff and with a huge max_attempts: ``dead`` fails every time;
    ``late`` fails until its last attempt, then logs ``done late <attempt>``."""
    # One traceback per failed attempt would be thousands of them.
    logging.getLogger("ipcbus.core.retry").setLevel(logging.CRITICAL)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Ping) -> None:
        attempt = AsyncMessageContext.current().attempt
        if message.token == "dead" or attempt < MANY_ATTEMPTS:
            raise ValueError(f"attempt {attempt} of {message.token}")
        _log_line(log, "done", message.token, attempt)

    broker = connect(address)
    broker.subscribe_async(
        Ping, handle, "work", max_attempts=MANY_ATTEMPTS, retry_backoff=0.0, prefetch=1
    )
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


@pytest.mark.hub
@pytest.mark.forks
@pytest.mark.queue_groups
def test_a_thousand_attempts_without_backoff_end_in_a_dead_letter_or_success(
    tmp_path: Path, workers: Workers
) -> None:
    address = f"ipc://{tmp_path}/hub"
    log = tmp_path / "consumer.log"
    group = "tests.messages.Ping/work"
    with Hub(address, start_method="fork") as hub:
        workers.start(_failing_ping_consumer, address, str(log))
        with HubBroker(address) as publisher:
            dead: list[DeadLetter] = []
            publisher.subscribe(DeadLetter, dead.append)
            publisher.publish(Ping("dead"))
            publisher.publish(Ping("late"))
            publisher.flush(10)
            wait_until(lambda: len(dead) == 1 and _lines(log) != [], 120)
            wait_until(lambda: queues_idle(address), 10)
            statistics = hub.statistics()
        workers.close()
    (letter,) = dead
    assert (letter.message, letter.attempts) == (Ping("dead"), MANY_ATTEMPTS)
    assert letter.error == f"ValueError: attempt {MANY_ATTEMPTS} of dead"
    assert _lines(log) == [["done", "late", str(MANY_ATTEMPTS)]]
    queue = statistics.queues[group]
    assert queue["dead_lettered"] == queue["acked"] == 1
    assert queue["retried"] == 2 * (MANY_ATTEMPTS - 1)
    assert queue["held"] == queue["in_flight"] == 0
    assert statistics.malformed_dropped == 0


class _RecordingSocket:
    """Stands in for the hub's control ROUTER: keeps what the control plane sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        self.sent.append(frames)


def _frames(*parts: bytes) -> list[zmq.Frame]:
    return [zmq.Frame(part) for part in parts]


def _control_plane_with_deliveries(
    count: int,
) -> tuple[ControlPlane, _RecordingSocket, list[bytes]]:
    plane = ControlPlane(
        b"0123456789abcdef", heartbeat_interval=0.5, heartbeat_timeout=3.0, max_held=100
    )
    control = _RecordingSocket()
    identity = b"client"
    plane.handle(control, _frames(identity, wire.header(wire.HELLO), identity), ("a", "b"))
    plane.book.add_consumer(PING_TOPIC, "work", (identity, b"1"), prefetch=count)
    plane.book.enqueue(PING_TOPIC, b"meta", [b"%d" % n for n in range(count)])
    delivery_ids = [d.delivery_id for d in plane.book.dispatch(time.monotonic())]
    assert len(delivery_ids) == count
    return plane, control, delivery_ids


def _ack_request(identity: bytes, *answers: tuple[bytes, bytes, bytes]) -> list[zmq.Frame]:
    body = [
        part
        for delivery_id, outcome, delay in answers
        for part in (delivery_id, outcome, delay, b"")
    ]
    return _frames(identity, wire.header(wire.ACK), *body)


def test_an_ack_the_hub_cannot_apply_does_not_stop_the_others_of_its_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a real client can send: acks for deliveries the hub no longer has (late) or never
    had (stale), next to good ones; and a hub bug on one ack (the old OverflowError) must not
    skip the rest of the request either."""
    plane, control, (first, second, third) = _control_plane_with_deliveries(3)
    settle = QueueBook.settle

    def settle_or_fail(book: QueueBook, ack: wire.Ack, now: float) -> None:
        if ack.delivery_id == second:
            raise OverflowError("int too large to convert to float")
        settle(book, ack, now)

    monkeypatch.setattr(QueueBook, "settle", settle_or_fail)
    request = _ack_request(
        b"client",
        (b"feedfacefeedface.1", wire.OUTCOME_OK, b"0.0"),  # another hub's
        (first, wire.OUTCOME_OK, b"0.0"),
        (second, wire.OUTCOME_FAILED, b"0.0"),
        (first, wire.OUTCOME_OK, b"0.0"),  # again: late
        (third, wire.OUTCOME_FAILED, b"0.0"),
    )
    caplog.set_level(logging.ERROR, logger="ipcbus")
    plane.handle(control, request, ("a", "b"))
    queue = next(iter(plane.book.statistics().values()))
    assert queue["acked"] == 1
    assert queue["retried"] == 1
    assert plane.book.stale_acks == plane.book.late_acks == 1
    assert plane.unapplied_acks == 1
    assert any("could not apply" in record.getMessage() for record in caplog.records)


def test_a_malformed_ack_request_is_refused_whole() -> None:
    """A real client never sends an ack the parser refuses (its outcomes are the four known, its
    delays finite and >= 0: ipcbus.core.retry caps them), so a request with one is not from a
    client that follows the protocol: none of its acks is applied (docs/security.md)."""
    plane, control, (first, second) = _control_plane_with_deliveries(2)
    request = _ack_request(
        b"client", (first, wire.OUTCOME_OK, b"0.0"), (second, wire.OUTCOME_FAILED, b"nan")
    )
    with pytest.raises(ValueError, match="retry delay"):
        plane.handle(control, request, ("a", "b"))
    assert plane.book.in_flight == 2
