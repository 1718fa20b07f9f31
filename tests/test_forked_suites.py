"""Users run their suites with ``pytest --forked``: a hub fixture built in the session's process
must serve tests that each run in a forked child (docs/architecture.md, "Testing")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hub, pytest.mark.forks]

CONFTEST = """
import pytest
from ipcbus import Hub

@pytest.fixture(scope="session")
def hub():
    with Hub() as running:
        yield running
"""

TESTS = """
import threading
from dataclasses import dataclass
from ipcbus import Message, connect, get_message_broker, set_message_broker

@dataclass(frozen=True)
class Note(Message):
    text: str

def round_trip(broker, text):
    got = threading.Event()
    broker.subscribe(Note, lambda m: got.set(), lambda m: m.text == text)
    broker.publish(Note(text))
    assert got.wait(20)

def test_first_forked_child(hub):
    with connect(hub.address) as broker:
        round_trip(broker, "first")

def test_second_forked_child_with_a_process_broker(hub):
    set_message_broker(connect(hub.address))
    round_trip(get_message_broker(), "second")
    get_message_broker().close()

def test_queue_group_in_a_forked_child(hub):
    done = threading.Event()
    with connect(hub.address) as broker:
        broker.subscribe_async(Note, lambda m: done.set(), "notes")
        broker.publish(Note("queued"))
        assert done.wait(20)
"""


def test_a_session_hub_serves_forked_tests(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_user_suite.py").write_text(TESTS)
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--forked", "-q", "-p", "no:cacheprovider", "-x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "3 passed" in completed.stdout
