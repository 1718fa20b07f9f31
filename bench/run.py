"""Throughput of ipcbus against its peers, run side by side, reported as ratios.

1 publisher process -> 1 subscriber process, small frozen dataclass messages:
- ipcbus: publisher HubBroker -> hub process -> subscriber HubBroker (3 processes)
- multiprocessing.Queue: producer -> consumer (2 processes; the baseline users replace)

1 producer -> 2 competing consumers (work queue):
- ipcbus: subscribe_async in one queue group (acknowledged, redelivered on crash)
- multiprocessing.Queue: two consumers get() from one queue (nothing acknowledged)

Each case runs ``--repeat`` times, interleaved, and the median is reported. Clocks: the parent
takes the start time and the receiving process the end time, both from time.monotonic()
(CLOCK_MONOTONIC, shared by all processes of the machine).

    python bench/run.py [--messages 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ipcbus import Hub, Message, connect

SPAWN: Any = multiprocessing.get_context("spawn")
PREFETCH = 100


@dataclass(frozen=True)
class Tick(Message):
    seq: int
    symbol: str
    price: float


@dataclass(frozen=True)
class Stop(Message):
    pass


def _tick(seq: int) -> Tick:
    return Tick(seq, "ACME", 100.0 + seq % 7)


# -- ipcbus ---------------------------------------------------------------------------------


def _ipcbus_subscriber(address: str, count: int, ready: Any, result: Any) -> None:
    broker = connect(address)
    received = 0
    done = threading.Event()

    def on_tick(message: Tick) -> None:
        nonlocal received
        received += 1
        if received == count:
            result.put(time.monotonic())
            done.set()

    broker.subscribe(Tick, on_tick)
    ready.set()
    done.wait(300)
    broker.close()


def _ipcbus_publisher(address: str, count: int, go: Any) -> None:
    broker = connect(address)
    go.wait(60)
    for seq in range(count):
        broker.publish(_tick(seq))
    broker.close()


def run_ipcbus(address: str, count: int) -> float:
    ready, go, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    subscriber = SPAWN.Process(target=_ipcbus_subscriber, args=(address, count, ready, result))
    publisher = SPAWN.Process(target=_ipcbus_publisher, args=(address, count, go))
    subscriber.start()
    publisher.start()
    ready.wait(60)
    time.sleep(0.5)  # let the publisher finish connecting: the bench times delivery, not start-up
    start = time.monotonic()
    go.set()
    end = result.get(timeout=300)
    for process in (publisher, subscriber):
        process.join(60)
    return count / (end - start)


def _ipcbus_consumer(address: str, counts: Any, slot: int, ready: Any, stop: Any) -> None:
    broker = connect(address)
    handled = 0

    def on_tick(message: Tick) -> None:
        nonlocal handled
        handled += 1
        counts[slot] = handled  # one writer per slot: no lock, as multiprocessing.Queue needs none

    broker.subscribe_async(Tick, on_tick, "work", prefetch=PREFETCH)
    ready.set()
    stop.wait(300)
    broker.close()


def run_ipcbus_queue(address: str, count: int, consumers: int = 2) -> float:
    counts, go, stop = SPAWN.Array("q", consumers, lock=False), SPAWN.Event(), SPAWN.Event()
    processes = []
    for slot in range(consumers):
        ready = SPAWN.Event()
        process = SPAWN.Process(target=_ipcbus_consumer, args=(address, counts, slot, ready, stop))
        process.start()
        ready.wait(60)
        processes.append(process)
    publisher = SPAWN.Process(target=_ipcbus_publisher, args=(address, count, go))
    publisher.start()
    time.sleep(0.5)
    start = time.monotonic()
    go.set()
    deadline = start + 300
    while sum(counts) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    end = time.monotonic()
    stop.set()
    for process in (publisher, *processes):
        process.join(60)
    return count / (end - start)


# -- multiprocessing.Queue ------------------------------------------------------------------


def _queue_consumer(queue: Any, count: int, result: Any) -> None:
    for _ in range(count):
        if queue.get() is None:
            break
    result.put(time.monotonic())


def _queue_producer_n(queue: Any, count: int, consumers: int, go: Any) -> None:
    go.wait(60)
    for seq in range(count):
        queue.put(_tick(seq))
    for _ in range(consumers):
        queue.put(None)
    queue.close()
    queue.join_thread()


def run_mp_queue_shared(count: int, consumers: int = 2) -> float:
    """Competing consumers on one multiprocessing.Queue; done when the last one drained."""
    queue, go, result = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    processes = [
        SPAWN.Process(target=_queue_consumer, args=(queue, count, result)) for _ in range(consumers)
    ]
    producer = SPAWN.Process(target=_queue_producer_n, args=(queue, count, consumers, go))
    for process in (*processes, producer):
        process.start()
    time.sleep(0.5)
    start = time.monotonic()
    go.set()
    end = max(result.get(timeout=600) for _ in processes)
    for process in (producer, *processes):
        process.join(60)
    return count / (end - start)


def _queue_producer(queue: Any, count: int, go: Any) -> None:
    go.wait(60)
    for seq in range(count):
        queue.put(_tick(seq))
    queue.close()
    queue.join_thread()


def run_mp_queue(count: int) -> float:
    queue, go, result = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    consumer = SPAWN.Process(target=_queue_consumer, args=(queue, count, result))
    producer = SPAWN.Process(target=_queue_producer, args=(queue, count, go))
    consumer.start()
    producer.start()
    time.sleep(0.5)  # same start-up allowance as ipcbus
    start = time.monotonic()
    go.set()
    end = result.get(timeout=300)
    for process in (producer, consumer):
        process.join(60)
    return count / (end - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--queue-messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    broadcast: dict[str, list[float]] = {"ipcbus broadcast": [], "multiprocessing.Queue": []}
    queue: dict[str, list[float]] = {"ipcbus queue group": [], "multiprocessing.Queue": []}
    for _ in range(args.repeat):
        # A fresh hub each round: queue groups live as long as their hub.
        with Hub() as hub:
            broadcast["ipcbus broadcast"].append(run_ipcbus(hub.address, args.messages))
            queue["ipcbus queue group"].append(run_ipcbus_queue(hub.address, args.queue_messages))
        broadcast["multiprocessing.Queue"].append(run_mp_queue(args.messages))
        queue["multiprocessing.Queue"].append(run_mp_queue_shared(args.queue_messages))
    _report(f"1 publisher -> 1 subscriber, {args.messages} messages", broadcast, args.repeat)
    _report(f"1 producer -> 2 consumers, {args.queue_messages} messages", queue, args.repeat)
    return 0


def _report(title: str, results: dict[str, list[float]], repeat: int) -> None:
    baseline = statistics.median(results["multiprocessing.Queue"])
    print(f"{title}, median of {repeat}")
    print(f"  {'case':24} {'msg/s':>12} {'ratio':>7}   runs")
    for name, rates in results.items():
        median = statistics.median(rates)
        runs = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"  {name:24} {median:>12,.0f} {median / baseline:>6.2f}x   {runs}")


if __name__ == "__main__":
    sys.exit(main())
