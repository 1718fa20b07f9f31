"""Big payloads through the hub's spool (issue 12, "big payloads"), across real processes.

A hub on ipc:// names a spool directory; big out-of-band buffers of broadcast batches travel as
files there, a share per registered subscriber, instead of through the encrypted sockets. What is
proved here: they arrive intact (bytes, bytearray, PickleBuffer; fork and spawn subscribers), the
hub relays none of their bytes, the memory is free once read and the directory gone when the hub
stops; a subscriber that lags past ``spool_linger`` drops and counts, never silently; a dead
subscriber's shares are swept; nobody registered, or a write that fails, means inline, never a
loss; the spool is never used over tcp; and another user can neither plant the directory nor
read what waits in it (played as uid nobody).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import multiprocessing
import os
import pickle
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest

from ipcbus import Hub, HubBroker, Message, SpoolError
from ipcbus.client.spool import SPOOL_MIN, Spool
from ipcbus.server import spool as hub_spool
from ipcbus.wire.address import Address
from ipcbus.wire.spool import (
    SpoolEntry,
    pack_spool_index,
    share_name,
    topic_directory_name,
    unpack_spool_index,
)

from .conftest import wait_until
from .hubtools import free_tcp_port, round_trip, run_cli
from .test_attacker_uid import FS_DENIED, Attacker, _remove_the_attackers, attackers, scratch

__all__ = ["attackers", "scratch"]  # fixtures of test_attacker_uid, used here too

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

BIG = 2 * SPOOL_MIN  # each big field of a Blob
TIMEOUT = 30.0


@dataclass(frozen=True)
class Blob(Message):
    seq: int
    data: bytes
    more: bytearray
    view: Any = None  # a PickleBuffer (protocol 5 out-of-band)


def _blob(seq: int) -> Blob:
    return Blob(
        seq,
        os.urandom(BIG),
        bytearray(os.urandom(BIG // 2 + 7)),
        pickle.PickleBuffer(bytearray(os.urandom(BIG + 13))),
    )


def _digest(blob: Blob) -> list[Any]:
    return [
        blob.seq,
        hashlib.sha256(blob.data).hexdigest(),
        hashlib.sha256(blob.more).hexdigest(),
        hashlib.sha256(blob.view).hexdigest(),
        [type(blob.data).__name__, type(blob.more).__name__, type(blob.view).__name__],
    ]


def _expected(blob: Blob) -> list[Any]:
    return [*_digest(blob)[:4], ["bytes", "bytearray", "memoryview"]]


def _reader(address: str, conn: Connection) -> None:
    """Child: subscribe to Blob, report each as its digests, then the counters when asked."""
    broker = HubBroker(address)
    try:
        broker.subscribe(Blob, lambda blob: conn.send(("blob", _digest(blob))))
        conn.send(("ready", None))
        while (command := conn.recv()) != "close":
            if command == "fork":  # a child that outlives this process (until killed)
                pid = os.fork()
                if pid == 0:
                    _close_all_but_locks()
                    time.sleep(TIMEOUT)
                    os._exit(0)
                conn.send(("fork", pid))
            else:
                conn.send(("report", (broker.spool, broker.undecodable)))
    finally:
        broker.close()


def _close_all_but_locks() -> None:
    """(In a forked grandchild) Close every inherited descriptor but lock files: the pipes to
    the test (multiprocessing waits for its child's sentinel pipe to close), but not a lock a
    fork would have kept, so the test sees it if ipcbus did not close it."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
                    os.close(fd)


class Reader:
    """A subscriber in another process, driven over a pipe (every wait has a deadline)."""

    def __init__(self, address: str, start_method: str = "fork") -> None:
        context: Any = multiprocessing.get_context(start_method)
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_reader, args=(address, child), daemon=True)
        self.process.start()
        child.close()
        self.blobs: list[Any] = []
        assert self._next("ready") is None

    def _next(self, kind: str) -> Any:
        while True:
            assert self.conn.poll(TIMEOUT), f"the reader sent no {kind} within {TIMEOUT} s"
            got, value = self.conn.recv()
            if got == kind:
                return value
            self.blobs.append(value)

    def take(self, count: int) -> list[Any]:
        while len(self.blobs) < count:
            assert self.conn.poll(TIMEOUT), f"{len(self.blobs)} of {count} blobs arrived"
            got, value = self.conn.recv()
            assert got == "blob", got
            self.blobs.append(value)
        return self.blobs

    def report(self) -> tuple[Any, int]:
        self.conn.send("report")
        return self._next("report")  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send("close")
        self.process.join(TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(TIMEOUT)
        self.conn.close()


@pytest.fixture
def spool_root() -> Iterator[str]:
    """A spool root of the test's own, on memory where the machine has it."""
    root = tempfile.mkdtemp(
        prefix="ipcbus-spool-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    yield root
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in files:
            os.unlink(os.path.join(directory, name))
        for name in dirs:
            os.rmdir(os.path.join(directory, name))
    os.rmdir(root)
    assert leftovers == [], f"left in the spool: {leftovers}"


@pytest.fixture
def readers() -> Iterator[Callable[..., Reader]]:
    started: list[Reader] = []

    def start(address: str, start_method: str = "fork") -> Reader:
        reader = Reader(address, start_method)
        started.append(reader)
        return reader

    yield start
    for reader in started:
        reader.close()


def _files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if not f.startswith("r-")  # readers' lock files: they live as long as their readers
    )


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_big_payloads_travel_through_the_spool_not_through_the_hub(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader], start_method: str
) -> None:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=spool_root) as hub:
        reader = readers(hub.address, start_method)
        blobs = [_blob(seq) for seq in range(6)]
        with HubBroker(hub.address) as publisher:
            for blob in blobs:
                publisher.publish(blob)
            publisher.flush(TIMEOUT)
            assert reader.take(6) == [_expected(blob) for blob in blobs]
            spool, undecodable = reader.report()
            assert (spool.read, spool.missing, undecodable) == (18, 0, 0)
            assert (publisher.spool.stored, publisher.spool.inline) == (18, 0)
            assert spool.directory == publisher.spool.directory
            assert spool.directory.startswith(os.path.join(spool_root, f"ipcbus-{os.getuid()}"))
            # The hub relayed indexes, not 30 MB of payloads; every share read is gone.
            assert hub.statistics().bytes_relayed < 6 * SPOOL_MIN // 4
            assert [f for f in _files(spool_root) if "/t-" not in f] == []
        reader.close()
    assert os.listdir(os.path.join(spool_root, f"ipcbus-{os.getuid()}")) == []


