"""Limits before authentication on tcp (docs/security.md, "Bounded input"): a flood of idle
connections neither pins the hub at its file limit nor keeps authenticated clients waiting."""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcbus.client.admin import request_statistics
from ipcbus.config import HubOptions
from ipcbus.wire.address import Address

from .hubtools import free_tcp_port, round_trip

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]

FLOOD = 1_100


@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process opens FLOOD sockets: its own soft limit must allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FLOOD + 512
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit on open files ({hard}) is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def cli_hub(address: str, files: int) -> Iterator[subprocess.Popen[str]]:
    """``ipcbus hub`` in a process of its own limited to ``files`` open files (hard limit too),
    as on a machine whose limit the flood exceeds."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    process = subprocess.Popen(
        [sys.executable, "-m", "ipcbus", "hub", "--address", address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=limit,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == address
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_an_idle_connection_flood_does_not_keep_clients_waiting(many_files: None) -> None:
    """A hub limited to 1,024 open files, 1,100 idle connections: without the pre-auth limit
    the hub sat at its file limit for the whole handshake window and clients waited."""
    port = free_tcp_port()
    address = f"tcp://127.0.0.1:{port}"
    key = Path(Address.parse(address).key_file)
    flood: list[socket.socket] = []
    try:
        with cli_hub(address, files=1024):
            # extend() keeps what was opened before a failure, so the finally closes it all.
            flood.extend(socket.create_connection(("127.0.0.1", port)) for _ in range(FLOOD))
            started = time.monotonic()
            round_trip(address, 10, timeout=10.0)
            served_after = time.monotonic() - started
            statistics = request_statistics(address)
            # The hub shed the flood down to its limit, oldest first...
            limit = HubOptions.max_pending_handshakes
            assert statistics.handshakes_shed >= FLOOD - limit
            shut = sum(1 for sock in flood if _closed_by_peer(sock))
            assert shut >= FLOOD - limit
            # ...and an authenticated client was served while the flood held its connections:
            # within a second (measured: 0.03 s; 4.9 s without the limit).
            assert served_after < 1.0
    finally:
        for sock in flood:
            sock.close()
        key.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            Path(Address.parse(address).hub_file(".lock")).unlink()


def _closed_by_peer(sock: socket.socket) -> bool:
    """The hub ended this connection (it may have sent its greeting first: read past it)."""
    sock.settimeout(0.0)
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
