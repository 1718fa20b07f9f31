"""The hub's security model (docs/security.md), attacked with raw pyzmq peers.

- A peer that cannot prove the bus secret gets nothing routed and nothing unpickled: its handshake
  is refused by the hub's ZAP handler before the hub reads a single frame of it.
- A peer that can (it read the 0600 key file, as a legitimate client does) is trusted to publish,
  but malformed input from it is counted and dropped, and the hub keeps serving.
- The hub never unpickles: hostile pickles are relayed (to secret holders only) as opaque bytes.
- Files: private 0700 directory, 0600 sockets and key file; TCP without CURVE is refused.

Hostile pickles carry a canary: unpickling one creates a file, which must never appear.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ipcbus import (
    Hub,
    HubBroker,
    HubStatistics,
    HubUnavailableError,
    connect,
)
from ipcbus.wire import keys as _keys
from ipcbus.wire import protocol as _wire
from ipcbus.wire.address import Address

from .conftest import wait_until
from .hubtools import BarrierWaiter, free_tcp_port, round_trip
from .messages import Barrier, Ping, Tick

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]

SPAWN: Any = multiprocessing.get_context("spawn")
REPLY_TIMEOUT = 10.0
# What a legitimate HubBroker sends for Tick (its unique name plus the terminator byte).
TICK_TOPIC = b"tests.messages.Tick\x00"
PING_TOPIC = b"tests.messages.Ping\x00"
# A well-formed topic nobody subscribes to: accepted requests on it are relayed to no one.
NOBODY_TOPIC = b"tests.test_security.Nobody\x00"
META = _wire.pack_meta(b"P", 1, 0.0)
SPLIT_META = _wire.pack_meta(_wire.CODEC_SPLIT_OBJECTS, 1, 0.0)
PUBLISH = _wire.header(_wire.PUBLISH)


class _Canary:
    """Unpickling this opens (creates) a file: the stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _hostile_publish(canary: Path, topic: bytes = TICK_TOPIC) -> list[bytes]:
    """A well-formed PUBLISH of Tick whose payload creates ``canary`` when unpickled."""
    payload = pickle.dumps([_Canary(canary)], protocol=5)
    return _wire.publish(topic, _wire.pack_meta(b"P", 1, time.time()), [payload])


def _canaries(directory: Path) -> list[Path]:
    return sorted(directory.glob("canary-*"))


def _secret(address: str) -> bytes:
    """The bus secret, read from the key file the way a legitimate client reads it."""
    return _keys.read_secret(Address.parse(address).key_file)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


class RawPeers:
    """Raw pyzmq sockets, no ipcbus code involved; all closed with linger 0 by ``close()``."""

    def __init__(self) -> None:
        self.context: zmq.Context[Any] = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []
        self._monitors: dict[zmq.Socket[bytes], zmq.Socket[bytes]] = {}

    def socket(
        self,
        kind: int,
        endpoint: str,
        password: bytes | None = None,
        *,
        monitor: bool = False,
        routing_id: bytes | None = None,
    ) -> zmq.Socket[bytes]:
        """A socket connected to ``endpoint``; with ``password`` it tries the CURVE keys derived
        from it, as a client does."""
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        sock.linger = 0
        if routing_id is not None:
            sock.routing_id = routing_id
        if password is not None:
            _keys.prove(sock, password)
        if monitor:
            self._monitors[sock] = sock.get_monitor_socket()
        sock.connect(endpoint)
        self.sockets.append(sock)
        return sock

    def plain_socket(self, kind: int, endpoint: str, password: bytes) -> zmq.Socket[bytes]:
        """A socket that offers the secret as a PLAIN password (what clients did before they
        authenticated the hub): monitored, connected."""
        sock: zmq.Socket[bytes] = self.context.socket(kind)
        sock.linger = 0
        sock.plain_username = _keys.USERNAME
        sock.plain_password = password
        self._monitors[sock] = sock.get_monitor_socket()
        sock.connect(endpoint)
        self.sockets.append(sock)
        return sock

    def handshake_failed(self, sock: zmq.Socket[bytes], timeout: float) -> bool:
        return _handshake_failed(self._monitors[sock], timeout)

    def close(self) -> None:
        for sock, monitor in self._monitors.items():
            sock.disable_monitor()
            monitor.close(linger=0)
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.destroy(linger=0)  # also any socket a failing test left open


def _handshake_failed(monitor: zmq.Socket[bytes], timeout: float) -> bool:
    """True once the monitored socket saw its handshake fail; an assertion error if it ever
    succeeds."""
    deadline = time.monotonic() + timeout
    failures = {
        zmq.EVENT_HANDSHAKE_FAILED_AUTH,
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    }
    while (remaining := deadline - time.monotonic()) > 0:
        if not monitor.poll(int(remaining * 1000) + 1):
            break
        event = recv_monitor_message(monitor)["event"]
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a peer without the secret got in"
        if event in failures:
            return True
    return False


