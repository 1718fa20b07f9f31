"""The dead letters a queue group keeps (hub process): bounded, with their payloads.

A consumer decides that a message is dead (ipcbus.core.retry) and publishes the ``DeadLetter``;
the hub keeps the message too, as the opaque bytes its publisher pickled (never unpickled here),
so that an operator can look at it (``ipcbus dead-letters``) and put it back into its group
(``ipcbus requeue``) once the cause is fixed.

Bounded per group by count and by bytes (``HubOptions.max_dead_letters`` and
``max_dead_letter_bytes``): the oldest go first, and a payload larger than the byte bound alone is
not kept; both are counted in ``evicted``. Each payload is copied out of its batch: a view would
keep the whole batch alive (a 1 000-message batch for one dead message). Measured on the 2-core
machine: a dead letter costs the hub ~300 bytes plus its payload (the record alone, before
payloads were kept, ~160), and copying and keeping it 7 us for 100 bytes, 21 us for 10 KB.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["DeadEntry", "DeadLetters"]


@dataclass(frozen=True, slots=True)
class DeadEntry:
    message_id: str
    attempts: int
    error: str
    when: float  # time.time() when the hub learned it was dead
    meta: bytes  # the meta frame of its batch: the codec the payload is encoded with
    payload: bytes


class DeadLetters:
    """One group's dead letters, oldest first."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._entries: deque[DeadEntry] = deque()
        self.bytes = 0  # payload bytes kept
        self.evicted = 0  # dead letters dropped to stay within the bounds
        self.requeued = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[DeadEntry]:
        return iter(self._entries)

    def add(
        self,
        message_id: str,
        attempts: int,
        error: str,
        meta: bytes,
        payload: bytes,
        when: float | None = None,
    ) -> DeadEntry | None:
        """Keep a dead letter; ``None`` when its payload alone is over the byte bound."""
        entry = DeadEntry(
            message_id, attempts, error, time.time() if when is None else when, meta, payload
        )
        return entry if self.restore(entry) else None

    def restore(self, entry: DeadEntry) -> bool:
        """Keep ``entry`` (a new one, or one a journal restored), within the bounds."""
        if len(entry.payload) > self.max_bytes:
            self.evicted += 1
            return False
        self._entries.append(entry)
        self.bytes += len(entry.payload)
        while len(self._entries) > self.max_count or self.bytes > self.max_bytes:
            self.bytes -= len(self._entries.popleft().payload)
            self.evicted += 1
        return True

    def latest(self, limit: int) -> list[DeadEntry]:
        """The ``limit`` latest, oldest first (all for 0)."""
        entries = list(self._entries)
        return entries[-limit:] if limit else entries

    def take(self, ids: Iterable[str] | None) -> tuple[list[DeadEntry], list[str]]:
        """Remove the dead letters named (all for ``None``): those found, oldest first, and the
        ids not found."""
        if ids is None:
            taken = list(self._entries)
            self._entries.clear()
            self.bytes = 0
            return taken, []
        wanted = dict.fromkeys(ids)
        taken, kept = [], deque[DeadEntry]()
        for entry in self._entries:
            if entry.message_id in wanted:
                del wanted[entry.message_id]
                taken.append(entry)
            else:
                kept.append(entry)
        self._entries = kept
        self.bytes -= sum(len(entry.payload) for entry in taken)
        return taken, list(wanted)
