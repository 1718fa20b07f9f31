"""Queue administration played against by a careless operator: absurd timeouts, dead letters
whose fields JSON cannot hold, read through ``ipcbus dead-letters --json`` (a real hub process,
the CLI run as a subprocess)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Hub, HubBroker, Message
from ipcbus.client.queue_admin import (
    request_dead_letters,
    request_purge,
    request_queues,
    request_requeue,
)

from .conftest import wait_until
from .hubtools import run_cli
from .messages import OrderPlaced, Tick

pytestmark = [pytest.mark.hub, pytest.mark.queue_groups, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as running:
        yield running


def _strict(text: str) -> Any:
    """JSON as RFC 8259 has it (no NaN or Infinity), as jq and other languages read it."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("timeout", [-1.0, -0.001, math.nan, math.inf])
def test_a_bad_admin_timeout_is_refused_at_once(hub: Hub, timeout: float) -> None:
    """A negative timeout would poll for ever (ZeroMQ's -1), NaN failed with "cannot convert
    float NaN to integer": each is a ValueError naming the timeout, before anything is sent."""
    calls = [
        lambda: request_queues(hub.address, timeout),
        lambda: request_dead_letters(hub.address, Tick, "work", timeout=timeout),
        lambda: request_requeue(hub.address, Tick, "work", timeout=timeout),
        lambda: request_purge(hub.address, Tick, "work", timeout=timeout),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="timeout"):
            call()


@pytest.mark.parametrize("timeout", ["-1", "nan", "inf"])
def test_the_cli_refuses_a_bad_timeout_with_usage(hub: Hub, timeout: str) -> None:
    """Every command that asks a hub: ``--timeout -1`` polled for ever (ZeroMQ's -1) once the
    hub did not answer (``ipcbus stats`` included)."""
    for args in (["queues", "--json"], ["purge", "tests.messages.Tick/work"], ["stats"], ["ping"]):
        done = run_cli(*args, "--address", hub.address, "--timeout", timeout)
        assert done.returncode == 2, (args, done.stderr)
        assert "timeout" in done.stderr
        assert done.stdout == ""


def _dead_letter(broker: HubBroker, message: Message, queue_name: str) -> None:
    def fail(received: Message) -> None:
        raise RuntimeError("no")

    subscription = broker.subscribe_async(type(message), fail, queue_name, max_attempts=1)
    broker.publish(message)
    broker.flush(10)
    name = f"{type(message).__module__}.{type(message).__qualname__}"
    wait_until(
        lambda: any(
            q.queue == f"{name}/{queue_name}" and q.dead_letters == 1 for q in broker.queues()
        ),
        timeout=20,
    )
    subscription.cancel()


def test_dead_letters_json_is_json_whatever_the_fields_hold(hub: Hub) -> None:
    """A field JSON cannot hold as is (a dict with tuple keys, a NaN, a set) must not crash the
    command (it did: a traceback, exit 1) nor print what is not JSON (``NaN``)."""
    with HubBroker(hub.address) as broker:
        _dead_letter(broker, Tick({(1, 2): 3}, "tuple keys"), "keys")  # type: ignore[arg-type]
        _dead_letter(broker, OrderPlaced(1, math.nan), "nan")
        _dead_letter(broker, Tick({1, 2}, "a set"), "set")  # type: ignore[arg-type]
    for queue in ("tests.messages.Tick/keys", "tests.messages.OrderPlaced/nan"):
        done = run_cli("dead-letters", queue, "--json", "--address", hub.address)
        assert done.returncode == 0, done.stderr
        (dead,) = _strict(done.stdout)["dead_letters"]
        assert dead["decoded"] is True
        assert dead["repr"] in (
            "Tick(seq={(1, 2): 3}, source='tuple keys')",
            "OrderPlaced(order_id=1, amount=nan)",
        )
    done = run_cli("dead-letters", "tests.messages.Tick/set", "--json", "--address", hub.address)
    assert done.returncode == 0, done.stderr
    (dead,) = _strict(done.stdout)["dead_letters"]
    assert dead["decoded"] is True


def test_requeue_of_one_id_from_two_operators_at_once_requeues_it_once(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        _dead_letter(broker, Tick(5, "twice"), "twice")
        (record,) = broker.dead_letters(Tick, "twice")
        results: list[Any] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    request_requeue(hub.address, Tick, "twice", [record.message_id], timeout=20)
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(done.requeued for done in results) == [0, 1]
        (stats,) = [q for q in broker.queues() if q.queue == "tests.messages.Tick/twice"]
        assert (stats.held, stats.dead_letters, stats.requeued) == (1, 0, 1)


def test_a_limit_past_63_bits_means_all_not_a_silent_drop(hub: Hub) -> None:
    """The hub drops a request whose limit does not fit 63 bits as malformed: the caller then
    waited its whole timeout for "no hub answered" (exit code 4)."""
    huge = 10**30
    with HubBroker(hub.address) as broker:
        _dead_letter(broker, Tick(1, "dead"), "work")
        (record,) = request_dead_letters(hub.address, Tick, "work", limit=huge, timeout=10)
        assert record.payload is not None
    done = run_cli(
        "dead-letters",
        "tests.messages.Tick/work",
        "--json",
        "--limit",
        str(huge),
        "--address",
        hub.address,
        "--timeout",
        "10",
    )
    assert done.returncode == 0, done.stderr
    assert len(_strict(done.stdout)["dead_letters"]) == 1
