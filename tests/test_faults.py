"""Faults (docs/guarantees.md): the hub killed and restarted, a consumer stopped past
the heartbeat timeout, a graceful hub shutdown, closing a broker whose hub is gone.

Real hub processes, real worker processes (spawned), SIGKILL / SIGSTOP / SIGTERM. Workers log
what they handle to files (one ``O_APPEND`` write per line: atomic) with ``time.monotonic()``,
which is one clock for every process of the machine, so latencies compare across processes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, Hub, HubBroker, HubUnavailableError, connect
from ipcbus.wire.address import Address

from .conftest import wait_until
from .hubtools import Workers
from .messages import Ping, Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

SPAWN: Any = multiprocessing.get_context("spawn")
# A client silent for 1 s is gone (and a hub silent for 1 s is gone for its clients).
HEARTBEAT: dict[str, float] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
START_TIMEOUT = 60.0


# -- worker processes ------------------------------------------------------------------------


def _tick_subscriber(
    address: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Broadcast subscriber to Tick: logs ``seq time`` per message."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    broker = connect(address)
    broker.subscribe(Tick, lambda m: os.write(log, b"%d %.6f\n" % (m.seq, time.monotonic())))
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


def _ping_consumer(
    address: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer of Ping in group "work": logs ``token attempt time`` per message."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Ping) -> None:
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%s %d %.6f\n" % (message.token.encode(), attempt, time.monotonic()))

    broker = connect(address)
    broker.subscribe_async(Ping, handle, "work")
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


def _tick_consumer(
    address: str,
    log_path: str,
    steps: int,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer of Tick in group "work": ``steps`` slices of 5 ms of work per message
    (counted, not timed: a handler stopped mid-way still has work left when it resumes), then
    logs ``seq attempt time``."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Tick) -> None:
        for _ in range(steps):
            time.sleep(0.005)
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%d %d %.6f\n" % (message.seq, attempt, time.monotonic()))

    broker = connect(address)
    broker.subscribe_async(Tick, handle, "work", prefetch=10)
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


def _lines(path: Path) -> list[list[bytes]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_bytes().splitlines()]


def _remove_sockets(address: str) -> None:
    """What a hub killed with SIGKILL leaves behind (no hub replaced it)."""
    path = address[len("ipc://") :]
    for leftover in (path, path + ".in", path + ".pub"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)


class TickPublisher:
    """Publishes Tick(0), Tick(1), ... from a thread, ~700 a second (the pacing only makes an
    outage a window of hundreds of messages), recording for each seq when it was published and
    whether the publisher's proxy then believed the hub alive: once it knows the hub is gone it
    sends nothing and buffers what is published."""

    def __init__(self, broker: HubBroker) -> None:
        self.broker = broker
        self.published: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TickPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            self.published.append((time.monotonic(), self.broker._io.hub_alive))
            self.broker.publish(Tick(seq))
            seq += 1
            time.sleep(0.001)

    def stop(self) -> int:
        """Stop publishing; the last seq published."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the publisher thread is stuck"
        return len(self.published) - 1

    def first_after(self, moment: float) -> int:
        """The first seq published after ``moment`` (waiting for it)."""
        wait_until(lambda: self.published[-1][0] > moment, 10)
        return next(seq for seq, (at, _) in enumerate(self.published) if at > moment)


# -- the hub killed and restarted ------------------------------------------------------------