def _receive(sock: zmq.Socket[bytes], timeout: float = REPLY_TIMEOUT) -> list[bytes]:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"no answer from the hub within {timeout} s")
    return sock.recv_multipart()


class AuthenticatedPeer:
    """A raw peer that proves the secret, on the control and data endpoints of a hub."""

    def __init__(self, peers: RawPeers, address: str, routing_id: bytes | None = None) -> None:
        secret = _secret(address)
        # An ASCII identity, like a HubBroker's (ZeroMQ's own are b"\0" + 4 random bytes; see
        # test_a_client_whose_identity_is_not_utf8_can_leave).
        routing_id = routing_id or b"raw-" + os.urandom(4).hex().encode()
        self.control = peers.socket(zmq.DEALER, address, secret, routing_id=routing_id)
        self.data = peers.socket(zmq.DEALER, address + ".in", secret, routing_id=routing_id)
        self._tokens = iter(range(1, 2**62))

    def hello(self) -> None:
        """Become a client of the hub (what a HubBroker does first)."""
        self.control.send_multipart([_wire.header(_wire.HELLO), b"raw-peer"])
        self.expect(_wire.WELCOME)

    def expect(self, kind: bytes, timeout: float = REPLY_TIMEOUT) -> list[bytes]:
        """The body of the next ``kind`` on the control socket (answering GROUPS on the way,
        as a client must for its own CONSUME to be confirmed)."""
        deadline = time.monotonic() + timeout
        while True:
            head, *body = _receive(self.control, max(0.0, deadline - time.monotonic()))
            if head == _wire.header(kind):
                return body
            if head == _wire.header(_wire.GROUPS):
                self.control.send_multipart([_wire.header(_wire.GROUPS_ACK), body[0]])

    def control_statistics(self, timeout: float = REPLY_TIMEOUT) -> HubStatistics:
        """Statistics from a STATS on the control socket: the hub answers it after everything
        this peer sent there before it (one connection, order kept)."""
        self.control.send_multipart([_wire.header(_wire.STATS)])
        (body,) = self.expect(_wire.STATS, timeout)
        return HubStatistics.from_json(body)

    def send_data(self, hub: Hub, frames: list[bytes]) -> tuple[HubStatistics, HubStatistics]:
        """Send ``frames`` on the data socket: the hub's statistics once it has handled what
        came before them, and once it has handled them."""
        self.data_sync()
        before = hub.statistics()
        self.data.send_multipart(frames)
        self.data_sync()
        return before, hub.statistics()

    def data_sync(self, timeout: float = REPLY_TIMEOUT) -> None:
        """Return once the hub has handled everything this peer sent on the data socket."""
        token = b"sync-%d" % next(self._tokens)
        self.data.send_multipart([_wire.header(_wire.FLUSH), token])
        deadline = time.monotonic() + timeout
        while True:
            answer = _wire.parse_flushed(_receive(self.data, max(0.0, deadline - time.monotonic())))
            if answer is not None and answer[0] == token:
                return


# -- peers without the secret ----------------------------------------------------------------


