"""Helpers for tests that cross process boundaries through a real hub."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from ipcbus import Broker, HubBroker, Message, Subscription, connect
from ipcbus.config import ENV_ADDRESS
from ipcbus.core.contract import Subscription as _Subscription

from .messages import Barrier, Tick

SETTLE_TIMEOUT = 20.0


class BarrierWaiter:
    """Subscribes to Barrier on ``broker``; ``wait(publish)`` returns once a fresh barrier,
    published through ``publish``, came back: everything that publisher sent before it has been
    handled by this process's broadcast handlers (one dispatcher thread, publish order kept)."""

    def __init__(self, broker: Broker) -> None:
        self._seen: set[str] = set()
        self._condition = threading.Condition()
        self.subscription = broker.subscribe(Barrier, self._on_barrier)

    def _on_barrier(self, message: Barrier) -> None:
        with self._condition:
            self._seen.add(message.token)
            self._condition.notify_all()

    def wait(self, publisher: Broker, timeout: float = SETTLE_TIMEOUT) -> None:
        token = uuid.uuid4().hex
        publisher.publish(Barrier(token))
        with self._condition:
            if not self._condition.wait_for(lambda: token in self._seen, timeout):
                raise AssertionError(f"barrier not seen within {timeout} s")


def round_trip(address: str, count: int = 10, timeout: float = SETTLE_TIMEOUT) -> None:
    """The hub at ``address`` serves: a fresh broker publishes ``count`` Ticks and gets exactly
    them back (a barrier, not a sleep, says when they are all in)."""
    source = uuid.uuid4().hex
    with HubBroker(address, connect_timeout=timeout) as broker:
        received: list[int] = []
        broker.subscribe(Tick, lambda m: received.append(m.seq), lambda m: m.source == source)
        barrier = BarrierWaiter(broker)
        for seq in range(count):
            broker.publish(Tick(seq, source))
        barrier.wait(broker, timeout)
    assert received == list(range(count))


def request_in_thread(broker: Broker, message: Message) -> tuple[threading.Thread, list[Any]]:
    """Start a thread that waits in ``broker.request(message, timeout=None)``; what it returned
    or raised goes into the list."""
    outcome: list[Any] = []

    def waiting() -> None:
        try:
            outcome.append(broker.request(message, timeout=None))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=waiting)
    thread.start()
    return thread, outcome


def reap_pid(pid: int, timeout: float) -> int | None:
    """Wait up to ``timeout`` for child ``pid`` to exit, SIGKILL it past that; reap it either
    way. Its exit status, ``None`` if it had to be killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def stop_popen(process: subprocess.Popen[Any]) -> None:
    """SIGTERM a subprocess, SIGKILL it past 10 s, reap it, close its stdout."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    if process.stdout is not None:
        process.stdout.close()


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def reap(processes: Any, timeout: float = 30.0) -> list[Any]:
    """Join every process; SIGKILL (and join) those still alive after ``timeout``. Returns the
    ones that had to be killed, so a test can fail on them after everything is reaped."""
    killed = []
    for process in processes:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(timeout)
            killed.append(process)
    return killed


def _serve_publisher(address: str, conn: multiprocessing.connection.Connection) -> None:
    """Child process: publish what the parent sends, answer with the outcome."""
    broker = connect(address)
    try:
        while True:
            try:
                request = conn.recv_bytes()
            except EOFError:
                return
            command, argument, qualname = cloudpickle.loads(request)
            sent = argument[0] if command == "request" else argument
            if qualname is not None and type(sent).__qualname__ != qualname:
                # cloudpickle rebuilds a class sent by value under its bare __name__; the test's
                # pipe sent it, not ipcbus, so restore the name the publishing test gave it.
                type(sent).__qualname__ = qualname
            try:
                result: Any = None
                if command == "publish":
                    broker.publish(argument)
                elif command == "request":
                    result = broker.request(*argument)
                elif command == "late_replies":
                    result = broker.late_replies
                elif command == "flush":
                    broker.flush(argument)
                elif command == "close":
                    broker.close()
                    conn.send_bytes(cloudpickle.dumps(("ok", None)))
                    return
                outcome: tuple[str, Any] = ("ok", result)
            except Exception as exc:
                outcome = ("error", exc)
            conn.send_bytes(cloudpickle.dumps(outcome))
    finally:
        broker.close()


