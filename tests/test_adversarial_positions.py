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
from ipcbus.wire import protocol as wire

from .conftest import wait_until
from .hubtools import Workers
from .messages import Tick
from .test_journal import HEARTBEAT, QUEUE, _calls, _consumer, _kill
from .test_security import AuthenticatedPeer, RawPeers

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
            # Everything left the outbox: into the socket buffers, then the ZeroMQ pipe.
            wait_until(lambda: producer._io.outbox.never_sent() == 0, 30)
            wait_until(lambda: producer._io._data.waiting is None, 30)
            _kill(hub)
            hub = Hub(address, **options).start()
            producer.flush(60)
        calls = _handled(address, log, workers)
        seqs = {seq for seq, _ in calls}
        assert sorted(set(range(count)) - seqs)[:10] == []
        assert _firsts_twice(calls) == []
    finally:
        hub.stop()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("journaled", [True, False], ids=["journal", "no-journal"])
@pytest.mark.parametrize("stop_second", [True, False], ids=["stopped", "running"])
def test_a_hub_killed_twice_in_a_row_hands_out_no_job_twice_as_a_first_delivery(
    tmp_path: Path, workers: Workers, journaled: bool, stop_second: bool
) -> None:
    """A producer publishes without flushing; the hub is killed mid-burst, and the next one is
    killed too while the copies sent again still come (stopped first, so that part of them sit
    in its buffers): no job is handled twice with attempt 1, and with a journal none is lost."""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    options: dict[str, Any] = {**HEARTBEAT, "journal": str(journal) if journaled else None}
    count = 20_000
    hub = Hub(address, **options).start()
    try:
        workers.start(_consumer, address, str(log), -1)
        with HubBroker(address) as producer:
            producer.declare_queue(Tick, "jobs")
            for seq in range(count):
                producer.publish(Tick(seq, "x" * 50))
                if seq == 8000:
                    wait_until(lambda: len(_calls(log)) > 2000, 60)
                    _kill(hub)
                    hub = Hub(address, **options).start()
                    if stop_second:
                        assert hub.pid is not None
                        os.kill(hub.pid, signal.SIGSTOP)
                    time.sleep(0.3)  # the producer reconnects and sends again
                    _kill(hub)
                    hub = Hub(address, **options).start()
            producer.flush(60)
        wait_until(lambda: request_statistics(address).queues[QUEUE]["held"] == 0, 60)
        wait_until(lambda: request_statistics(address).queues[QUEUE]["in_flight"] == 0, 60)
        calls = _calls(log)
        seqs = {seq for seq, _ in calls}
        assert _firsts_twice(calls) == []
        if journaled:
            assert sorted(set(range(count)) - seqs)[:10] == []
    finally:
        hub.stop()


# -- hostile numbered batches from a peer that holds the secret -----------------------------

TICK_TOPIC = b"tests.messages.Tick\x00"
NUMBERED = wire.header(wire.NUMBERED)
SPLIT_META = wire.pack_meta(wire.CODEC_SPLIT_OBJECTS, 1, 0.0)


def _head(flags: int, position: int, topic: bytes = TICK_TOPIC, meta: bytes = SPLIT_META) -> bytes:
    return NUMBERED + bytes((flags,)) + position.to_bytes(8, "little") + topic + meta


ONE = [wire.pack_sizes([1]), b"x"]
HOSTILE_NUMBERED: dict[str, list[bytes]] = {
    "unknown flag": [_head(2, 1), *ONE],
    "every flag": [_head(255, 1), *ONE],
    "position 2**63": [_head(0, 1 << 63), *ONE],
    "position 2**64 - 1": [_head(wire.AGAIN, (1 << 64) - 1), *ONE],
    "no position": [NUMBERED + b"\x00\x01", *ONE],
    "no topic": [NUMBERED + bytes(9), *ONE],
    "empty topic": [_head(0, 1, b"\x00"), *ONE],
    "topic without terminator": [_head(0, 1, b"tests.messages.Tick", b""), *ONE],
    "no meta": [_head(0, 1, TICK_TOPIC, b""), *ONE],
    "short meta": [_head(0, 1, TICK_TOPIC, SPLIT_META[:-1]), *ONE],
    "no payload": [_head(0, 1)],
    "sizes beyond the payloads": [_head(wire.AGAIN, 1), wire.pack_sizes([2]), b"x"],
    "sizes short of the payloads": [_head(0, 1), wire.pack_sizes([1]), b"xy"],
    "more sizes than the meta": [_head(0, 1), wire.pack_sizes([1, 1]), b"xy"],
    "three payload frames": [_head(0, 1), wire.pack_sizes([1]), b"x", b"y"],
}


@pytest.mark.parametrize("case", list(HOSTILE_NUMBERED))
def test_a_malformed_numbered_batch_of_a_grouped_topic_is_counted_and_taken_for_nothing(
    fresh_hub: Hub, raw_peers: RawPeers, case: str
) -> None:
    """Malformed, it is counted and dropped, and it numbers nothing: the same position, well
    formed and sent again, is held (attempt 2), not dropped as one the hub had."""
    address = fresh_hub.address
    with HubBroker(address) as producer:
        producer.declare_queue(Tick, "jobs")
        producer.flush(30)
    peer = AuthenticatedPeer(raw_peers, address)
    before, middle = peer.send_data(fresh_hub, HOSTILE_NUMBERED[case])
    assert middle.malformed_dropped - before.malformed_dropped == 1
    assert middle.queues[QUEUE]["held"] == before.queues[QUEUE]["held"]
    # Sent again, well formed, at the position the malformed one named (if it named one).
    peer.data.send_multipart([_head(wire.AGAIN, 1), *ONE])
    peer.data_sync()
    after = fresh_hub.statistics()
    assert after.duplicates_dropped == before.duplicates_dropped
    assert after.queues[QUEUE]["held"] == before.queues[QUEUE]["held"] + 1
    with HubBroker(address) as producer:  # the hub still serves
        producer.publish(Tick(1))
        producer.flush(30)
    assert fresh_hub.statistics().queues[QUEUE]["held"] == before.queues[QUEUE]["held"] + 2
    fresh_hub.purge(Tick, "jobs")
