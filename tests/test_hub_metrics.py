"""Prometheus metrics of a real hub, scraped over HTTP and parsed with prometheus_client's own
text parser: the values are what was published, acked and connected."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipcbus import Hub, HubBroker
from ipcbus.server.metrics import HubMetrics

from .conftest import wait_until
from .hubtools import REPO, AsNobody, needs_root_for_nobody, round_trip, run_cli, stop_popen
from .messages import OrderPlaced, Tick

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork", metrics_port=0) as running:
        yield running


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_metrics_match_what_was_published(hub: Hub) -> None:
    assert hub.metrics_url is not None
    assert hub.metrics_url.startswith("http://127.0.0.1:")  # not on every interface
    queue = "tests.messages.OrderPlaced/orders"
    with HubBroker(hub.address) as subscriber, HubBroker(hub.address) as publisher:
        ticks: list[int] = []
        all_ticks = threading.Event()

        def on_tick(tick: Tick) -> None:
            ticks.append(tick.seq)
            if len(ticks) == 50:
                all_ticks.set()

        subscriber.subscribe(Tick, on_tick)
        subscriber.subscribe_async(OrderPlaced, lambda order: None, "orders")
        for seq in range(50):
            publisher.publish(Tick(seq, "metrics"))
        for order_id in range(20):
            publisher.publish(OrderPlaced(order_id))
        publisher.flush(30)
        assert all_ticks.wait(30)

        def acked() -> bool:
            return scrape(url).get(("ipcbus_hub_queue_acked_total", (("queue", queue),))) == 20

        url = hub.metrics_url
        wait_until(acked, 30)
        samples = scrape(url)
        statistics = hub.statistics()
    assert samples[("ipcbus_hub_clients", ())] == 2
    assert samples[("ipcbus_hub_messages_relayed_total", ())] == 70
    assert samples[("ipcbus_hub_messages_relayed_total", ())] == statistics.messages_relayed
    assert samples[("ipcbus_hub_bytes_relayed_total", ())] == statistics.bytes_relayed
    assert samples[("ipcbus_hub_topics", ())] >= 1
    assert samples[("ipcbus_hub_queue_published_total", (("queue", queue),))] == 20
    assert samples[("ipcbus_hub_queue_in_flight", (("queue", queue),))] == 0
    assert samples[("ipcbus_hub_queue_held", (("queue", queue),))] == 0
    assert samples[("ipcbus_hub_queue_redelivered_total", (("queue", queue),))] == 0
    assert samples[("ipcbus_hub_queue_dead_lettered_total", (("queue", queue),))] == 0
    for reason in ("malformed", "stalled_subscriber", "unsplittable", "deleted_queue"):
        assert samples[("ipcbus_hub_dropped_messages_total", (("reason", reason),))] == 0
    assert samples[("ipcbus_hub_backpressure_stalls_total", ())] >= 0
    assert samples[("ipcbus_hub_auth_rejected_total", ())] == 0


def test_unrouted_and_auth_rejections_are_counted(hub: Hub) -> None:
    import zmq

    assert hub.metrics_url is not None
    with HubBroker(hub.address) as publisher:
        for seq in range(3):
            publisher.publish(Tick(seq))  # nobody subscribes
        publisher.flush(30)
    # A peer without the secret: CURVE with a key of its own.
    context = zmq.Context()
    intruder: Any = context.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    intruder.curve_publickey, intruder.curve_secretkey = public, secret
    intruder.curve_serverkey = zmq.curve_keypair()[0]
    intruder.linger = 0
    intruder.connect(hub.address)
    try:
        wait_until(
            lambda: scrape(hub.metrics_url or "")[("ipcbus_hub_auth_rejected_total", ())] > 0, 30
        )
    finally:
        intruder.close(0)
        context.term()
    samples = scrape(hub.metrics_url)
    assert samples[("ipcbus_hub_unrouted_messages_total", (("type", "tests.messages.Tick"),))] == 3


def test_ipcbus_hub_serves_metrics_and_says_where(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipcbus",
            "hub",
            "--address",
            f"ipc://{tmp_path}/hub",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[2].startswith("metrics at http://127.0.0.1:"), lines
        samples = scrape(lines[2].split()[-1])
        assert samples[("ipcbus_hub_clients", ())] == 0
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0


def test_a_missing_extra_is_a_clear_usage_error(tmp_path: Path) -> None:
    """Without prometheus_client (a stand-in that fails to import, first on the path)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text("raise ImportError('not installed')\n")
    refused = run_cli(
        "hub", "--address", f"ipc://{tmp_path}/hub", "--metrics-port", "0", PYTHONPATH=str(shadow)
    )
    assert refused.returncode == 2, refused.stderr
    assert "pip install 'ipcbus[metrics]'" in refused.stderr
    assert "Traceback" not in refused.stderr


# -- another local user holding connections to the endpoint ----------------------------------

