"""One PNG figure of a bench run (``--chart``): how many times better ipcbus did than each peer,
per scenario, one bar per (scenario, peer).

Every bar reads the same way, above 1 ipcbus did better: throughput is ipcbus's rate / the
peer's, round trips and memory are the peer's p50 or peak / ipcbus's (the inverse of the ratios
in the table, where lower is better for those). A log scale once the ratios span more than 10x.

Needs matplotlib (the ``chart`` extra, part of ``bench``); without it the bench says it skipped
the chart, and writes everything else.
"""

from __future__ import annotations

import importlib.util
from typing import Any

BETTER = "#2b7a3d"
WORSE = "#b5452d"


def missing() -> str | None:
    """Why no chart can be drawn here, or None."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (pip install -e '.[chart]')"
    return None


def bars(doc: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(group, label, ipcbus advantage) per bar, in the order of the report."""
    found: list[tuple[str, str, float]] = []
    for scenario, contenders in doc.get("results", {}).items():
        for contender, entry in contenders.items():
            if entry.get("ipcbus_ratio"):
                found.append((scenario, contender, entry["ipcbus_ratio"]))
    for case, row in doc.get("round_trips", {}).get("cases", {}).items():
        if row.get("ipcbus_p50_ratio"):
            found.append(("round trip p50", case, 1 / row["ipcbus_p50_ratio"]))
    for name, row in (doc.get("memory") or {}).get("cases", {}).items():
        if row.get("ipcbus_peak_ratio"):
            found.append(("hub memory, peak", name, 1 / row["ipcbus_peak_ratio"]))
    return found


def write(doc: dict[str, Any], path: str) -> str | None:
    """Draws the chart into ``path``; returns why it did not (None when it did)."""
    why = missing()
    if why is not None:
        return why
    found = bars(doc)
    if not found:
        return "no ratio to draw (every peer skipped or failed)"
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    labels = [f"{group} | {label}" for group, label, _ in found]
    values = [value for _, _, value in found]
    figure, axes = pyplot.subplots(figsize=(10, 0.32 * len(found) + 1.6))
    colours = [BETTER if value >= 1 else WORSE for value in values]
    positions = range(len(found))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()  # the report's order, top down
    axes.axvline(1.0, color="black", linewidth=0.8)
    if max(values) / min(values) > 10:
        axes.set_xscale("log")
    for position, value in zip(positions, values, strict=True):
        axes.annotate(
            f"{value:.2f}x",
            (value, position),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    box = doc.get("machine", {})
    axes.set_xlabel("times better than the peer: ipcbus rate / peer's; peer's µs or MiB / ipcbus's")
    axes.set_title(
        f"ipcbus beside its peers (above 1: ipcbus better)\n{doc.get('date', '')}, "
        f"{box.get('cpu', '')}, {box.get('cpus', '')} cores, Python {box.get('python', '')}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None
