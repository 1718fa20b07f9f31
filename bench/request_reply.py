"""Round-trip latency through a hub: ``request()`` beside the publish/publish round trip.

Two processes and a hub. In each round the requester either
- publishes ``Ping``; a broadcast handler of the responder publishes ``Pong``; a broadcast handler
  of the requester receives it (the round trip users built before request/reply), or
- calls ``request(Ask)``; a broadcast handler of the responder returns ``Answer``.
Blocks of the two kinds alternate, after a warm-up, so both see the same machine; each round
trip is timed alone (one in flight). Reports p50 and p99 of each and their ratio.

    python bench/request_reply.py [--rounds 2000] [--block 100]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from harness import FRESH, reap
from ipcbus import Hub, Message, connect


@dataclass(frozen=True)
class Ping(Message):
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    seq: int


@dataclass(frozen=True)
class Ask(Message):
    seq: int


@dataclass(frozen=True)
class Answer(Message):
    seq: int


def _responder(address: str, ready: Any, stop: Any) -> None:
    broker = connect(address)
    broker.subscribe(Ping, lambda m: broker.publish(Pong(m.seq)))
    broker.subscribe(Ask, lambda m: Answer(m.seq))
    ready.send("ready")
    stop.poll(600)
    broker.close()


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass(frozen=True)
class RequestRows:
    """p50 and p99 (µs) of each kind of round trip, or why the run failed."""

    publish_p50_us: float = 0.0
    publish_p99_us: float = 0.0
    request_p50_us: float = 0.0
    request_p99_us: float = 0.0
    late_replies: int = 0
    failure: str | None = None  # a lost Pong, a wrong reply, a responder that never started


class _Lost(Exception):
    pass


def measure(rounds: int = 2000, block: int = 100, warmup: int = 200) -> RequestRows:
    """``rounds`` round trips of each kind, in alternating blocks of ``block``, after ``warmup``
    of each, with a fresh hub and a fresh responder process."""
    with Hub() as hub:
        ready, child_ready = FRESH.Pipe(duplex=False)
        child_stop, stop = FRESH.Pipe(duplex=False)
        process = FRESH.Process(target=_responder, args=(hub.address, child_ready, child_stop))
        process.start()
        try:
            if not (ready.poll(120) and ready.recv() == "ready"):
                return RequestRows(failure="the responder did not start")
            broker = connect(hub.address)
            try:
                return _time(broker, rounds, block, warmup)
            except _Lost as lost:
                return RequestRows(failure=str(lost))
            finally:
                broker.close()
        finally:
            stop.close()
            reap([process])


def _time(broker: Any, rounds: int, block: int, warmup: int) -> RequestRows:
    arrived = threading.Event()
    expected = [-1]

    def on_pong(message: Pong) -> None:
        if message.seq == expected[0]:
            arrived.set()

    broker.subscribe(Pong, on_pong)

    def publish_round(seq: int) -> float:
        arrived.clear()
        expected[0] = seq
        started = time.perf_counter()
        broker.publish(Ping(seq))
        if not arrived.wait(30):
            raise _Lost(f"Pong {seq} lost")
        return time.perf_counter() - started

    def request_round(seq: int) -> float:
        started = time.perf_counter()
        reply = broker.request(Ask(seq), timeout=30)
        elapsed = time.perf_counter() - started
        if reply != Answer(seq):
            raise _Lost(f"wrong reply {reply!r} to {seq}")
        return elapsed

    for seq in range(warmup):
        publish_round(seq)
        request_round(seq)
    published: list[float] = []
    requested: list[float] = []
    seq = warmup
    while len(requested) < rounds:
        size = min(block, rounds - len(requested))
        for _ in range(size):
            seq += 1
            published.append(publish_round(seq))
        for _ in range(size):
            seq += 1
            requested.append(request_round(seq))
    return RequestRows(
        _percentile(published, 0.5) * 1e6,
        _percentile(published, 0.99) * 1e6,
        _percentile(requested, 0.5) * 1e6,
        _percentile(requested, 0.99) * 1e6,
        broker.late_replies,
    )


def report(rows: RequestRows, rounds: int, block: int) -> bool:
    """Print the two rows and their ratio; False when the run failed."""
    print(f"request() beside publish round trip: {rounds} of each, alternating blocks of {block}")
    if rows.failure is not None:
        print(f"  FAILED: {rows.failure}")
        return False
    print(f"  {'round trip':<42} {'p50 µs':>8} {'p99 µs':>8}")
    print(
        f"  {'publish Ping -> handler publishes Pong':<42} {rows.publish_p50_us:8.0f} "
        f"{rows.publish_p99_us:8.0f}"
    )
    print(f"  {'request(Ask) -> Answer':<42} {rows.request_p50_us:8.0f} {rows.request_p99_us:8.0f}")
    print(
        f"  request / publish round trip: p50 {rows.request_p50_us / rows.publish_p50_us:.2f}x, "
        f"p99 {rows.request_p99_us / rows.publish_p99_us:.2f}x; late replies {rows.late_replies}"
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="round trips of each kind")
    parser.add_argument("--block", type=int, default=100, help="round trips per block")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    rows = measure(args.rounds, args.block, args.warmup)
    return 0 if report(rows, args.rounds, args.block) else 1


if __name__ == "__main__":
    sys.exit(main())