@pytest.mark.slow
def test_clients_recover_from_a_hub_killed_and_restarted_at_the_same_address(
    tmp_path: Path, workers: Workers
) -> None:
    address = f"ipc://{tmp_path}/hub"
    ticks_log, pings_log = tmp_path / "ticks.log", tmp_path / "pings.log"
    hub = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
    restarted: Hub | None = None

    def ticks() -> list[tuple[int, float]]:
        return [(int(seq), float(at)) for seq, at in _lines(ticks_log)]

    def pings() -> dict[str, float]:
        return {token.decode(): float(at) for token, _attempt, at in _lines(pings_log)}

    try:
        workers.start(_tick_subscriber, address, str(ticks_log))
        workers.start(_ping_consumer, address, str(pings_log))
        with HubBroker(address) as publisher:
            publisher.publish(Ping("before"))
            wait_until(lambda: "before" in pings(), 10)
            with TickPublisher(publisher) as ticker:
                wait_until(lambda: len(ticks()) >= 500, 30)
                assert hub.pid is not None
                key = Path(Address.parse(address).key_file)
                secret = key.read_bytes()
                killed_at = time.monotonic()
                os.kill(hub.pid, signal.SIGKILL)
                assert hub.stop() == -signal.SIGKILL
                restarted = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
                ready_at = time.monotonic()
                assert key.read_bytes() == secret, "the new hub did not reuse the key file"
                # A Ping every 50 ms until the consumer, back by itself, processes one: a Ping
                # that reaches the new hub before the consumer is back is lost (no group yet;
                # see test_a_queue_group_survives_a_hub_restart, xfail).
                after: list[float] = []
                while not any(token.startswith("after-") for token in pings()):
                    assert time.monotonic() - ready_at < 10, "the queue consumer is not back"
                    after.append(time.monotonic())
                    publisher.publish(Ping(f"after-{len(after) - 1}"))
                    time.sleep(0.05)
                # The first Tick published once the new hub was ready, then some more traffic.
                first_new = ticker.first_after(ready_at)
                wait_until(lambda: any(seq >= first_new + 500 for seq, _ in ticks()), 10)
            published = ticker.published
            publisher.flush(10)
            last = len(published) - 1
            wait_until(lambda: ticks()[-1][0] == last, 10)
    finally:
        workers.close()
        hub.stop()
        if restarted is not None:
            assert restarted.stop() == 0

    received = ticks()
    seqs = [seq for seq, _ in received]
    assert all(a < b for a, b in itertools.pairwise(seqs)), "duplicate or reordered"
    missing = sorted(set(range(last + 1)) - set(seqs))
    tick_resume = min(at for _, at in received if at > ready_at) - ready_at
    new_resume = next(at for seq, at in received if seq >= first_new) - ready_at
    processed = {int(t[len("after-") :]): at for t, at in pings().items() if t.startswith("after-")}
    ping_resume = min(processed.values()) - ready_at
    # The publisher's view of the outage: it noticed the kill at seq `noticed` (from then on it
    # buffered) and was back at seq `back`. Lost Ticks before `noticed` were in flight at the
    # kill. Those after it reached the new hub before the subscriber's SUB socket had
    # reconnected: a race (seen in about 1 run of 10, when the new hub takes ~0.3 s to start)
    # whose deterministic form is test_ticks_buffered_during_a_hub_restart_reach_a_late_subscriber.
    noticed = next((seq for seq, (_, alive) in enumerate(published) if not alive), last + 1)
    back = next((seq for seq in range(noticed, last + 1) if published[seq][1]), last + 1)
    in_flight = [seq for seq in missing if seq < noticed]
    buffered = [seq for seq in missing if noticed <= seq < back]
    after_back = [seq for seq in missing if seq >= back]
    window = "none"
    if missing:
        first_at, last_at = (published[seq][0] - killed_at for seq in (missing[0], missing[-1]))
        window = (
            f"seqs {missing[0]}..{missing[-1]}, published {first_at:+.3f} .. {last_at:+.3f} s "
            f"from the kill: {len(in_flight)} in flight, {len(buffered)} buffered, "
            f"{len(after_back)} published after the publisher was back"
        )
    print(
        f"\nhub restart: new hub ready {ready_at - killed_at:.3f} s after the kill; "
        f"{last + 1} Ticks published, {len(missing)} lost ({window}); Ticks resumed "
        f"{tick_resume:.3f} s after the restart (the first published after it: "
        f"{new_resume:.3f} s); the queue consumer processed a Ping {ping_resume:.3f} s after it "
        f"(the first {min(processed)} of {len(after)} Pings published after it were lost)"
    )
    if missing:
        assert missing == list(range(missing[0], missing[-1] + 1)), "more than one window"
        assert abs(published[missing[0]][0] - killed_at) < 0.5, "the window is not at the kill"
    assert tick_resume < 2.0
    assert new_resume < 2.0
    assert ping_resume < 2.0


