"""Hub lifecycle, bad input, clean exit of workers and the command line (docs/guarantees.md).

Real hub processes, real worker processes, real ``python -m ipcbus`` commands. Every wait has a
timeout; every process is stopped in a ``finally``; after each test no child process, no
``ipcbus-*`` thread and no socket file in the test's ``tmp_path`` remain.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import zmq

import ipcbus
from ipcbus import (
    BrokerClosedError,
    Hub,
    HubAddressError,
    HubBroker,
    HubUnavailableError,
    MessageSerializationError,
)
from ipcbus.client.admin import request_statistics
from ipcbus.wire.address import Address

from .conftest import wait_until
from .hubtools import BarrierWaiter, free_tcp_port, round_trip, run_cli
from .messages import Tick, Unpicklable

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

REPO = Path(__file__).resolve().parent.parent
ENV_ADDRESS = "IPCBUS_ADDRESS"
START_TIMEOUT = 30.0
JOIN_TIMEOUT = 60.0
SETTLE_TIMEOUT = 20.0


# -- helpers ----------------------------------------------------------------------------------


def _sockets_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]


def _ipc_path(address: str) -> str:
    assert address.startswith("ipc://"), address
    return address[len("ipc://") :]


def _subscribe_ticks(broker: HubBroker, source: str) -> list[int]:
    """Collects the ``seq`` of every Tick from ``source`` that ``broker`` delivers, in order."""
    received: list[int] = []
    broker.subscribe(Tick, lambda m: received.append(m.seq), lambda m: m.source == source)
    return received


def _reap(process: multiprocessing.process.BaseProcess, timeout: float = 10.0) -> None:
    """Join ``process``; kill it if it is still alive (used in ``finally``)."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(timeout)


def _start_hub(address: str) -> Hub:
    hub = Hub(address)
    try:
        return hub.start(timeout=START_TIMEOUT)
    except BaseException:
        hub.stop()
        raise


def _stop_hub(hub: Hub) -> int | None:
    """Stop ``hub`` (in a ``finally``); the returned exit code is asserted by the caller."""
    return hub.stop(timeout=10.0)


