"""ipcbus beside its peers, run side by side, reported as ratios (``make bench``).

One command, one run: it starts the peers' servers once (``servers.py``), then

1. the throughput cases (``CASE_MODULES`` and ``LOCAL_CASES``: broadcast, fan-out, queue groups,
   the queue journal, big payloads, a ``__main__`` class) ``--repeat`` times, interleaved, each
   run in fresh processes with a fresh hub per round, after a warm-up round;
2. the round trips (``latency.py``): ipcbus through the hub beside ``multiprocessing.Pipe``,
   pyzmq REQ/REP, the raw relay floor, nats-py request/reply and redis pub/sub, ``--repeat``
   repetitions in fresh processes, each after its own warm-up round trips;
3. ``request()`` beside the publish round trip (``request_reply.py``);
4. the hub's memory beside nats-server's and redis-server's, idle and under a slow consumer
   (``memory.py``, fresh servers of its own);

and reports each case's median and, per scenario, the ratio of ipcbus to each peer, and writes
everything to one JSON file (``--json``), the tables as Markdown (``--markdown``) and a PNG chart
of the ratios (``--chart``, when matplotlib is installed; ``results.py``, ``chart.py``).

A throughput case of this file is one function ``f(settings) -> Outcome`` and one line
``Case(scenario, contender, f)`` in ``LOCAL_CASES``; a module of cases has
``cases(settings) -> list[Case]`` (see ``harness.py``) and a line in ``CASE_MODULES``.

Every run counts what arrived (distinct sequence numbers; see ``harness.measure``; a round trip
that never completes fails its case): a run that lost or duplicated a message is reported as
FAILED, not as a number. ipcbus failing is the bench failing (exit status 1); a peer failing is
reported and the bench goes on.

``--quick`` is a smoke test: tiny sizes, queue shapes 1 -> 2 and 4 -> 4 only, one round, no
warm-up round, 200 round trips per case, a flood of 600 messages for the memory case.

    python bench/run.py [--quick] [--repeat 3] [--only SCENARIO] [--json bench-results.json]
                        [--markdown bench-results.md] [--chart bench-results.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import chart
import latency
import memory
import nats_cases
import request_reply
import results
from harness import Case, Outcome, Settings
from ipcbus import Hub
from servers import running
from throughput import ipcbus_queue, queue_shared

CASE_MODULES = ("throughput", "big_kinds", "peers", "main_class")
BASELINE = "ipcbus"
JOURNAL = "queue 1 -> 2, journal on"
MEMORY = "hub memory, slow consumer"  # --only: memory.py's case


def ipcbus_journal(settings: Settings) -> Outcome:
    """Acked 1 producer -> 2 consumers through a hub of its own with the queue journal on (an
    fdatasync per loop turn, the default); hub socket and journal in a private directory."""
    directory = tempfile.mkdtemp(prefix="ipcbus-bench-")
    try:
        with Hub(f"ipc://{directory}/hub", journal=f"{directory}/journal") as hub:
            return ipcbus_queue(dataclasses.replace(settings, hub_address=hub.address), 1, 2)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def natsbroker_broadcast(settings: Settings) -> Outcome:
    """ipcbus's own API on NATS (``NatsBroker``), 1 publisher -> 1 subscriber."""
    assert settings.nats_url is not None
    rate, dropped = nats_cases.run_broadcast(settings.nats_url, settings.messages)
    return Outcome(rate, [f"{dropped} messages dropped (counted)"] if dropped else [])


def natsbroker_queue(settings: Settings) -> Outcome:
    """``NatsBroker`` queue group on JetStream, 1 producer -> 2 consumers, exactly once."""
    assert settings.nats_url is not None
    name = f"bench-{os.getpid()}-{time.monotonic_ns()}"  # a fresh durable consumer per run
    rate, problems = nats_cases.run_queue(settings.nats_url, settings.queue_messages, name)
    return Outcome(rate, problems)


# Cases of this file: a function f(settings) -> Outcome, and one line here.
LOCAL_CASES: list[Case] = [
    Case(JOURNAL, "ipcbus", ipcbus_journal),
    Case(JOURNAL, "multiprocessing.Queue", lambda s: queue_shared(s, 1, 2)),
    Case("broadcast 1 -> 1", "NatsBroker", natsbroker_broadcast, needs="nats"),
    Case("queue 1 -> 2", "NatsBroker", natsbroker_queue, needs="nats"),
]

# A smoke test: every kind of case once; 1 -> 4 adds no path that 1 -> 2 and 4 -> 4 miss.
QUICK = Settings(
    messages=3_000,
    queue_messages=2_000,
    big_messages=4,
    big_size=1024 * 1024,
    queue_shapes=((1, 2), (4, 4)),
)


