"""Every example in examples/ runs, as a user would run it, and succeeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLES.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_job_queue_serves_jobs_over_http() -> None:
    completed = _run(str(EXAMPLES / "job_queue.py"), "--demo", "20")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "20 jobs done over HTTP by 2 workers" in completed.stdout


def test_the_pipeline_fans_out() -> None:
    completed = _run(str(EXAMPLES / "pipeline.py"), "--readings", "2000")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "2000 enriched by the queue group" in completed.stdout


def test_the_plugin_example_passes() -> None:
    completed = _run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / "test_with_plugin.py")
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "4 passed" in completed.stdout
