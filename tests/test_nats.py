"""NatsBroker beyond the contract suite: names on the server, signatures against a forging
publisher, slow consumers, limits, fork, long handlers. Against a real ``nats-server -js``."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    HubUnavailableError,
    MessageTooLargeError,
    connect,
    get_message_broker,
    set_message_broker,
)
from ipcbus.exceptions import InsecurePathError
from ipcbus.nats import NatsBroker
from ipcbus.nats.envelope import Signer, seal
from ipcbus.nats.signing import load_or_create_secret
from ipcbus.nats.subjects import consumer_name, escape_token, subject_for, unescape_token

from .conftest import wait_until
from .hubtools import BarrierWaiter, close_with_stuck_handlers, request_in_thread
from .messages import OrderPlaced, Tick
from .natstools import SECRET, NatsServer

pytestmark = pytest.mark.usefixtures("no_leftovers")

FORK: Any = multiprocessing.get_context("fork")


@pytest.fixture
def namespace(nats_server: NatsServer) -> str:
    return nats_server.namespace()


@pytest.fixture
def broker(nats_server: NatsServer, namespace: str) -> Iterator[NatsBroker]:
    with NatsBroker(nats_server.url, namespace=namespace, secret=SECRET) as opened:
        yield opened


# -- names ------------------------------------------------------------------------------------


def test_a_type_name_maps_to_readable_valid_subject_tokens() -> None:
    assert subject_for("ipcbus", "tests.messages.OrderPlaced") == (
        "ipcbus.m.tests.messages.OrderPlaced"
    )
    assert subject_for("app", "main.build.<locals>.Local") == (
        "app.m.main.build.-3Clocals-3E.Local"
    )
    names = ["", "-", "a-b", "a b", "*", ">", "é", "-2D", "x_y", "<lambda>"]
    escaped = [escape_token(name) for name in names]
    assert len(set(escaped)) == len(names), "the mapping is injective"
    for name, token in zip(names, escaped, strict=True):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
        assert unescape_token(token) == name
    assert consumer_name("a.b") != consumer_name("a_b")
    assert len(consumer_name("q" * 500)) < 80


def test_connect_picks_the_nats_broker_by_scheme(nats_server: NatsServer, namespace: str) -> None:
    with connect(nats_server.url, namespace=namespace, secret=SECRET) as broker:
        assert isinstance(broker, NatsBroker)
        received: list[Tick] = []
        broker.subscribe(Tick, received.append)
        broker.publish(Tick(1))
        BarrierWaiter(broker).wait(broker, 10)
    assert received == [Tick(1)]


# -- the secret -------------------------------------------------------------------------------


class Exploit:
    """What an attacker pickles: unpickling it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


async def _forge(url: str, subject: str, forgeries: list[tuple[bytes, Any]]) -> None:
    client = await nats.connect(url)
    try:
        for data, headers in forgeries:
            await client.publish(subject, data, headers=headers)
        await client.flush()
    finally:
        await client.close()