class _Output:
    """Reads a child's stdout and stderr on threads, so tests wait for lines with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(process.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(process.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self, stream: IO[str]) -> None:
        self._stderr.extend(stream)

    def line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line on stdout within {timeout} s; stderr: {self.stderr!r}")
        if line is None:
            pytest.fail(f"stdout closed before the expected line; stderr: {self.stderr!r}")
        return line.rstrip("\n")

    def finish(self, timeout: float) -> None:
        """Wait for both pipes to close (the process has exited)."""
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a pipe of the child stayed open"

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)


@contextlib.contextmanager
def _running(args: list[str], **kwargs: Any) -> Iterator[tuple[subprocess.Popen[str], _Output]]:
    """Popen with piped text output; on the way out the process is killed if still alive, and
    always waited for."""
    kwargs.setdefault("cwd", REPO)
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )
    output = _Output(process)
    try:
        yield process, output
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        output.finish(timeout=10)
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()
        process.stderr.close()


# The two ways to run a hub in the foreground; both are run from the repository root.
_HUB_COMMANDS = {
    "module": lambda address: [sys.executable, "-m", "ipcbus", "hub", "--address", address],
    "script": lambda address: ["sh", "scripts/start-hub", "--address", address],
}


# -- 1. bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("not_a_message", ["text", 42, None, Tick, {"seq": 1}])
def test_publishing_a_non_message_is_a_type_error(hub: Hub, not_a_message: object) -> None:
    with HubBroker(hub.address) as broker:
        with pytest.raises(TypeError):
            broker.publish(not_a_message)  # type: ignore[arg-type]
        broker.flush(SETTLE_TIMEOUT)  # the broker is still usable


def test_an_unpicklable_message_raises_in_the_caller_and_nothing_is_sent(hub: Hub) -> None:
    source = uuid.uuid4().hex
    with HubBroker(hub.address) as broker:
        unpicklable: list[object] = []
        broker.subscribe(Unpicklable, unpicklable.append)
        ticks = _subscribe_ticks(broker, source)
        barrier = BarrierWaiter(broker)
        broker.flush(SETTLE_TIMEOUT)
        relayed_before = hub.statistics().messages_relayed

        for _ in range(2):  # a failed check does not let the next message of the type through
            with pytest.raises(MessageSerializationError):
                broker.publish(Unpicklable())
        broker.flush(SETTLE_TIMEOUT)
        assert hub.statistics().messages_relayed == relayed_before

        # The broker keeps working, and a barrier proves delivery of everything before it.
        broker.publish(Tick(1, source))
        barrier.wait(broker, SETTLE_TIMEOUT)
        assert unpicklable == []
        assert ticks == [1]
        assert hub.statistics().messages_relayed == relayed_before + 2  # the Tick and the Barrier


def test_a_later_unserialisable_message_costs_only_itself(hub: Hub) -> None:
    """Only the first message of a type is checked in the caller (docs/architecture.md); a later
    one that cannot be serialised is reported by the next flush(), never by a publish(). Every
    message whose publish() returned normally must still arrive."""
    source = uuid.uuid4().hex
    with HubBroker(hub.address) as broker:
        received = _subscribe_ticks(broker, source)
        barrier = BarrierWaiter(broker)
        broker.publish(Tick(-1, source))  # the type is checked once, here
        broker.flush(SETTLE_TIMEOUT)
        bad = Tick(threading.Lock(), source)  # type: ignore[arg-type]
        messages = [Tick(seq, source) for seq in range(1000)]
        messages += [bad] + [Tick(seq, source) for seq in range(1000, 2000)]
        accepted, errors = [-1], 0
        for message in messages:
            try:
                broker.publish(message)
            except MessageSerializationError:
                errors += 1
            else:
                if message is not bad:
                    accepted.append(message.seq)
        try:
            broker.flush(SETTLE_TIMEOUT)
        except MessageSerializationError:
            errors += 1
        barrier.wait(broker, SETTLE_TIMEOUT)
        assert errors == 1, "the failure must be reported once, by the flush()"
        assert received == accepted


def test_a_closed_broker_refuses_publish(hub: Hub) -> None:
    broker = HubBroker(hub.address)
    broker.close()
    with pytest.raises(BrokerClosedError):
        broker.publish(Tick(0))
    with pytest.raises(BrokerClosedError):
        broker.flush(1.0)
    broker.close()  # idempotent
    with pytest.raises(BrokerClosedError):
        broker.publish(Tick(1))


def test_connecting_where_no_hub_serves_fails_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    address = f"ipc://{tmp_path}/nothing-here"
    started = time.monotonic()
    with pytest.raises(HubUnavailableError) as info:
        ipcbus.connect(address, connect_timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"connect(connect_timeout=0.5) took {elapsed:.1f} s to fail"
    assert address in str(info.value)
    assert ENV_ADDRESS not in os.environ, "a failed connect() exported its address"
    assert list(tmp_path.iterdir()) == []


def test_connect_without_an_address_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    with pytest.raises(HubUnavailableError, match=ENV_ADDRESS):
        ipcbus.connect(connect_timeout=0.5)


# -- 2. hub basics ----------------------------------------------------------------------------


def test_a_hub_process_that_cannot_start_leaves_no_private_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Process.start() raising (spawn from a module a spawned child is importing raises
    RuntimeError) left the private directory behind: found in the temporary directory."""

    def refuse(process: Any) -> None:
        raise RuntimeError("cannot start a process now")

    monkeypatch.setattr(multiprocessing.get_context("spawn").Process, "start", refuse)
    hub = Hub(start_method="spawn")
    directory = os.path.dirname(_ipc_path(hub.address))
    assert os.path.isdir(directory)
    with pytest.raises(RuntimeError, match="cannot start"):
        hub.start(timeout=START_TIMEOUT)
    assert not os.path.exists(directory)


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_default_hub_serves_from_a_private_directory_removed_on_stop(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_ADDRESS, raising=False)  # restored afterwards; start() sets it
    hub = Hub(start_method=start_method)
    other = Hub()
    exit_code: int | None = None
    try:
        address = hub.address
        path = _ipc_path(address)
        directory = os.path.dirname(path)
        assert os.path.dirname(_ipc_path(other.address)) != directory, "directory not fresh"
        assert os.listdir(directory) == []
        hub.start(timeout=START_TIMEOUT)

        info = os.stat(directory)
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.getuid()
        entries = sorted(os.listdir(directory))
        assert entries, "the hub created no socket"
        for name in entries:
            entry = os.stat(os.path.join(directory, name))
            if name.endswith(".key"):  # the bus secret, beside the sockets
                assert stat.S_ISREG(entry.st_mode), name
                assert entry.st_size == 64, name
            elif name.endswith(".lock"):  # held by the hub for its life: one hub per address
                assert stat.S_ISREG(entry.st_mode), name
            else:
                assert stat.S_ISSOCK(entry.st_mode), name
            assert stat.S_IMODE(entry.st_mode) == 0o600, name
        assert os.path.basename(path) in entries
        assert os.path.basename(path) + ".key" in entries

        assert hub.statistics().pid == hub.pid
        round_trip(address)
    finally:
        exit_code = _stop_hub(hub)
        other.stop()
    assert exit_code == 0
    assert not os.path.exists(directory)
    assert not os.path.exists(os.path.dirname(_ipc_path(other.address)))


