"""Throughput of ipcbus against its peers, run side by side, reported as ratios.

1 publisher process -> 1 subscriber process, small frozen dataclass messages:
- ipcbus: publisher HubBroker -> hub process -> subscriber HubBroker (3 processes)
- multiprocessing.Queue: producer -> consumer (2 processes; the baseline users replace)

Work queues, P producers -> C competing consumers (1 -> 2, 1 -> 4, 4 -> 4):
- ipcbus: subscribe_async in one queue group, default settings (acknowledged, redelivered on
  crash), plain handler
- multiprocessing.Queue: the same producers put() into one queue, the same consumers get() from it
  (nothing acknowledged)

Every message of a queue case is distinct (a sequence number unique across producers), and every
consumer reports what it received: a queue case whose messages did not each arrive exactly once is
a failure, whatever its rate (the bench says so and exits 1).

Each case runs ``--repeat`` times, interleaved, and the median is reported. Clocks: the parent
takes the start time (when it lets the producers go) and the end time (when the consumers' counts,
polled every millisecond, reach the total), or for broadcast the receiving process the end time,
all from time.monotonic() (CLOCK_MONOTONIC, shared by all processes of the machine).

    python bench/run.py [--messages 200000] [--queue-messages 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipcbus import Hub, Message, connect

SPAWN: Any = multiprocessing.get_context("spawn")
QUEUE_SHAPES = ((1, 2), (1, 4), (4, 4))  # (producers, consumers)


@dataclass(frozen=True)
class Tick(Message):
    seq: int
    symbol: str
    price: float


def _tick(seq: int) -> Tick:
    return Tick(seq, "ACME", 100.0 + seq % 7)


# -- ipcbus broadcast -----------------------------------------------------------------------


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


def _ipcbus_publisher(address: str, first: int, count: int, go: Any) -> None:
    broker = connect(address)
    go.wait(60)
    for seq in range(first, first + count):
        broker.publish(_tick(seq))
    broker.close()


def run_ipcbus(address: str, count: int) -> float:
    ready, go, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    subscriber = SPAWN.Process(target=_ipcbus_subscriber, args=(address, count, ready, result))
    publisher = SPAWN.Process(target=_ipcbus_publisher, args=(address, 0, count, go))
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


# -- work queues: the harness both contenders share ------------------------------------------


class Received:
    """What one consumer process received: the seqs, and a count the parent polls."""

    def __init__(self, counts: Any, slot: int) -> None:
        self._counts = counts
        self._slot = slot
        self._lock = threading.Lock()  # ipcbus runs plain handlers on several threads
        self.seqs: list[int] = []

    def add(self, seq: int) -> None:
        with self._lock:
            self.seqs.append(seq)
            self._counts[self._slot] = len(self.seqs)  # one writer per slot


@dataclass
class QueueRun:
    rate: float
    problems: list[str]


def _run_queue(
    count: int,
    producers: int,
    consumers: int,
    consumer: Callable[..., None],
    consumer_args: tuple[Any, ...],
    producer: Callable[..., None],
    producer_args: tuple[Any, ...],
    stop_consumers: Callable[[], None],
) -> QueueRun:
    """Start ``consumers``, then ``producers`` (each sends ``count // producers`` distinct seqs),
    time until the consumers received ``count`` messages, and check each arrived once."""
    counts, go, results = SPAWN.Array("q", consumers, lock=False), SPAWN.Event(), SPAWN.Queue()
    started = []
    for slot in range(consumers):
        ready = SPAWN.Event()
        process = SPAWN.Process(
            target=consumer, args=(*consumer_args, counts, slot, ready, results)
        )
        process.start()
        ready.wait(60)
        started.append(process)
    share = count // producers
    sending = [
        SPAWN.Process(target=producer, args=(*producer_args, index * share, share, go))
        for index in range(producers)
    ]
    for process in sending:
        process.start()
    time.sleep(0.5)  # let the producers finish connecting: the bench times delivery
    start = time.monotonic()
    go.set()
    deadline = start + 300
    total = share * producers
    while sum(counts) < total and time.monotonic() < deadline:
        time.sleep(0.001)
    end = time.monotonic()
    time.sleep(0.2)  # a duplicate that was on its way is counted too
    stop_consumers()
    seen = bytearray(total)
    problems = []
    for _ in started:
        for seq in results.get(timeout=60):
            if 0 <= seq < total and seen[seq] < 255:
                seen[seq] += 1
            else:
                problems.append(f"unexpected seq {seq}")
    for process in (*sending, *started):
        process.join(60)
    missing = seen.count(0)
    duplicated = total - missing - seen.count(1)
    if missing:
        problems.append(f"{missing} of {total} messages never arrived")
    if duplicated:
        problems.append(f"{duplicated} messages arrived more than once")
    return QueueRun(total / (end - start), problems)


# -- ipcbus work queue ----------------------------------------------------------------------


def _ipcbus_consumer(
    address: str, stop: Any, counts: Any, slot: int, ready: Any, results: Any
) -> None:
    broker = connect(address)
    received = Received(counts, slot)

    def on_tick(message: Tick) -> None:
        received.add(message.seq)

    broker.subscribe_async(Tick, on_tick, "work")  # the default settings
    ready.set()
    stop.wait(300)
    broker.close()
    results.put(received.seqs)


def run_ipcbus_queue(address: str, count: int, producers: int, consumers: int) -> QueueRun:
    stop = SPAWN.Event()
    return _run_queue(
        count,
        producers,
        consumers,
        _ipcbus_consumer,
        (address, stop),
        _ipcbus_publisher,
        (address,),
        stop.set,
    )


# -- multiprocessing.Queue ------------------------------------------------------------------


def _queue_consumer(queue: Any, counts: Any, slot: int, ready: Any, results: Any) -> None:
    received = Received(counts, slot)
    ready.set()
    while (message := queue.get()) is not None:
        received.add(message.seq)
    results.put(received.seqs)


def _queue_producer(queue: Any, first: int, count: int, go: Any) -> None:
    go.wait(60)
    for seq in range(first, first + count):
        queue.put(_tick(seq))
    queue.close()
    queue.join_thread()


def run_mp_queue_shared(count: int, producers: int, consumers: int) -> QueueRun:
    """Competing consumers on one multiprocessing.Queue fed by ``producers`` processes."""
    queue = SPAWN.Queue()

    def stop() -> None:
        for _ in range(consumers):
            queue.put(None)

    return _run_queue(
        count, producers, consumers, _queue_consumer, (queue,), _queue_producer, (queue,), stop
    )


def _mp_result_consumer(queue: Any, count: int, result: Any) -> None:
    for _ in range(count):
        queue.get()
    result.put(time.monotonic())


def run_mp_queue(count: int) -> float:
    queue, go, result = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    consumer = SPAWN.Process(target=_mp_result_consumer, args=(queue, count, result))
    producer = SPAWN.Process(target=_queue_producer, args=(queue, 0, count, go))
    consumer.start()
    producer.start()
    time.sleep(0.5)  # same start-up allowance as ipcbus
    start = time.monotonic()
    go.set()
    end = result.get(timeout=300)
    for process in (producer, consumer):
        process.join(60)
    return count / (end - start)


# -- the queue journal ----------------------------------------------------------------------


def run_journal_case(count: int, repeat: int) -> list[str]:
    """Acked 1 producer -> 2 consumers with the queue journal on (fsync per loop turn, the
    default), beside multiprocessing.Queue in the same rounds; prints its rows and returns the
    exactly-once problems. Hub socket and journal share a private temporary directory."""
    import shutil  # inside: the case is self-contained
    import tempfile

    results: dict[str, list[float]] = {"ipcbus + journal": [], "multiprocessing.Queue": []}
    problems: list[str] = []
    for round_ in range(repeat):
        directory = tempfile.mkdtemp(prefix="ipcbus-bench-")
        try:
            with Hub(f"ipc://{directory}/hub", journal=f"{directory}/journal") as hub:
                run = run_ipcbus_queue(hub.address, count, 1, 2)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        results["ipcbus + journal"].append(run.rate)
        problems += [f"round {round_ + 1}, journal 1 -> 2: {p}" for p in run.problems]
        run = run_mp_queue_shared(count, 1, 2)
        results["multiprocessing.Queue"].append(run.rate)
        problems += [f"round {round_ + 1}, multiprocessing.Queue 1 -> 2: {p}" for p in run.problems]
    _report(f"journal on: 1 producer -> 2 consumers, {count} messages", results, repeat)
    return problems


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--queue-messages", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--queues-only", action="store_true", help="skip the broadcast case")
    args = parser.parse_args(argv)
    broadcast: dict[str, list[float]] = {"ipcbus broadcast": [], "multiprocessing.Queue": []}
    queues = {
        shape: {"ipcbus queue group": [], "multiprocessing.Queue": []} for shape in QUEUE_SHAPES
    }
    problems: list[str] = []
    for round_ in range(args.repeat):
        # A fresh hub each round: queue groups live as long as their hub.
        with Hub() as hub:
            if not args.queues_only:
                broadcast["ipcbus broadcast"].append(run_ipcbus(hub.address, args.messages))
            for producers, consumers in QUEUE_SHAPES:
                run = run_ipcbus_queue(hub.address, args.queue_messages, producers, consumers)
                queues[(producers, consumers)]["ipcbus queue group"].append(run.rate)
                problems += [
                    f"round {round_ + 1}, ipcbus {producers} -> {consumers}: {problem}"
                    for problem in run.problems
                ]
        if not args.queues_only:
            broadcast["multiprocessing.Queue"].append(run_mp_queue(args.messages))
        for producers, consumers in QUEUE_SHAPES:
            run = run_mp_queue_shared(args.queue_messages, producers, consumers)
            queues[(producers, consumers)]["multiprocessing.Queue"].append(run.rate)
            problems += [
                f"round {round_ + 1}, multiprocessing.Queue {producers} -> {consumers}: {problem}"
                for problem in run.problems
            ]
    if not args.queues_only:
        _report(f"1 publisher -> 1 subscriber, {args.messages} messages", broadcast, args.repeat)
    for (producers, consumers), results in queues.items():
        title = f"{producers} producer(s) -> {consumers} consumers, {args.queue_messages} messages"
        _report(title, results, args.repeat)
    problems += run_journal_case(args.queue_messages, args.repeat)
    runs = args.repeat * len(QUEUE_SHAPES) * 2
    if problems:
        print(f"exactly-once check FAILED in the queue cases ({len(problems)} problems):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(
        f"exactly-once check passed: in each of the {runs} queue runs every message "
        "(distinct seqs) arrived exactly once"
    )
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
