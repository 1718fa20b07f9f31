"""Every Python code block of the README and of docs/ runs, as written (a complete program).

A block whose first line is ``# test_<name>.py`` is a test file: it is written under that name
and run with pytest (the plugin's fixtures available, as in a user's project). Any other block
is a program, run with ``python``. Each runs in a fresh directory of its own, which is also its
temporary directory (checked empty of hub files afterwards).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{document.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


def test_the_documents_have_code_to_run() -> None:
    assert len(BLOCKS) >= 5, BLOCKS


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_code_block_runs(where: str, code: str, tmp_path: Path) -> None:
    elided = [line for line in code.splitlines() if line.strip() == "..." or line.endswith(": ...")]
    assert elided == [], f"{where}: a fragment with elided code, not a program"
    scratch = tmp_path / "tmp"
    scratch.mkdir(mode=0o700)
    first = code.splitlines()[0]
    name = re.fullmatch(r"# (test_\w+\.py)", first)
    if name:
        (tmp_path / name.group(1)).write_text(code)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name.group(1)]
    else:
        (tmp_path / "program.py").write_text(code)
        command = [sys.executable, "program.py"]
    completed = subprocess.run(
        command,
        cwd=tmp_path,
        env={**_environment(), "TMPDIR": str(scratch), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, f"{where}\n{completed.stdout}\n{completed.stderr}"
    assert [p.name for p in scratch.iterdir() if "ipcbus" in p.name] == [], "hub files left"


def _environment() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "IPCBUS_ADDRESS"}


def test_the_test_files_of_the_docs_type_check(tmp_path: Path) -> None:
    """What users copy into their suites passes ``mypy --strict`` (``override_message_broker``
    returns the broker's own type, so ``process_messages()`` type-checks)."""
    files = []
    for _where, code in BLOCKS:
        name = re.fullmatch(r"# (test_\w+\.py)", code.splitlines()[0])
        if name:
            (tmp_path / name.group(1)).write_text(code)
            files.append(name.group(1))
    assert files
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
