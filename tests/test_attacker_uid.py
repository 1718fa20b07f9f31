"""Issue 10, proved the way an attacker would try it: as a real second uid on the same machine.

The tests run as root (here and in CI). The attacker is a child made with ``os.fork()`` that
drops to ``nobody`` (``setgroups([])``, ``setgid``, ``setuid``) before it does anything else,
takes its orders and reports through two pipes (JSON lines), and leaves with ``os._exit``. It can
use only what any user can: world-writable places such as the system temporary directory. Not
running as root, the tests that need the second uid are skipped (they cannot switch uid).

- An impostor at the address of a stopped ``Hub()`` (its private directory recreated by the
  attacker): it never sees credentials, no pickle of its is unpickled, the connected client
  reports the failed handshakes, and a new client refuses the directory before connecting.
- A hub in a directory of its own leaves nothing another user can take; an address directly in
  a shared directory is refused.
- Pre-made directories (the tcp key directory, shared or foreign directories) are refused with an
  error naming them; symlinks planted where the hub's files will be are never followed; bad
  lines in the queue-groups file are skipped and counted.
- Two hubs racing for one address: exactly one starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import select
import shutil
import stat
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from ipcbus import Hub, HubAddressError, HubBroker, HubUnavailableError
from ipcbus.client.admin import request_statistics
from ipcbus.wire import keys as _keys
from ipcbus.wire import protocol as _wire
from ipcbus.wire.address import Address

from .conftest import wait_until
from .hubtools import free_tcp_port, reap_pid, round_trip
from .messages import Ping, Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

NOBODY = 65534
ATTACKER_TIMEOUT = 10.0  # any answer of the attacker, and its exit
REPORT_TIMEOUT = 5.0  # what the brief calls "within a few seconds"
TICK_TOPIC = _wire.topic_for("tests.messages.Tick")
FS_DENIED = {"EACCES", "EPERM"}


# -- the attacker: a forked child running as nobody -------------------------------------------


class _Canary:
    """Unpickling this opens (creates) a file: the stand-in for arbitrary code execution."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _Channel:
    """JSON lines over a pair of pipes; every read has a deadline."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self._buffer = b""

    def send(self, message: Any) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self.write_fd, data) :]

    def recv(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message through the pipe within {timeout} s")
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise EOFError("the other end of the pipe is gone")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _event_name(event: int) -> str:
    try:
        return zmq.Event(event).name or str(event)
    except ValueError:
        return str(event)


class _Impostor:
    """(Attacker side) What takes over a hub's socket paths: a ROUTER with PLAIN and a ZAP
    handler that records every credential offered (and admits everyone) at the control path, a
    CURVE server with keys of its own (derived from a secret of its own) at ``.in``, and an XPUB
    without security at ``.pub`` that answers every subscription with a canary pickle."""

    def __init__(self, context: zmq.Context[Any], path: str, canary: str, secret: bytes) -> None:
        self.path = path
        self._payload = pickle.dumps([_Canary(canary)], protocol=5)
        self._seq = 0
        self._topics: set[bytes] = {TICK_TOPIC}
        self._last_canaries = 0.0
        self.zap_requests: list[list[str]] = []
        self.received: dict[str, list[list[str]]] = {"control": [], "data": []}
        self.subscriptions: list[str] = []
        self.events: dict[str, dict[str, int]] = {}
        self.canaries_sent = 0
        self.zap: zmq.Socket[bytes] = context.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind("inproc://zeromq.zap.01")
        self.control: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.control.plain_server = True
        self.data: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.data.curve_server = True
        self.data.curve_secretkey = _keys._curve_pair(secret, b"server")[1]
        self.xpub: zmq.Socket[bytes] = context.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sockets = {"control": self.control, "data": self.data, "pub": self.xpub}
        self.monitors: dict[str, zmq.Socket[bytes]] = {}
        for name, sock, suffix in (
            ("control", self.control, ""),
            ("data", self.data, ".in"),
            ("pub", self.xpub, ".pub"),
        ):
            sock.linger = 0
            if sock is not self.xpub:
                sock.zap_domain = _keys.ZAP_DOMAIN
            self.monitors[name] = sock.get_monitor_socket()
            self.events[name] = {}
            sock.bind(f"ipc://{path}{suffix}")

    def register(self, poller: zmq.Poller) -> None:
        for sock in [self.zap, *self.sockets.values(), *self.monitors.values()]:
            poller.register(sock, zmq.POLLIN)

    def service(self) -> None:
        while self.zap.poll(0):
            request = self.zap.recv_multipart()
            self.zap_requests.append([frame.hex() for frame in request])
            version, request_id = request[:2]
            self.zap.send_multipart([version, request_id, b"200", b"OK", b"victim", b""])
        for name in ("control", "data"):
            sock = self.sockets[name]
            while sock.poll(0):
                frames = sock.recv_multipart()
                self.received[name].append([frame.hex() for frame in frames])
                if name == "control" and len(frames) > 1 and frames[1] == _wire.header(_wire.HELLO):
                    # Play the hub: send the client on to the other sockets of the impostor.
                    welcome = _wire.Welcome(
                        f"ipc://{self.path}.in",
                        f"ipc://{self.path}.pub",
                        b"impostor",
                        0.5,
                        3.0,
                        1 << 20,
                    )
                    sock.send_multipart(welcome.frames(frames[0]))
        while self.xpub.poll(0):
            message = self.xpub.recv()
            self.subscriptions.append(message.hex())
            if message[:1] == b"\x01":
                topic = message[1:]
                self._topics.add(topic)
                if _wire.is_sync_topic(topic):
                    self.xpub.send(topic)  # "your subscription is live"
                self._send_canary(topic)
        if time.monotonic() - self._last_canaries > 0.1:
            self._last_canaries = time.monotonic()
            for topic in self._topics:
                self._send_canary(topic)
        for name, monitor in self.monitors.items():
            while monitor.poll(0):
                event = _event_name(int(recv_monitor_message(monitor)["event"]))
                self.events[name][event] = self.events[name].get(event, 0) + 1

    def _send_canary(self, topic: bytes) -> None:
        self._seq += 1
        meta = _wire.pack_meta(_wire.CODEC_OBJECTS, 1, time.time())
        self.xpub.send_multipart(_wire.fanout(topic, meta, self._seq, [self._payload]))
        self.canaries_sent += 1

    def report(self) -> dict[str, Any]:
        return {
            "zap_requests": self.zap_requests,
            "received": self.received,
            "subscriptions": self.subscriptions,
            "events": self.events,
            "canaries_sent": self.canaries_sent,
        }

    def close(self) -> None:
        for name, sock in self.sockets.items():
            sock.disable_monitor()
            self.monitors[name].close(linger=0)
            sock.close(linger=0)
        self.zap.close(linger=0)


def _attempt(context: zmq.Context[Any], action: str, path: str, argument: str = "") -> str:
    """(Attacker side) Try one thing on the file system: "ok", or the errno's name."""
    try:
        if action == "mkdir":
            os.mkdir(path, int(argument or "0o700", 8))
        elif action == "create":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        elif action == "write_key":  # a key file of the attacker's own, as a hub would write it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, argument.encode())
            finally:
                os.close(fd)
        elif action == "read":
            with open(path, "rb") as file:
                file.read()
        elif action == "unlink":
            os.unlink(path)
        elif action == "rename":
            os.rename(path, argument)
        elif action == "rmdir":
            os.rmdir(path)
        elif action == "symlink":
            os.symlink(argument, path)
        elif action == "bind":
            sock: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
            try:
                sock.linger = 0
                sock.bind(f"ipc://{path}")
            finally:
                sock.close(linger=0)
        else:
            raise ValueError(f"unknown action {action!r}")
    except (OSError, zmq.ZMQError) as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def _attacker_main(channel: _Channel) -> None:
    """(Attacker side) Obey the parent's orders until it says "exit" or goes away."""
    context: zmq.Context[Any] = zmq.Context()
    impostor: _Impostor | None = None
    try:
        while True:
            poller = zmq.Poller()
            poller.register(channel.read_fd, zmq.POLLIN)
            if impostor is not None:
                impostor.register(poller)
            events = dict(poller.poll(50))
            if impostor is not None:
                impostor.service()
            if channel.read_fd not in events:
                continue
            order = channel.recv(ATTACKER_TIMEOUT)
            action = order.pop("op")
            if action == "exit":
                return
            try:
                if action == "fs":
                    result: Any = [_attempt(context, *attempt) for attempt in order["attempts"]]
                elif action == "impostor":
                    assert impostor is None, "one impostor per attacker (one ZAP handler)"
                    secret = os.urandom(32).hex().encode()  # the attacker's own
                    planted = [_attempt(context, "mkdir", d, "0o700") for d in order["directories"]]
                    if order["key_file"]:
                        planted.append(
                            _attempt(context, "write_key", order["path"] + ".key", secret.decode())
                        )
                    impostor = _Impostor(context, order["path"], order["canary"], secret)
                    result = planted
                elif action == "status":
                    assert impostor is not None
                    impostor.service()
                    result = impostor.report()
                else:
                    raise ValueError(f"unknown order {action!r}")
                channel.send({"result": result})
            except Exception:
                channel.send({"error": traceback.format_exc()})
    finally:
        if impostor is not None:
            impostor.close()
        context.destroy(linger=0)