def test_a_forged_pickled_payload_is_never_unpickled(
    nats_server: NatsServer,
    broker: NatsBroker,
    namespace: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that may publish on the subject but lacks the bus secret: its pickles reach
    neither broadcast subscribers nor queue groups, and are counted."""
    marker = tmp_path / "unpickled"
    received: list[OrderPlaced] = []
    worked: list[OrderPlaced] = []
    broker.subscribe(OrderPlaced, received.append)
    broker.subscribe_async(OrderPlaced, worked.append, "work")
    subject = subject_for(namespace, "tests.messages.OrderPlaced")
    payload = pickle.dumps(Exploit(marker))
    other_secret = os.urandom(32).hex().encode()
    genuine = seal(Signer(other_secret), subject, "forged-1", "p", 0.0, payload)
    head = genuine[: -len(payload) - 32]
    forgeries = [
        (payload, None),  # a bare pickle
        (payload, {"Ipcbus-Meta": "forged-1 p 0.0"}),  # with headers that look like ours
        (head + b"\0" * 32 + payload, None),  # an envelope with a made-up signature
        (genuine, None),  # signed, with another secret
    ]
    asyncio.run(_forge(nats_server.url, subject, forgeries))
    # Broadcast and the queue group each see the four: 8 rejections.
    wait_until(lambda: broker.statistics().rejected == 8, 20)
    broker.publish(OrderPlaced(1))
    BarrierWaiter(broker).wait(broker, 10)
    wait_until(lambda: worked == [OrderPlaced(1)], 20)
    assert not marker.exists(), "a forged payload was unpickled"
    assert received == [OrderPlaced(1)]
    statistics = broker.statistics()
    assert statistics.rejected == 8
    assert statistics.queues["tests.messages.OrderPlaced:work"].held == 0
    assert any("without a valid signature" in r.getMessage() for r in caplog.records)


def test_a_broker_with_another_secret_is_not_heard(
    nats_server: NatsServer, broker: NatsBroker, namespace: str
) -> None:
    received: list[Tick] = []
    broker.subscribe(Tick, received.append)
    with NatsBroker(nats_server.url, namespace=namespace, secret=os.urandom(32).hex()) as other:
        other.publish(Tick(1))
        other.flush(10)
    wait_until(lambda: broker.statistics().rejected == 1, 20)
    assert received == []


def test_the_key_file_is_created_private_and_a_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nats.key"
    secret = load_or_create_secret(str(path))
    assert len(secret) == 64
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(str(path)) == secret
    planted = tmp_path / "planted.key"
    planted.symlink_to(path)
    with pytest.raises(InsecurePathError):
        load_or_create_secret(str(planted))


# -- limits -----------------------------------------------------------------------------------


def test_slow_broadcast_handlers_drop_what_exceeds_the_limit_counted_and_logged(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    received: list[int] = []

    def slow(message: Tick) -> None:
        release.wait(30)
        received.append(message.seq)

    with NatsBroker(
        nats_server.url, namespace=namespace, secret=SECRET, pending_msgs_limit=10
    ) as broker:
        broker.subscribe(Tick, slow)
        for seq in range(200):
            broker.publish(Tick(seq))
        broker.flush(10)
        wait_until(lambda: broker.statistics().dropped >= 189, 20)
        release.set()
        wait_until(lambda: len(received) + broker.statistics().dropped == 200, 20)
        dropped = broker.statistics().dropped
    assert 189 <= dropped <= 190
    assert received == sorted(received)
    assert any(
        "slow consumer" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records
    )


def test_a_message_over_the_servers_max_payload_is_rejected_in_the_caller(
    broker: NatsBroker,
) -> None:
    received: list[Tick] = []
    broker.subscribe(Tick, received.append)
    with pytest.raises(MessageTooLargeError, match="max_payload"):
        broker.publish(Tick(1, "x" * (2 * 1024 * 1024)))
    broker.publish(Tick(2))
    BarrierWaiter(broker).wait(broker, 10)
    assert received == [Tick(2)]


def test_a_handler_longer_than_ack_wait_is_not_delivered_twice(
    nats_server: NatsServer, namespace: str
) -> None:
    calls: list[int] = []

    def long_job(message: Tick) -> None:
        calls.append(AsyncMessageContext.current().attempt)
        threading.Event().wait(2.5)

    with NatsBroker(nats_server.url, namespace=namespace, secret=SECRET, ack_wait=1.0) as broker:
        broker.subscribe_async(Tick, long_job, "long")
        broker.publish(Tick(1))
        broker.flush(10)
        wait_until(lambda: calls != [], 10)
        wait_until(lambda: broker.statistics().in_hand == 0, 20)
        threading.Event().wait(1.5)  # a redelivery would come after ack_wait (1 s)
        queues = broker.statistics().queues
    assert calls == [1]
    assert queues["tests.messages.Tick:long"].in_flight == 0


# -- fork -------------------------------------------------------------------------------------


def _in_child(parent: NatsBroker, result: Any) -> None:
    try:
        parent.publish(Tick(0))
        outcome = "the parent's broker published"
    except BrokerClosedError:
        child = get_message_broker()
        outcome = "own" if isinstance(child, NatsBroker) and child is not parent else "same"
        child.publish(Tick(1))
        child.flush(10)
        child.close()
    result.send(outcome)


def test_a_forked_child_refuses_the_parents_broker_and_connects_its_own(
    broker: NatsBroker,
) -> None:
    received: list[Tick] = []
    broker.subscribe(Tick, received.append)
    set_message_broker(broker)
    here, there = FORK.Pipe()
    child = FORK.Process(target=_in_child, args=(broker, there))
    child.start()
    try:
        assert here.poll(30)
        assert here.recv() == "own"
    finally:
        child.join(30)
    assert child.exitcode == 0
    wait_until(lambda: received == [Tick(1)], 10)
    broker.publish(Tick(2))  # the parent's broker still works
    BarrierWaiter(broker).wait(broker, 10)
    assert received == [Tick(1), Tick(2)]


# -- the server restarts ----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[NatsServer]:
    """A nats-server of this test's own, to kill and restart (the session's stays up)."""
    from .natstools import require_nats_server

    private = NatsServer(require_nats_server()).start()
    try:
        yield private
    finally:
        private.stop()


def test_stored_jobs_survive_a_killed_server_and_brokers_reconnect(server: NatsServer) -> None:
    options: dict[str, Any] = {
        "secret": SECRET,
        "namespace": "restart",
        "reconnect_time_wait": 0.2,
    }
    with NatsBroker(server.url, **options) as producer:
        producer.declare_queue(Tick, "work")
        for seq in range(50):
            producer.publish(Tick(seq))
        producer.flush(10)
        server.kill()
        server.start()
        wait_until(lambda: _reconnects(producer) == 1, 30)
        done: list[int] = []
        producer.subscribe_async(Tick, lambda m: done.append(m.seq), "work")
        wait_until(lambda: len(done) >= 50, 30)
        producer.publish(Tick(50))  # and the connection works again both ways
        wait_until(lambda: len(done) >= 51, 30)
    assert sorted(done) == list(range(51))


def _reconnects(broker: NatsBroker) -> int:
    try:
        return broker.statistics().reconnects
    except Exception:  # the server is not back yet: statistics() asks it about the groups
        return -1


async def _delete_consumer(url: str, stream: str, durable: str) -> None:
    client = await nats.connect(url)
    try:
        await client.jetstream().delete_consumer(stream, durable)
    finally:
        await client.close()


def test_a_group_deleted_under_its_member_is_reported_without_a_busy_loop(
    broker: NatsBroker,
    nats_server: NatsServer,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ipcbus.nats.subjects import stream_name

    broker.subscribe_async(Tick, lambda m: None, "work")
    stream = stream_name(namespace, "tests.messages.Tick")
    asyncio.run(_delete_consumer(nats_server.url, stream, consumer_name("work")))
    wait_until(lambda: any("refused a pull" in r.getMessage() for r in caplog.records), 10)
    threading.Event().wait(2.0)
    refusals = [r for r in caplog.records if "refused a pull" in r.getMessage()]
    assert len(refusals) <= 6, f"{len(refusals)} refusals in 2 s: a busy loop"
    received: list[Tick] = []
    broker.subscribe(Tick, received.append)  # the broker still works
    broker.publish(Tick(1))
    BarrierWaiter(broker).wait(broker, 10)
    assert received == [Tick(1)]


def test_close_with_stuck_handlers_gives_them_one_linger_together(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A broadcast handler and a queue handler that never return: close() gives the threads
    that run handlers one linger together, not one each (as HubBroker's close, same test)."""
    caplog.set_level(logging.CRITICAL, logger="ipcbus")
    linger = 2.0
    broker = NatsBroker(nats_server.url, namespace=namespace, secret=SECRET, linger=linger)

    def subscribe(stuck: Callable[[Any], None]) -> None:
        broker.subscribe(Tick, stuck)
        broker.subscribe_async(OrderPlaced, stuck, "jobs")

    ours: list[threading.Thread] = []
    try:
        took = close_with_stuck_handlers(broker, subscribe, [Tick(0), OrderPlaced(1)])
    finally:
        ours = [thread for thread in threading.enumerate() if thread.name.startswith("ipcbus")]
        wait_until(lambda: not [thread for thread in ours if thread.is_alive()], 20)
    # Before: a linger for the deliveries in hand, then one for each thread that runs handlers.
    assert took < 2 * linger + 0.5, f"close() took {took:.1f} s with linger={linger}"


