"""What a NatsBroker counts: every message it did not deliver is counted here, never silently
gone (the NATS counterpart of a ``HubBroker``'s ``gaps``, ``undecodable`` and ``rejected``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["Counters", "GroupStatistics", "NatsStatistics"]


@dataclass(frozen=True)
class GroupStatistics:
    """A queue group as JetStream reports it: ``held`` messages not yet delivered to any
    member, ``in_flight`` delivered and not yet acknowledged (retries waiting included)."""

    held: int
    in_flight: int


@dataclass(frozen=True)
class NatsStatistics:
    """Counts since the broker connected.

    - ``dropped``: broadcast messages dropped in this process because its handlers fell behind
      by more than ``pending_msgs_limit`` messages or ``pending_bytes_limit`` bytes (nats-py's
      slow consumer); each burst is logged at ERROR;
    - ``rejected``: messages whose signature did not check (forged, altered, or signed with
      another bus secret): never unpickled; logged at ERROR;
    - ``undecodable``: signed messages this process could not unpickle (a class it cannot
      import); queue deliveries among them are dead-lettered;
    - ``store_failures``: messages of a type with a queue group that JetStream refused to store
      (its broadcast subscribers still got them); the next ``flush()`` raises for them;
    - ``store_in_doubt``: messages of a type with a queue group whose storing JetStream had not
      confirmed when the connection to the server dropped: stored or not (an upper bound of
      what was lost); logged at ERROR. ``flush()`` no longer waits for them;
    - ``unsent``: messages ``publish()`` accepted that could not be sent: the connection was
      closed, or the server unreachable with nats-py's reconnect buffer (``pending_size``) full;
      the next ``flush()`` raises for them;
    - ``replies_dropped``: answers to a ``request()`` that came after the first one, or after
      the requester gave up;
    - ``reconnects``: how often the connection to the server was re-established (core NATS
      messages published meanwhile by others may have been missed);
    - ``in_hand``: queue deliveries this process's handlers hold now (not a count since);
    - ``queues``: each queue group this broker declared or joined, by ``"type:group"``.
    """

    dropped: int = 0
    rejected: int = 0
    undecodable: int = 0
    store_failures: int = 0
    store_in_doubt: int = 0
    unsent: int = 0
    replies_dropped: int = 0
    reconnects: int = 0
    in_hand: int = 0
    queues: dict[str, GroupStatistics] = field(default_factory=dict)


_NOT_COUNTED = frozenset({"queues", "in_hand"})


class Counters:
    """The mutable counts behind :class:`NatsStatistics`, incremented from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = {f.name: 0 for f in fields(NatsStatistics) if f.name not in _NOT_COUNTED}
        self._logged: dict[str, float] = {}

    def add_logged(self, name: str) -> tuple[int, bool]:
        """Count one; also say whether to log it: the first, then at most once a second (a
        publisher that forges thousands of messages must not flood the log)."""
        with self._lock:
            self.values[name] += 1
            now = time.monotonic()
            due = now - self._logged.get(name, -2.0) >= 1.0
            if due:
                self._logged[name] = now
            return self.values[name], due

    def add(self, name: str, count: int = 1) -> int:
        with self._lock:
            self.values[name] += count
            return self.values[name]

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def snapshot(self, **extra: Any) -> NatsStatistics:
        with self._lock:
            values: dict[str, Any] = {**self.values, **extra}
        return NatsStatistics(**values)