def _subscriber_child(
    address: str,
    reports: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Spawned: a legitimate subscriber to Tick; on each Barrier it reports what it received."""
    received: list[int] = []
    with connect(address) as broker:
        broker.subscribe(Tick, lambda m: received.append(m.seq))
        broker.subscribe(Barrier, lambda m: reports.send((m.token, list(received))))
        reports.send(("ready", []))
        stop.poll(120)


def _report(reports: multiprocessing.connection.Connection, token: str) -> list[int]:
    """What the subscriber child had received when it saw Barrier(token)."""
    while True:
        assert reports.poll(REPLY_TIMEOUT), "the subscriber child did not report"
        seen, received = reports.recv()
        if seen == token:
            return list(received)


def _offer(sock: zmq.Socket[bytes], *messages: list[bytes]) -> None:
    """Queue ``messages`` for the hub: they would reach it if it accepted the connection. A
    socket queues only while its connection is pending: once the hub refused the handshake,
    there is nowhere to queue (EAGAIN), which is just as well."""
    for frames in messages:
        with contextlib.suppress(zmq.Again):
            sock.send_multipart(frames, zmq.NOBLOCK)


@pytest.mark.forks
def test_peers_without_the_secret_get_nothing_routed_and_nothing_unpickled(
    fresh_hub: Hub, raw_peers: RawPeers, tmp_path: Path
) -> None:
    address = fresh_hub.address
    endpoints = {"control": address, "data": address + ".in", "fanout": address + ".pub"}
    garbage = [[b"\x00"], [b"\xff" * 300, b"", b"x"], [os.urandom(64) for _ in range(5)]]
    before = fresh_hub.statistics()
    reports, child_reports = SPAWN.Pipe(duplex=False)
    child_stop, stop = SPAWN.Pipe(duplex=False)  # (reader, writer)
    child = SPAWN.Process(
        target=_subscriber_child, args=(address, child_reports, child_stop), daemon=True
    )
    child.start()
    child_reports.close()
    child_stop.close()
    try:
        with HubBroker(address) as broker:
            # No predicate: this hub is the test's own, every Tick on it is counted.
            received: list[int] = []
            broker.subscribe(Tick, lambda m: received.append(m.seq))
            barrier = BarrierWaiter(broker)
            assert reports.poll(60), "the subscriber child did not start"
            assert reports.recv() == ("ready", [])

            rogues: list[zmq.Socket[bytes]] = []
            rogue_subscribers: list[zmq.Socket[bytes]] = []
            # No credentials at all (NULL mechanism), and the right user with a wrong password.
            for credentials, password in (("none", None), ("wrong", b"0" * 64)):
                for name in ("control", "data"):
                    dealer = raw_peers.socket(zmq.DEALER, endpoints[name], password, monitor=True)
                    canary = tmp_path / f"canary-{credentials}-{name}"
                    _offer(
                        dealer,
                        *garbage,
                        _hostile_publish(canary),
                        [_wire.header(_wire.STATS)],
                        [_wire.header(_wire.FLUSH), b"t"],
                    )
                    rogues.append(dealer)
                # On the fan-out endpoint: an XSUB that sends garbage (subscriptions and not),
                # and a SUB that subscribes to everything.
                xsub = raw_peers.socket(zmq.XSUB, endpoints["fanout"], password, monitor=True)
                _offer(xsub, *([frame] for frame in (b"\x01", b"\x01" + TICK_TOPIC, b"\x07x", b"")))
                sub = raw_peers.socket(zmq.SUB, endpoints["fanout"], password, monitor=True)
                sub.subscribe(b"")
                rogues += [xsub, sub]
                rogue_subscribers += [xsub, sub]

            # Every rogue connection reached the hub and was refused in its handshake.
            for rogue in rogues:
                assert raw_peers.handshake_failed(rogue, REPLY_TIMEOUT), "no handshake refusal"

            count = 100
            for seq in range(count):
                broker.publish(Tick(seq))
            broker.flush(REPLY_TIMEOUT)
            barrier.wait(broker)
            broker.publish(Barrier("child"))
            broker.flush(REPLY_TIMEOUT)
            child_received = _report(reports, "child")

            # The legitimate traffic had time to reach every connected subscriber; the rogue
            # subscribers got none of it, the rogue dealers no answer.
            for rogue in rogue_subscribers:
                assert rogue.poll(200) == 0, "a peer without the secret received a message"
            for rogue in rogues:
                assert rogue.poll(0) == 0, "a peer without the secret got an answer"
            after = fresh_hub.statistics()
    finally:
        stop.close()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
        reports.close()

    assert _canaries(tmp_path) == [], "a hostile pickle was unpickled"
    assert child.exitcode == 0
    assert received == list(range(count))
    assert child_received == list(range(count))
    # Each of the 8 rogue connections was refused by the ZAP handler (some retried).
    assert after.auth_rejected - before.auth_rejected >= len(rogues)
    # Nothing of theirs was read: no malformed request, and only the legitimate messages
    # (the Ticks and two Barriers) were relayed.
    assert after.malformed_dropped == before.malformed_dropped
    assert after.messages_relayed - before.messages_relayed == count + 2
    round_trip(address, 20)
    assert _canaries(tmp_path) == []


# -- authenticated peers: malformed input ----------------------------------------------------

# Requests on the data endpoint; each is dropped and counted once. A DEALER's frames reach the
# hub behind the identity frame its ROUTER adds, and MAX_FRAMES counts that frame too.
MALFORMED_DATA = {
    "wrong version": [bytes((_wire.VERSION + 1,)) + _wire.PUBLISH + NOBODY_TOPIC + META, b"x"],
    "version zero": [b"\x00" + _wire.PUBLISH + NOBODY_TOPIC + META, b"x"],
    "header too long": [_wire.header(_wire.FLUSH) + b"!", b"token"],  # only a PUBLISH's is
    "header too short": [b"\x01"],
    "empty frame": [b""],
    "unknown kind": [_wire.header(b"Z"), b"x"],
    "control kind on data": [_wire.header(_wire.HELLO), b"raw-peer"],
    "publish without topic": [PUBLISH, b"x"],
    "publish without meta": [PUBLISH + NOBODY_TOPIC, b"x"],
    "publish without payload": [PUBLISH + NOBODY_TOPIC + META],
    "topic without terminator": [PUBLISH + TICK_TOPIC[:-1], b"x"],
    "empty topic": [PUBLISH + b"\x00" + META, b"x"],
    "sync topic": [PUBLISH + _wire.SYNC_PREFIX + b"raw:1\x00" + META, b"x"],
    "topic too long": [PUBLISH + b"a" * _wire.MAX_TOPIC_LEN + b"\x00" + META, b"x"],
    "too many frames": [PUBLISH + NOBODY_TOPIC + META, *[b"x"] * (_wire.MAX_FRAMES - 1)],
    # A split batch is two frames, sizes that add up to its payloads, one per message.
    "split batch in one frame": [PUBLISH + NOBODY_TOPIC + SPLIT_META, b"x"],
    "split batch in three frames": [PUBLISH + NOBODY_TOPIC + SPLIT_META, b"\x01\0\0\0", b"x", b"y"],
    "split sizes beyond the payloads": [
        PUBLISH + NOBODY_TOPIC + SPLIT_META,
        _wire.pack_sizes([2]),
        b"x",
    ],
    "split sizes short of the payloads": [
        PUBLISH + NOBODY_TOPIC + SPLIT_META,
        _wire.pack_sizes([1]),
        b"xy",
    ],
    "split sizes for more messages than the meta": [
        PUBLISH + NOBODY_TOPIC + SPLIT_META,
        _wire.pack_sizes([1, 1]),
        b"xy",
    ],
    "flush without token": [_wire.header(_wire.FLUSH)],
    "flush with two tokens": [_wire.header(_wire.FLUSH), b"a", b"b"],
}


@pytest.mark.parametrize("case", list(MALFORMED_DATA))
def test_malformed_data_requests_are_counted_and_dropped(
    fresh_hub: Hub, raw_peers: RawPeers, case: str
) -> None:
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    before, after = peer.send_data(fresh_hub, MALFORMED_DATA[case])
    assert after.malformed_dropped - before.malformed_dropped == 1
    assert after.batches_relayed == before.batches_relayed, "a malformed request was relayed"
    round_trip(fresh_hub.address, 20)


@pytest.mark.parametrize("meta", [b"", b"short", META + b"!"], ids=["empty", "short", "long"])
def test_a_meta_frame_of_the_wrong_size_is_counted_and_dropped(
    fresh_hub: Hub, raw_peers: RawPeers, meta: bytes
) -> None:
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    peer.data_sync()
    before = fresh_hub.statistics()
    peer.data.send_multipart([PUBLISH + NOBODY_TOPIC + meta, b"x"])
    peer.data_sync(timeout=2.0)  # the hub answers only if it is still alive
    after = fresh_hub.statistics()
    assert after.malformed_dropped - before.malformed_dropped == 1
    round_trip(fresh_hub.address, 20)


def test_the_largest_legal_request_is_relayed(fresh_hub: Hub, raw_peers: RawPeers) -> None:
    """The boundary of "too many frames": one frame fewer is a legal batch (a payload, a spool
    index and MAX_BUFFERS out-of-band buffers)."""
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    payloads = [b"x"] * (_wire.MAX_FRAMES - 2)  # the identity, the head
    assert len(payloads) == 2 + _wire.MAX_BUFFERS
    meta = _wire.pack_meta(b"P", len(payloads), time.time())
    peer.data_sync()
    before = fresh_hub.statistics()
    peer.data.send_multipart(_wire.publish(NOBODY_TOPIC, meta, payloads))
    peer.data_sync()
    after = fresh_hub.statistics()
    assert after.malformed_dropped == before.malformed_dropped
    assert after.messages_relayed - before.messages_relayed == len(payloads)


# Requests on the control endpoint from a peer that said HELLO; each is counted once.
MALFORMED_CONTROL = {
    "wrong version": [bytes((_wire.VERSION + 1,)) + _wire.PING],
    "header too short": [b"\x01"],
    "empty frame": [b""],
    "unknown kind": [_wire.header(b"Z")],
    "data kind on control": [PUBLISH + NOBODY_TOPIC + META, b"x"],
    "ack without deliveries": [_wire.header(_wire.ACK)],
    "ack with five fields": [_wire.header(_wire.ACK), b"s 1 1 ok 0.0"],
    "ack with an empty range": [_wire.header(_wire.ACK), b"s 2 1 ok 0.0 "],
    "ack of a negative delivery": [_wire.header(_wire.ACK), b"s -1 1 ok 0.0 "],
    "ack with an unknown outcome": [_wire.header(_wire.ACK), b"s 1 1 maybe 0.0 "],
    "ack with a negative delay": [_wire.header(_wire.ACK), b"s 1 1 failed -1.0 "],
    "ack with an infinite delay": [_wire.header(_wire.ACK), b"s 1 1 failed inf "],
    "ack with a delay that is no number": [_wire.header(_wire.ACK), b"s 1 1 failed x "],
    # One entry more than a client puts in one ACK: more frames than the hub takes.
    "ack of too many entries": [
        _wire.header(_wire.ACK), *[b"s 1 1 ok 0.0 "] * (_wire.MAX_ACKS + 1),
    ],
    "consume with too few frames": [_wire.header(_wire.CONSUME), b"1", PING_TOPIC],
    "consume with a bad prefetch": [
        _wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"q", b"many",
    ],
    "consume with a zero prefetch": [_wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"q", b"0"],
    "consume with too many frames": [
        _wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"q", b"10", b"3",
    ],
    "consume of a topic without terminator": [
        _wire.header(_wire.CONSUME), b"1", PING_TOPIC[:-1], b"q", b"10",
    ],
    "cancel of two ids": [_wire.header(_wire.CANCEL), b"1", b"2"],
    "groups ack without a number": [_wire.header(_wire.GROUPS_ACK), b"x"],
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED_CONTROL))
def test_malformed_control_requests_are_counted_and_dropped(
    fresh_hub: Hub, raw_peers: RawPeers, case: str
) -> None:
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    peer.hello()
    before = peer.control_statistics()
    peer.control.send_multipart(MALFORMED_CONTROL[case])
    after = peer.control_statistics()
    assert after.malformed_dropped - before.malformed_dropped == 1
    assert after.late_acks == before.late_acks
    assert after.queues == before.queues == {}, "a malformed CONSUME created a queue group"
    round_trip(fresh_hub.address, 20)


def test_an_unknown_control_request_before_hello_is_counted(
    fresh_hub: Hub, raw_peers: RawPeers
) -> None:
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    before = peer.control_statistics()  # STATS needs no HELLO
    peer.control.send_multipart([_wire.header(b"Z"), b"x"])
    after = peer.control_statistics()
    assert after.malformed_dropped - before.malformed_dropped == 1


def test_a_consume_of_a_topic_that_is_not_utf8_leaves_statistics_working(
    fresh_hub: Hub, raw_peers: RawPeers
) -> None:
    peer = AuthenticatedPeer(raw_peers, fresh_hub.address)
    peer.hello()
    topic = b"\xff\xfe\x00"  # no unique name encodes to this: only a raw peer sends it
    peer.control.send_multipart([_wire.header(_wire.CONSUME), b"1", topic, b"q", b"10"])
    with contextlib.suppress(AssertionError):
        peer.expect(_wire.CONSUMING, timeout=2.0)  # refusing it would be fine too
    peer.control_statistics(timeout=3.0)  # answered, whatever the hub made of the CONSUME
    fresh_hub.statistics(timeout=3.0)


@pytest.mark.parametrize("how", ["says goodbye", "falls silent"])
def test_a_client_whose_identity_is_not_utf8_can_leave(
    raw_peers: RawPeers, tmp_path: Path, how: str
) -> None:
    address = f"ipc://{tmp_path}/hub"
    group = "tests.messages.Ping/leave"
    heartbeat = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
    with Hub(address, start_method="fork", drain_timeout=1.0, **heartbeat) as hub:
        peer = AuthenticatedPeer(raw_peers, address, routing_id=b"\xff\xfe-raw")
        peer.hello()
        with HubBroker(address) as publisher:
            peer.control.send_multipart(
                [_wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"leave", b"10"]
            )
            assert peer.expect(_wire.CONSUMING) == [b"1"]
            publisher.publish(Ping("held"))
            publisher.flush(REPLY_TIMEOUT)
            peer.expect(_wire.DELIVER)
            before = peer.control_statistics()
            if how == "says goodbye":
                peer.control.send_multipart([_wire.header(_wire.BYE)])
            else:
                wait_until(lambda: hub.statistics(timeout=2.0).clients_lost == 1, REPLY_TIMEOUT)
            after = peer.control_statistics()
            assert after.malformed_dropped == before.malformed_dropped
            # Its delivery went back to the group, to wait for another consumer.
            assert after.queues[group]["in_flight"] == 0
            assert after.queues[group]["held"] == 1
            round_trip(address, 20)
        assert hub.stop() == 0


def test_an_oversized_frame_is_refused(raw_peers: RawPeers, tmp_path: Path) -> None:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork", max_message_size=4096) as hub:
        before = hub.statistics()
        # ZeroMQ drops the connection of a peer that sends a frame over the limit before the
        # hub reads it (so it is not counted as malformed): the frame is never relayed, and
        # the hub serves everyone else.
        big = raw_peers.socket(zmq.DEALER, hub.address + ".in", _secret(hub.address))
        monitor = big.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            big.send_multipart(_wire.publish(NOBODY_TOPIC, META, [b"x" * 8192]))
            assert monitor.poll(int(REPLY_TIMEOUT * 1000)), "the connection was not dropped"
        finally:
            big.disable_monitor()
            monitor.close(linger=0)
        after = hub.statistics()
        assert after.batches_relayed == before.batches_relayed
        assert after.malformed_dropped == before.malformed_dropped
        round_trip(hub.address)


# -- authenticated peers: replayed frames ----------------------------------------------------


def test_a_replayed_publish_is_just_another_publish(fresh_hub: Hub, raw_peers: RawPeers) -> None:
    """Replay protection is not needed: only holders of the secret can connect at all (the ZAP
    handler refuses every other handshake), and a holder of the secret may publish anything
    anyway. So a captured PUBLISH sent again is one more publish, delivered like any other."""
    address = fresh_hub.address
    secret = _secret(address)
    capture = raw_peers.socket(zmq.SUB, address + ".pub", secret)
    capture.subscribe(TICK_TOPIC)
    # The hub answers a sync subscription once the ones before it are live (see _wire).
    sync = _wire.SYNC_PREFIX + b"raw:capture"
    capture.subscribe(sync)
    assert _receive(capture) == [sync]
    replayer = AuthenticatedPeer(raw_peers, address)
    source = uuid.uuid4().hex
    with HubBroker(address) as broker:
        received: list[Tick] = []
        broker.subscribe(Tick, received.append, lambda m: m.source == source)
        barrier = BarrierWaiter(broker)
        broker.publish(Tick(7, source))
        barrier.wait(broker)
        # Fan-out is [head, *payload] (see _wire): the hub numbers each batch in its head.
        head, *payload = _receive(capture)
        topic, _seq, _publisher, meta = _wire.parse_fanout_head(head)
        assert topic == TICK_TOPIC
        replayer.data.send_multipart(_wire.publish(topic, meta, payload))
        replayer.data_sync()
        barrier.wait(broker)
    assert received == [Tick(7, source), Tick(7, source)]


def test_an_ack_for_a_settled_delivery_is_counted_late_and_changes_nothing(
    fresh_hub: Hub, raw_peers: RawPeers
) -> None:
    address = fresh_hub.address
    peer = AuthenticatedPeer(raw_peers, address)
    peer.hello()
    with HubBroker(address) as publisher:
        peer.control.send_multipart(
            [_wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"replay", b"10"]
        )
        assert peer.expect(_wire.CONSUMING) == [b"1"]
        publisher.publish(Ping("once"))
        publisher.flush(REPLY_TIMEOUT)
        descriptor, _meta, _sizes, _payloads = peer.expect(_wire.DELIVER)
        subscription_id, stream, seq, attempt, _rest = descriptor.split(b" ", 4)
        assert (subscription_id, attempt) == (b"1", b"1")
        ack = [_wire.header(_wire.ACK), b"%s %s %s ok 0.0 " % (stream, seq, seq)]
        peer.control.send_multipart(ack)
        settled = peer.control_statistics()
        peer.control.send_multipart(ack)  # replayed
        replayed = peer.control_statistics()
    group = "tests.messages.Ping/replay"
    assert settled.queues[group]["acked"] == 1
    assert replayed.late_acks - settled.late_acks == 1
    assert replayed.queues[group] == settled.queues[group]
    assert replayed.queues[group]["delivered"] == 1
    assert replayed.queues[group]["in_flight"] == 0


def test_an_ack_from_a_consumer_declared_gone_is_counted_late(
    raw_peers: RawPeers, tmp_path: Path
) -> None:
    """The ack of a consumer that was stopped past the heartbeat timeout arrives after its
    delivery went back to the group: ignored, and counted (_queues: "ignored and counted")."""
    address = f"ipc://{tmp_path}/hub"
    with Hub(address, start_method="fork", heartbeat_interval=0.2, heartbeat_timeout=1.0) as hub:
        peer = AuthenticatedPeer(raw_peers, address)
        peer.hello()
        with HubBroker(address) as publisher:
            peer.control.send_multipart(
                [_wire.header(_wire.CONSUME), b"1", PING_TOPIC, b"late", b"10"]
            )
            assert peer.expect(_wire.CONSUMING) == [b"1"]
            publisher.publish(Ping("late"))
            publisher.flush(REPLY_TIMEOUT)
            descriptor, _meta, _sizes, _payloads = peer.expect(_wire.DELIVER)
        stream, seq = descriptor.split(b" ")[1:3]
        # The peer sends no PING: after heartbeat_timeout the hub declares it gone.
        wait_until(lambda: hub.statistics().clients_lost == 1, REPLY_TIMEOUT)
        before = peer.control_statistics()  # STATS needs no HELLO
        assert before.queues["tests.messages.Ping/late"]["redelivered"] == 1
        ack = b"%s %s %s ok 0.0 " % (stream, seq, seq)
        peer.control.send_multipart([_wire.header(_wire.ACK), ack])
        after = peer.control_statistics()
    assert after.queues == before.queues, "a late ack changed the group"
    assert after.late_acks - before.late_acks == 1


# -- fuzz ------------------------------------------------------------------------------------

FUZZ_MESSAGES = 100_000
FUZZ_SEED = 20_240_229
FUZZ_WINDOW = 256
LEGIT_TICKS = 5_000
# Requests a client may send; a quarter of the fuzz starts with one of these behind a valid
# header, so that it reaches the parsers of each kind instead of dying at the header check.
CLIENT_KINDS = [
    _wire.HELLO,
    _wire.STATS,
    _wire.PING,
    _wire.CONSUME,
    _wire.CANCEL,
    _wire.ACK,
    _wire.GROUPS_ACK,
    _wire.BYE,
    _wire.PUBLISH,
    _wire.NUMBERED,
    _wire.FLUSH,
]


def _fuzz_message(rng: random.Random, pool: bytes) -> list[bytes]:
    frames = []
    for _ in range(rng.randint(1, 80)):
        size = rng.randint(0, 2048)
        start = rng.randrange(len(pool) - size + 1)
        frames.append(pool[start : start + size])
    if rng.random() < 0.25:
        kind = rng.choice(CLIENT_KINDS)
        frames[0] = _wire.header(kind)
        if kind == _wire.PUBLISH and len(frames) >= 2 and rng.random() < 0.5:
            # Half of the fuzz's PUBLISHes get a topic and a meta of the right size, to reach
            # further.
            frames[0] += rng.choice([NOBODY_TOPIC, frames[1][:40] + b"\x00"]) + rng.randbytes(13)
        elif kind == _wire.NUMBERED and len(frames) >= 2 and rng.random() < 0.5:
            # Flags (mostly valid), a position, a topic and a meta.
            flags = bytes((rng.choice([0, _wire.AGAIN, rng.randrange(256)]),))
            frames[0] += flags + rng.randbytes(8) + NOBODY_TOPIC + rng.randbytes(13)
    return frames


def _surely_malformed(frames: list[bytes]) -> bool:
    """Dropped at the frame count or header check, whatever the hub's state."""
    head = frames[0]
    too_many = len(frames) + 1 > _wire.MAX_FRAMES  # + the identity frame
    long_head = len(head) != _wire.HEADER_LEN and head[: _wire.HEADER_LEN] not in (
        PUBLISH,
        _wire.header(_wire.NUMBERED),
    )
    return too_many or long_head or len(head) < _wire.HEADER_LEN or head[0] != _wire.VERSION


def _fuzz_child(
    address: str, count: int, seed: int, report: multiprocessing.connection.Connection
) -> None:
    """Spawned: sends ``count`` random requests, 95 % through authenticated DEALERs on the
    control and data endpoints (in windows: a peer waits for the hub to catch up every
    FUZZ_WINDOW requests), 5 % through peers without the secret; reports what it sent."""
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 20)
    peers = RawPeers()
    try:
        peer = AuthenticatedPeer(peers, address)
        rogues = [
            peers.socket(zmq.DEALER, address, None),
            peers.socket(zmq.DEALER, address + ".in", b"0" * 64),
        ]
        sent = {"authenticated": 0, "surely_malformed": 0, "rogue": 0, "rogue_refused": 0}
        windows = {"control": 0, "data": 0}
        stats_requests = 0  # STATS the fuzz itself sent in this window: each gets an answer
        for _ in range(count):
            frames = _fuzz_message(rng, pool)
            if rng.random() < 0.05:
                sent["rogue"] += 1
                try:
                    rng.choice(rogues).send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    sent["rogue_refused"] += 1  # its pipe is full: it never connected
                continue
            sent["authenticated"] += 1
            sent["surely_malformed"] += _surely_malformed(frames)
            if rng.random() < 0.5:
                peer.control.send_multipart(frames)
                if frames[0] == _wire.header(_wire.STATS) and len(frames) < _wire.MAX_FRAMES:
                    stats_requests += 1
                windows["control"] += 1
                if windows["control"] == FUZZ_WINDOW:
                    _catch_up_control(peer, stats_requests)
                    windows["control"], stats_requests = 0, 0
            else:
                peer.data.send_multipart(frames)
                windows["data"] += 1
                if windows["data"] == FUZZ_WINDOW:
                    peer.data_sync(60)
                    windows["data"] = 0
        _catch_up_control(peer, stats_requests)
        peer.data_sync(60)
        report.send(sent)
    finally:
        peers.close()


