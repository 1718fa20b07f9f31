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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="round trips of each kind")
    parser.add_argument("--block", type=int, default=100, help="round trips per block")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    with Hub() as hub:
        ready, child_ready = SPAWN.Pipe(duplex=False)
        child_stop, stop = SPAWN.Pipe(duplex=False)
        process = SPAWN.Process(target=_responder, args=(hub.address, child_ready, child_stop))
        process.start()
        if not (ready.poll(60) and ready.recv() == "ready"):
            raise SystemExit("the responder did not start")
        broker = connect(hub.address)
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
                raise SystemExit(f"Pong {seq} lost")
            return time.perf_counter() - started

        def request_round(seq: int) -> float:
            started = time.perf_counter()
            reply = broker.request(Ask(seq), timeout=30)
            elapsed = time.perf_counter() - started
            if reply != Answer(seq):
                raise SystemExit(f"wrong reply {reply!r} to {seq}")
            return elapsed

        for seq in range(args.warmup):
            publish_round(seq)
            request_round(seq)
        published: list[float] = []
        requested: list[float] = []
        seq = args.warmup
        while len(requested) < args.rounds:
            for _ in range(args.block):
                seq += 1
                published.append(publish_round(seq))
            for _ in range(args.block):
                seq += 1
                requested.append(request_round(seq))
        late = broker.late_replies
        broker.close()
        stop.close()
        process.join(30)
    rows = [
        ("publish Ping -> handler publishes Pong", published),
        ("request(Ask) -> Answer", requested),
    ]
    print(f"{args.rounds} round trips of each kind, in alternating blocks of {args.block}")
    print(f"{'round trip':<42} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8}")
    for title, samples in rows:
        print(
            f"{title:<42} {_percentile(samples, 0.5) * 1e6:8.0f} "
            f"{_percentile(samples, 0.99) * 1e6:8.0f} {statistics.fmean(samples) * 1e6:8.0f}"
        )
    p50 = _percentile(requested, 0.5) / _percentile(published, 0.5)
    p99 = _percentile(requested, 0.99) / _percentile(published, 0.99)
    print(f"request / publish round trip: p50 {p50:.2f}x, p99 {p99:.2f}x; late replies {late}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
