"""Big payloads 1 -> 1, in MB/s, beside ``multiprocessing.Queue``: a ``bytes`` field
(``harness.Blob``, the scenario peers.py runs too), a ``bytearray`` field, and a buffer-protocol
object through pickle protocol 5 (a ``pickle.PickleBuffer`` field, as numpy arrays travel).
Distinct payloads, every one checked at arrival.

``multiprocessing.Queue`` pickles with protocol 4, which cannot carry a ``PickleBuffer``: it gets
the same payload as a ``bytearray`` then (what a user of the Queue would send).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

from harness import (
    FRESH,
    Blob,
    Case,
    Outcome,
    Probe,
    Settings,
    big_payload,
    big_scenario,
    big_seq,
    measure,
    publish_on_go,
)
from ipcbus import Message, connect

MB = 1_000_000
KINDS = ("bytes", "bytearray", "PickleBuffer")


@dataclass(frozen=True)
class BigArray(Message):
    seq: int
    data: bytearray


@dataclass(frozen=True)
class BigView(Message):
    seq: int
    data: Any  # a pickle.PickleBuffer: arrives as a read-only memoryview


def cases(settings: Settings) -> list[Case]:
    found = []
    for kind in KINDS:
        scenario = big_scenario(settings, "payloads" if kind == "bytes" else kind)
        found += [
            Case(scenario, "ipcbus", _bind(ipcbus_big_kind, kind), "MB/s"),
            Case(scenario, "multiprocessing.Queue", _bind(queue_big_kind, kind), "MB/s"),
        ]
    return found


def _bind(run: Any, kind: str) -> Any:
    return lambda settings: run(settings, kind)


_TYPES = {"bytes": Blob, "bytearray": BigArray, "PickleBuffer": BigView}


def _message(kind: str, seq: int, payload: bytes) -> Message:
    if kind == "bytes":
        return Blob(seq, payload)
    if kind == "bytearray":
        return BigArray(seq, bytearray(payload))
    return BigView(seq, pickle.PickleBuffer(bytearray(payload)))


def _ipcbus_subscriber(address: str, kind: str, size: int, probe: Probe, stop: Any) -> None:
    broker = connect(address)

    def on_message(message: Any) -> None:
        seq = big_seq(message.data, size)
        if seq is None or seq != message.seq:
            probe.reject(f"a damaged payload (seq {message.seq})")
        else:
            probe.add(seq)

    broker.subscribe(_TYPES[kind], on_message)
    probe.ready()
    stop.wait(3600)
    broker.close()
    probe.report()


def _ipcbus_publisher(address: str, kind: str, size: int, seqs: range, ready: Any, go: Any) -> None:
    broker = connect(address)
    body = os.urandom(size)
    messages = [_message(kind, seq, big_payload(seq, size, body)) for seq in seqs]
    publish_on_go(broker, messages, ready, go)


def ipcbus_big_kind(settings: Settings, kind: str) -> Outcome:
    address, size, count = settings.hub_address, settings.big_size, settings.big_messages
    return measure(
        settings,
        [(_ipcbus_subscriber, (address, kind, size))],
        [(_ipcbus_publisher, (address, kind, size))],
        count,
        True,
        volume=count * size / MB,
    )


def _queue_consumer(queue: Any, size: int, probe: Probe, stop: Any) -> None:
    probe.ready()
    while (data := queue.get()) is not None:
        seq = big_seq(data, size)
        if seq is None:
            probe.reject("a damaged payload")
        else:
            probe.add(seq)
    probe.report()


def _queue_producer(queue: Any, kind: str, size: int, seqs: range, ready: Any, go: Any) -> None:
    body = os.urandom(size)
    as_sent = bytes if kind == "bytes" else bytearray
    payloads = [as_sent(big_payload(seq, size, body)) for seq in seqs]
    ready.set()
    go.wait(3600)
    for payload in payloads:
        queue.put(payload)
    queue.close()
    queue.join_thread()


def queue_big_kind(settings: Settings, kind: str) -> Outcome:
    queue, size, count = FRESH.Queue(), settings.big_size, settings.big_messages
    return measure(
        settings,
        [(_queue_consumer, (queue, size))],
        [(_queue_producer, (queue, kind, size))],
        count,
        True,
        lambda: queue.put(None),
        volume=count * size / MB,
    )