def _catch_up_control(peer: AuthenticatedPeer, stats_requests: int) -> None:
    """Wait for the answer to a STATS sent after the window (and those of the window's own)."""
    peer.control.send_multipart([_wire.header(_wire.STATS)])
    for _ in range(stats_requests + 1):
        peer.expect(_wire.STATS, 60)


@pytest.mark.forks
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fuzzing_the_hub_does_not_disturb_legitimate_traffic(
    fresh_hub: Hub, tmp_path: Path
) -> None:
    address = fresh_hub.address
    assert fresh_hub.pid is not None
    source = uuid.uuid4().hex
    with HubBroker(address) as subscriber, HubBroker(address) as publisher:
        received: list[int] = []
        subscriber.subscribe(Tick, lambda m: received.append(m.seq), lambda m: m.source == source)
        barrier = BarrierWaiter(subscriber)
        barrier.wait(publisher)  # warm: both brokers connected, the subscription live
        before = fresh_hub.statistics()
        rss_before = _rss_kb(fresh_hub.pid)

        report, child_report = SPAWN.Pipe(duplex=False)
        fuzzer = SPAWN.Process(
            target=_fuzz_child,
            args=(address, FUZZ_MESSAGES, FUZZ_SEED, child_report),
            daemon=True,
        )
        started = time.monotonic()
        fuzzer.start()
        child_report.close()
        publishing_done = threading.Event()

        def publish_ticks() -> None:
            for seq in range(LEGIT_TICKS):
                publisher.publish(Tick(seq, source))
                if seq % 50 == 49:
                    time.sleep(0.1)  # spread the legitimate traffic over the fuzz run
            publishing_done.set()

        thread = threading.Thread(target=publish_ticks, daemon=True)
        thread.start()
        rss_peak = rss_before
        try:
            while fuzzer.is_alive() and time.monotonic() - started < 180:
                rss_peak = max(rss_peak, _rss_kb(fresh_hub.pid))
                fuzzer.join(0.5)
            assert report.poll(1), f"the fuzzer failed (exit code {fuzzer.exitcode})"
            sent = report.recv()
            thread.join(60)
            assert publishing_done.is_set()
            barrier.wait(publisher)
        finally:
            report.close()
            if fuzzer.is_alive():
                fuzzer.kill()
            fuzzer.join(10)
        elapsed = time.monotonic() - started
        # If the fuzz said HELLO and no BYE, the hub declares it gone once it is silent.
        wait_until(lambda: fresh_hub.statistics().clients == 2, REPLY_TIMEOUT)
        after = fresh_hub.statistics()
        rss_after = _rss_kb(fresh_hub.pid)

    assert fuzzer.exitcode == 0
    assert after.pid == fresh_hub.pid, "the hub is not the one that was fuzzed"
    assert received == list(range(LEGIT_TICKS)), "legitimate Ticks lost, doubled or reordered"
    assert _canaries(tmp_path) == []
    malformed = after.malformed_dropped - before.malformed_dropped
    assert sent["surely_malformed"] <= malformed <= sent["authenticated"]
    assert after.auth_rejected - before.auth_rejected >= 2
    growth_mb = (rss_after - rss_before) / 1024
    print(
        f"\nfuzz: {FUZZ_MESSAGES} messages in {elapsed:.1f} s ({sent['authenticated']} "
        f"authenticated, {sent['rogue']} from peers without the secret, "
        f"{sent['rogue_refused']} of those refused at their own socket), {malformed} counted "
        f"malformed (>= {sent['surely_malformed']} certain), hub RSS {rss_before / 1024:.1f} -> "
        f"{rss_after / 1024:.1f} MB (peak {rss_peak / 1024:.1f} MB)"
    )
    assert growth_mb < 100, f"hub RSS grew by {growth_mb:.1f} MB"
    round_trip(address, 20)