def test_an_ipc_path_longer_than_the_system_allows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ("x" * zmq.IPC_PATH_MAX_LEN)
    assert len(str(path)) > zmq.IPC_PATH_MAX_LEN
    hub: Hub | None = None
    try:
        with pytest.raises(HubAddressError, match="IPC_PATH_MAX_LEN") as info:
            hub = _start_hub(f"ipc://{path}")  # refused by Hub() or by start(), before binding
    finally:
        if hub is not None:
            hub.stop()
    assert str(zmq.IPC_PATH_MAX_LEN) in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1", "tcp://:5555", "tcp://127.0.0.1:http", "inproc://hub", "/x"]
)
def test_malformed_and_unknown_addresses_are_refused(address: str) -> None:
    hub = Hub(address)
    try:
        with pytest.raises(HubAddressError) as info:
            hub.start(timeout=START_TIMEOUT)
    finally:
        assert hub.stop() is None, "a hub process was started for a refused address"
    expected = "host and a port" if address.startswith("tcp://") else "ipc://"
    assert expected in str(info.value)


def test_tcp_is_encrypted_and_refuses_peers_without_the_keys() -> None:
    """tcp:// only on request, and then CURVE: a peer without the keys derived from the secret
    completes no handshake, gets no answer and is counted."""
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    hub = _start_hub(address)
    context = zmq.Context()
    probe = context.socket(zmq.DEALER)
    probe.linger = 0
    try:
        with ipcbus.connect(address) as subscriber, ipcbus.connect(address) as publisher:
            received: list[int] = []
            subscriber.subscribe(Tick, lambda m: received.append(m.seq))
            probe.connect(address)
            probe.send_multipart([b"\x01S"])  # a STATS request, without credentials
            for seq in range(100):
                publisher.publish(Tick(seq))
            publisher.flush(10)
            wait_until(lambda: len(received) == 100, 10)
            assert received == list(range(100))
            assert not probe.poll(500), "a peer without the keys got an answer"
            wait_until(lambda: hub.statistics().auth_rejected >= 1, 10)
    finally:
        probe.close()
        context.term()
        _stop_hub(hub)
        # A tcp hub keeps its key file (a restarted hub reuses it); this test removes its own.
        os.unlink(Address.parse(address).key_file)


def test_a_second_hub_at_a_served_address_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    address = f"ipc://{tmp_path}/h"
    path = _ipc_path(address)
    first = Hub(address)
    second = Hub(address)
    exit_code: int | None = None
    try:
        first.start(timeout=START_TIMEOUT)
        source = uuid.uuid4().hex
        with HubBroker(address) as broker:
            received = _subscribe_ticks(broker, source)
            barrier = BarrierWaiter(broker)
            with pytest.raises((HubUnavailableError, HubAddressError)) as info:
                second.start(timeout=START_TIMEOUT)
            assert "another hub" in str(info.value)
            assert second.pid is None
            assert os.path.exists(path), "the refused hub removed the first hub's socket"

            for seq in range(5):
                broker.publish(Tick(seq, source))
            barrier.wait(broker, SETTLE_TIMEOUT)
            assert received == list(range(5))
        assert first.statistics().pid == first.pid
        round_trip(address)  # new connections still reach the first hub
    finally:
        second.stop()
        exit_code = _stop_hub(first)
    assert exit_code == 0
    assert not os.path.exists(path)


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/h"
    path = _ipc_path(address)
    for stale in (path, path + ".pub"):  # what a hub killed with SIGKILL leaves behind
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(stale)
        assert stat.S_ISSOCK(os.stat(stale).st_mode)
    hub = Hub(address)
    exit_code: int | None = None
    try:
        hub.start(timeout=START_TIMEOUT)
        round_trip(address)
    finally:
        exit_code = _stop_hub(hub)
    assert exit_code == 0
    assert _sockets_under(tmp_path) == []


