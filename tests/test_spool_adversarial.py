"""The spool (issue 12, "big payloads") under attack and careless use: races, churn, restarts.

Each test here was written against a defect found by trying to break the spool, and failed
before its fix.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ipcbus import Hub, HubBroker
from ipcbus.client.spool import SPOOL_MIN, Spool
from ipcbus.server.spool import HubSpool
from ipcbus.wire.spool import topic_directory_name

from .conftest import wait_until
from .test_attacker_uid import Attacker, _remove_the_attackers, attackers, scratch
from .test_spool import TIMEOUT, Reader, _blob, readers, spool_root

__all__ = ["attackers", "readers", "scratch", "spool_root"]  # fixtures of other modules

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def hub_spool(spool_root: str) -> Iterator[HubSpool]:
    # The shortest period (0.05 s): sweeps overlap the readers' arrivals as often as they can.
    spool = HubSpool.create(spool_root, "hub", linger=0.01)
    assert spool is not None
    yield spool
    spool.close()


def test_a_sweep_never_drops_a_reader_that_registers_while_it_runs(hub_spool: HubSpool) -> None:
    """A sweep lists the readers' lock files, then the registrations: a reader that took its
    lock in between was taken for a dead one, and its registration removed while it lived (no
    share from then on: every big message of the topic dropped, for good)."""
    topic = b"t\x00"
    stop = threading.Event()

    def sweep() -> None:
        while not stop.is_set():
            hub_spool.sweep()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    readers: list[Spool] = []
    try:
        for number in range(600):
            reader = Spool.open(hub_spool.path, 1 << 28, f"reader{number}")
            assert reader is not None
            readers.append(reader)
            reader.register(topic)
    finally:
        stop.set()
        sweeper.join(TIMEOUT)
    try:
        hub_spool.sweep()  # one more, on its own
        registered = os.listdir(os.path.join(hub_spool.path, topic_directory_name(topic)))
        assert len(registered) == len(readers)
    finally:
        for reader in readers:
            reader.close()


def test_a_spool_root_another_user_owns_is_not_used(
    tmp_path: Any,
    attackers: Callable[[], Attacker],
    scratch: Callable[..., str],
    readers: Callable[..., Reader],
) -> None:
    """The ``spool`` option names a directory another user owns (0777, not sticky). The owner
    of a directory may rename what is in it: it moved our ``ipcbus-<uid>`` aside and put one of
    its own in its place, with a registration of its own, and publishers wrote there (sizes
    and timing its to see), linked shares for it alone, and every subscriber dropped every big
    message. The hub now refuses such a root as it refuses a foreign home: big payloads inline."""
    own = os.path.join(scratch(0o1777), "attackers")
    attacker = attackers()
    try:
        assert attacker.fs(("mkdir", own, "0o777")) == ["ok"]
        with Hub(f"ipc://{tmp_path}/hub", start_method="fork", spool=own) as hub:
            reader = readers(hub.address)
            with HubBroker(hub.address) as publisher:
                publisher.publish(_blob(4))
                publisher.flush(TIMEOUT)
                assert hub.statistics().spool == {}
                assert publisher.spool.directory == ""
                assert reader.take(1)[0][0] == 4  # inline
                assert reader.report()[1] == 0
        assert os.listdir(own) == [], "the hub put a file in the attacker's directory"
    finally:
        attacker.close()
        _remove_the_attackers(own)


def test_a_hub_that_stops_while_big_messages_flow_leaves_no_spool_behind(
    spool_root: str,
) -> None:
    """Publishers write and subscribers take shares while the hub stops. One listing of the
    directory while others create and remove names in it misses some of them (measured here:
    123 of 246 shares left, a 2 MB file each), so the directory stayed, full, after the hub
    was gone: nothing removes it until another hub of the same root comes."""
    spool = HubSpool.create(spool_root, "hub", linger=60.0)
    assert spool is not None
    topic = b"t\x00"
    stop = threading.Event()
    readers = [Spool.open(spool.path, 1 << 28, f"reader{n}") for n in range(2)]
    for reader in readers:
        assert reader is not None
        reader.register(topic)

    def publish(number: int) -> None:
        publisher = Spool.open(spool.path, 1 << 28, f"publisher{number}")
        assert publisher is not None
        data = os.urandom(SPOOL_MIN)
        while not stop.is_set():
            publisher.store(topic, b"D", [b"payload", data])
        publisher.close()

    publishers = [threading.Thread(target=publish, args=(n,)) for n in range(2)]
    for thread in publishers:
        thread.start()
    try:
        wait_until(lambda: len(os.listdir(spool.path)) > 200, TIMEOUT)
        spool.close()
        assert not os.path.exists(spool.path), sorted(os.listdir(spool.path))[:5]
    finally:
        stop.set()
        for thread in publishers:
            thread.join(TIMEOUT)
        for reader in readers:
            assert reader is not None
            reader.close()


def test_a_hub_making_its_directory_is_not_taken_for_a_gone_one(hub_spool: HubSpool) -> None:
    """A hub made its directory, then locked it: another hub's sweep in between found it
    unlocked, took it for a gone hub's and removed it, and the new hub served a deleted
    directory (its clients sent inline). A hub now makes it under a name of its own, locked,
    then renames it; such a name is swept only once it is old (a hub that died making it)."""
    base = os.path.dirname(hub_spool.path)
    making = os.path.join(base, "making-another")
    os.mkdir(making, 0o700)
    hub_spool._next_sweep = 0.0
    hub_spool.sweep()
    assert os.path.isdir(making), "a directory being made was swept"
    os.utime(making, (0, 0))  # left by a hub that died making it
    hub_spool._next_sweep = 0.0
    hub_spool.sweep()
    assert not os.path.exists(making)
    assert sorted(os.listdir(base)) == [os.path.basename(hub_spool.path)]


def test_setting_the_wall_clock_expires_nothing_early(spool_root: str) -> None:
    """Shares expired when their modification time (the wall clock) was spool_linger old: the
    clock set forward an hour (here: the files' times set an hour back) expired every big
    message on its way at the next sweep, each dropped by its subscriber. A file's age now
    counts from the sweep that first saw it, on the monotonic clock."""
    spool = HubSpool.create(spool_root, "hub", linger=0.5)
    assert spool is not None
    reader = Spool.open(spool.path, 1 << 28, "reader")
    assert reader is not None
    try:
        reader.register(b"t\x00")
        reader.store(b"t\x00", b"D", [b"payload", os.urandom(SPOOL_MIN)])
        (share,) = [name for name in os.listdir(spool.path) if name.endswith(".reader")]
        path = os.path.join(spool.path, share)
        an_hour_ago = time.time() - 3600
        os.utime(path, (an_hour_ago, an_hour_ago))
        first = time.monotonic()
        spool.sweep()
        assert os.path.exists(path), "expired by the wall clock"
        while os.path.exists(path) and time.monotonic() - first < TIMEOUT:
            spool._next_sweep = 0.0
            spool.sweep()
            time.sleep(0.01)
        gone = time.monotonic() - first
        assert not os.path.exists(path), "never expired"
        assert gone >= 0.5  # spool_linger after the first look, not before
        assert spool.statistics().expired == 1
    finally:
        reader.close()
        spool.close()


def test_a_file_that_reuses_an_expired_files_inode_and_name_starts_its_age_afresh() -> None:
    """Ages are kept per (device, inode, name): the one removed for its age is forgotten, so a
    new file the file system gives the same inode, under the same name, is not removed at once."""
    from ipcbus.server.spool import _Ages

    ages = _Ages()
    info = os.stat_result((0o100600, 7, 1, 1, 0, 0, 10, 0, 0, 0))  # inode 7 on device 1
    ages.start(100.0, 60.0)
    assert not ages.expired(info, "share.1")
    ages.finish()
    ages.start(161.0, 60.0)
    assert ages.expired(info, "share.1")  # first seen 61 s ago: removed
    ages.finish()
    ages.start(161.5, 60.0)
    assert not ages.expired(info, "share.1")  # the same inode and name again: a new file
    ages.finish()
