"""Adversarial tests of numbered queue batches across hub kills (docs/guarantees.md, "Hub
`kill -9` and restart"): no queue job lost that a publisher sent again, none handled twice as a
first delivery (attempt 1)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Hub, HubBroker
from ipcbus.client.admin import request_statistics

from .conftest import wait_until
from .hubtools import Workers
from .messages import Tick
from .test_journal import HEARTBEAT, QUEUE, _calls, _consumer, _kill

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]


def _handled(address: str, log: Path, workers: Workers) -> list[tuple[int, int]]:
    """Every held job handled by one consumer: its (seq, attempt) calls."""
    workers.start(_consumer, address, str(log), -1)
    wait_until(lambda: request_statistics(address).queues[QUEUE]["held"] == 0, 60)
    wait_until(lambda: request_statistics(address).queues[QUEUE]["in_flight"] == 0, 60)
    return _calls(log)


def _firsts_twice(calls: list[tuple[int, int]]) -> list[int]:
    firsts: dict[int, int] = {}
    for seq, attempt in calls:
        firsts[seq] = firsts.get(seq, 0) + (attempt == 1)
    return sorted(seq for seq, count in firsts.items() if count > 1)


@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "no-journal"])
def test_jobs_lost_on_the_way_to_a_stopped_hub_are_not_taken_for_duplicates(
    tmp_path: Path, workers: Workers, journaled: bool
) -> None:
    """The hub is stopped (SIGSTOP) while a producer publishes a burst bigger than the socket
    buffers: the first batches sit in the kernel buffers (lost with the hub), the rest in the
    producer's ZeroMQ pipe (handed to the next hub, unflagged). The copies sent again of the
    lost batches number below what came out of the pipe: they must not be dropped as
    duplicates."""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    options: dict[str, Any] = {**HEARTBEAT, "journal": str(journal) if journaled else None}
    count = 20_000
    hub = Hub(address, **options).start()
    try:
        with HubBroker(address, max_pending=10 * count) as producer:
            producer.declare_queue(Tick, "jobs")
            producer.flush(30)
            assert hub.pid is not None
            os.kill(hub.pid, signal.SIGSTOP)
            padding = "x" * 200
            for seq in range(count):
                producer.publish(Tick(seq, padding))
            time.sleep(1)  # the I/O thread fills the socket buffers, then its pipe
            _kill(hub)
            hub = Hub(address, **options).start()
            producer.flush(60)
        dropped = request_statistics(address).duplicates_dropped
        calls = _handled(address, log, workers)
        seqs = {seq for seq, _ in calls}
        print(f"duplicates dropped {dropped}, handled {len(calls)}, distinct {len(seqs)}")
        assert sorted(set(range(count)) - seqs)[:10] == []
        assert _firsts_twice(calls) == []
    finally:
        hub.stop()