def test_ticks_buffered_during_a_hub_restart_reach_a_late_subscriber(
    tmp_path: Path, workers: Workers
) -> None:
    """docs/guarantees.md: a live subscription receives everything published afterwards,
    and a publisher buffers while the hub is away. Here the subscriber is stopped from just
    before the kill until 0.3 s after its publisher is back: the deterministic form of the race
    the restart test above sees once in a while (hundreds of buffered Ticks lost)."""
    address = f"ipc://{tmp_path}/hub"
    ticks_log = tmp_path / "ticks.log"
    hub = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
    restarted: Hub | None = None

    def seqs() -> list[int]:
        return [int(seq) for seq, _at in _lines(ticks_log)]

    try:
        subscriber = workers.start(_tick_subscriber, address, str(ticks_log))
        with HubBroker(address) as publisher:
            with TickPublisher(publisher) as ticker:
                wait_until(lambda: len(seqs()) >= 200, 30)
                os.kill(subscriber.pid, signal.SIGSTOP)
                try:
                    assert hub.pid is not None
                    os.kill(hub.pid, signal.SIGKILL)
                    hub.stop()
                    restarted = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
                    wait_until(lambda: publisher._io.hub_alive, 10)
                    back_at = time.monotonic()
                    # Traffic flows to the new hub (the "short sleep" of the rules): the
                    # subscriber's reconnection waits, as a slow process's would.
                    time.sleep(0.3)
                finally:
                    os.kill(subscriber.pid, signal.SIGCONT)
                first_new = ticker.first_after(back_at + 0.3)
                wait_until(lambda: any(seq >= first_new for seq in seqs()), 10)
            publisher.flush(10)
            last = len(ticker.published) - 1
            wait_until(lambda: seqs()[-1] == last, 10)
    finally:
        workers.close()
        hub.stop()
        if restarted is not None:
            restarted.stop()
    missing = set(range(last + 1)) - set(seqs())
    buffered = {seq for seq, (_at, hub_alive) in enumerate(ticker.published) if not hub_alive}
    assert buffered, "the publisher never noticed the hub was gone: the test proves nothing"
    lost = sorted(missing & buffered)
    assert lost == [], f"{len(lost)} of {len(buffered)} buffered Ticks lost"


@pytest.mark.queue_groups
def test_a_queue_group_survives_a_hub_restart(tmp_path: Path, workers: Workers) -> None:
    """docs/guarantees.md: a group outlives the temporary absence of its consumers, and
    clients ride out a hub restart. The deterministic form of what the restart test above sees
    as a race: there, Pings published right after the restart are lost until the consumer has
    said CONSUME to the new hub; here the consumer is stopped through the restart."""
    address = f"ipc://{tmp_path}/hub"
    pings_log = tmp_path / "pings.log"
    hub = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
    restarted: Hub | None = None

    def pings() -> set[str]:
        return {token.decode() for token, _attempt, _at in _lines(pings_log)}

    try:
        consumer = workers.start(_ping_consumer, address, str(pings_log))
        with HubBroker(address) as publisher:
            publisher.publish(Ping("before"))
            wait_until(lambda: "before" in pings(), 10)
            os.kill(consumer.pid, signal.SIGSTOP)  # temporarily absent, through the restart
            try:
                assert hub.pid is not None
                os.kill(hub.pid, signal.SIGKILL)
                hub.stop()
                restarted = Hub(address, **HEARTBEAT).start(START_TIMEOUT)
                publisher.publish(Ping("meanwhile"))
                publisher.flush(10)  # the new hub has it
            finally:
                os.kill(consumer.pid, signal.SIGCONT)
            wait_until(lambda: "meanwhile" in pings(), 5)
    finally:
        workers.close()
        hub.stop()
        if restarted is not None:
            restarted.stop()


# -- a consumer stopped past the heartbeat timeout -------------------------------------------


@pytest.mark.queue_groups
def test_a_consumer_stopped_past_the_heartbeat_timeout_loses_its_deliveries_to_another(
    tmp_path: Path, workers: Workers
) -> None:
    address = f"ipc://{tmp_path}/hub"
    group = "tests.messages.Tick/work"
    count = 300
    stopped_log, other_log = tmp_path / "stopped.log", tmp_path / "other.log"

    def entries(path: Path) -> list[tuple[int, int]]:
        return [(int(seq), int(attempt)) for seq, attempt, _at in _lines(path)]

    def processed() -> set[int]:
        return {seq for seq, _ in entries(stopped_log) + entries(other_log)}

    samples: list[dict[str, int]] = []
    sampling = threading.Event()
    with Hub(address, **HEARTBEAT) as hub:

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(HubUnavailableError):
                    queues = hub.statistics().queues
                    if group in queues:
                        samples.append(queues[group])
                sampling.wait(0.02)

        stopped = workers.start(_tick_consumer, address, str(stopped_log), 4)
        workers.start(_tick_consumer, address, str(other_log), 4)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with HubBroker(address) as producer:
                for seq in range(count):
                    producer.publish(Tick(seq))
                producer.flush(10)
            wait_until(lambda: len(entries(stopped_log)) >= 10, 30)
            os.kill(stopped.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: hub.statistics().clients_lost >= 1, 10)
                wait_until(lambda: hub.statistics().queues[group]["redelivered"] > 0, 10)
                wait_until(lambda: any(attempt >= 2 for _, attempt in entries(other_log)), 10)
                handled_while_stopped = len(entries(stopped_log))
            finally:
                os.kill(stopped.pid, signal.SIGCONT)
            wait_until(lambda: processed() == set(range(count)), 60)
            wait_until(lambda: hub.statistics().late_acks >= 1, 10)
            wait_until(
                lambda: (q := hub.statistics().queues[group])["held"] == q["in_flight"] == 0, 10
            )
            final = hub.statistics()
            # Still running: the stopped consumer resumed and reconnected by itself.
            resumed_alive = stopped.is_alive()
        finally:
            sampling.set()
            sampler.join(10)
            workers.close()  # while the hub is up: they leave with BYE

    assert resumed_alive, "the stopped consumer died instead of resuming"
    assert stopped.exitcode == 0
    mine, others = entries(stopped_log), entries(other_log)
    retried = {seq for seq, attempt in others if attempt >= 2}
    assert retried, "no redelivery reached the other consumer"
    assert retried <= {seq for seq, attempt in mine if attempt == 1}, (
        "redelivered something the stopped consumer never had"
    )
    assert len(mine) > handled_while_stopped, "the resumed consumer finished nothing it held"
    assert final.clients_lost >= 1
    queue = final.queues[group]
    assert queue["redelivered"] > 0
    assert final.late_acks >= 1
    assert samples, "no statistics sampled"
    assert all(sample["acked"] <= sample["published"] for sample in samples)
    assert queue["acked"] == queue["published"] == count, "a late ack counted, or one missing"
    print(
        f"\nstopped consumer: {queue['redelivered']} redelivered, {len(retried)} completed by "
        f"the other on attempt 2+, {final.late_acks} late acks counted, "
        f"{len(mine) + len(others) - count} duplicate completions"
    )