def _attacker_child(read_fd: int, write_fd: int) -> None:
    """(Attacker side) The forked child: drop to nobody first, then obey. Never returns."""
    code = 70
    try:
        channel = _Channel(read_fd, write_fd)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as exc:
            channel.send({"dropped": False, "error": repr(exc)})
            return
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        channel.send(
            {
                "dropped": True,
                "uid": os.getuid(),
                "euid": os.geteuid(),
                "gid": os.getgid(),
                "egid": os.getegid(),
                "groups": os.getgroups(),
                "regained_root": regained,
            }
        )
        _attacker_main(channel)
        code = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            channel.send({"error": traceback.format_exc()})
    finally:
        os._exit(code)


class Attacker:
    """(Parent side) The handle of one attacker child."""

    def __init__(self) -> None:
        orders_read, orders_write = os.pipe()
        reports_read, reports_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child leaves through os._exit
            os.close(orders_write)
            os.close(reports_read)
            _attacker_child(orders_read, reports_write)
        os.close(orders_read)
        os.close(reports_write)
        self.pid: int | None = pid
        self.exit_status: int | None = None
        self._channel = _Channel(reports_read, orders_write)
        identity = self._channel.recv(ATTACKER_TIMEOUT)
        assert identity.get("dropped"), f"the attacker could not drop to nobody: {identity}"
        assert identity["uid"] == identity["euid"] == NOBODY, identity
        assert identity["gid"] == identity["egid"] == NOBODY, identity
        assert identity["groups"] == [], identity
        assert not identity["regained_root"], "the attacker could become root again"

    def order(self, op: str, **arguments: Any) -> Any:
        self._channel.send({"op": op, **arguments})
        answer = self._channel.recv(ATTACKER_TIMEOUT)
        if "error" in answer:
            raise AssertionError(f"the attacker failed:\n{answer['error']}")
        return answer["result"]

    def fs(self, *attempts: tuple[str, ...]) -> list[str]:
        return list(self.order("fs", attempts=[list(attempt) for attempt in attempts]))

    def close(self) -> int | None:
        """Tell the child to leave; kill it past the timeout; reap it whatever happens. Returns
        its exit status (``None`` if it had to be killed)."""
        if self.pid is None:
            return self.exit_status
        with contextlib.suppress(OSError):
            self._channel.send({"op": "exit"})
        self.exit_status = reap_pid(self.pid, ATTACKER_TIMEOUT)
        self.pid = None
        self._channel.close()
        return self.exit_status


