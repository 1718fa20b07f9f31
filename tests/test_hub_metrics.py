"""Prometheus metrics of a real hub, scraped over HTTP and parsed with prometheus_client's own
text parser: the values are what was published, acked and connected."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipcbus import Hub, HubBroker

from .conftest import wait_until
from .hubtools import REPO, run_cli
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
