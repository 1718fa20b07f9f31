"""Throughput cases of ipcbus and of ``multiprocessing.Queue``, the baseline users replace.

- broadcast 1 -> 1 and fan-out 1 -> 4: one publisher, every subscriber gets every message
  (ipcbus: publisher -> hub -> subscribers; the Queue: one queue per consumer, the producer puts
  each message into each);
- queue 1 -> 2, 1 -> 4, 4 -> 4 (``Settings.queue_shapes``): competing consumers (ipcbus: one
  queue group, default settings, every message acknowledged; the Queue: one shared queue,
  nothing acknowledged);
- (8 MB payloads: ``big_kinds.py``.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

from harness import (
    FRESH,
    Case,
    Outcome,
    Probe,
    Settings,
    Target,
    measure,
    publish_on_go,
    tick,
)
from ipcbus import QueueInUseError, connect

MB = 1_000_000


def cases(settings: Settings) -> list[Case]:
    found = [
        Case("broadcast 1 -> 1", "ipcbus", lambda s: ipcbus_broadcast(s, 1)),
        Case("broadcast 1 -> 1", "multiprocessing.Queue", lambda s: queue_broadcast(s, 1)),
        Case("fan-out 1 -> 4", "ipcbus", lambda s: ipcbus_broadcast(s, 4)),
        Case("fan-out 1 -> 4", "multiprocessing.Queue", lambda s: queue_broadcast(s, 4)),
    ]
    for producers, consumers in settings.queue_shapes:
        scenario = f"queue {producers} -> {consumers}"
        found += [
            Case(scenario, "ipcbus", _bind(ipcbus_queue, producers, consumers)),
            Case(scenario, "multiprocessing.Queue", _bind(queue_shared, producers, consumers)),
        ]
    return found  # the big payload cases: big_kinds.py


def _bind(run: Any, producers: int, consumers: int) -> Any:
    return lambda settings: run(settings, producers, consumers)


# -- ipcbus ----------------------------------------------------------------------------------


def _ipcbus_subscriber(address: str, group: str | None, probe: Probe, stop: Any) -> None:
    broker = connect(address)
    lock = threading.Lock()  # queue handlers run on several threads

    def on_tick(message: Any) -> None:
        with lock:
            probe.add(message.seq)

    if group is None:
        broker.subscribe(_tick_type(), on_tick)
    else:
        broker.subscribe_async(_tick_type(), on_tick, group)  # the default settings
    probe.ready()
    stop.wait(3600)
    broker.close()
    probe.report()


def _tick_type() -> Any:
    return type(tick(0))


def _ipcbus_publisher(address: str, seqs: range, ready: Any, go: Any) -> None:
    broker = connect(address)
    publish_on_go(broker, [tick(seq) for seq in seqs], ready, go)


def ipcbus_broadcast(settings: Settings, subscribers: int) -> Outcome:
    address = settings.hub_address
    consumers: list[Target] = [(_ipcbus_subscriber, (address, None))] * subscribers
    return measure(settings, consumers, [(_ipcbus_publisher, (address,))], settings.messages, True)


def ipcbus_queue(settings: Settings, producers: int, consumers: int) -> Outcome:
    address = settings.hub_address
    try:
        return measure(
            settings,
            [(_ipcbus_subscriber, (address, "work"))] * consumers,
            [(_ipcbus_publisher, (address,))] * producers,
            settings.queue_messages,
            False,
        )
    finally:
        _delete_group(address, "work")


def _delete_group(address: str, name: str) -> None:
    """Groups live as long as their hub: one left behind would take a copy of every Tick that
    later cases of the round broadcast, and hold them (at max_held the type's publishers wait,
    which a broadcast case took for lost messages)."""
    with connect(address) as broker:
        deadline = time.monotonic() + 30
        while True:
            try:
                broker.delete_queue(_tick_type(), name)
                return
            except QueueInUseError:  # the consumers' goodbyes are still on their way
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# -- multiprocessing.Queue -------------------------------------------------------------------


def _queue_consumer(queue: Any, probe: Probe, stop: Any) -> None:
    probe.ready()
    while (message := queue.get()) is not None:
        probe.add(message.seq)
    probe.report()


def _queue_producer(queues: list[Any], seqs: range, ready: Any, go: Any) -> None:
    messages = [tick(seq) for seq in seqs]
    ready.set()
    go.wait(3600)
    for message in messages:
        for queue in queues:
            queue.put(message)
    for queue in queues:
        queue.close()
        queue.join_thread()


def queue_broadcast(settings: Settings, subscribers: int) -> Outcome:
    queues = [FRESH.Queue() for _ in range(subscribers)]

    def stop() -> None:
        for queue in queues:
            queue.put(None)

    return measure(
        settings,
        [(_queue_consumer, (queue,)) for queue in queues],
        [(_queue_producer, (queues,))],
        settings.messages,
        True,
        stop,
    )


def queue_shared(settings: Settings, producers: int, consumers: int) -> Outcome:
    queue = FRESH.Queue()

    def stop() -> None:
        for _ in range(consumers):
            queue.put(None)

    return measure(
        settings,
        [(_queue_consumer, (queue,))] * consumers,
        [(_queue_producer, ([queue],))] * producers,
        settings.queue_messages,
        False,
        stop,
    )