@dataclasses.dataclass(frozen=True)
class RoundTrips:
    """Sizes of the round-trip cases: latency.py's and request_reply.py's."""

    rounds: int = 2000
    warmup: int = 200
    requests: int = 2000
    block: int = 100


# A smoke test: enough round trips for a p99 to exist, one repetition.
QUICK_ROUND_TRIPS = RoundTrips(rounds=200, warmup=20, requests=200, block=50)


def all_cases(settings: Settings) -> list[Case]:
    found: list[Case] = []
    for name in CASE_MODULES:
        found += importlib.import_module(name).cases(settings)
    return found + LOCAL_CASES


@dataclasses.dataclass
class Tally:
    """What the runs of one case gave."""

    case: Case
    values: list[float] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values and not self.problems else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    settings = QUICK if args.quick else Settings()
    settings = dataclasses.replace(
        settings,
        **{
            key: value
            for key, value in (
                ("messages", args.messages),
                ("queue_messages", args.queue_messages),
                ("big_messages", args.big_messages),
                ("big_size", args.big_size),
            )
            if value is not None
        },
    )
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    cases = [c for c in all_cases(settings) if not args.only or args.only in c.scenario]
    if args.no_peers:
        cases = [c for c in cases if c.contender in (BASELINE, "multiprocessing.Queue")]
    trips = QUICK_ROUND_TRIPS if args.quick else RoundTrips()
    if args.rounds is not None:
        trips = dataclasses.replace(trips, rounds=args.rounds, requests=args.rounds)
    latency_cases = [
        name
        for name, needs, _ in latency.CASES
        if (not args.only or args.only in "round trip")
        and (not args.no_peers or name in (latency.IPCBUS, "multiprocessing.Pipe"))
    ]
    with_requests = not args.only or args.only in "request/reply"
    with_memory = not args.only or args.only in MEMORY
    flood = memory.QUICK_FLOOD if args.quick else memory.Flood()
    needs = {case.needs for case in cases}
    needs |= {server for name, server, _ in latency.CASES if name in latency_cases and server}
    began = time.monotonic()
    latency_rows: list[latency.LatencyRow] = []
    requests: request_reply.RequestRows | None = None
    with running("nats" in needs, "redis" in needs) as servers:
        skipped = dict(servers.skipped or {})
        for server, why in skipped.items():
            print(f"skipped: every {server} case: {why}", flush=True)
        settings = dataclasses.replace(
            settings, nats_url=servers.nats_url, redis_port=servers.redis_port
        )
        cases = [case for case in cases if case.needs not in skipped]
        tallies = {(case.scenario, case.contender): Tally(case) for case in cases}
        if not args.quick:
            print("warm-up round (not counted)", flush=True)
            _round(
                dataclasses.replace(
                    QUICK, nats_url=servers.nats_url, redis_port=servers.redis_port
                ),
                cases,
                None,
                0,
                0,
            )
        for round_ in range(1, repeat + 1):
            _round(settings, cases, tallies, round_, repeat)
        if latency_cases:
            latency_rows = latency.measure(
                trips.rounds,
                trips.warmup,
                repeat,
                lambda line: print(line, flush=True),
                set(latency_cases),
                (servers.addresses(), skipped),
            )
        if with_requests:
            print(f"request() beside publish round trip ({time.monotonic() - began:.0f} s)")
            requests = request_reply.measure(trips.requests, trips.block, trips.warmup)
    memory_rows: list[memory.MemoryRow] = []
    if with_memory:  # servers of its own, fresh ones: their memory is the case's alone
        names = {memory.IPCBUS} if args.no_peers else set(memory.CONTENDERS)
        memory_rows = memory.measure(flood, repeat, lambda line: print(line, flush=True), names)
    elapsed = time.monotonic() - began
    print()
    _report(tallies, repeat)
    if latency_rows:
        print()
        latency.report(latency_rows, trips.rounds, trips.warmup, repeat)
    if requests is not None:
        print()
    requests_ok = requests is None or request_reply.report(requests, trips.requests, trips.block)
    memory_ok = True
    if memory_rows:
        print()
        memory_ok = memory.report(memory_rows, flood, repeat)
    document = results.document(
        quick=args.quick,
        settings={k: v for k, v in dataclasses.asdict(settings).items() if k != "hub_address"},
        repeat=repeat,
        seconds=round(elapsed, 1),
        skipped=skipped,
        results=results.throughput(tallies),
        round_trips={
            **dataclasses.asdict(trips),
            "cases": results.round_trips(latency_rows, latency.IPCBUS),
        },
        request_reply=dataclasses.asdict(requests) if requests is not None else None,
        memory=memory.as_json(memory_rows, flood) if memory_rows else None,
    )
    print()
    _write(args, document)
    failed = [t for t in tallies.values() if t.problems]
    for tally in failed:
        case = tally.case
        print(f"FAILED {case.scenario} / {case.contender}:")
        for problem in tally.problems[:10]:
            print(f"  {problem}")
    counted = sum(len(t.values) for t in tallies.values())
    print(
        f"{counted} runs in {elapsed:.0f} s; each counted what arrived ({len(failed)} cases failed)"
    )
    ours_failed = any(t.case.contender == BASELINE for t in failed)
    ours_failed |= any(row.failure for row in latency_rows if row.case == latency.IPCBUS)
    return 1 if ours_failed or not requests_ok or not memory_ok else 0


