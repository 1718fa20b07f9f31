"""The hub's statistics record (hub process): what ``ipcbus stats``, ``Hub.statistics()`` and
the metrics endpoint show, gathered from the serving loop's parts."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

import zmq

from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.statistics import HubStatistics

if TYPE_CHECKING:
    from .control import ControlPlane
    from .data_path import DataPath
    from .fanout import Fanout
    from .journal import Journal
    from .preauth import PendingHandshakes
    from .spool import HubSpool

__all__ = ["RelayStatistics"]


class RelayStatistics:
    """``statistics()`` of :class:`~ipcbus.server.relay.Relay` (its state is set there)."""

    endpoint: str
    address: Address
    control_plane: ControlPlane
    journal: Journal | None
    spool: HubSpool | None
    _started: float
    _data_path: DataPath
    _malformed: int
    _auth_rejected: int
    _pending: dict[zmq.Socket[bytes], PendingHandshakes]

    @property
    def _fanout(self) -> Fanout | None:
        """The XPUB side, once bound (the data path relays through it)."""
        return self._data_path.fanout

    def statistics(self) -> HubStatistics:
        fanout, book = self._fanout, self.control_plane.book
        return HubStatistics(
            address=self.endpoint,
            pid=os.getpid(),
            uptime=time.monotonic() - self._started,
            clients=len(self.control_plane.clients),
            topics=len(fanout.topics) if fanout else 0,
            batches_relayed=self._data_path.batches,
            messages_relayed=self._data_path.messages,
            bytes_relayed=self._data_path.bytes,
            backpressure_stalls=fanout.stalls if fanout else 0,
            malformed_dropped=self._malformed,
            stall_drops=fanout.stall_drops if fanout else 0,
            loss_notices=self.control_plane.notices.loss_notices,
            auth_rejected=self._auth_rejected,
            clients_lost=self.control_plane.clients_lost,
            late_acks=book.late_acks,
            deleted_queue_dropped=book.deleted_dropped,
            full_topics=sorted(wire.unique_name_of(topic) for topic in book.full_topics),
            stale_acks=book.stale_acks,
            unapplied_acks=self.control_plane.unapplied_acks,
            unsplittable_dropped=self._data_path.unsplittable,
            duplicates_dropped=self._data_path.duplicates,
            bad_group_entries=self.control_plane.bad_group_entries,
            handshakes_shed=sum(pending.shed for pending in self._pending.values()),
            unrouted=dict(self._data_path.unrouted.counts),
            journal=self.journal.statistics() if self.journal is not None else {},
            spool=asdict(self.spool.statistics()) if self.spool is not None else {},
            queues=book.statistics(),
            dead_letters={
                name: [asdict(record) for record in records]
                for name, records in book.dead_letters().items()
                if records
            },
        )
