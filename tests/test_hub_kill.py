"""A hub killed with SIGKILL under broadcast load, and a new one at the same address: every
message a subscriber misses is reported, by the publisher (``in_doubt``: sent and never
confirmed by the dead hub) or by the subscriber (``gaps``) (docs/guarantees.md, "Hub kill -9")."""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Hub, HubBroker, connect

from .conftest import wait_until
from .hubtools import Workers
from .messages import Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

HEARTBEAT: dict[str, float] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}


def _subscriber(
    address: str,
    log_path: str,
    delay: float,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Broadcast subscriber of Tick: logs each seq (after ``delay`` s: a slow one, with small
    pipes, so that the hub's pipe to it is full); at the end writes its gaps."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    broker = connect(address, hwm=2, dispatch_queue=2) if delay else connect(address)

    def handle(message: Tick) -> None:
        if delay:
            time.sleep(delay)
        os.write(log, b"%d\n" % message.seq)

    broker.subscribe(Tick, handle)
    ready.send("ready")
    stop.poll(300)
    with open(log_path + ".gaps", "w") as file:
        json.dump(broker.gaps, file)
    broker.close()
    os.close(log)


def _received(path: Path) -> set[int]:
    return {int(line) for line in path.read_bytes().split()} if path.exists() else set()


def _run(tmp_path: Path, workers: Workers, delay: float, **options: Any) -> tuple[int, int, int]:
    """Publish continuously, kill the hub, start another, stop: (missing, in doubt, gaps)."""
    address, log = f"ipc://{tmp_path}/hub", tmp_path / "ticks"
    hub = Hub(address, **HEARTBEAT, **options).start()
    # Small buffers: what waits for a slow subscriber is bounded (a few seconds' worth).
    publisher = HubBroker(address, max_pending=1000, hwm=5) if delay else HubBroker(address)
    stop = threading.Event()
    published: list[int] = []

    def publish_continuously() -> None:
        seq = 0
        while not stop.is_set():
            publisher.publish(Tick(seq), timeout=30)
            published.append(seq)
            seq += 1
            if seq % 100 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=publish_continuously)
    try:
        subscriber = workers.start(_subscriber, address, str(log), delay)
        thread.start()
        wait_until(lambda: len(_received(log)) > 5_000, 60)
        os.kill(hub.pid or 0, signal.SIGKILL)
        assert hub.stop(timeout=10) == -signal.SIGKILL
        hub = Hub(address, **HEARTBEAT, **options).start()
        wait_until(lambda: publisher.in_doubt > 0 or len(published) > 200_000, 30)
        time.sleep(0.5)  # and some more after the restart
        stop.set()
        thread.join(30)
        publisher.flush(60)
        last = published[-1]
        wait_until(lambda: last in _received(log), 60)
        workers.stop(subscriber)
        gaps = json.loads((tmp_path / "ticks.gaps").read_text())
        missing = set(published) - _received(log)
        assert publisher.in_doubt_by_type == {"tests.messages.Tick": publisher.in_doubt}
        return len(missing), publisher.in_doubt, gaps
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(30)
        publisher.close()
        hub.stop()


def test_what_a_killed_hub_took_is_reported_in_doubt(tmp_path: Path, workers: Workers) -> None:
    missing, in_doubt, gaps = _run(tmp_path, workers, 0.0)
    print(f"missing {missing}, in doubt {in_doubt}, gaps {gaps}")
    assert in_doubt > 0
    assert missing <= in_doubt + gaps


def test_what_a_killed_journaled_hub_had_sent_a_slow_subscriber_is_in_its_gaps(
    tmp_path: Path, workers: Workers
) -> None:
    """The hub's pipe to a slow subscriber is full when it dies: those batches were confirmed
    to the publisher, so not in doubt. A hub with a journal continues the dead one's counts,
    and the subscriber counts them in its gaps."""
    journal = str(tmp_path / "journal")
    missing, in_doubt, gaps = _run(tmp_path, workers, 0.0002, hwm=20, journal=journal)
    print(f"missing {missing}, in doubt {in_doubt}, gaps {gaps}")
    assert gaps > 0
    assert missing <= in_doubt + gaps
