"""The quiet path: a publisher that finds the bus quiet sends at once, from its own thread, and a
batch arriving at an idle dispatcher is read by the dispatcher itself (docs/architecture.md,
"Where a round trip's time goes"). Nothing here asserts a timing: these prove that the short cuts
keep every message, each publisher's order, and flushes, between real processes, at every pace
(quiet, bursts, both at once from several threads)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ipcbus import Hub, HubBroker, connect

from .conftest import wait_until
from .hubtools import Workers, paired_channel
from .messages import Ping, Pong, Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

THREADS = 4
PER_THREAD = 400


@pytest.fixture
def hub_with_small_pipes() -> Iterator[Hub]:
    with Hub(start_method="fork", hwm=20) as running:
        yield running


def _echo(address: str, ready: Any, stop: Any) -> None:
    broker = connect(address)
    broker.subscribe(Ping, lambda ping: broker.publish(Pong(ping.token, 0)))
    ready.send("ready")
    stop.poll(120)
    broker.close()


def test_round_trips_chained_in_handlers_across_processes(fresh_hub: Any, workers: Workers) -> None:
    """Each Pong's handler publishes the next Ping: both sides publish from handler threads on
    an otherwise quiet bus, every one of them at once."""
    workers.start(_echo, fresh_hub.address)
    total = 300
    received: list[str] = []
    done = threading.Event()
    with HubBroker(fresh_hub.address) as broker:

        def on_pong(pong: Pong) -> None:
            received.append(pong.token)
            if len(received) == total:
                done.set()
            else:
                broker.publish(Ping(str(len(received))))

        broker.subscribe(Pong, on_pong)
        broker.publish(Ping("0"))
        assert done.wait(60), f"{len(received)} of {total} round trips completed"
        broker.flush(30)
        assert broker.rejected == 0
    assert received == [str(seq) for seq in range(total)]


def _paced_publisher(address: str, ready: Any, stop: Any) -> None:
    """THREADS threads publish PER_THREAD Ticks each: bursts (queued, batched) and single
    messages after pauses (sent at once), interleaved between the threads."""
    broker = connect(address)
    ready.send("ready")
    stop.poll(60)  # the test closes its end once it subscribed: go

    def publish(source: str) -> None:
        for seq in range(PER_THREAD):
            broker.publish(Tick(seq, source))
            if seq % 25 == 0:
                time.sleep(0.002)  # quiet: the next publish goes at once
            elif seq % 7 == 0:
                time.sleep(0.0003)

    threads = [threading.Thread(target=publish, args=(f"t{n}",)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    broker.flush(30)
    broker.close()


def test_quiet_and_busy_publishes_keep_each_threads_order(fresh_hub: Any) -> None:
    received: dict[str, list[int]] = {f"t{n}": [] for n in range(THREADS)}
    lock = threading.Lock()

    def on_tick(tick: Tick) -> None:
        with lock:
            received[tick.source].append(tick.seq)

    with HubBroker(fresh_hub.address) as broker:
        broker.subscribe(Tick, on_tick)
        workers = Workers()
        try:
            process = workers.start(_paced_publisher, fresh_hub.address)
            process.stop_pipe.close()  # go
            wait_until(lambda: sum(map(len, received.values())) >= THREADS * PER_THREAD, timeout=60)
            process.join(30)
            assert process.exitcode == 0
        finally:
            workers.close()
        assert broker.gaps == 0
    for source, seqs in received.items():
        assert seqs == list(range(PER_THREAD)), f"{source}: out of order or incomplete"


def test_flush_confirms_a_message_sent_at_once(fresh_hub: Any) -> None:
    got = threading.Event()
    with HubBroker(fresh_hub.address) as broker:
        broker.subscribe(Tick, lambda tick: got.set())
        time.sleep(0.01)  # quiet: the publish below goes at once
        broker.publish(Tick(1, "once"))
        broker.flush(30)
        assert got.wait(30)
    assert broker.undelivered == 0


def test_a_quiet_publisher_sends_a_due_confirmation_after_its_message() -> None:
    """A client asks the hub from time to time to confirm what it sent (client/confirm.py): a
    quiet publisher by time, not every 32 messages. When one is due, the publisher's thread
    sends its message, then the request for the confirmation (which covers the message too);
    before, the request went first and the message waited in the outbox for the I/O thread."""

    from ipcbus.client.data import DataChannel
    from ipcbus.client.outbox import Outbox
    from ipcbus.client.session import Session
    from ipcbus.wire import protocol as wire

    outbox = Outbox(max_batch=1000, on_reject=lambda rejected: None)
    outbox.set_limit(1024 * 1024)
    outbox.check(Tick(0, "quiet"))
    wakes: list[str] = []
    channel = DataChannel(
        outbox, Session("ipc://test"), lambda: None, lambda: wakes.append("wake"), 10_000
    )
    with paired_channel(channel, "data") as (hub_side, _client):
        kinds: list[bytes] = []
        for seq in range(41):
            # Quiet: each publish goes at once; the last one after a confirmation is due.
            time.sleep(0.3 if seq == 40 else 0.001)
            assert channel.send_at_once(Tick(seq, "quiet"))
            assert not outbox.items, f"message {seq} was left for the I/O thread"
            while hub_side.poll(1000 if len(kinds) <= seq else 0):
                kinds.append(wire.parse_data_kind(hub_side.recv_multipart()[0]))
        assert kinds[:40] == [wire.PUBLISH] * 40  # no confirmation asked every 32 messages
        assert kinds[40:] == [wire.PUBLISH, wire.FLUSH]  # the message, then the ask
        assert wakes == []  # the I/O thread had nothing to do


def test_past_max_unconfirmed_the_pump_asks_a_confirmation_and_waits_for_it() -> None:
    """With max_unconfirmed messages sent and not confirmed, the I/O thread sends nothing more
    but a request for a confirmation, and sends on once the hub answered. Also when the
    confirmation asked before went back into the outbox (a lost hub: resend_flushes, which now
    forgets it was asked), behind
    the messages that wait: the cap then held it back for ever (found by the hub-kill test)."""

    from ipcbus.client.data import DataChannel
    from ipcbus.client.outbox import Outbox
    from ipcbus.client.session import Session
    from ipcbus.wire import protocol as wire

    outbox = Outbox(max_batch=10, on_reject=lambda rejected: None)
    outbox.set_limit(1024 * 1024)
    outbox.check(Tick(0, "cap"))
    channel = DataChannel(outbox, Session("ipc://test"), lambda: None, lambda: None, 20)

    def received() -> list[list[bytes]]:
        requests = []
        while hub_side.poll(200):
            requests.append(hub_side.recv_multipart())
        return requests

    def answer(requests: list[list[bytes]]) -> None:
        for request in requests:
            if wire.parse_data_kind(request[0]) == wire.FLUSH:
                hub_side.send_multipart(wire.flushed(b"", request[1], b"")[1:])
                assert client_side.poll(1000)  # there for the pump to read

    with paired_channel(channel, "cap") as (hub_side, client_side):
        for seq in range(50):
            outbox.append(Tick(seq, "cap"))
        channel.pump()
        first = received()
        kinds = [wire.parse_data_kind(request[0]) for request in first]
        assert kinds == [wire.PUBLISH, wire.PUBLISH, wire.FLUSH]  # 20 sent, then the ask
        assert outbox.sent == 20
        channel.pump()
        assert received() == [], "sent past the cap without a confirmation"
        answer(first)
        channel.pump()
        assert outbox.confirmed == 20
        second = received()
        assert [wire.parse_data_kind(request[0]) for request in second][:2] == [wire.PUBLISH] * 2
        assert outbox.sent == 40
        # The hub is lost before it answers: its confirmation goes back behind the queue.
        outbox.resend_flushes()
        assert outbox.flushes == {}
        channel.pump()
        third = received()
        assert [wire.parse_data_kind(request[0]) for request in third] == [wire.FLUSH]
        answer(third)
        channel.pump()
        assert outbox.confirmed == 40
        assert outbox.sent == 50


def _flood(address: str, ready: Any, stop: Any) -> None:
    """Publishes Ticks as fast as it can until the test closes its stop pipe (at most 60 s)."""
    broker = connect(address)
    ready.send("ready")
    deadline = time.monotonic() + 60
    seq = 0
    while time.monotonic() < deadline and not stop.poll(0):
        for _ in range(500):
            broker.publish(Tick(seq, "flood"))
            seq += 1
    broker.close()


def test_close_in_a_handler_under_a_flood_never_holds_the_hub(
    hub_with_small_pipes: Any, workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    """close() in a broadcast handler: the dispatcher stops reading the SUB socket, so the I/O
    thread reads (and drops) what keeps coming. Otherwise the pipe fills, the hub holds its
    fan-out for this process, reads no more data, and close() waits out its linger for a
    FLUSHED that cannot come."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    broker = HubBroker(hub_with_small_pipes.address, hwm=20, dispatch_queue=2, linger=5.0)
    closed = threading.Event()

    def on_tick(tick: Tick) -> None:
        if tick.seq >= 2_000 and not closed.is_set():
            closed.set()
            broker.close()

    try:
        broker.subscribe(Tick, on_tick)
        workers.start(_flood, hub_with_small_pipes.address)
        assert closed.wait(60)
        wait_until(lambda: broker.closed, 30)
    finally:
        broker.close()
    assert not [r for r in caplog.records if "without a complete flush" in r.getMessage()]
    assert broker.undelivered == 0
