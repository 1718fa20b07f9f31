"""The spool (issue 12, "big payloads") under attack and careless use: races, churn, restarts.

Each test here was written against a defect found by trying to break the spool, and failed
before its fix.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from ipcbus.client.spool import Spool
from ipcbus.server.spool import HubSpool
from ipcbus.wire.spool import topic_directory_name

from .test_spool import spool_root

__all__ = ["spool_root"]  # fixture of test_spool, used here too

pytestmark = [pytest.mark.usefixtures("no_leftovers")]

TIMEOUT = 30.0


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
        hub_spool.sweep(now=0.0)  # one more, on its own
        registered = os.listdir(os.path.join(hub_spool.path, topic_directory_name(topic)))
        assert len(registered) == len(readers)
    finally:
        for reader in readers:
            reader.close()
