"""Running a hub as an operator does: tcp://host:0 and fixed data ports, and the README pattern
that must exit without a word on stderr."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ipcbus import Hub
from ipcbus.config import ENV_ADDRESS
from ipcbus.wire.address import Address

from .hubtools import REPO, free_tcp_port, round_trip, run_cli

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


def _remove_tcp_files(address: str) -> None:
    """A tcp hub keeps its key file (and lock) in the per-user directory: remove this test's."""
    parsed = Address.parse(address)
    for suffix in (".key", ".lock", ".groups"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(parsed.hub_file(suffix))


def _port_is_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_ipcbus_hub_at_tcp_port_zero_prints_the_port_it_got() -> None:
    publish_port, fanout_port = free_tcp_port(), free_tcp_port()
    environment = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ipcbus",
            "hub",
            "--address",
            "tcp://127.0.0.1:0",
            "--tcp-publish-port",
            str(publish_port),
            "--tcp-fanout-port",
            str(fanout_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=environment,
    )
    address = ""
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", address), address
        assert not address.endswith(":0")
        assert process.stdout.readline().strip() == f"export {ENV_ADDRESS}={address}"
        assert run_cli("ping", "--address", address).returncode == 0
        round_trip(address)  # the clients found the fixed data ports through WELCOME
        assert _port_is_taken(publish_port)
        assert _port_is_taken(fanout_port)
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
        if address:
            _remove_tcp_files(address)
    assert process.returncode == 0, err


def test_hub_start_at_tcp_port_zero_reports_its_address() -> None:
    with Hub("tcp://127.0.0.1:0", start_method="fork") as hub:
        try:
            assert not hub.address.endswith(":0")
            assert os.environ[ENV_ADDRESS] == hub.address  # what its children connect to
            round_trip(hub.address)
        finally:
            address = hub.address
    _remove_tcp_files(address)


def _readme_program() -> str:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    (program,) = [block for block in blocks if "with Hub():" in block]
    return program


def test_the_readme_pattern_exits_without_a_word_on_stderr(tmp_path: Path) -> None:
    """Clients are quiet at WARNING: an orderly run of the README's program, a stale
    IPCBUS_ADDRESS in its environment included, prints its result and nothing else."""
    (tmp_path / "program.py").write_text(_readme_program())
    scratch = tmp_path / "tmp"
    scratch.mkdir(mode=0o700)
    environment = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
    environment.update({ENV_ADDRESS: f"ipc://{tmp_path}/stale", "TMPDIR": str(scratch)})
    completed = subprocess.run(
        [sys.executable, "program.py"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert completed.stdout.splitlines()[-1] == f"shipped {list(range(10))}"
