"""The command line, driven as an operator would: a real hub, real subprocesses, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Hub, HubBroker
from ipcbus.config import ENV_ADDRESS

from .hubtools import REPO, run_cli
from .messages import Tick

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as running:
        yield running


def test_version_and_help() -> None:
    version = run_cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("ipcbus ")
    for command in ([], ["hub"], ["stats"], ["ping"], ["publish"]):
        shown = run_cli(*command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "exit codes: 0 ok, 1 failed, 2 usage, 3 address, 4 unavailable" in shown.stdout
        assert "``" not in shown.stdout, "help text with markup"
    assert "--max-held" in run_cli("hub", "--help").stdout  # every Hub option is a flag


@pytest.mark.parametrize(
    "flags", [["-v", "ping"], ["ping", "-v"], ["ping", "--log-level", "ERROR"]]
)
def test_log_options_are_accepted_before_and_after_the_subcommand(
    hub: Hub, flags: list[str]
) -> None:
    answered = run_cli(*flags, "--address", hub.address)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip() == f"{hub.address}: ok"


def test_ping_exit_codes(hub: Hub, tmp_path: Path) -> None:
    assert run_cli("ping", "--address", hub.address).returncode == 0
    assert run_cli("ping", **{ENV_ADDRESS: hub.address}).returncode == 0  # address from the env
    dead = run_cli("ping", "--address", f"ipc://{tmp_path}/nobody", "--timeout", "0.5")
    assert dead.returncode == 4
    assert "no hub answered" in dead.stderr
    assert run_cli("ping").returncode == 2  # no address at all


def test_publish_sends_one_message_from_json(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        got: list[Tick] = []
        arrived = threading.Event()

        def on_tick(tick: Tick) -> None:
            got.append(tick)
            arrived.set()

        broker.subscribe(Tick, on_tick)
        sent = run_cli(
            "publish",
            "tests.messages.Tick",
            "--json",
            '{"seq": 7, "source": "cli"}',
            "--address",
            hub.address,
        )
        assert sent.returncode == 0, sent.stderr
        assert arrived.wait(20)
        assert got == [Tick(7, "cli")]


@pytest.mark.parametrize(
    ("type_name", "fields"),
    [
        ("tests.messages.NoSuchType", "{}"),
        ("no_such_module.Tick", "{}"),
        ("json.JSONDecoder", "{}"),  # not a Message
        ("tests.messages.Tick", "[1, 2]"),  # not an object
        ("tests.messages.Tick", "{not json"),
        ("tests.messages.Tick", '{"unknown_field": 1}'),
        ("tests.messages.Checked", '{"x": -1}'),  # its __post_init__ refuses
        pytest.param("tests.messages.Tick", "[" * 60_000, id="too-deep-for-the-decoder"),
    ],
)
def test_publish_refuses_what_it_cannot_build(hub: Hub, type_name: str, fields: str) -> None:
    refused = run_cli("publish", type_name, "--json", fields, "--address", hub.address)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("ipcbus publish: ")
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        ("stats", "--watch", "-1"),
        ("stats", "--watch", "nan"),
        ("stats", "--watch", "inf"),
        ("stats", "--watch", "0"),
        ("tail", "--timeout", "-1"),
        ("tail", "--timeout", "nan"),
        ("tail", "--timeout", "0"),
        ("ping", "--timeout", "0"),
        ("publish", "tests.messages.Ping", "--json", "{}", "--timeout", "0"),
        ("worker", "tests.messages", "--shutdown-timeout", "inf"),
        ("worker", "tests.messages", "--max-backoff", "1e400"),
    ],
)
def test_bad_periods_and_timeouts_are_usage_errors(arguments: tuple[str, ...]) -> None:
    """Found by an adversarial review: these passed the parser, then ended in a traceback
    (exit 1), or, for tail, waited for nothing."""
    refused = run_cli(*arguments, "--address", "ipc:///nonexistent/hub")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("tail",),
        ("ping",),
        ("stats",),
        ("publish", "tests.messages.Ping", "--json", "{}"),
        ("worker", "tests.ops_jobs"),
    ],
)
def test_a_malformed_address_is_an_address_error(command: tuple[str, ...]) -> None:
    """Exit 3 (the address), not 4 (no hub answered), and said without "no hub answered"."""
    refused = run_cli(*command, "--address", "garbage")
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.startswith(f"ipcbus {command[0]}: unsupported address 'garbage'")
    assert "Traceback" not in refused.stderr


def test_stats_watch_prints_rates(hub: Hub) -> None:
    """While messages flow, each new table shows the rate since the previous one."""
    stop = threading.Event()
    with HubBroker(hub.address) as broker:
        broker.subscribe(Tick, lambda tick: None)

        def publish() -> None:
            seq = 0
            while not stop.is_set():
                broker.publish(Tick(seq))
                seq += 1
                if seq % 100 == 0:
                    broker.flush(20)

        publisher = threading.Thread(target=publish)
        publisher.start()
        process = subprocess.Popen(
            [sys.executable, "-m", "ipcbus", "stats", "--watch", "0.3", "--address", hub.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert process.stdout is not None
            rates = []
            while not rates:
                line = process.stdout.readline()
                assert line, "ipcbus stats --watch ended"
                if line.startswith("messages_relayed") and "/s)" in line:
                    rates.append(line)
        finally:
            stop.set()
            publisher.join(30)
            process.terminate()
            process.communicate(timeout=10)
    assert process.returncode in (0, -15)


def test_hub_options_from_flags_and_environment(tmp_path: Path) -> None:
    """A flag wins over the environment; a bad value is a usage error."""
    bad = run_cli("hub", "--address", f"ipc://{tmp_path}/h", IPCBUS_HUB_HWM="lots")
    assert bad.returncode == 2
    assert "IPCBUS_HUB_HWM" in bad.stderr
    worse = run_cli("hub", "--address", f"ipc://{tmp_path}/h", "--heartbeat-timeout", "0.1")
    assert worse.returncode == 2
    assert "heartbeat_timeout" in worse.stderr
    assert not list(tmp_path.iterdir()), "a refused hub left files"


def test_stats_json_is_parseable(hub: Hub) -> None:
    shown = run_cli("stats", "--json", "--address", hub.address)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["pid"] == hub.pid


def _listen(address: str, ready: Any, stop: Any) -> None:
    from ipcbus import connect

    from .messages import OrderPlaced

    broker = connect(address)
    broker.subscribe(Tick, lambda tick: None)
    broker.subscribe_async(OrderPlaced, lambda order: None, "orders")
    ready.set()
    stop.wait(60)
    broker.close()


def test_clients_lists_who_is_connected_and_to_what(hub: Hub) -> None:
    import multiprocessing

    spawn: Any = multiprocessing.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    child = spawn.Process(target=_listen, args=(hub.address, ready, stop))
    child.start()
    try:
        assert ready.wait(60)
        listed = run_cli("clients", "--json", "--address", hub.address)
        assert listed.returncode == 0, listed.stderr
        (client,) = json.loads(listed.stdout)
        assert client["pid"] == child.pid
        assert client["start_method"] == "spawn or forkserver"
        assert client["subscriptions"] == ["tests.messages.Tick"]
        assert client["queue_consumers"] == ["tests.messages.OrderPlaced/orders"]
        table = run_cli("clients", "--address", hub.address)
        assert table.returncode == 0, table.stderr
        assert str(child.pid) in table.stdout
        assert "tests.messages.OrderPlaced/orders" in table.stdout
    finally:
        stop.set()
        child.join(30)
    left = run_cli("clients", "--json", "--address", hub.address)
    assert json.loads(left.stdout) == []