class RemotePublisher:
    """A HubBroker in another process (spawned), driven over a pipe."""

    def __init__(self, address: str, start_method: str = "spawn") -> None:
        context: Any = multiprocessing.get_context(start_method)
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()
        self.process = context.Process(target=_serve_publisher, args=(address, child), daemon=True)
        self.process.start()
        child.close()

    def call(self, command: str, argument: Any = None, timeout: float = 30.0) -> Any:
        with self._lock:
            qualname = type(argument).__qualname__ if isinstance(argument, Message) else None
            if command == "request":
                qualname = type(argument[0]).__qualname__
            self._conn.send_bytes(cloudpickle.dumps((command, argument, qualname)))
            if not self._conn.poll(timeout):
                raise AssertionError(f"remote publisher did not answer {command} in {timeout} s")
            status, detail = cloudpickle.loads(self._conn.recv_bytes())
        if status == "error":
            raise detail
        return detail

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(AssertionError, OSError, EOFError):
                self.call("close", timeout=timeout)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()


class SplitBroker(Broker):
    """Subscribes through a HubBroker in this process, publishes from another process.

    A real Broker (the argument checks are the base class's); only publishing crosses a process
    boundary, so the contract suite can prove delivery between processes.
    """

    def __init__(self, address: str) -> None:
        super().__init__()
        self.local = HubBroker(address)
        try:
            self.remote = RemotePublisher(address)
        except BaseException:
            self.local.close()
            raise

    def _publish(self, message: Message) -> None:
        try:
            cloudpickle.dumps(message)
        except Exception:
            # It cannot even reach the other process: let the local proxy reject it as it would.
            self.local.publish(message)
            raise AssertionError("HubBroker accepted an unserialisable message") from None
        self.remote.call("publish", message)

    def flush(self, timeout: float | None = None) -> None:
        self.remote.call("flush", timeout)

    def _request(self, message: Message, timeout: float | None) -> Message:
        """The request leaves from the other process; its responders are here (or there)."""
        try:
            cloudpickle.dumps(message)
        except Exception:
            return self.local.request(message, timeout)  # rejected as the remote one would
        wait = 30.0 if timeout is None else timeout + 30.0
        reply: Message = self.remote.call("request", (message, timeout), timeout=wait)
        return reply

    @property
    def late_replies(self) -> int:
        """The requester's count: the replies come back to the other process."""
        count: int = self.remote.call("late_replies")
        return count

    def _subscribe(self, subscription: _Subscription) -> None:
        raise AssertionError("unreachable: subscribe is delegated")

    def subscribe(self, *args: Any, **kwargs: Any) -> Subscription:  # type: ignore[override]
        self._check_open()
        return self.local.subscribe(*args, **kwargs)

    def subscribe_async(self, *args: Any, **kwargs: Any) -> Subscription:  # type: ignore[override]
        self._check_open()
        return self.local.subscribe_async(*args, **kwargs)

    def _cancel(self, subscription: _Subscription) -> None:
        raise AssertionError("unreachable: cancel is delegated")

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        self.local.declare_queue(message_type, queue_name)

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        return self.local.delete_queue(message_type, queue_name)

    def _close(self) -> None:
        self.remote.stop()
        self.local.close()


_SPAWN: Any = multiprocessing.get_context("spawn")


