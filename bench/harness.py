"""What every case of the bench shares: the case record, the settings of a run, and one way to
time producers and consumers in fresh processes while counting what arrived.

A case is one contender in one scenario: a function that starts its processes, times them and
returns an ``Outcome``, a rate or a failure. A module of cases (``throughput``, ``peers``, and
any module listed in ``run.CASE_MODULES``) has a function ``cases(settings) -> list[Case]``.

Counting: every message carries a sequence number distinct across producers. Each consumer
counts how often it saw each one (a byte per message) and reports that map; the parent checks
that a broadcast subscriber saw every message once, and that a queue's consumers together saw
every message once. A run that lost or duplicated a message is a failure, never a number.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ipcbus import Message

# Every process of a case is a fresh one, forked from a server process (forkserver) that has
# only imported the bench's modules: no hub, socket or thread of an earlier case. Spawning each
# instead re-imports them, 0.6 s of CPU per process on the 2-core machine, and a quick run
# starts about a hundred processes. The forkserver starts as ``python -c`` and Python 3.11 does
# not hand it the bench's sys.path: without PYTHONPATH every preload below but ipcbus and zmq
# failed (silently), and each child imported them all again when it re-ran the main script
# (0.5 s per process, measured: 18 ms with them preloaded). "run" brings what run.py imports.
BENCH = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (BENCH, os.environ.get("PYTHONPATH"))))
FRESH: Any = multiprocessing.get_context("forkserver")
FRESH.set_forkserver_preload(
    [
        "ipcbus",
        "zmq",
        "harness",
        "throughput",
        "big_kinds",
        "peers",
        "latency_peers",
        "relay_floor",
        "main_class",
        "memory",
        "run",
    ]
)
START_TIMEOUT = 120.0  # a child on a busy 2-core machine can take seconds to start
STALL = 20.0  # nothing arrived for this long, once started: what is missing is lost


@dataclass(frozen=True)
class Settings:
    """Sizes of one bench run, and where the servers it started listen."""

    messages: int = 200_000  # broadcast cases
    queue_messages: int = 100_000  # queue cases
    big_messages: int = 32  # big payload cases
    big_size: int = 8 * 1024 * 1024
    queue_shapes: tuple[tuple[int, int], ...] = ((1, 2), (1, 4), (4, 4))  # producers, consumers
    deadline: float = 300.0  # one timed run, at most
    hub_address: str = ""  # a fresh hub per round
    nats_url: str | None = None
    redis_port: int | None = None


@dataclass
class Outcome:
    value: float  # in the case's unit
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    scenario: str  # a row of the report: "broadcast 1 -> 1"
    contender: str  # a column: "ipcbus", "multiprocessing.Queue", ...
    run: Callable[[Settings], Outcome]
    unit: str = "msg/s"  # higher is better
    needs: str = ""  # "nats" or "redis": skipped (with a line saying why) without its server
    note: str = ""  # how the scenario is run, printed under its table (one per scenario)


# -- the consumer's side -------------------------------------------------------------------


class Probe:
    """Handed to a consumer process: where it says it is ready, counts what it received (the
    parent polls the counts) and reports, per sequence number, how often it saw it."""

    def __init__(self, counts: Any, slot: int, total: int, ready: Any, results: Any) -> None:
        self.counts = counts
        self.slot = slot
        self.total = total
        self._ready = ready
        self._results = results
        self.seen = bytearray()
        self.received = 0
        self.bad: list[str] = []

    def ready(self) -> None:
        self.seen = bytearray(self.total)
        self._ready.set()

    def add(self, seq: int) -> None:
        """One message received (call from one thread at a time)."""
        if 0 <= seq < self.total:
            if self.seen[seq] < 255:
                self.seen[seq] += 1
        elif len(self.bad) < 10:
            self.bad.append(f"unexpected seq {seq}")
        self.received += 1
        self.counts[self.slot] = self.received  # one writer per slot

    def reject(self, problem: str) -> None:
        """A message that arrived damaged (a payload of the wrong size or content)."""
        if len(self.bad) < 10:
            self.bad.append(problem)
        self.received += 1
        self.counts[self.slot] = self.received

    def report(self) -> None:
        self._results.put((self.slot, bytes(self.seen), self.bad))


# -- the parent's side ---------------------------------------------------------------------

Target = tuple[Callable[..., None], tuple[Any, ...]]


def measure(
    settings: Settings,
    consumers: list[Target],
    producers: list[Target],
    total: int,
    broadcast: bool,
    stop: Callable[[], None] | None = None,
    volume: float | None = None,
) -> Outcome:
    """Start ``consumers`` (each called as ``f(*args, probe, stop_event)``), then
    ``producers`` (``f(*args, seqs, ready_event, go_event)``; together they send the
    sequence numbers ``0 .. total - 1``), and time from go until the consumers received
    everything. ``stop`` is called after that, besides setting the stop event (a sentinel for
    consumers blocked in a queue). The rate is per delivered message, or ``volume`` (bytes of
    all messages sent) per second when given."""
    counts = FRESH.Array("q", len(consumers), lock=False)
    results, go, stop_event = FRESH.Queue(), FRESH.Event(), FRESH.Event()
    started: list[Any] = []
    try:
        # All consumers start at once, then all producers: a process's start overlaps the
        # others' (in order, one waiting for the next, a quick run spent seconds more).
        readies = []
        for slot, (target, args) in enumerate(consumers):
            readies.append(FRESH.Event())
            probe = Probe(counts, slot, total, readies[-1], results)
            process = FRESH.Process(target=target, args=(*args, probe, stop_event), daemon=True)
            process.start()
            started.append(process)
        for slot, ready in enumerate(readies):
            if not ready.wait(START_TIMEOUT):
                return Outcome(0.0, [f"consumer {slot} did not start"])
        share = -(-total // len(producers))
        readies = []
        for index, (target, args) in enumerate(producers):
            readies.append(FRESH.Event())
            seqs = range(index * share, min(total, (index + 1) * share))
            arguments = (*args, seqs, readies[-1], go)
            process = FRESH.Process(target=target, args=arguments, daemon=True)
            process.start()
            started.append(process)
        for index, ready in enumerate(readies):
            if not ready.wait(START_TIMEOUT):
                return Outcome(0.0, [f"producer {index} did not start"])
        expected = total * len(consumers) if broadcast else total
        start = time.monotonic()
        go.set()
        deadline = start + settings.deadline
        progress, progressed = 0, start
        while (arrived := sum(counts)) < expected and (now := time.monotonic()) < deadline:
            if any(process.exitcode not in (None, 0) for process in started):
                break
            if arrived != progress:
                progress, progressed = arrived, now
            elif now - progressed > STALL:
                break  # lost: the count says how many, no need to wait for the deadline
            time.sleep(0.001)
        end = time.monotonic()
        time.sleep(0.2)  # a duplicate on its way is counted too
        stop_event.set()
        if stop is not None:
            stop()
        problems = _check(results, len(consumers), total, broadcast)
        elapsed = max(end - start, 1e-9)
        rate = (volume if volume is not None else expected) / elapsed
        return Outcome(rate, problems)
    finally:
        go.set()
        stop_event.set()
        reap(started)


def _check(results: Any, consumers: int, total: int, broadcast: bool) -> list[str]:
    problems: list[str] = []
    maps: list[bytes] = []
    for _ in range(consumers):
        try:
            _slot, seen, bad = results.get(timeout=60)
        except Exception:
            return [*problems, "a consumer never reported what it received"]
        maps.append(seen)
        problems += bad
    if broadcast:
        for index, seen in enumerate(maps):
            problems += _judge(seen, f"subscriber {index}: ")
    else:
        together = bytearray(total)
        for seen in maps:
            for seq, times in enumerate(seen):
                if times:
                    together[seq] = min(255, together[seq] + times)
        problems += _judge(bytes(together), "")
    return problems


def _judge(seen: bytes, who: str) -> list[str]:
    missing = seen.count(0)
    duplicated = len(seen) - missing - seen.count(1)
    problems = []
    if missing:
        problems.append(f"{who}{missing} of {len(seen)} messages never arrived")
    if duplicated:
        problems.append(f"{who}{duplicated} messages arrived more than once")
    return problems


# -- messages and payloads -----------------------------------------------------------------


@dataclass(frozen=True)
class Tick(Message):
    seq: int
    symbol: str
    price: float


def tick(seq: int) -> Tick:
    return Tick(seq, "ACME", 100.0 + seq % 7)


@dataclass(frozen=True)
class Blob(Message):
    seq: int
    data: bytes


def size_label(size: int) -> str:
    return f"{size // 2**20} MB" if size >= 2**20 else f"{size // 1024} KB"


def big_scenario(settings: Settings, kind: str = "payloads") -> str:
    """The name of a big payload scenario ("8 MB payloads 1 -> 1": bytes, the first one)."""
    return f"{size_label(settings.big_size)} {kind} 1 -> 1"


def big_payload(seq: int, size: int, body: bytes) -> bytes:
    """``size`` bytes no other message shares: its seq at both ends of a random body."""
    mark = seq.to_bytes(8, "big")
    return mark + body[: size - 16] + mark


def big_seq(data: Any, size: int) -> int | None:
    """The seq of a payload made by ``big_payload``, or None when it is damaged."""
    view = memoryview(data)
    if view.nbytes != size or view[:8] != view[size - 8 :]:
        return None
    return int.from_bytes(view[:8], "big")


def publish_on_go(broker: Any, messages: list[Any], ready: Any, go: Any) -> None:
    """An ipcbus publisher's timed part: say ready, wait for go, publish everything (built
    before the clock starts, as for every peer), wait until the hub has it all, close."""
    ready.set()
    go.wait(3600)
    publish = broker.publish
    for message in messages:
        publish(message)
    broker.flush(600)
    broker.close()


def redis_subscribed(pubsub: Any, channel: str) -> None:
    """Subscribe and wait for the server's confirmation: subscribed before saying ready."""
    pubsub.subscribe(channel)
    while True:
        confirmation = pubsub.get_message(timeout=1.0)
        if confirmation is not None and confirmation["type"] == "subscribe":
            return


def reap(processes: list[Any]) -> None:
    """Wait for ``processes`` told to stop; kill what is still there after 30 s."""
    for process in processes:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(10)


def redis_messages(pubsub: Any, stop: Any) -> Iterator[bytes]:
    """The data of each message ``pubsub`` receives, until ``stop`` is set and none is left."""
    while True:
        message = pubsub.get_message(timeout=0.1)
        if message is None:
            if stop.is_set():
                return
            continue
        if message["type"] == "message":
            yield message["data"]