def test_a_hub_restarts_at_the_address_of_a_hub_killed_with_sigkill(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/h"
    killed = Hub(address)
    try:
        killed.start(timeout=START_TIMEOUT)
        assert killed.pid is not None
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed_code = _stop_hub(killed)
    assert killed_code == -signal.SIGKILL
    # stop() removed the dead hub's stale sockets (a stale socket left by a process that is
    # gone altogether is replaced at start: see the test above) and kept its key file, which
    # the next hub at this address reuses, so that clients of the dead one can come back.
    assert _sockets_under(tmp_path) == []
    key = (tmp_path / "h.key").read_bytes()
    hub = Hub(address)
    exit_code: int | None = None
    try:
        hub.start(timeout=START_TIMEOUT)
        round_trip(address)
    finally:
        exit_code = _stop_hub(hub)
    assert exit_code == 0
    assert _sockets_under(tmp_path) == []
    assert (tmp_path / "h.key").read_bytes() == key


def test_the_latest_hub_started_names_the_address_until_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/architecture.md, "Addresses": a process that starts a hub connects to it."""
    monkeypatch.delenv(ENV_ADDRESS, raising=False)
    first = Hub(f"ipc://{tmp_path}/a")
    second = Hub(f"ipc://{tmp_path}/b")
    try:
        first.start(timeout=START_TIMEOUT)
        assert os.environ.get(ENV_ADDRESS) == first.address
        second.start(timeout=START_TIMEOUT)
        assert os.environ.get(ENV_ADDRESS) == second.address
        assert _stop_hub(second) == 0
        assert os.environ.get(ENV_ADDRESS) == first.address  # back to what it was
        monkeypatch.setenv(ENV_ADDRESS, "ipc:///somewhere/else")  # set by the user meanwhile
        assert _stop_hub(first) == 0
        assert os.environ[ENV_ADDRESS] == "ipc:///somewhere/else"  # theirs: left alone
    finally:
        exit_codes = (_stop_hub(second), _stop_hub(first))
    assert exit_codes == (None, None)  # stopped already


# -- 3. clean exit without close() ------------------------------------------------------------


def _publish_ticks_and_return(count: int, source: str) -> None:
    """Worker: connect through IPCBUS_ADDRESS, publish, return without close()."""
    broker = ipcbus.connect()
    for seq in range(count):
        broker.publish(Tick(seq, source))


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_worker_that_returns_without_close_delivers_everything(
    hub: Hub, start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 10_000
    source = uuid.uuid4().hex
    monkeypatch.setenv(ENV_ADDRESS, hub.address)  # inherited by the worker
    context: Any = multiprocessing.get_context(start_method)
    with HubBroker(hub.address) as broker:
        received = _subscribe_ticks(broker, source)
        barrier = BarrierWaiter(broker)
        worker = context.Process(
            target=_publish_ticks_and_return, args=(count, source), daemon=True
        )
        worker.start()
        try:
            worker.join(JOIN_TIMEOUT)
            assert not worker.is_alive(), f"worker did not exit within {JOIN_TIMEOUT} s"
            assert worker.exitcode == 0
        finally:
            _reap(worker)
        wait_until(lambda: len(received) >= count, timeout=SETTLE_TIMEOUT)
        # The worker's flush at exit confirmed everything before it returned, so a barrier
        # published now arrives after all of it: no duplicate can come later.
        barrier.wait(broker, SETTLE_TIMEOUT)
        assert len(received) == count
        assert received == list(range(count))


_SCRIPT = """
import sys

import ipcbus
from tests.messages import Tick

count, source = int(sys.argv[1]), sys.argv[2]
broker = ipcbus.connect()
for seq in range(count):
    broker.publish(Tick(seq, source))
"""


def test_a_script_that_just_exits_delivers_everything(hub: Hub) -> None:
    count = 5_000
    source = uuid.uuid4().hex
    env = {**os.environ, ENV_ADDRESS: hub.address, "PYTHONPATH": str(REPO)}
    with HubBroker(hub.address) as broker:
        received = _subscribe_ticks(broker, source)
        barrier = BarrierWaiter(broker)
        completed = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(count), source],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stderr == ""  # no warning such as "closing without a complete flush"
        wait_until(lambda: len(received) >= count, timeout=SETTLE_TIMEOUT)
        barrier.wait(broker, SETTLE_TIMEOUT)
        assert received == list(range(count))


# -- 4. command line --------------------------------------------------------------------------


def test_cli_hub_serves_reports_refuses_a_second_and_stops_on_sigterm(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/h"
    path = _ipc_path(address)
    with _running(_HUB_COMMANDS["module"](address)) as (process, output):
        assert output.line(START_TIMEOUT) == address
        assert output.line(START_TIMEOUT) == f"export {ENV_ADDRESS}={address}"

        published = 100
        source = uuid.uuid4().hex
        with HubBroker(address, connect_timeout=START_TIMEOUT) as broker:
            received = _subscribe_ticks(broker, source)
            barrier = BarrierWaiter(broker)
            for seq in range(published):
                broker.publish(Tick(seq, source))
            barrier.wait(broker, SETTLE_TIMEOUT)
            assert received == list(range(published))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

        stats = run_cli("stats", "--address", address, "--json")
        assert stats.returncode == 0, stats.stderr
        numbers = json.loads(stats.stdout)
        assert numbers["messages_relayed"] >= published + 1  # and the barrier
        assert numbers["address"] == address
        assert numbers["pid"] == process.pid

        second = run_cli("hub", "--address", address)
        assert second.returncode == 3, second.stderr
        assert "another hub already serves" in second.stderr
        assert os.path.exists(path), "the refused hub removed the serving hub's socket"
        assert process.poll() is None, "the first hub died"
        assert request_statistics(address, timeout=10).pid == process.pid

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, output.stderr
        output.finish(timeout=10)
        assert "Traceback" not in output.stderr
        assert f"hub at {address} stopped" in output.stderr
    with pytest.raises(HubUnavailableError):
        request_statistics(address, timeout=0.5)
    assert _sockets_under(tmp_path) == [], "the hub left its socket files behind"


def test_cli_stats_exit_codes_without_a_hub(tmp_path: Path) -> None:
    dead = run_cli("stats", "--address", f"ipc://{tmp_path}/dead", "--timeout", "0.5")
    assert dead.returncode == 4, dead.stderr
    assert "no hub answered" in dead.stderr
    assert dead.stdout == ""

    missing = run_cli("stats")  # no address anywhere
    assert missing.returncode == 2, missing.stderr
    assert ENV_ADDRESS in missing.stderr


def test_start_hub_script_prints_the_address_and_stops_on_sigterm(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/h"
    with _running(_HUB_COMMANDS["script"](address)) as (process, output):
        assert output.line(START_TIMEOUT) == address
        assert output.line(START_TIMEOUT) == f"export {ENV_ADDRESS}={address}"
        round_trip(address)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, output.stderr
    # SIGTERM reached the hub itself (the script execs it): nothing answers any more.
    with pytest.raises(HubUnavailableError):
        request_statistics(address, timeout=0.5)
    assert _sockets_under(tmp_path) == [], "the hub left its socket files behind"


def _start_hub_and_wait(start_method: str, tmp_dir: str, pids: Any) -> None:
    """Runs in a process that is then killed: starts a hub and reports its pid."""
    hub = Hub(f"ipc://{tmp_dir}/hub", start_method=start_method)
    hub.start(timeout=START_TIMEOUT)
    pids.put(hub.pid)
    time.sleep(600)  # killed long before


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_hub_does_not_outlive_the_process_that_started_it(
    start_method: str, tmp_path: Path
) -> None:
    """SIGKILL of the starter (no clean-up runs there): the hub notices its pipe close and
    stops. A forked hub used to hold the starter's end of that pipe itself, and lived on."""
    context = multiprocessing.get_context("spawn")
    pids = context.Queue()
    starter = context.Process(target=_start_hub_and_wait, args=(start_method, str(tmp_path), pids))
    starter.start()
    try:
        hub_pid = pids.get(timeout=60)
    finally:
        starter.kill()
        starter.join(10)
    deadline = time.monotonic() + 10
    while _alive(hub_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(hub_pid)
    if alive:
        os.kill(hub_pid, signal.SIGKILL)
    assert not alive, f"the {start_method} hub outlived its starter"


def _alive(pid: int) -> bool:
    """Alive and not a zombie (the hub's parent is gone, so init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stale_address_in_the_environment_does_not_redirect_the_hubs_starter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`with Hub(): connect()` reaches that hub whatever IPCBUS_ADDRESS said before; the old
    value is back after the hub stops."""
    stale = f"ipc://{tmp_path}/gone/hub"
    monkeypatch.setenv(ENV_ADDRESS, stale)
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as hub:
        assert os.environ[ENV_ADDRESS] == hub.address
        with ipcbus.connect(connect_timeout=5) as broker:
            assert broker.address == hub.address
        round_trip(hub.address)
    assert os.environ[ENV_ADDRESS] == stale
