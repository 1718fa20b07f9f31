"""A short run of the soak test with a ledger (scripts/soak.py, `make soak` for the long one).

The soak runs as a subprocess, once for this module: a hub, publishers, broadcast subscribers, a
stage whose handler publishes, queue consumers in two groups and a DeadLetter subscriber, while it
injects every kind of fault but a SIGKILL of the hub. Its last line is a JSON summary. One test
checks the harness (every fault kind was injected, messages flowed, nothing was left behind); the
other its verdict (every message publish() accepted was accounted for, nothing hung, resources
stayed bounded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.hub, pytest.mark.forks]

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"
SUMMARY_PREFIX = "SOAK-SUMMARY "
# 25 s of faults, at most 30 s to drain: about 50 s when everything drains, 90 s at most.
# Every fault but the hub's SIGKILL, which `make soak` injects too: its hub has a journal, and
# the ledger counts what the publishers report in doubt (docs/guarantees.md, "Hub kill -9");
# a 3-minute run with 7 to 11 hub kills accounts for every message.
ARGUMENTS = ["--seconds", "25", "--seed", "9", "--drain-seconds", "30", "--skip", "sigkill_hub"]
DEADLINE = 240.0


@dataclass
class SoakRun:
    returncode: int
    output: str
    summary: dict[str, Any]
    leftovers: list[str]


@pytest.fixture(scope="module")
def soak_run(tmp_path_factory: pytest.TempPathFactory) -> SoakRun:
    parent = tmp_path_factory.mktemp("soak")
    completed = subprocess.run(
        [sys.executable, str(SOAK), *ARGUMENTS, "--tmpdir", str(parent)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    output = completed.stdout + completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith(SUMMARY_PREFIX)]
    assert lines, f"the soak printed no summary line:\n{output[-5000:]}"
    summary = json.loads(lines[-1][len(SUMMARY_PREFIX) :])
    leftovers = [str(path) for path in parent.iterdir()]
    return SoakRun(completed.returncode, output, summary, leftovers)


@pytest.mark.timeout(DEADLINE + 60)
def test_the_soak_injects_every_fault_and_messages_flow(soak_run: SoakRun) -> None:
    summary = soak_run.summary
    assert soak_run.leftovers == [], "the soak left its private directory behind"
    faults = summary["faults"]
    assert {kind for kind, count in faults.items() if count == 0} == {"sigkill_hub"}, faults
    totals = summary["totals"]
    assert totals["published_accepted"] > 10_000, totals
    assert totals["broadcast_received"] > 10_000, totals
    assert totals["queue_processed"] > 500, totals
    assert totals["dead_lettered"] > 0, totals
    assert totals["hub_processes"] == 1, totals


@pytest.mark.timeout(DEADLINE + 60)
def test_the_soak_accounts_for_every_accepted_message(soak_run: SoakRun) -> None:
    summary = soak_run.summary
    assert summary["failures"] == [], soak_run.output[-8000:]
    assert summary["ok"]
    assert soak_run.returncode == 0