def _write(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """The JSON file, the Markdown table and the chart, each where asked (or said why not)."""
    if args.json:
        with open(args.json, "w") as file:
            json.dump(document, file, indent=2)
        print(f"written: {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(results.markdown(document))
        print(f"written: {args.markdown}")
    if args.chart:
        why = chart.write(document, args.chart)
        print(f"chart skipped: {why}" if why else f"written: {args.chart}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--repeat", type=int, help="rounds (3; 1 with --quick)")
    parser.add_argument("--messages", type=int, help="broadcast messages per run")
    parser.add_argument("--queue-messages", type=int, help="queue messages per run")
    parser.add_argument("--big-messages", type=int, help="big payloads per run")
    parser.add_argument("--big-size", type=int, help="bytes per big payload")
    parser.add_argument("--rounds", type=int, help="round trips per latency case and kind")
    parser.add_argument(
        "--only", help="only the scenarios whose name contains this ('round trip', 'request')"
    )
    parser.add_argument("--no-peers", action="store_true", help="ipcbus and the Queue only")
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
    parser.add_argument(
        "--markdown", help="also write the tables as Markdown, with the date and machine"
    )
    parser.add_argument(
        "--chart", default="bench-results.png", help="the PNG chart (needs matplotlib; '' skips)"
    )
    return parser.parse_args(argv)


def _round(
    settings: Settings,
    cases: list[Case],
    tallies: dict[tuple[str, str], Tally] | None,
    round_: int,
    repeat: int,
) -> None:
    # A fresh hub each round: queue groups live as long as their hub.
    with Hub() as hub:
        settings = dataclasses.replace(settings, hub_address=hub.address)
        for index, case in enumerate(cases, 1):
            where = f"round {round_}/{repeat}" if tallies is not None else "warm-up"
            label = f"[{index:>2}/{len(cases)}] {where}  {case.scenario}  {case.contender}"
            print(f"{label} ...", end="", flush=True)
            took = time.monotonic()
            try:
                outcome = case.run(settings)
            except Exception as exc:  # a peer's library or server that misbehaves
                outcome = Outcome(0.0, [f"{type(exc).__name__}: {exc}"])
            if outcome.problems:
                print(f" FAILED ({outcome.problems[0]})", flush=True)
            else:
                took = time.monotonic() - took
                print(f" {outcome.value:,.0f} {case.unit}  ({took:.1f} s)", flush=True)
            if tallies is not None:
                tally = tallies[(case.scenario, case.contender)]
                if outcome.problems:
                    tally.problems += [f"round {round_}: {p}" for p in outcome.problems]
                else:
                    tally.values.append(outcome.value)


def _report(tallies: dict[tuple[str, str], Tally], repeat: int) -> None:
    scenarios: dict[str, list[Tally]] = {}
    for tally in tallies.values():
        scenarios.setdefault(tally.case.scenario, []).append(tally)
    for scenario, found in scenarios.items():
        unit = found[0].case.unit
        ours = next((t.median for t in found if t.case.contender == BASELINE), None)
        print(f"{scenario}, median of {repeat} ({unit})")
        print(f"  {'contender':24} {'median':>12} {'ipcbus is':>10}   runs")
        for tally in found:
            runs = ", ".join(f"{value:,.0f}" for value in tally.values)
            median = tally.median
            if median is None:
                print(f"  {tally.case.contender:24} {'FAILED':>12} {'':>10}   {runs}")
                continue
            ratio = f"{ours / median:.2f}x" if ours and tally.case.contender != BASELINE else ""
            print(f"  {tally.case.contender:24} {median:>12,.0f} {ratio:>10}   {runs}")
        for note in {t.case.note for t in found if t.case.note}:
            print(f"  ({note})")


if __name__ == "__main__":
    sys.exit(main())