def test_stores_unconfirmed_when_the_server_dies_are_counted_in_doubt_and_flush_returns(
    server: NatsServer,
) -> None:
    """Found by an adversarial review: after a server killed mid-stream, the confirmations
    JetStream had not sent were waited for for ever (flush() hung or timed out every time) and
    the messages it never stored were counted nowhere. Now: counted in store_in_doubt (an
    upper bound), and flush() confirms what came after."""
    options: dict[str, Any] = {"secret": SECRET, "namespace": "doubt"}
    with NatsBroker(server.url, reconnect_time_wait=0.2, **options) as producer:
        producer.declare_queue(Tick, "work")
        producer.flush(10)
        for seq in range(2000):  # many stores on their way when the server dies
            producer.publish(Tick(seq))
        server.kill()
        server.start()
        wait_until(lambda: _reconnects(producer) == 1, 30)
        producer.publish(Tick(2000))
        producer.flush(20)  # confirms what came after: nothing from before holds it
        statistics = producer.statistics()
        held = statistics.queues["tests.messages.Tick:work"].held
        # Every message is stored, unsent, or counted in doubt (what was lost is in there).
        accounted = held + statistics.store_in_doubt + statistics.unsent
        assert accounted >= 2001, statistics


def test_a_request_wakes_when_the_connection_closes_for_good(server: NatsServer) -> None:
    """The server gone and reconnection given up: a request waiting with timeout=None woke
    never (found by an adversarial review), and one made afterwards waited out its timeout for
    an answer to a message that never left."""
    broker = NatsBroker(
        server.url,
        secret=SECRET,
        namespace="gone",
        max_reconnect_attempts=2,
        reconnect_time_wait=0.2,
    )
    try:
        requester, outcome = request_in_thread(broker, Tick(1))
        wait_until(lambda: broker.pending_requests == 1, 10)
        server.kill()
        requester.join(30)
        assert not requester.is_alive(), "request(timeout=None) still waits"
        assert [type(exc) for exc in outcome] == [HubUnavailableError]
        began = time.monotonic()
        with pytest.raises(HubUnavailableError):
            broker.request(Tick(2), timeout=30)
        assert time.monotonic() - began < 10, "it waited for an answer that cannot come"
    finally:
        broker.close()
