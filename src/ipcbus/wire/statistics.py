"""The hub's statistics: a frozen record that travels as JSON in a STATS reply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

__all__ = ["HubStatistics"]


@dataclass(frozen=True)
class HubStatistics:
    """What the hub has done since it started (``ipcbus stats`` renders it)."""

    address: str
    pid: int
    uptime: float
    clients: int
    topics: int
    batches_relayed: int
    messages_relayed: int
    bytes_relayed: int
    backpressure_stalls: int
    malformed_dropped: int
    # Sends made without waiting for a subscriber that accepted nothing for stall_timeout (each
    # may drop a batch for one or more subscribers; each subscriber counts exactly what it
    # missed, in messages: HubBroker.gaps).
    stall_drops: int = 0
    # Times the hub, having stopped sending without waiting, told every client to check what it
    # missed (LOSSY).
    loss_notices: int = 0
    auth_rejected: int = 0
    clients_lost: int = 0
    # Acks for a delivery this hub no longer has (redelivered after its consumer was declared
    # gone): ignored.
    late_acks: int = 0
    # Acks for a delivery of another hub (a previous one at this address, before a restart):
    # ignored; delivery ids are unique across hubs, so they can never settle one of this hub's.
    stale_acks: int = 0
    # Acks the hub failed to apply (a bug of the hub's, logged with its traceback); the other
    # acks of the same request were applied.
    unapplied_acks: int = 0
    unsplittable_dropped: int = 0
    # Messages a client sent again after a hub died that this hub had taken already (from the
    # client's pipe, or journaled by the hub before): dropped, not delivered twice.
    duplicates_dropped: int = 0
    bad_group_entries: int = 0  # lines of the queue-groups file skipped at start
    handshakes_shed: int = 0  # tcp connections shut down before authenticating (preauth)
    # Per type, messages published while no process subscribed and no queue group existed:
    # broadcast to nobody (declare_queue() keeps jobs for workers that start later).
    unrouted: dict[str, int] = field(default_factory=dict)
    # The queue journal (Hub(journal=...)), empty without one: its size in bytes, messages
    # restored at start, torn_bytes cut off its end and corrupt_records skipped at start,
    # checkpoints (compactions), fsyncs, write_errors, and full (1 while it holds topics back).
    journal: dict[str, int] = field(default_factory=dict)
    # The spool (big payloads in files, ipc:// hubs), empty without one: its directory, the
    # files and bytes in it at the last sweep, files expired (spool_linger), gone hubs swept.
    spool: dict[str, object] = field(default_factory=dict)
    # Messages a queue group held when it was deleted (delete_queue): dropped with it.
    deleted_queue_dropped: int = 0
    # Topics publishers are told to hold back: a queue group of each holds max_held messages.
    full_topics: list[str] = field(default_factory=list)
    queues: dict[str, dict[str, int]] = field(default_factory=dict)
    # Per queue, the dead letters the hub keeps (bounded): message_id, attempts, last error.
    dead_letters: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> HubStatistics:
        return cls(**json.loads(text))
