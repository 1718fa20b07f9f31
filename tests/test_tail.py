"""``ipcbus tail`` against a real hub, in a subprocess: what another process publishes shows up,
typed, sized, with its publisher; a tail whose output stalls leaves messages out and counts them,
and never holds the bus back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcbus import Hub, HubBroker
from ipcbus.config import ENV_ADDRESS

from .hubtools import REPO, RemotePublisher, run_cli
from .messages import OrderShipped, Tick

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as running:
        yield running


def start_tail(address: str, *args: str) -> subprocess.Popen[str]:
    """``ipcbus tail`` in a subprocess, returned once it says it is watching (from then on it
    misses nothing)."""
    environment = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
    process = subprocess.Popen(
        [sys.executable, "-m", "ipcbus", "tail", "--address", address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=environment,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    if not line.startswith("ipcbus tail: watching"):
        process.kill()
        raise AssertionError(f"tail did not start: {line}{process.communicate(timeout=10)}")
    return process


def test_tail_shows_what_another_process_publishes(hub: Hub) -> None:
    tail = start_tail(hub.address, "--json", "--count", "5")
    publisher = RemotePublisher(hub.address)
    try:
        for seq in range(5):
            publisher.call("publish", Tick(seq, "elsewhere"))
        publisher.call("flush", 30.0)
        out, err = tail.communicate(timeout=60)
    finally:
        publisher.stop()
        if tail.poll() is None:
            tail.kill()
            tail.communicate(timeout=10)
    assert tail.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["type"] for record in records] == ["tests.messages.Tick"] * 5
    assert [record["repr"] for record in records] == [
        f"Tick(seq={seq}, source='elsewhere')" for seq in range(5)
    ]
    assert all(record["size"] > 0 for record in records)
    assert all(
        record["publisher"].startswith(f"pid {publisher.process.pid} ") for record in records
    )
    assert all(abs(record["published_at"] - time.time()) < 120 for record in records)


def test_tail_of_some_types_shows_only_those(hub: Hub) -> None:
    tail = start_tail(hub.address, "tests.messages.OrderShipped", "--count", "2", "--no-repr")
    try:
        with HubBroker(hub.address) as broker:
            broker.publish(Tick(1))
            broker.publish(OrderShipped(1))
            broker.publish(Tick(2))
            broker.publish(OrderShipped(2))
            broker.flush(30)
            out, err = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate(timeout=10)
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert all("tests.messages.OrderShipped" in line for line in lines)
    assert all(f"pid {os.getpid()} " in line for line in lines)


def test_a_stalled_tail_leaves_messages_out_and_never_holds_the_bus(hub: Hub) -> None:
    """Nobody reads the tail's output: its pipe fills, its printing stops. The bus goes on: a
    real subscriber gets every message; the tail counts what it left out and says so."""
    total = 20_000
    tail = start_tail(hub.address, "--json", "--buffer", "100")
    try:
        with HubBroker(hub.address) as broker:
            received = []
            everything = threading.Event()

            def on_tick(tick: Tick) -> None:
                received.append(tick.seq)
                if len(received) == total:
                    everything.set()

            broker.subscribe(Tick, on_tick)
            for seq in range(total):
                broker.publish(Tick(seq, "x" * 100))
            broker.flush(60)
            assert everything.wait(60), f"the bus was held: {len(received)} of {total}"
            statistics = hub.statistics()
        tail.send_signal(signal.SIGTERM)
        out, err = tail.communicate(timeout=60)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate(timeout=10)
    assert received == list(range(total))
    assert statistics.stall_drops == 0  # the hub never had to give up on the tail
    assert tail.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    shown = [record for record in records if "type" in record]
    dropped = sum(record["dropped"] for record in records if "dropped" in record)
    assert dropped > 0
    assert len(shown) + dropped <= total
    assert "messages not shown: the output is slower than the bus" in err


def test_tail_without_a_hub_is_unavailable(tmp_path: Path) -> None:
    refused = run_cli("tail", "--address", f"ipc://{tmp_path}/nobody", "--timeout", "0.5")
    assert refused.returncode == 4, refused.stderr
    assert "no hub answered" in refused.stderr
    assert "Traceback" not in refused.stderr