def test_a_subscriber_that_lags_past_the_linger_drops_and_counts(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader]
) -> None:
    with Hub(
        f"ipc://{tmp_path}/hub", start_method="fork", spool=spool_root, spool_linger=0.5
    ) as hub:
        reader = readers(hub.address)
        _lag_past_the_linger(hub, reader, late=3)
        spool, undecodable = reader.report()
        assert (spool.missing, undecodable, spool.read) == (9, 3, 3)


def _lag_past_the_linger(hub: Hub, reader: Reader, late: int) -> None:
    """``late`` Blobs (3 buffers each) published while ``reader`` is stopped, until the hub's
    sweep expired their shares; then one more, which it gets (the late ones are not delivered)."""
    with HubBroker(hub.address) as publisher:
        os.kill(reader.process.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            for seq in range(late):
                publisher.publish(_blob(seq))
            publisher.flush(TIMEOUT)
            wait_until(lambda: hub.statistics().spool["expired"] >= 3 * late, TIMEOUT)
        finally:
            os.kill(reader.process.pid, signal.SIGCONT)  # type: ignore[arg-type]
        fresh = _blob(late)
        publisher.publish(fresh)
        publisher.flush(TIMEOUT)
        assert reader.take(1) == [_expected(fresh)]


def test_a_dead_subscribers_shares_are_swept(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader]
) -> None:
    address = f"ipc://{tmp_path}/hub"
    with Hub(address, start_method="fork", spool=spool_root, spool_linger=5) as hub:
        reader = readers(hub.address)
        os.kill(reader.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        reader.process.join(TIMEOUT)
        with HubBroker(hub.address) as publisher:
            publisher.publish(_blob(0))  # registered still: shares for the dead reader
            publisher.flush(TIMEOUT)
            wait_until(lambda: hub.statistics().spool["readers_gone"] == 1, TIMEOUT)
            wait_until(lambda: _files(spool_root) == [], TIMEOUT)
            shown = run_cli("stats", "--address", hub.address).stdout
            assert "spool (big payloads in files)" in shown
            assert "readers_gone         1" in shown
            publisher.publish(_blob(1))  # nobody registered now: inline (to nobody)
            publisher.flush(TIMEOUT)
            assert (publisher.spool.stored, publisher.spool.inline) == (3, 3)
            assert _files(spool_root) == []


def test_a_forked_child_does_not_keep_its_dead_parents_registration(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader]
) -> None:
    """The reader's lock is an open file description, which a forked child inherits: the child
    closes its copy, so the parent's death is seen while the child lives on."""
    address = f"ipc://{tmp_path}/hub"
    with Hub(address, start_method="fork", spool=spool_root, spool_linger=5) as hub:
        reader = readers(hub.address)
        reader.conn.send("fork")
        grandchild = reader._next("fork")
        try:
            os.kill(reader.process.pid, signal.SIGKILL)  # type: ignore[arg-type]
            reader.process.join(TIMEOUT)
            wait_until(lambda: hub.statistics().spool["readers_gone"] == 1, TIMEOUT)
            os.kill(grandchild, 0)  # still alive: it did not hold the lock
        finally:
            os.kill(grandchild, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(grandchild, 0)


def _publish_with_a_file_size_limit(address: str, conn: Connection) -> None:
    """Child: no file it writes may pass 64 KiB (EFBIG, SIGXFSZ ignored): every spool write
    fails half-way."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    with HubBroker(address) as broker:
        broker.publish(_blob(7))
        broker.flush(TIMEOUT)
        conn.send((broker.spool.stored, broker.spool.inline))


def test_a_spool_write_that_fails_sends_the_payload_inline(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader]
) -> None:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=spool_root) as hub:
        reader = readers(hub.address)
        context: Any = multiprocessing.get_context("fork")
        conn, child = context.Pipe()
        publisher = context.Process(
            target=_publish_with_a_file_size_limit, args=(hub.address, child)
        )
        publisher.start()
        try:
            assert conn.poll(TIMEOUT)
            assert conn.recv() == (0, 3)
        finally:
            publisher.join(TIMEOUT)
            conn.close()
        [blob] = reader.take(1)
        assert blob[0] == 7
        assert blob[4] == ["bytes", "bytearray", "memoryview"]
        spool, undecodable = reader.report()
        assert (spool.read, undecodable) == (0, 0)
        assert _files(spool_root) == [f for f in _files(spool_root) if "/t-" in f]


def _assert_no_spool_and_inline(hub: Hub, reader: Reader, seq: int) -> None:
    """The hub has no spool, and a big message reaches the reader all the same (inline)."""
    with HubBroker(hub.address) as publisher:
        publisher.publish(_blob(seq))
        publisher.flush(TIMEOUT)
        assert reader.take(1)[0][0] == seq
        assert publisher.spool.directory == ""
        assert hub.statistics().spool == {}
    reader.close()


def test_a_tcp_hub_has_no_spool(readers: Callable[..., Reader]) -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    try:
        with Hub(address, start_method="fork") as hub:
            _assert_no_spool_and_inline(hub, readers(hub.address), 1)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Address.parse(address).key_file)


# -- what a reader checks ---------------------------------------------------------------------


def test_a_reader_takes_only_the_file_its_publisher_wrote(spool_root: str) -> None:
    directory = os.path.join(spool_root, "spool")
    os.mkdir(directory, 0o700)
    reader = Spool.open(directory, 1 << 30, "r1")
    assert reader is not None
    try:
        reader.register(b"t\x00")
        codec, frames = reader.store(b"t\x00", b"D", [b"payload", os.urandom(SPOOL_MIN)])
        assert codec == b"B"
        [entry] = unpack_spool_index(frames[1], 1)
        share = os.path.join(directory, share_name(entry.file_name, "r1"))
        os.unlink(share)  # replaced by a file of the same name and size
        with open(share, "wb") as planted:
            planted.write(b"x" * SPOOL_MIN)

        class Frame:
            def __init__(self, data: bytes) -> None:
                self.bytes = data

        head = [Frame(b"t\x00"), b"payload"]  # the head is not read here
        got = reader.fill([*head, Frame(frames[1]), b""])
        assert isinstance(got[3], SpoolError)
        assert "not the file" in str(got[3])
        assert not os.path.exists(share)  # taken out of the spool all the same
        bad = pack_spool_index([SpoolEntry(3, 1, 0, 0, b"\x00" * 16)])  # position out of range
        got = reader.fill([*head, Frame(bad), b""])
        assert isinstance(got[3], SpoolError)
        assert reader.counts.missing == 1
    finally:
        reader.close()
    # Its registration and lock file went with it; the topic's directory is the hub's to remove.
    assert os.listdir(directory) == [topic_directory_name(b"t\x00")]
    assert os.listdir(os.path.join(directory, topic_directory_name(b"t\x00"))) == []


# -- another user (uid nobody) ----------------------------------------------------------------


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_a_spool_directory_another_user_made_first_is_not_used(
    tmp_path: Any,
    attackers: Callable[[], Attacker],
    scratch: Callable[..., str],
    readers: Callable[..., Reader],
    planted: str,
) -> None:
    """The attacker makes ``<root>/ipcbus-<uid>`` first in a shared sticky root (its own 0777
    directory, or a symlink to one): the hub serves without a spool, writes nothing there, and
    big payloads still arrive, inline."""
    root = scratch(0o1777)
    target = os.path.join(root, f"ipcbus-{os.getuid()}")
    own = os.path.join(root, "attackers")
    attacker = attackers()
    try:
        if planted == "symlink":
            outcomes = attacker.fs(("mkdir", own, "0o777"), ("symlink", target, own))
            looked_at = own
        else:
            outcomes = attacker.fs(("mkdir", target, "0o777"))
            looked_at = target
        assert set(outcomes) == {"ok"}, outcomes
        with Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=root) as hub:
            _assert_no_spool_and_inline(hub, readers(hub.address), 5)
        assert os.listdir(looked_at) == [], "the hub put a file in the attacker's directory"
    finally:
        attacker.close()
        _remove_the_attackers(target, own)


def test_another_user_can_neither_read_nor_plant_what_waits_in_the_spool(
    tmp_path: Any,
    attackers: Callable[[], Attacker],
    spool_root: str,
    readers: Callable[..., Reader],
) -> None:
    os.chmod(spool_root, 0o1777)  # a shared root, as /dev/shm
    attacker = attackers()
    try:
        with Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=spool_root) as hub:
            reader = readers(hub.address)
            os.kill(reader.process.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            try:
                with HubBroker(hub.address) as publisher:
                    publisher.publish(_blob(9))
                    publisher.flush(TIMEOUT)
                    directory = publisher.spool.directory
                    names = os.listdir(directory)
                    share = next(f for f in names if "." in f and not f.startswith("r-"))
                    [topic] = [f for f in names if f.startswith("t-")]
                    attempts = [
                        ("read", os.path.join(directory, share)),
                        ("unlink", os.path.join(directory, share)),
                        ("create", os.path.join(directory, "planted")),
                        ("create", os.path.join(directory, topic, "attacker")),
                        ("rename", directory, directory + "-moved"),
                        ("mkdir", os.path.join(os.path.dirname(directory), "x"), "0o700"),
                    ]
                    outcomes = attacker.fs(*attempts)
                    allowed = [
                        a for a, o in zip(attempts, outcomes, strict=True) if o not in FS_DENIED
                    ]
                    assert allowed == [], f"nobody could: {allowed} ({outcomes})"
            finally:
                os.kill(reader.process.pid, signal.SIGCONT)  # type: ignore[arg-type]
            assert reader.take(1)[0][0] == 9
    finally:
        attacker.close()


@pytest.fixture
def small_spool_root() -> Iterator[str]:
    """A spool root on a tmpfs of its own, 16 MiB: room runs out after a few big messages. Needs
    the right to mount (root, as the attacker tests need)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root to mount a small tmpfs (running as uid {os.geteuid()})")
    root = tempfile.mkdtemp(prefix="ipcbus-small-spool-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=1777", "tmpfs", root],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        os.rmdir(root)
        pytest.fail(f"cannot mount a tmpfs as root: {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", root], check=True)
        os.rmdir(root)