HUB_FILES = 128  # the hub's limit on open files in the test: the attack alone would exceed it
HELD = 200
MAX_CONNECTIONS = 16  # what the endpoint serves at once (server/metrics.py)


@contextlib.contextmanager
def metrics_hub(address: str, files: int, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``ipcbus hub --metrics-port 0`` in a process of its own limited to ``files`` open files
    (an ipc hub never raises its limit); yields it and its metrics URL."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    with log.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "ipcbus", "hub", "--address", address, "--metrics-port", "0"],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            cwd=REPO,
            preexec_fn=limit,
        )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[2].startswith("metrics at "), (lines, log.read_text())
        yield process, lines[2].split()[-1]
    finally:
        stop_popen(process)


def _unfinished_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """How long until the server closed ``sock`` (None: not within ``seconds``)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except OSError:
        data = b""
    assert data == b"", f"an answer to an unfinished request: {data!r}"
    return time.monotonic() - started


def test_the_endpoint_bounds_the_time_and_the_connections_of_its_clients() -> None:
    """Unfinished requests are closed after the request timeout; past the cap, a connection is
    closed at once; a finished request is then answered."""
    metrics = HubMetrics("127.0.0.1", 0, request_timeout=0.5, max_connections=2)
    held: list[socket.socket] = []
    try:
        held += [_unfinished_request(metrics.port) for _ in range(2)]
        # Accepted in order, each taking its slot as it is: this one finds none.
        extra = _unfinished_request(metrics.port)
        held.append(extra)
        at_once = _closed_within(extra, 0.4)
        assert at_once is not None
        assert metrics.refused == 1
        for sock in held[:2]:
            assert _closed_within(sock, 2.0) is not None  # their timeout
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10) as got:
            assert got.status == 200
            assert got.headers["Content-Type"].startswith("text/plain")
    finally:
        for sock in held:
            sock.close()
        metrics.close()


def _hold_unfinished_requests(stop: int, report: Callable[[object], None], port: int) -> None:
    """(As nobody) Keep HELD connections to the metrics port, each having sent a request line
    and never the end of its headers; one the hub closes is opened again at once."""
    poller = select.poll()
    poller.register(stop, select.POLLIN)
    held: dict[int, socket.socket] = {}
    counts = {"opened": 0, "closed_by_hub": 0, "failed": 0}

    def top_up() -> None:
        while len(held) < HELD:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            except OSError:
                counts["failed"] += 1
                return
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            except OSError:
                sock.close()
                counts["closed_by_hub"] += 1
                continue
            held[sock.fileno()] = sock
            poller.register(sock, select.POLLIN)
            counts["opened"] += 1

    top_up()
    report(dict(counts, held=len(held)))
    while True:
        events = poller.poll(50)
        if any(fd == stop for fd, _ in events):
            break
        for fd, _ in events:  # the hub never answers an unfinished request: it closed it
            poller.unregister(fd)
            held.pop(fd).close()
            counts["closed_by_hub"] += 1
        top_up()
    report(dict(counts, held=len(held)))


def test_unfinished_requests_of_another_user_neither_exhaust_nor_stop_the_hub(
    tmp_path: Path,
) -> None:
    """Another user holds 200 connections to the endpoint, each with an unfinished request (the
    attack that stopped a hub: prometheus_client's server held a thread and a descriptor for
    each, with no timeout, until the hub ran out of descriptors and its serving loop died of
    EMFILE). The hub, limited to 128 open files, closes what is over its 16 at once and the
    rest after their timeout (3 s); clients are served meanwhile, and a scraper after."""
    needs_root_for_nobody()
    address = f"ipc://{tmp_path}/hub"
    log = tmp_path / "hub.log"
    with metrics_hub(address, HUB_FILES, log) as (hub, url):
        port = urllib.parse.urlsplit(url).port
        attacker = AsNobody(_hold_unfinished_requests, port)
        try:
            first = attacker.recv(30)
            most_files = 0
            deadline = time.monotonic() + 4.0  # past the timeout of the first connections held
            while time.monotonic() < deadline:
                round_trip(address, 5, timeout=10)
                time.sleep(0.25)  # a client now and then, not a flood of them
                most_files = max(most_files, len(os.listdir(f"/proc/{hub.pid}/fd")))
                assert hub.poll() is None, log.read_text()
        finally:
            assert attacker.stop() == 0
            last = attacker.recv(5)
            attacker.close()
        assert first["opened"] >= HELD, first
        # Over the cap, connections were closed at once; the rest after their timeout.
        assert last["closed_by_hub"] >= HELD - MAX_CONNECTIONS, last
        assert most_files < HUB_FILES - MAX_CONNECTIONS, most_files
        samples = scrape(url)
        assert samples[("ipcbus_hub_clients", ())] == 0
        assert hub.poll() is None, log.read_text()
    assert hub.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()