@pytest.fixture
def attackers() -> Iterator[Callable[[], Attacker]]:
    """Starts attackers (each a child running as nobody); reaps every one at the end."""
    if os.geteuid() != 0:
        pytest.skip(
            f"needs root to play a second uid (running as uid {os.geteuid()}): the attacker "
            "is a forked child that drops to nobody with os.setuid, which only root may do"
        )
    started: list[Attacker] = []

    def start() -> Attacker:
        attacker = Attacker()
        started.append(attacker)
        return attacker

    yield start
    statuses = [attacker.close() for attacker in started]
    assert statuses == [0] * len(started), f"attacker exit statuses: {statuses}"


# -- helpers of the parent (root) --------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Callable[..., str]]:
    """``make(mode)``: a fresh directory of root's, with a random name in the system temporary
    directory, chmod-ed to ``mode``; all removed afterwards (with what others put in them)."""
    made: list[str] = []

    def make(mode: int = 0o700, parent: str | None = None) -> str:
        path = tempfile.mkdtemp(prefix="ipcbus-uid-", dir=parent or tempfile.gettempdir())
        os.chmod(path, mode)
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        shutil.rmtree(path, ignore_errors=True)


def _random_name(tag: str) -> str:
    return f"ipcbus-{tag}-{uuid.uuid4().hex[:12]}"