# -- graceful shutdown; closing a broker whose hub is gone -----------------------------------


def test_a_graceful_hub_stop_waits_for_the_handler_and_tells_the_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipcbus")
    address = f"ipc://{tmp_path}/hub"
    # Heartbeats alone would take 5 s to tell the clients.
    hub = Hub(address, start_method="fork", heartbeat_timeout=5.0).start(START_TIMEOUT)
    consumer = HubBroker(address)
    publisher = HubBroker(address, max_pending=10)
    try:
        started, finished = threading.Event(), threading.Event()

        def handle(message: Ping) -> None:
            started.set()
            time.sleep(0.5)  # the work the hub's SIGTERM interrupts
            finished.set()

        consumer.subscribe_async(Ping, handle, "work")
        publisher.publish(Ping("slow"))
        publisher.flush(10)
        assert started.wait(10)
        stopping = time.monotonic()
        exit_code = hub.stop()
        stopped = time.monotonic() - stopping
        assert exit_code == 0
        assert finished.is_set(), "the hub exited before the handler in progress finished"
        wait_until(lambda: not consumer._io.hub_alive and not publisher._io.hub_alive, 1.0)
        noticed = time.monotonic() - stopping
        reasons = [
            r.getMessage().partition(" is gone ")[2]
            for r in caplog.records
            if " is gone " in r.getMessage()
        ]
        assert len(reasons) >= 2, reasons
        for seq in range(10):  # the outbox holds them while the hub is away
            publisher.publish(Tick(seq))
        refused_at = time.monotonic()
        with pytest.raises(HubUnavailableError):
            publisher.publish(Tick(10), timeout=0.5)
        waited = time.monotonic() - refused_at
        assert 0.4 <= waited < 2.0
    finally:
        closing = time.monotonic()
        consumer.close()
        publisher.close()
        closed = time.monotonic() - closing
        hub.stop()
    assert closed < 3.0
    print(
        f"\ngraceful stop: hub exited {stopped:.3f} s after SIGTERM (the handler's 0.5 s); "
        f"both clients knew {noticed:.3f} s after SIGTERM: {'; '.join(reasons)}"
    )


@pytest.mark.parametrize("when", ["at once", "once noticed"])
def test_close_is_prompt_when_the_hub_was_killed(tmp_path: Path, when: str) -> None:
    address = f"ipc://{tmp_path}/hub"
    hub = Hub(address, start_method="fork").start(START_TIMEOUT)
    broker = HubBroker(address)  # linger: 10 s
    try:
        received: list[Tick] = []
        broker.subscribe(Tick, received.append)
        broker.subscribe_async(Ping, lambda message: None, "work")
        broker.publish(Tick(0))
        broker.flush(10)
        assert hub.pid is not None
        os.kill(hub.pid, signal.SIGKILL)
        assert hub.stop() == -signal.SIGKILL
        if when == "once noticed":
            wait_until(lambda: not broker._io.hub_alive, 5)
        for seq in range(1, 100):
            broker.publish(Tick(seq))  # nowhere to go
        closing = time.monotonic()
        broker.close()
        closed = time.monotonic() - closing
    finally:
        broker.close()
        hub.stop()
        _remove_sockets(address)
    assert closed < 3.0
    assert not broker._io.alive