class Workers:
    """Spawned worker processes; each gets a ready pipe and a stop pipe of its own (a shared
    multiprocessing.Event deadlocks when a waiter is killed or stopped). The ``workers``
    fixture of conftest stops every one."""

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.processes: list[Any] = []
        self._start_timeout = start_timeout

    def start(self, target: Callable[..., None], *args: Any) -> Any:
        ready, child_ready = _SPAWN.Pipe(duplex=False)
        child_stop, stop = _SPAWN.Pipe(duplex=False)
        process = _SPAWN.Process(target=target, args=(*args, child_ready, child_stop), daemon=True)
        process.start()
        child_ready.close()
        child_stop.close()
        self.processes.append(process)
        process.stop_pipe = stop
        try:
            assert ready.poll(self._start_timeout), f"{target.__name__} did not start"
            assert ready.recv() == "ready"
        finally:
            ready.close()
        return process

    def stop(self, process: Any, timeout: float = 30.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # in case the test left it stopped
        process.stop_pipe.close()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(10)

    def close(self) -> None:
        for process in self.processes:
            self.stop(process)


REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m ipcbus *args`` from the repository root, without this process's
    IPCBUS_ADDRESS, with ``env`` added to the environment."""
    environment = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ipcbus", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=environment,
        check=False,
    )


def close_with_stuck_handlers(
    broker: Broker, subscribe: Callable[[Callable[[Any], None]], None], messages: list[Message]
) -> float:
    """``subscribe(handler)`` subscribes the broker with a handler that never returns; each of
    ``messages`` is published once the one before is stuck in it (a delivery each, so a thread
    each); then ``close()``: how long it took. The handlers are released afterwards."""
    forever = threading.Event()
    started = threading.Semaphore(0)

    def stuck(message: object) -> None:
        started.release()
        forever.wait()

    try:
        subscribe(stuck)
        for message in messages:
            broker.publish(message)
            assert started.acquire(timeout=20), f"{message} was not handled"
        began = time.monotonic()
        broker.close()
        return time.monotonic() - began
    finally:
        forever.set()
        broker.close()


NOBODY = 65534


class AsNobody:
    """``main(stop_fd, report, *args)`` in a forked child that drops to uid ``nobody`` before
    anything else (the tests run as root; the caller skips otherwise): another local user, as
    an attacker would be. ``report(message)`` sends a JSON line to the parent (``recv``); the
    child is told to leave when the parent closes its end of ``stop_fd`` (``stop``), and may
    report once more then. ``files``: its limit on open files, set while still root."""

    def __init__(self, main: Callable[..., None], *args: Any, files: int | None = None) -> None:
        # Nobody cannot read this interpreter's library if it lies in root's home: what the
        # child may load lazily is loaded now (socket.getaddrinfo needs the idna codec).
        "localhost".encode("idna")
        stop_read, self._stop = os.pipe()
        self._reports, report_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit
            code = 70
            try:
                os.close(self._stop)
                os.close(self._reports)
                if files is not None:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)

                def report(message: Any) -> None:
                    data = json.dumps(message).encode() + b"\n"
                    while data:
                        data = data[os.write(report_write, data) :]

                main(stop_read, report, *args)
                code = 0
            except BaseException:
                with contextlib.suppress(BaseException):
                    os.write(
                        report_write, json.dumps({"error": traceback.format_exc()}).encode() + b"\n"
                    )
            finally:
                os._exit(code)
        os.close(stop_read)
        os.close(report_write)
        self.pid: int | None = pid
        self._buffer = b""

    def recv(self, timeout: float) -> Any:
        """The child's next report (an AssertionError if it failed, or said nothing in time)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready = select.select([self._reports], [], [], max(0.0, remaining))[0]
            chunk = os.read(self._reports, 1 << 16) if ready else b""
            if not chunk:
                raise AssertionError(f"no report of the child within {timeout} s: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if isinstance(message, dict) and "error" in message:
            raise AssertionError(f"the child (as nobody) failed:\n{message['error']}")
        return message

    def stop(self, timeout: float = 10.0) -> int | None:
        """Tell the child to leave; kill it past ``timeout``; reap it. Its exit status (``None``
        if it had to be killed)."""
        if self.pid is None:
            return None
        with contextlib.suppress(OSError):
            os.close(self._stop)
        status = reap_pid(self.pid, timeout)
        self.pid = None
        return status

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            os.close(self._reports)


def needs_root_for_nobody() -> None:
    """Skip unless this process may switch to another uid (AsNobody)."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip(f"needs root to play a second uid (running as uid {os.geteuid()})")


@contextlib.contextmanager
def paired_channel(channel: Any, name: str) -> Iterator[tuple[Any, Any]]:
    """A client's ``DataChannel`` (client/data.py) attached to one end of an in-process PAIR, the
    other end playing the hub's data socket; yields (hub side, client side). Closed after."""
    import zmq

    context = zmq.Context()
    hub_side, client_side = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        hub_side.bind(f"inproc://{name}")
        client_side.connect(f"inproc://{name}")
        channel.attach(client_side)
        yield hub_side, client_side
    finally:
        channel.close()
        hub_side.close(linger=0)
        context.term()
