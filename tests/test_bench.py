"""``make bench`` cannot rot: its quick mode runs every case once on tiny sizes (throughput, the
queue journal, a ``__main__`` class, the round trips beside their peers, ``request()``, the
servers' memory under a slow consumer), every run counts what arrived, and it writes the JSON,
Markdown and PNG files. Asserts that the harness runs and counts, never a timing."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq

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
    "1 MB payloads 1 -> 1",  # 1 MiB: big enough for the spool (ipcbus.client.spool)
    "1 MB bytearray 1 -> 1",
    "1 MB PickleBuffer 1 -> 1",
    "queue 1 -> 2, journal on",
    "__main__ class 1 -> 1",
}
MEMORY = {"ipcbus hub", "nats-server", "redis-server"}
PNG = b"\x89PNG\r\n\x1a\n"
ROUND_TRIPS = {
    "ipcbus through the hub",
    "multiprocessing.Pipe",
    "pyzmq REQ/REP",
    "raw relay floor",
    "raw relay floor + CURVE",
    "nats-py request/reply",
    "redis pub/sub ping-pong",
}


@pytest.mark.timeout(900)
def test_the_quick_bench_runs_every_case_and_counts_what_arrived(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    table, picture = tmp_path / "bench.md", tmp_path / "bench.png"
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
            str(1024 * 1024),
            "--json",
            str(results),
            "--markdown",
            str(table),
            "--chart",
            str(picture),
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
        if scenario.startswith(("broadcast", "fan-out", "1 MB payloads")):
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
    _check_main_class(document["results"]["__main__ class 1 -> 1"])
    _check_memory(document["memory"], skipped)
    _check_files(document, table.read_text(), picture, output)


def _check_main_class(contenders: dict[str, Any]) -> None:
    # The same broadcast with an importable class beside it, and the Queue carrying the class.
    assert set(contenders) == {"ipcbus", "ipcbus, importable class", "multiprocessing.Queue"}
    assert contenders["ipcbus, importable class"]["ipcbus_ratio"] > 0
    assert "by reference" in contenders["ipcbus"]["note"]


def _check_memory(memory: dict[str, Any], skipped: dict[str, str]) -> None:
    sent = memory["flood"]["messages"]
    assert set(memory["cases"]) == MEMORY
    for server, row in memory["cases"].items():
        if server != "ipcbus hub" and server.split("-")[0] in skipped:
            assert row["skipped"], server
            continue
        # Every message accounted for: what arrived plus what the library reported lost.
        assert row["failure"] is None, (server, row["failure"])
        assert row["skipped"] is None, server
        assert [a + b for a, b in zip(row["received"], row["reported_lost"], strict=True)] == [
            sent
        ], server
        assert 0 < row["idle_mb_median"] <= row["peak_mb_median"], server
        if server != "ipcbus hub":
            assert row["ipcbus_peak_ratio"] > 0, server


def _check_files(document: dict[str, Any], table: str, picture: Path, output: str) -> None:
    machine = document["machine"]
    assert machine["cpu"]
    assert machine["pyzmq"] == zmq.pyzmq_version()
    assert machine["libzmq"] == zmq.zmq_version()
    assert document["date"] in table
    assert f"{machine['cpus']} cores" in table
    assert f"pyzmq {machine['pyzmq']} (libzmq {machine['libzmq']})" in table
    assert "| scenario | contender | median | ratio |" in table
    assert "| \\_\\_main\\_\\_ class 1 -> 1 | ipcbus, importable class |" in table
    assert "| ipcbus hub |" in table
    # matplotlib is part of the dev install (the bench extra): the chart is drawn.
    assert f"written: {picture}" in output
    data = picture.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > 20_000  # a figure with bars and labels, not an empty canvas


def test_the_chart_is_skipped_with_a_line_saying_why_without_matplotlib(tmp_path: Path) -> None:
    # A run's document drawn in a process where matplotlib cannot be imported.
    script = (
        "import json, sys\n"
        "sys.modules['matplotlib'] = None\n"
        "sys.path.insert(0, 'bench')\n"
        "import chart\n"
        "print(chart.write(json.loads(sys.argv[1]), sys.argv[2]))\n"
    )
    document = {"results": {"broadcast 1 -> 1": {"peer": {"ipcbus_ratio": 2.0}}}}
    picture = tmp_path / "chart.png"
    finished = subprocess.run(
        [sys.executable, "-c", script, json.dumps(document), str(picture)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert finished.stdout.strip() == "matplotlib is not installed (pip install -e '.[chart]')"
    assert not picture.exists()


def test_the_memory_case_fails_a_run_that_loses_messages_it_does_not_report(
    tmp_path: Path,
) -> None:
    # nats-py drops for real what overflows a pending limit of 20 while the handler is slow; a
    # subscriber that counts the drops it is told of accounts for every message, one that
    # ignores them leaves messages unaccounted for, and the run fails, saying how many.
    script = (
        "import sys\n"
        "sys.path[:0] = ['bench', 'tests']\n"
        "import bench_roles, memory\n"
        "from servers import running\n"
        "flood = memory.Flood(messages=2000, size=1024, slow=0.002, stall=3.0)\n"
        "with running(True, False) as servers:\n"
        "    assert servers.nats_url, servers.skipped\n"
        "    for counted in (True, False):\n"
        "        subscriber = (bench_roles.nats_dropping, (servers.nats_url, counted))\n"
        "        publisher = (memory._nats_publisher, (servers.nats_url,))\n"
        "        print(repr(memory._run(flood, servers.pids['nats'], subscriber, publisher)))\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    counted, ignored = (ast.literal_eval(line) for line in finished.stdout.splitlines())
    _idle, _peak, received, lost = counted
    assert lost > 0  # the limit did drop messages
    assert received + lost == 2000
    assert isinstance(ignored, str)
    assert ignored.endswith("unaccounted for"), ignored
