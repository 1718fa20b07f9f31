"""What a bench run leaves behind: one JSON document (``--json``), and from it a Markdown table
(``--markdown``) to paste into the README with the date and the machine.

The document holds, per throughput scenario and contender, the runs, their median and
``ipcbus_ratio`` (ipcbus / contender: above 1, ipcbus is faster); per round-trip case p50/p99 and
``ipcbus_p50_ratio`` (ipcbus / contender: below 1, ipcbus is faster); ``request_reply``; and per
server of the memory case its idle and peak resident memory and ``ipcbus_peak_ratio`` (below 1,
the hub uses less).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
from typing import Any

import zmq

BASELINE = "ipcbus"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in file if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
    }


def throughput(tallies: dict[tuple[str, str], Any]) -> dict[str, dict[str, Any]]:
    """The throughput cases (``run.Tally`` by scenario and contender) with their ratios."""
    results: dict[str, dict[str, Any]] = {}
    for (scenario, contender), tally in tallies.items():
        results.setdefault(scenario, {})[contender] = {
            "unit": tally.case.unit,
            "runs": tally.values,
            "median": tally.median,
            "problems": tally.problems,
        }
        if tally.case.note:
            results[scenario][contender]["note"] = tally.case.note
    for contenders in results.values():
        ours = contenders.get(BASELINE, {}).get("median")
        for contender, entry in contenders.items():
            if contender != BASELINE and ours and entry["median"]:
                entry["ipcbus_ratio"] = ours / entry["median"]
    return results


def round_trips(rows: list[Any], ours_name: str) -> dict[str, Any]:
    """The round trips (``latency.LatencyRow``): per case p50/p99 (µs), and ipcbus's p50 and p99
    divided by the case's (lower is better for ipcbus, unlike the throughput ratios)."""
    ours = next((row for row in rows if row.case == ours_name and row.p50_us), None)
    cases: dict[str, Any] = {}
    for row in rows:
        entry = dataclasses.asdict(row)
        if ours is not None and row is not ours and row.p50_us and row.p99_us:
            entry["ipcbus_p50_ratio"] = ours.p50_us / row.p50_us
            entry["ipcbus_p99_ratio"] = ours.p99_us / row.p99_us
        cases[row.case] = entry
    return cases


def document(**parts: Any) -> dict[str, Any]:
    """The JSON document: the date and machine, then ``parts`` as given."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"date": now, "machine": machine(), **parts}


# -- Markdown ----------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    """The tables of a run, as Markdown, headed by its date and machine."""
    box = doc["machine"]
    mode = "quick, " if doc.get("quick") else ""
    lines = [
        f"Measured {doc['date']} ({mode}median of {doc['repeat']}) on {box['cpu']}, "
        f"{box['cpus']} cores, Python {box['python']}, pyzmq {box['pyzmq']} "
        f"(libzmq {box['libzmq']}), {box['platform']}.",
        "",
        "Throughput; ratio = ipcbus / contender (above 1: ipcbus is faster).",
        "",
        "| scenario | contender | median | ratio |",
        "|---|---|---:|---:|",
    ]
    notes: list[str] = []
    for scenario, contenders in doc["results"].items():
        for contender, entry in contenders.items():
            median = entry["median"]
            shown = "FAILED" if median is None else f"{median:,.0f} {entry['unit']}"
            ratio = f"{entry['ipcbus_ratio']:.2f}x" if "ipcbus_ratio" in entry else ""
            lines.append(f"| {_cell(scenario)} | {_cell(contender)} | {shown} | {ratio} |")
            if entry.get("note"):
                notes.append(_cell(f"{scenario}: {entry['note']}."))
    lines += ["", *notes] if notes else []
    trips = doc.get("round_trips", {}).get("cases", {})
    if trips:
        lines += [
            "",
            "Round trips, µs; ratio = ipcbus / contender (below 1: ipcbus is faster).",
            "",
            "| round trip | p50 | p99 | p50 ratio | p99 ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for case, row in trips.items():
            if row["skipped"] or row["failure"]:
                lines.append(f"| {case} | {'skipped' if row['skipped'] else 'FAILED'} | | | |")
                continue
            p50 = f"{row['ipcbus_p50_ratio']:.2f}x" if "ipcbus_p50_ratio" in row else ""
            p99 = f"{row['ipcbus_p99_ratio']:.2f}x" if "ipcbus_p99_ratio" in row else ""
            lines.append(
                f"| {case} | {row['p50_us']:,.0f} | {row['p99_us']:,.0f} | {p50} | {p99} |"
            )
    requests = doc.get("request_reply")
    if requests and not requests["failure"]:
        lines += [
            "",
            "| request/reply, µs | p50 | p99 |",
            "|---|---:|---:|",
            f"| publish Ping, handler publishes Pong | {requests['publish_p50_us']:,.0f} | "
            f"{requests['publish_p99_us']:,.0f} |",
            f"| request(Ask) -> Answer | {requests['request_p50_us']:,.0f} | "
            f"{requests['request_p99_us']:,.0f} |",
        ]
    lines += _memory(doc.get("memory"))
    skipped = doc.get("skipped", {})
    if skipped:
        lines += ["", *(f"Skipped, every {name} case: {why}." for name, why in skipped.items())]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` as Markdown shows it verbatim (``__main__`` would turn bold)."""
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("|", "\\|")


def _memory(memory: dict[str, Any] | None) -> list[str]:
    if not memory:
        return []
    flood = memory["flood"]
    lines = [
        "",
        f"Server memory (RSS, MiB): idle with one subscriber; peak while one publisher floods "
        f"{flood['messages']:,} messages of {flood['size']:,} B and the subscriber's handler "
        f"blocks {flood['slow'] * 1e3:g} ms per message; ratio = ipcbus / server (below 1: the "
        "hub uses less). Every run accounted for every message: received + reported lost = sent.",
        "",
        "| server | idle | peak | ratio | received | reported lost |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in memory["cases"].items():
        if row["skipped"] or row["failure"]:
            why = f"skipped: {row['skipped']}" if row["skipped"] else f"FAILED: {row['failure']}"
            lines.append(f"| {name} | {why} | | | | |")
            continue
        ratio = f"{row['ipcbus_peak_ratio']:.2f}x" if "ipcbus_peak_ratio" in row else ""
        lines.append(
            f"| {name} | {row['idle_mb_median']:.1f} | {row['peak_mb_median']:.1f} | {ratio} | "
            f"{statistics.median(row['received']):,.0f} | "
            f"{statistics.median(row['reported_lost']):,.0f} |"
        )
    return lines