def test_a_spool_short_of_room_sends_inline_and_loses_nothing(
    tmp_path: Any, small_spool_root: str, readers: Callable[..., Reader]
) -> None:
    """A stopped subscriber holds its shares; once less than a quarter of the spool's file
    system is free, publishers go inline (counted), and every message arrives when it resumes."""
    address = f"ipc://{tmp_path}/hub"
    with Hub(address, start_method="fork", spool=small_spool_root) as hub:
        reader = readers(hub.address)
        blobs = [_blob(seq) for seq in range(6)]  # 5 MiB each: 30 MiB for a 16 MiB spool
        with HubBroker(hub.address) as publisher:
            os.kill(reader.process.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            try:
                for blob in blobs:
                    publisher.publish(blob)
                publisher.flush(TIMEOUT)
                stored, inline = publisher.spool.stored, publisher.spool.inline
            finally:
                os.kill(reader.process.pid, signal.SIGCONT)  # type: ignore[arg-type]
            assert reader.take(6) == [_expected(blob) for blob in blobs]
            spool, undecodable = reader.report()
        assert stored > 0
        assert inline > 0
        assert stored + inline == 18
        assert (spool.read, spool.missing, undecodable) == (stored, 0, 0)
        reader.close()


def test_a_write_that_others_outran_goes_inline_and_the_reserve_holds(
    small_spool_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishers look for room, then write: not atomic across processes, so several writing
    at once took the spool below its reserve (a quarter free), down to no space at all (found
    by an adversarial review). Another process's write is played here between the look and
    this one: the batch goes inline, counted, and leaves no share behind."""
    directory = os.path.join(small_spool_root, "spool")
    os.mkdir(directory, 0o700)
    spool = Spool.open(directory, 1 << 30, "r1")
    assert spool is not None
    write = Spool._write
    other = os.path.join(small_spool_root, "another-publishers-file")

    def outran(self: Spool, position: int, buffer: Any, readers: list[str]) -> Any:
        if not os.path.exists(other):  # 11 of the 16 MiB, written since the look
            with open(other, "wb") as filler:
                filler.write(b"\0" * (11 << 20))
        return write(self, position, buffer, readers)

    monkeypatch.setattr(Spool, "_write", outran)
    try:
        spool.register(b"t\x00")
        frames = [b"payload", os.urandom(2 << 20)]
        codec, sent = spool.store(b"t\x00", b"D", frames)
        assert (codec, sent) == (b"D", frames)  # inline after all
        assert (spool.counts.stored, spool.counts.inline) == (0, 1)
        assert [name for name in os.listdir(directory) if "." in name and "lock" not in name] == []
    finally:
        spool.close()
        with contextlib.suppress(FileNotFoundError):  # not made if the write never came
            os.unlink(other)


def test_what_a_subscriber_counted_of_the_spool_outlives_a_hub_restart(
    tmp_path: Any, spool_root: str, readers: Callable[..., Reader]
) -> None:
    """The counts lived on the object of one hub's spool, made anew for the next hub's: after a
    restart a subscriber's ``spool.missing`` read 0 (found by an adversarial review)."""
    address = f"ipc://{tmp_path}/hub"
    hub = Hub(address, start_method="fork", spool=spool_root, spool_linger=0.5).start()
    try:
        reader = readers(hub.address)
        _lag_past_the_linger(hub, reader, late=1)
        before, _undecodable = reader.report()
        assert (before.missing, before.read) == (3, 3)
        hub.stop()
        hub = Hub(address, start_method="fork", spool=spool_root, spool_linger=0.5).start()
        wait_until(lambda: reader.report()[0].directory not in ("", before.directory), TIMEOUT)
        after, _undecodable = reader.report()
        assert (after.missing, after.read) == (3, 3)
        reader.close()
    finally:
        hub.stop()


def _out_of_descriptors(*_: Any) -> None:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_the_hub_serves_on_when_its_spool_sweep_fails(
    tmp_path: Any, spool_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep out of descriptors (EMFILE, as a flood of connections left the hub): it is
    logged and the hub serves on (its serving loop ended, the hub exited 1). The forked hub
    inherits the failing sweep: it fails at every turn."""
    monkeypatch.setattr(hub_spool.HubSpool, "sweep", _out_of_descriptors)
    hub = Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=spool_root)
    hub.start()
    try:
        deadline = time.monotonic() + 1.5  # three sweep periods
        while time.monotonic() < deadline:
            round_trip(hub.address, 5, timeout=TIMEOUT)
        assert hub.statistics().spool  # it still has one
    finally:
        code = hub.stop()
    assert code == 0


def test_a_spool_closed_while_out_of_descriptors_is_removed_once_they_are_back(
    spool_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() out of descriptors raised EMFILE and left the spool's files: it tries again."""
    spool = hub_spool.HubSpool.create(spool_root, os.urandom(8).hex(), 60.0)
    assert spool is not None
    with open(os.path.join(spool.path, "waiting"), "wb") as file:
        file.write(b"x")
    remove_all = hub_spool._remove_all
    failures = [2]

    def remove_when_it_can(directory: int) -> None:
        if failures[0]:
            failures[0] -= 1
            _out_of_descriptors()
        remove_all(directory)

    monkeypatch.setattr(hub_spool, "_remove_all", remove_when_it_can)
    spool.close()
    assert failures == [0]
    assert not os.path.exists(spool.path)