def _remove_the_attackers(*paths: str) -> None:
    """As root, remove what the attacker made at ``paths`` (only entries it owns)."""
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if info.st_uid != NOBODY:
            continue
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _accepted(report: dict[str, Any]) -> dict[str, int]:
    return {name: events.get("ACCEPTED", 0) for name, events in report["events"].items()}


def _all_tried(report: dict[str, Any]) -> bool:
    """The client has come to each socket of the impostor, and the handshake there ended."""
    return all(
        events.get("ACCEPTED", 0) >= 1
        and sum(n for event, n in events.items() if event.startswith("HANDSHAKE_")) >= 1
        for events in report["events"].values()
    )


def _hub_files(path: str) -> list[str]:
    return [path + suffix for suffix in ("", ".in", ".pub", ".key", ".lock", ".groups")]


# -- 1. the impostor after stop, default address -----------------------------------------------


def test_an_impostor_at_a_stopped_hubs_address_gets_no_secret_and_runs_no_code(
    attackers: Callable[[], Attacker], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's attack 1: ``Hub()`` stops (its private directory goes), its client keeps
    reconnecting, another user recreates the directory (its name is visible in the temporary
    directory) and answers there."""
    caplog.set_level(logging.ERROR, logger="ipcbus")
    attacker = attackers()  # forked first: no thread of this test exists yet
    canary = tmp_path / "canary-impostor"
    hub = Hub(start_method="fork")
    broker: HubBroker | None = None
    directory = ""
    try:
        hub.start()
        address = hub.address
        path = address.removeprefix("ipc://")
        directory = os.path.dirname(path)
        assert os.path.dirname(directory) == tempfile.gettempdir()
        secret = _keys.read_secret(Address.parse(address).key_file)
        broker = HubBroker(address)
        received: list[Any] = []
        broker.subscribe(Tick, received.append)
        assert hub.stop() == 0
        assert not os.path.lexists(directory), "Hub.stop() left its private directory"

        planted = attacker.order(
            "impostor", directories=[directory], path=path, canary=str(canary), key_file=True
        )
        assert planted == ["ok", "ok"], "the attacker could not take the address over"
        assert os.lstat(directory).st_uid == NOBODY

        # The old client keeps reconnecting, now to the impostor: wait until it has come to
        # each of its sockets and the handshake there has ended. (libzmq does not retry an
        # endpoint after a protocol error such as a mechanism mismatch: the control DEALER and
        # the SUB come once; the data DEALER, dropped by the CURVE server, comes back.)
        wait_until(lambda: _all_tried(attacker.order("status")), REPORT_TIMEOUT, 0.05)
        report = attacker.order("status")
        for name, events in report["events"].items():
            assert events.get("HANDSHAKE_SUCCEEDED", 0) == 0, f"a handshake succeeded on {name}"
        assert report["zap_requests"] == [], "the impostor was offered credentials"
        assert report["received"] == {"control": [], "data": []}
        assert report["subscriptions"] == [], "the impostor learnt the client's subscriptions"
        dump = json.dumps(report)
        assert secret.decode() not in dump
        assert secret.hex() not in dump
        assert report["canaries_sent"] > 0
        assert not canary.exists(), "the client unpickled the impostor's pickle"
        assert received == [], "a handler of the client was called"
        # ... and the client says so.
        io = broker._io
        wait_until(lambda: io.auth_failures > 0, REPORT_TIMEOUT)
        failures = [
            record
            for record in caplog.records
            if record.levelno == logging.ERROR and "failed to prove the bus secret" in record.msg
        ]
        assert failures, "the client logged no authentication failure"
        assert path in failures[0].getMessage()
        broker.close()
        broker = None

        # A new client refuses the directory (not ours), and never connects.
        before = _accepted(attacker.order("status"))
        with pytest.raises(HubUnavailableError) as refused:
            HubBroker(address, connect_timeout=1)
        assert directory in str(refused.value)
        with pytest.raises(HubUnavailableError, match=directory):
            request_statistics(address, 1)
        assert _accepted(attacker.order("status")) == before, "a new client connected"

        # The attack is real: a client that sends a PLAIN password and a SUB that does not
        # authenticate its server (what clients did before the fix) are served by the impostor.
        _check_the_impostor_would_have_worked(attacker, path)
        assert not canary.exists()
    finally:
        if broker is not None:
            broker.close()
        hub.stop()
        attacker.close()
        if directory:
            _remove_the_attackers(directory)


def _check_the_impostor_would_have_worked(attacker: Attacker, path: str) -> None:
    context: zmq.Context[Any] = zmq.Context()
    try:
        password = b"probe-" + os.urandom(8).hex().encode()
        old_client: zmq.Socket[bytes] = context.socket(zmq.DEALER)
        old_client.linger = 0
        old_client.plain_username = _keys.USERNAME
        old_client.plain_password = password
        old_client.connect(f"ipc://{path}")
        old_client.send_multipart(_wire.hello(b"probe"))
        assert old_client.poll(int(REPORT_TIMEOUT * 1000)), "the impostor did not answer"
        assert old_client.recv_multipart()[0] == _wire.header(_wire.WELCOME)
        sub: zmq.Socket[bytes] = context.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(TICK_TOPIC)
        sub.connect(f"ipc://{path}.pub")
        assert sub.poll(int(REPORT_TIMEOUT * 1000)), "the impostor sent no pickle"
        head, payload = sub.recv_multipart()
        assert _wire.parse_fanout_head(head)[0] == TICK_TOPIC
        assert b"canary-impostor" in payload  # a pickle that would open the canary: not loaded
        offered = [request[-1] for request in attacker.order("status")["zap_requests"]]
        assert offered == [password.hex()], "the impostor's recorder missed the probe"
        for sock in (old_client, sub):
            sock.close(linger=0)
    finally:
        context.destroy(linger=0)


# -- 2. a directory of one's own; a shared directory ------------------------------------------


def test_a_hub_in_its_own_directory_leaves_nothing_another_user_can_take(
    attackers: Callable[[], Attacker], scratch: Callable[..., str]
) -> None:
    attacker = attackers()
    directory = scratch(0o755)  # root's, readable by all, writable by root only
    path = os.path.join(directory, "bus")
    address = f"ipc://{path}"
    key = Address.parse(address).key_file
    hub = Hub(address, start_method="fork")
    try:
        hub.start()
        secret = Path(key).read_bytes()
        with HubBroker(address) as broker:
            broker.subscribe(Tick, lambda message: None)
            assert hub.stop() == 0
            # The client reconnects; the attacker tries to take the address over.
            moved = directory + "-moved"
            attempts = [
                ("mkdir", os.path.join(directory, "x"), "0o700"),
                ("create", path),
                ("bind", path),
                ("bind", path + ".in"),
                ("bind", path + ".pub"),
                ("symlink", path + ".groups", "/etc/passwd"),
                ("create", path + ".lock.new"),
                ("read", key),
                ("unlink", key),
                ("unlink", path + ".lock"),
                ("rename", directory, moved),
                ("rmdir", directory),
            ]
            outcomes = attacker.fs(*attempts)
            allowed = [
                a for a, outcome in zip(attempts, outcomes, strict=True) if outcome not in FS_DENIED
            ]
            assert allowed == [], f"nobody could: {allowed} ({outcomes})"
            assert not os.path.lexists(moved)
            assert sorted(os.listdir(directory)) == ["bus.key", "bus.lock"]
            assert Path(key).read_bytes() == secret
            # The owner's next hub serves there, and the old client is back.
            with Hub(address, start_method="fork"):
                wait_until(lambda: broker._io.hub_alive, REPORT_TIMEOUT)
                round_trip(address)
        assert broker._io.auth_failures == 0
    finally:
        hub.stop()


def test_an_address_in_a_shared_directory_is_refused_and_its_impostor_ignored(
    attackers: Callable[[], Attacker], tmp_path: Path
) -> None:
    """An address directly in the temporary directory (``ipc:///tmp/bus``): another user can
    be there first, with sockets and a key file of its own."""
    attacker = attackers()
    shared = tempfile.gettempdir()
    path = os.path.join(shared, _random_name("shared"))
    address = f"ipc://{path}"
    canary = tmp_path / "canary-shared"
    try:
        planted = attacker.order(
            "impostor", directories=[], path=path, canary=str(canary), key_file=True
        )
        assert planted == ["ok"]
        with pytest.raises(HubAddressError) as refused:
            Hub(address, start_method="fork").start()
        message = str(refused.value)
        assert path in message
        assert f"{shared} is writable by other users" in message
        with pytest.raises(HubUnavailableError, match=shared):
            HubBroker(address, connect_timeout=1)
        with pytest.raises(HubUnavailableError, match=shared):
            request_statistics(address, 1)
        report = attacker.order("status")
        assert _accepted(report) == {"control": 0, "data": 0, "pub": 0}
        assert report["zap_requests"] == []
        assert not canary.exists()
    finally:
        attacker.close()
        _remove_the_attackers(*_hub_files(path))


# -- 3. pre-made directories and symlinks ------------------------------------------------------


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_tcp_key_directory_made_by_another_user_is_refused(
    attackers: Callable[[], Attacker],
    scratch: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    planted: str,
) -> None:
    """``$TMPDIR/ipcbus-<uid>`` made first by the attacker, in a root-owned 1777 directory
    standing in for a freshly booted /tmp (the real one may hold this user's directory
    already, which the test must not delete)."""
    monkeypatch.setattr(tempfile, "tempdir", scratch(0o1777))
    home = os.path.join(tempfile.gettempdir(), f"ipcbus-{os.getuid()}")
    attacker = attackers()
    own = os.path.join(tempfile.gettempdir(), _random_name("attacker"))
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    try:
        if planted == "directory":
            outcomes = attacker.fs(("mkdir", home, "0o777"))
        else:
            outcomes = attacker.fs(("mkdir", own, "0o777"), ("symlink", home, own))
        assert set(outcomes) == {"ok"}, outcomes
        with pytest.raises(HubAddressError) as refused:
            Hub(address, start_method="fork").start()
        assert home in str(refused.value)
        with pytest.raises(HubUnavailableError, match=home):
            HubBroker(address, connect_timeout=0.5)
        with pytest.raises(HubUnavailableError, match=home):
            request_statistics(address, 0.5)
        assert os.listdir(home) == [], "ipcbus put a file in the attacker's directory"
    finally:
        attacker.close()
        _remove_the_attackers(home, own)


@pytest.mark.parametrize("made", ["root-0777", "root-1777", "by-attacker", "below-attacker"])
def test_a_directory_another_user_can_change_is_refused(
    attackers: Callable[[], Attacker], scratch: Callable[..., str], made: str
) -> None:
    """The socket's directory, or one above it, can be changed by nobody: a shared directory
    the user mistakenly chose, one the attacker made in advance, or a private directory of
    root's inside one the attacker owns."""
    attacker = attackers()
    attacker_dir = os.path.join(tempfile.gettempdir(), _random_name("attacker"))
    try:
        if made.startswith("root-"):
            directory = refused_path = scratch(int(made[len("root-") :], 8))
            # It is writable by nobody indeed: the attacker plants a file and a symlink.
            outcomes = attacker.fs(
                ("create", os.path.join(directory, "planted")),
                ("symlink", os.path.join(directory, "bus.groups"), "/etc/passwd"),
            )
            assert outcomes == ["ok", "ok"]
        elif made == "by-attacker":
            assert attacker.fs(("mkdir", attacker_dir, "0o755")) == ["ok"]
            directory = refused_path = attacker_dir
        else:
            assert attacker.fs(("mkdir", attacker_dir, "0o777")) == ["ok"]
            directory = scratch(0o700, parent=attacker_dir)
            refused_path = attacker_dir
        path = os.path.join(directory, "bus")
        address = f"ipc://{path}"
        before = sorted(os.listdir(directory))
        with pytest.raises(HubAddressError) as refused:
            Hub(address, start_method="fork").start()
        assert f"{refused_path} " in str(refused.value)
        with pytest.raises(HubUnavailableError) as unavailable:
            HubBroker(address, connect_timeout=0.5)
        assert f"{refused_path} " in str(unavailable.value)
        assert sorted(os.listdir(directory)) == before, "the refused hub left files there"
    finally:
        attacker.close()
        _remove_the_attackers(attacker_dir)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
@pytest.mark.parametrize("suffix", [".groups", ".lock", ".key"])
def test_a_symlink_where_a_hub_file_will_be_is_never_followed(
    scratch: Callable[..., str], suffix: str, dangling: bool
) -> None:
    """Planted (by root, standing in for an attacker who had access earlier) in a directory
    of root's: a link to a private file of root's, which the hub would accept as its own if
    it followed the link."""
    directory = scratch(0o755)
    elsewhere = scratch(0o700)
    target = Path(elsewhere, "precious")
    content = b"precious: must stay as it is\n"
    if not dangling:
        target.write_bytes(content)
        target.chmod(0o600)
    path = os.path.join(directory, "bus")
    address = f"ipc://{path}"
    link = path + suffix
    os.symlink(target, link)
    hub = Hub(address, start_method="fork")
    try:
        if suffix == ".groups":
            hub.start()
            handled = threading.Event()
            with HubBroker(address) as broker:
                # Joining a queue group makes the hub append the group to .groups.
                broker.subscribe_async(Ping, lambda message: handled.set(), "joined")
                broker.publish(Ping("after"))
                assert handled.wait(REPORT_TIMEOUT), "the hub did not serve the queue group"
            statistics = hub.statistics()
            assert statistics.queues["tests.messages.Ping/joined"]["acked"] == 1
            assert statistics.bad_group_entries >= 1, "the link was not counted"
        else:
            # Refused; which error it is is test_a_symlink_at_the_lock_file_is_a_hub_error's.
            refused: BaseException | None = None
            try:
                hub.start()
            except Exception as exc:
                refused = exc
            assert refused is not None, "the hub started with a symlink as its " + suffix
            assert link in str(refused)
    finally:
        hub.stop()
    assert os.readlink(link) == str(target), "the link was replaced"
    if dangling:
        assert not target.exists(), "the hub created a file through the link"
    else:
        assert target.read_bytes() == content, "the hub wrote through the link"
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
    for socket_file in Address.parse(address).socket_files():
        assert not os.path.lexists(socket_file)


def test_a_symlink_at_the_lock_file_is_a_hub_error(scratch: Callable[..., str]) -> None:
    path = os.path.join(scratch(0o755), "bus")
    link = path + ".lock"
    os.symlink(os.path.join(scratch(0o700), "precious"), link)
    hub = Hub(f"ipc://{path}", start_method="fork")
    try:
        with pytest.raises((HubAddressError, HubUnavailableError)) as refused:
            hub.start()
        assert link in str(refused.value)
    finally:
        hub.stop()


GOOD_GROUP = b'{"topic": "tests.messages.Ping", "queue": "restored"}'
BAD_GROUPS = [
    b"[1]",
    b'{"topic": 5}',
    b"\xff\xfe\x00 garbage \x80\x81",
    b'{"topic": "tests.messages.Ping"}',
    b'{"topic": "tests.messages.Ping", "queue": ""}',
    b'{"topic": "\\u0000sync:x", "queue": "q"}',
    b'"a string"',
    b'{"topic": "' + b"a" * 2000 + b'", "queue": "q"}',
]


def _plant_groups(directory: str, lines: list[bytes]) -> str:
    path = os.path.join(directory, "bus")
    groups = Path(path + ".groups")
    groups.write_bytes(b"\n".join(lines) + b"\n")
    groups.chmod(0o600)
    return f"ipc://{path}"


def test_bad_lines_of_the_groups_file_are_skipped_and_counted(
    scratch: Callable[..., str],
) -> None:
    address = _plant_groups(scratch(0o700), [BAD_GROUPS[0], GOOD_GROUP, *BAD_GROUPS[1:]])
    with Hub(address, start_method="fork") as hub:
        with HubBroker(address) as broker:
            broker.publish(Ping("held for the restored group"))
            broker.flush(REPORT_TIMEOUT)
        statistics = hub.statistics()
    assert set(statistics.queues) == {"tests.messages.Ping/restored"}
    assert statistics.queues["tests.messages.Ping/restored"]["held"] == 1
    assert statistics.bad_group_entries == len(BAD_GROUPS)


def test_a_deeply_nested_line_of_the_groups_file_is_skipped_too(
    scratch: Callable[..., str],
) -> None:
    address = _plant_groups(scratch(0o700), [b"[" * 100_000, GOOD_GROUP])
    with Hub(address, start_method="fork") as hub:
        statistics = hub.statistics()
    assert set(statistics.queues) == {"tests.messages.Ping/restored"}
    assert statistics.bad_group_entries == 1


# -- 4. racing hubs ----------------------------------------------------------------------------


def _race(hubs: list[Hub]) -> list[BaseException | None]:
    """Start ``hubs`` at the same moment, each from a thread; what each start() raised."""
    outcomes: list[BaseException | None] = [None] * len(hubs)
    barrier = threading.Barrier(len(hubs))

    def start(index: int) -> None:
        try:
            barrier.wait(ATTACKER_TIMEOUT)
            hubs[index].start()
        except BaseException as exc:  # reported by the caller
            outcomes[index] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(hubs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a start() hung"
    return outcomes


def test_of_two_hubs_racing_for_one_address_exactly_one_starts(
    scratch: Callable[..., str],
) -> None:
    path = os.path.join(scratch(0o700), "bus")
    address = f"ipc://{path}"
    for _ in range(3):
        # Spawned, as by default: two hubs forked at the same moment by two threads inherit
        # each other's multiprocessing pipes, and the loser's stop() then waits out its whole
        # timeout (10 s) for a sentinel the winner's process holds open.
        hubs = [Hub(address, start_method="spawn", restart_grace=0.0) for _ in range(2)]
        try:
            outcomes = _race(hubs)
            winners = [i for i, outcome in enumerate(outcomes) if outcome is None]
            assert len(winners) == 1, f"outcomes: {outcomes}"
            winner, loser = hubs[winners[0]], hubs[1 - winners[0]]
            error = outcomes[1 - winners[0]]
            assert isinstance(error, HubAddressError), repr(error)
            assert "another hub already serves" in str(error)
            assert loser.pid is None  # gone: start() reaped it
            bound = {f: os.lstat(f).st_ino for f in Address.parse(address).socket_files()}
            round_trip(address)
            with pytest.raises(HubAddressError):
                Hub(address, start_method="fork").start()
            assert {f: os.lstat(f).st_ino for f in bound} == bound
            assert winner.stop() == 0
        finally:
            for hub in hubs:
                hub.stop()
        for socket_file in Address.parse(address).socket_files():
            assert not os.path.lexists(socket_file), f"{socket_file} left after the stop"


@pytest.mark.parametrize("planted", ["directory-0700", "directory-0777", "symlink"])
def test_a_journal_directory_another_user_made_first_is_refused(
    attackers: Callable[[], Attacker], scratch: Callable[..., str], planted: str
) -> None:
    """The attacker makes the journal's directory first (its own 0700 or 0777 one), or plants a
    symlink there to a directory of its own, in a shared sticky directory: the hub refuses to
    start, names the path, and writes nothing there (the attacker would read every job)."""
    shared = scratch(0o1777)
    journal = os.path.join(shared, "journal")
    own = os.path.join(shared, _random_name("attacker"))
    address = f"ipc://{scratch(0o700)}/hub"
    hub = Hub(address, start_method="fork", journal=journal)
    attacker = attackers()
    try:
        if planted == "symlink":
            outcomes = attacker.fs(("mkdir", own, "0o777"), ("symlink", journal, own))
            looked_at = own
        else:
            outcomes = attacker.fs(("mkdir", journal, "0o" + planted[-4:]))
            looked_at = journal
        assert set(outcomes) == {"ok"}, outcomes
        with pytest.raises(HubAddressError) as refused:
            hub.start()
        assert journal in str(refused.value)
        assert os.listdir(looked_at) == [], "the hub put a file in the attacker's directory"
    finally:
        hub.stop()  # started only if the refusal regressed
        attacker.close()
        _remove_the_attackers(journal, own)


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_journal_below_a_path_of_another_user_is_refused_before_anything_is_made(
    attackers: Callable[[], Attacker], scratch: Callable[..., str], planted: str
) -> None:
    """The journal's parent is the attacker's directory, or the attacker's symlink to a
    directory of ours: refused, and its directory was not made first (found by an adversarial
    review: the hub made it, then refused it)."""
    shared = scratch(0o1777)
    theirs = os.path.join(shared, _random_name("attacker"))
    ours = scratch(0o755)
    hub = Hub(f"ipc://{scratch(0o700)}/hub", start_method="fork", journal=os.path.join(theirs, "j"))
    attacker = attackers()
    try:
        if planted == "symlink":
            outcomes = attacker.fs(("symlink", theirs, ours))
            where_it_would_land = ours
        else:
            outcomes = attacker.fs(("mkdir", theirs, "0o777"))
            where_it_would_land = theirs
        assert set(outcomes) == {"ok"}, outcomes
        with pytest.raises(HubAddressError) as refused:
            hub.start()
        assert theirs in str(refused.value)
        assert os.listdir(where_it_would_land) == [], "made below a path of another user"
    finally:
        hub.stop()  # started only if the refusal regressed
        attacker.close()
        _remove_the_attackers(theirs)
