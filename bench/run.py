"""Throughput of ipcbus against its peers, run side by side, reported as ratios.

1 publisher process -> 1 subscriber process, small frozen dataclass messages:
- ipcbus: publisher HubBroker -> hub process -> subscriber HubBroker (3 processes)
- multiprocessing.Queue: producer -> consumer (2 processes; the baseline users replace)

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


# -- multiprocessing.Queue ------------------------------------------------------------------


def _queue_consumer(queue: Any, count: int, result: Any) -> None:
    for _ in range(count):
        queue.get()
    result.put(time.monotonic())


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
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"ipcbus (hub)": [], "multiprocessing.Queue": []}
    with Hub() as hub:
        for _ in range(args.repeat):
            results["ipcbus (hub)"].append(run_ipcbus(hub.address, args.messages))
            results["multiprocessing.Queue"].append(run_mp_queue(args.messages))
    baseline = statistics.median(results["multiprocessing.Queue"])
    print(f"1 publisher -> 1 subscriber, {args.messages} messages, median of {args.repeat}")
    print(f"{'case':24} {'msg/s':>12} {'ratio':>7}   runs")
    for name, rates in results.items():
        median = statistics.median(rates)
        runs = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"{name:24} {median:>12,.0f} {median / baseline:>6.2f}x   {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
