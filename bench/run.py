"""Throughput of ipcbus beside its peers, run side by side, reported as ratios (``make bench``).

One command, one run: it starts the peers' servers (``servers.py``), then runs every case
``--repeat`` times, interleaved, each run in fresh spawned processes with a fresh hub per round,
after a warm-up round; it reports each case's median and, per scenario, the ratio of ipcbus to
each peer (higher is better for ipcbus), and writes everything to a JSON file.

Cases come from the modules in ``CASE_MODULES`` (each has ``cases(settings) -> list[Case]``,
see ``harness.py``) and from ``LOCAL_CASES`` below: a case of this file is one function
``f(settings) -> Outcome`` and one line ``Case(scenario, contender, f)`` in that list.

Every run counts what arrived (distinct sequence numbers; see ``harness.measure``): a run that
lost or duplicated a message is reported as FAILED, not as a number. ipcbus failing is the
bench failing (exit status 1); a peer failing is reported and the bench goes on.

    python bench/run.py [--quick] [--repeat 3] [--only SCENARIO] [--json bench-results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from harness import Case, Outcome, Settings
from ipcbus import Hub
from servers import running

CASE_MODULES = ("throughput", "peers")
BASELINE = "ipcbus"

# Cases of this file: a function f(settings) -> Outcome, and one line here.
LOCAL_CASES: list[Case] = []

QUICK = Settings(messages=3_000, queue_messages=2_000, big_messages=4, big_size=1024 * 1024)


def all_cases(settings: Settings) -> list[Case]:
    found = list(LOCAL_CASES)
    for name in CASE_MODULES:
        found += importlib.import_module(name).cases(settings)
    return found


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
    needs = {case.needs for case in cases}
    began = time.monotonic()
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
    elapsed = time.monotonic() - began
    print()
    _report(tallies, repeat)
    if args.json:
        _write_json(args.json, settings, repeat, tallies, skipped, elapsed)
        print(f"\nwritten: {args.json}")
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
    return 1 if any(t.case.contender == BASELINE for t in failed) else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--repeat", type=int, help="rounds (3; 1 with --quick)")
    parser.add_argument("--messages", type=int, help="broadcast messages per run")
    parser.add_argument("--queue-messages", type=int, help="queue messages per run")
    parser.add_argument("--big-messages", type=int, help="big payloads per run")
    parser.add_argument("--big-size", type=int, help="bytes per big payload")
    parser.add_argument("--only", help="only the scenarios whose name contains this")
    parser.add_argument("--no-peers", action="store_true", help="ipcbus and the Queue only")
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
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
            try:
                outcome = case.run(settings)
            except Exception as exc:  # a peer's library or server that misbehaves
                outcome = Outcome(0.0, [f"{type(exc).__name__}: {exc}"])
            if outcome.problems:
                print(f" FAILED ({outcome.problems[0]})", flush=True)
            else:
                print(f" {outcome.value:,.0f} {case.unit}", flush=True)
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


def _write_json(
    path: str,
    settings: Settings,
    repeat: int,
    tallies: dict[tuple[str, str], Tally],
    skipped: dict[str, str],
    elapsed: float,
) -> None:
    results: dict[str, dict[str, Any]] = {}
    for (scenario, contender), tally in tallies.items():
        results.setdefault(scenario, {})[contender] = {
            "unit": tally.case.unit,
            "runs": tally.values,
            "median": tally.median,
            "problems": tally.problems,
        }
    for contenders in results.values():
        ours = contenders.get(BASELINE, {}).get("median")
        for contender, entry in contenders.items():
            if contender != BASELINE and ours and entry["median"]:
                entry["ipcbus_ratio"] = ours / entry["median"]
    document = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            k: v for k, v in dataclasses.asdict(settings).items() if k not in ("hub_address",)
        },
        "repeat": repeat,
        "seconds": round(elapsed, 1),
        "skipped": skipped,
        "results": results,
    }
    with open(path, "w") as file:
        json.dump(document, file, indent=2)


if __name__ == "__main__":
    sys.exit(main())
