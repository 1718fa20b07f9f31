"""Big payloads (issue 12, item 3): 8 MB ``bytes``, ``bytearray`` and ``pickle.PickleBuffer``
fields, a distinct payload per message, between real processes.

- Broadcast and queue groups deliver every payload intact (each subscriber hashes what it got)
  and with a documented type: ``bytes`` stays ``bytes``, ``bytearray`` stays ``bytearray``; a
  ``PickleBuffer`` arrives as a read-only ``memoryview`` of the received frame (broadcast).
- Big fields leave the publisher as frames of their own, views of the message's own memory
  (pickle protocol 5 out-of-band), and a batch of them never exceeds the hub's
  ``max_message_size``.
- A message over the limit raises ``MessageTooLargeError`` in ``publish()``, the first of its
  type or a later one.
- One undecodable message among a thousand big ones costs only itself.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.connection
import pickle
import random
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ipcbus import Hub, HubBroker, Message, MessageTooLargeError, connect
from ipcbus.client.outbox import Outbox, Rejected
from ipcbus.message import get_unique_name_for_message
from ipcbus.wire import protocol as wire

from .conftest import queues_idle, wait_until
from .hubtools import reap
from .messages import Barrier

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

SPAWN: Any = multiprocessing.get_context("spawn")
Conn = multiprocessing.connection.Connection
MiB = 1024 * 1024
DEADLINE = 60.0
KINDS = ["bytes", "bytearray", "PickleBuffer"]
# What each kind arrives as in a broadcast handler (docs/guarantees.md, "Big payloads").
ARRIVES_AS = {"bytes": "bytes", "bytearray": "bytearray", "PickleBuffer": "memoryview"}


@dataclass(frozen=True)
class Payload(Message):
    seq: int
    data: Any  # bytes, bytearray or pickle.PickleBuffer
    digest: bytes  # sha256 of data, computed by the publisher
    extra: Any = None


def _payload(seq: int, kind: str, size: int) -> Payload:
    """A payload no other message shares: random bytes seeded by ``seq``."""
    raw = random.Random(seq).randbytes(size)
    digest = hashlib.sha256(raw).digest()
    data: Any = raw
    if kind == "bytearray":
        data = bytearray(raw)
    elif kind == "PickleBuffer":
        data = pickle.PickleBuffer(bytearray(raw))
    return Payload(seq, data, digest)


def _check(message: Payload) -> tuple[int, str, bool, bool]:
    """(seq, the type that arrived, digest matches, read-only)."""
    data = message.data
    view = memoryview(data)
    return (
        message.seq,
        type(data).__name__,
        hashlib.sha256(view).digest() == message.digest,
        view.readonly,
    )


# -- subscribers in other processes ------------------------------------------------------------


def _subscriber(address: str, group: str | None, conn: Conn) -> None:
    """Child: checks every Payload; broadcast ends at a Barrier, a queue consumer when the
    parent says so. Answers with what it checked."""
    received: list[tuple[int, str, bool, bool]] = []
    lock = threading.Lock()
    done = threading.Event()

    def on_payload(message: Payload) -> None:
        checked = _check(message)
        with lock:
            received.append(checked)

    with connect(address, connect_timeout=DEADLINE) as broker:
        if group is None:
            broker.subscribe(Payload, on_payload)
            broker.subscribe(Barrier, lambda message: done.set())
        else:
            broker.subscribe_async(Payload, on_payload, group)
        conn.send("ready")
        if group is None:
            done.wait(DEADLINE)
        else:
            conn.poll(DEADLINE)
        with lock:
            conn.send(list(received))


class Subscribers:
    def __init__(self, address: str, count: int, group: str | None) -> None:
        self.conns: list[Conn] = []
        self.processes: list[Any] = []
        for _ in range(count):
            conn, child = SPAWN.Pipe()
            process = SPAWN.Process(target=_subscriber, args=(address, group, child), daemon=True)
            process.start()
            child.close()
            self.conns.append(conn)
            self.processes.append(process)
        for conn in self.conns:
            assert conn.poll(DEADLINE), "a subscriber did not start"
            assert conn.recv() == "ready"

    def results(self) -> list[list[tuple[int, str, bool, bool]]]:
        for conn in self.conns:
            conn.send("stop")  # a queue consumer's cue; a broadcast subscriber ignores it
        answers = []
        for conn in self.conns:
            assert conn.poll(DEADLINE), "a subscriber did not answer"
            answers.append(conn.recv())
        return answers

    def close(self) -> None:
        assert reap(self.processes, 30) == []
        for conn in self.conns:
            conn.close()
        assert all(process.exitcode == 0 for process in self.processes)


# -- broadcast and queue groups ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_distinct_8mb_payloads_arrive_intact_to_every_subscriber(tmp_path: Path, kind: str) -> None:
    count = 6
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as hub:
        subscribers = Subscribers(hub.address, 2, None)
        try:
            with HubBroker(hub.address) as broker:
                for seq in range(count):
                    broker.publish(_payload(seq, kind, 8 * MiB))
                broker.publish(Barrier("end"))
                broker.flush(DEADLINE)
            answers = subscribers.results()
        finally:
            subscribers.close()
    readonly = kind != "bytearray"
    expected = [(seq, ARRIVES_AS[kind], True, readonly) for seq in range(count)]
    assert answers == [expected, expected]


@pytest.mark.queue_groups
@pytest.mark.parametrize("kind", KINDS)
def test_distinct_8mb_payloads_reach_a_queue_group_exactly_once(tmp_path: Path, kind: str) -> None:
    """Queue groups carry each message pickled alone, in-band: a PickleBuffer arrives as the
    type pickle gives its memory in-band (``bytearray`` for a writable one)."""
    count = 8
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as hub:
        consumers = Subscribers(hub.address, 2, "work")
        try:
            with HubBroker(hub.address) as broker:
                for seq in range(count):
                    broker.publish(_payload(seq, kind, 8 * MiB))
                broker.flush(DEADLINE)
            wait_until(lambda: queues_idle(hub.address), DEADLINE)
            answers = consumers.results()
        finally:
            consumers.close()
    received = sorted(answers[0] + answers[1])
    arrives_as = "bytearray" if kind == "PickleBuffer" else kind
    assert received == [(seq, arrives_as, True, kind == "bytes") for seq in range(count)]


# -- the limit -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_message_over_the_limit_raises_in_publish_first_or_later(
    tmp_path: Path, kind: str
) -> None:
    """A 16 MB payload against a 12 MiB limit: refused in the caller, the first message of its
    type or a later one (big fields are measured on every publish of a type that has them);
    the messages around it arrive."""
    with (
        Hub(f"ipc://{tmp_path}/hub", start_method="fork", max_message_size=12 * MiB) as hub,
        HubBroker(hub.address) as broker,
    ):
        received: list[tuple[int, str, bool, bool]] = []
        broker.subscribe(Payload, lambda message: received.append(_check(message)))
        for seq in range(4):
            size = 16 * MiB if seq % 2 == 0 else 8 * MiB
            if size > 12 * MiB:
                with pytest.raises(MessageTooLargeError, match=r"Payload.*12582912"):
                    broker.publish(_payload(seq, kind, size))
            else:
                broker.publish(_payload(seq, kind, size))
        broker.flush(DEADLINE)
        wait_until(lambda: len(received) == 2, DEADLINE)
        assert broker.rejected == 0  # refused in the caller: never accepted
    assert [(seq, ok) for seq, _type, ok, _readonly in received] == [(1, True), (3, True)]


def test_big_fields_leave_as_views_in_batches_below_the_limit() -> None:
    """The outbox, in this process: 10 distinct 8 MiB payloads against a 20 MiB limit. Each
    big field is a frame of its own that is the message's own memory (no copy), and no request
    carries more than the limit in all."""
    rejected: list[Rejected] = []
    outbox = Outbox(max_batch=1000, on_reject=rejected.append)
    outbox.set_limit(20 * MiB)
    messages = [_payload(seq, "bytes" if seq % 2 else "bytearray", 8 * MiB) for seq in range(10)]
    outbox.check(messages[0])
    for message in messages:
        outbox.append(message)
    buffers: list[Any] = []
    while (request := outbox.take()) is not None:
        head, payload, *frames = request
        _codec, count, _published_at = wire.unpack_meta(wire.parse_publish_head(head)[1])
        assert len(frames) == count
        assert len(payload) + sum(len(frame) for frame in frames) <= 20 * MiB
        buffers += frames
    assert rejected == []
    for message, frame in zip(messages, buffers, strict=True):
        assert memoryview(frame).obj is message.data, "the frame is a copy of the payload"


@pytest.mark.parametrize("grouped", [False, True], ids=["broadcast", "queue group"])
@pytest.mark.parametrize(("size", "per_request"), [(8 * MiB, 1), (96 * 1024, 10)])
def test_a_batch_of_big_fields_carries_about_a_mebibyte(
    size: int, per_request: int, grouped: bool
) -> None:
    """A subscriber gets nothing of a batch until all of it has arrived, and the hub relays a
    batch only once it has all of it: a batch of 31 8 MB payloads (what fits a 256 MiB limit)
    made every hop wait for the one before and the subscriber saw nothing for seconds, then
    everything. Big fields therefore go about 1 MiB to a request: an 8 MB payload alone. So do
    the in-band payloads of a topic with queue groups (the hub hands out nothing of a batch
    before it has all of it either)."""
    outbox = Outbox(max_batch=1000, on_reject=lambda rejected: None)
    outbox.set_limit(256 * MiB)
    if grouped:
        outbox.grouped = frozenset({wire.topic_for(get_unique_name_for_message(Payload))})
    messages = [_payload(seq, "bytes", size) for seq in range(30)]
    outbox.check(messages[0])
    for message in messages:
        outbox.append(message)
    counts = []
    while (request := outbox.take()) is not None:
        kind = wire.parse_data_kind(request[0])  # not a confirmation it asks for:
        if kind == wire.PUBLISH:
            counts.append(wire.unpack_meta(wire.parse_publish_head(request[0])[1])[1])
        elif kind == wire.NUMBERED:  # a split batch (queue group)
            counts.append(wire.unpack_meta(wire.parse_numbered_head(request[0])[3])[1])
    assert sum(counts) == 30
    assert max(counts) == per_request


# -- one undecodable among a thousand ------------------------------------------------------

PHANTOM_MODULE = "ipcbus_big_payload_phantom"


def _phantom_publisher(address: str, count: int, bad: int, conn: Conn) -> None:
    """Child: ``count`` distinct 96 KiB payloads (out-of-band); message ``bad`` also holds an
    instance of a class only this process has. Then a Barrier."""
    module = types.ModuleType(PHANTOM_MODULE)
    exec("class Phantom:\n    pass\n", module.__dict__)
    sys.modules[PHANTOM_MODULE] = module
    with connect(address, connect_timeout=DEADLINE) as broker:
        conn.send("ready")
        for seq in range(count):
            message = _payload(seq, "bytes", 96 * 1024)
            if seq == bad:
                message = Payload(seq, message.data, message.digest, module.Phantom())
            broker.publish(message)
        broker.publish(Barrier("end"))
        broker.flush(DEADLINE)
        conn.send("published")


def test_one_undecodable_among_a_thousand_costs_only_itself(tmp_path: Path) -> None:
    count, bad = 1000, 500
    received: list[tuple[int, str, bool, bool]] = []
    done = threading.Event()
    with (
        Hub(f"ipc://{tmp_path}/hub", start_method="fork") as hub,
        HubBroker(hub.address) as broker,
    ):
        broker.subscribe(Payload, lambda message: received.append(_check(message)))
        broker.subscribe(Barrier, lambda message: done.set())
        conn, child = SPAWN.Pipe()
        publisher = SPAWN.Process(
            target=_phantom_publisher, args=(hub.address, count, bad, child), daemon=True
        )
        publisher.start()
        child.close()
        try:
            assert conn.poll(DEADLINE)
            assert conn.recv() == "ready"
            assert conn.poll(DEADLINE)
            assert conn.recv() == "published"
            assert done.wait(DEADLINE)
        finally:
            assert reap([publisher], 30) == []
            conn.close()
        undecodable = broker.undecodable
    assert undecodable == 1
    assert received == [(seq, "bytes", True, True) for seq in range(count) if seq != bad]
