"""``make bench`` cannot rot: its quick mode runs every case once on tiny sizes (throughput, the
queue journal, the round trips beside their peers, ``request()``), and every run counts what
arrived. Asserts that the harness runs and counts, never a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.hub,
    pytest.mark.forks,
    pytest.mark.slow,
    pytest.mark.usefixtures("no_leftovers"),
]

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {
    "broadcast 1 -> 1",
    "fan-out 1 -> 4",
    "queue 1 -> 2",
    "queue 4 -> 4",
    "256 KB payloads 1 -> 1",
    "queue 1 -> 2, journal on",
}
ROUND_TRIPS = {
    "ipcbus through the hub",
    "multiprocessing.Pipe",
    "pyzmq REQ/REP",
    "raw relay floor",
    "nats-py request/reply",
    "redis pub/sub ping-pong",
}


@pytest.mark.timeout(900)
def test_the_quick_bench_runs_every_case_and_counts_what_arrived(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    environment = {k: v for k, v in os.environ.items() if k != "IPCBUS_ADDRESS"}
    finished = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--quick",
            "--messages",
            "300",
            "--queue-messages",
            "200",
            "--big-messages",
            "3",
            "--big-size",
            str(256 * 1024),
            "--json",
            str(results),
        ],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    document = json.loads(results.read_text())
    assert set(document["results"]) == SCENARIOS
    for scenario, contenders in document["results"].items():
        for contender, entry in contenders.items():
            # One run each, counted whole: a run that lost a message has no median.
            assert entry["problems"] == [], (scenario, contender, entry["problems"])
            assert len(entry["runs"]) == 1, (scenario, contender)
            assert entry["median"] is not None
        assert {"ipcbus", "multiprocessing.Queue"} <= set(contenders), scenario
        if scenario.startswith(("broadcast", "fan-out", "256 KB")):
            assert "pyzmq PUB/SUB" in contenders, scenario
    trips = document["round_trips"]
    assert set(trips["cases"]) == ROUND_TRIPS
    for case, row in trips["cases"].items():
        if row["skipped"] is None:
            # Every round trip completed: a lost one is a failure, and has no p50.
            assert row["failure"] is None, (case, row["failure"])
            assert len(row["runs"]) == 1, case
            assert row["p50_us"] is not None, case
            assert row["p99_us"] is not None, case
            if case != "ipcbus through the hub":
                assert row["ipcbus_p50_ratio"] > 0, case
    assert trips["cases"]["ipcbus through the hub"]["skipped"] is None
    requests = document["request_reply"]
    assert requests["failure"] is None, requests["failure"]
    assert requests["request_p50_us"] > 0
    assert requests["publish_p50_us"] > 0
    skipped = document["skipped"]
    for server, why in skipped.items():
        assert f"skipped: every {server} case: {why}" in output
    if os.environ.get("CI") == "true":
        # The bench's peers are part of the dev install: a missing one is a failure here.
        assert skipped == {}, skipped
    if "nats" not in skipped:
        assert "nats-py" in document["results"]["queue 4 -> 4"]
        assert trips["cases"]["nats-py request/reply"]["skipped"] is None
    if "redis" not in skipped:
        assert "redis-py" in document["results"]["fan-out 1 -> 4"]
        assert trips["cases"]["redis pub/sub ping-pong"]["skipped"] is None