# -- files -----------------------------------------------------------------------------------


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_default_hub_keeps_its_files_private() -> None:
    hub = Hub(start_method="fork")
    try:
        hub.start()
        path = hub.address[len("ipc://") :]
        directory = os.path.dirname(path)
        assert os.stat(directory).st_uid == os.getuid()
        assert _mode(directory) == 0o700
        for socket_path in (path, path + ".in", path + ".pub"):
            assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
            assert _mode(socket_path) == 0o600, socket_path
        key = Address.parse(hub.address).key_file
        assert _mode(key) == 0o600
        assert os.stat(key).st_size == 64
        assert len(bytes.fromhex(Path(key).read_text())) == 32
    finally:
        assert hub.stop() == 0
    assert not os.path.exists(directory)


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as hub:
        key = Path(Address.parse(hub.address).key_file)
        key.chmod(0o644)
        try:
            with pytest.raises(HubUnavailableError, match="0600"):
                HubBroker(hub.address, connect_timeout=0.5)
        finally:
            key.chmod(0o600)
        round_trip(hub.address)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_a_hub_admits_only_curve_with_the_bus_keys(
    raw_peers: RawPeers, transport: str, tmp_path: Path
) -> None:
    """Every transport encrypted and authenticated: a peer without CURVE (no mechanism, or PLAIN
    even with the right secret as password) or with CURVE keys not derived from the secret is
    refused."""
    if transport == "tcp":
        address = f"tcp://127.0.0.1:{free_tcp_port()}"
    else:
        address = f"ipc://{tmp_path}/hub"
    key = Path(Address.parse(address).key_file)
    try:
        with Hub(address, start_method="fork") as hub:
            assert _mode(key) == 0o600
            if transport == "tcp":
                assert _mode(key.parent) == 0o700
            round_trip(address)  # a HubBroker proves the secret over CURVE
            before = hub.statistics()
            secret = _secret(address)
            refused = [
                raw_peers.socket(zmq.DEALER, address, None, monitor=True),
                raw_peers.plain_socket(zmq.DEALER, address, secret),
            ]
            # CURVE with the hub's real public key but a client key pair of its own.
            stranger: zmq.Socket[bytes] = raw_peers.context.socket(zmq.DEALER)
            raw_peers.sockets.append(stranger)
            stranger.linger = 0
            stranger.curve_serverkey = _keys._curve_pair(secret, b"server")[0]
            stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
            monitor = stranger.get_monitor_socket()
            stranger.connect(address)
            for sock in refused:
                _offer(sock, [_wire.header(_wire.STATS)])
                assert raw_peers.handshake_failed(sock, REPLY_TIMEOUT)
            _offer(stranger, [_wire.header(_wire.STATS)])
            try:
                assert _handshake_failed(monitor, REPLY_TIMEOUT)
            finally:
                stranger.disable_monitor()
                monitor.close(linger=0)
            for sock in [*refused, stranger]:
                assert sock.poll(200) == 0, "a peer without the bus keys got an answer"
            after = hub.statistics()
            assert after.auth_rejected - before.auth_rejected >= 3
            round_trip(address, 20)
    finally:
        key.unlink(missing_ok=True)
