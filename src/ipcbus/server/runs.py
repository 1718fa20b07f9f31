"""Runs: the hub's unit of queue state (hub process). Pure data, no sockets.

A run is consecutive messages of one producer batch with the same history, held as the batch's
own sizes and payloads (views, never copies, never unpickled). It is cut only where a rule needs
it: a consumer's credit or fair share, or one message of it that failed, was rejected or died.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..wire.sizes import SIZE_BYTES, unpack_sizes

__all__ = ["InFlight", "Run", "overlapping"]

_UNSETTLED = re.compile(b"\x00+")


@dataclass(eq=False, slots=True)
class Run:
    meta: bytes
    sizes: memoryview  # one little-endian uint32 per message, as on the wire
    payloads: memoryview  # the messages' pickles, end to end
    first_id: int  # its messages are numbered first_id, first_id + 1, ... (their message ids)
    count: int
    attempt: int = 0  # deliveries so far
    rejected_by: set[tuple[bytes, bytes]] | None = None  # consumers whose predicate said no

    def part(self, low: int, high: int) -> Run:
        """Messages ``low`` to ``high - 1`` as a run of their own (sharing the bytes)."""
        start = sum(unpack_sizes(self.sizes[: low * SIZE_BYTES])) if low else 0
        end = start + sum(unpack_sizes(self.sizes[low * SIZE_BYTES : high * SIZE_BYTES]))
        return Run(
            self.meta,
            self.sizes[low * SIZE_BYTES : high * SIZE_BYTES],
            self.payloads[start:end],
            self.first_id + low,
            high - low,
            self.attempt,
            set(self.rejected_by) if self.rejected_by else None,
        )

    def split_off(self, count: int) -> Run:
        """The first ``count`` messages as a run of their own; this one keeps the rest."""
        head = self.part(0, count)
        self.sizes = self.sizes[count * SIZE_BYTES :]
        self.payloads = self.payloads[len(head.payloads) :]
        self.first_id += count
        self.count -= count
        return head

    def payload_list(self) -> list[bytes]:
        """Each message's payload (for inspection: the hub itself never splits them)."""
        parts, start = [], 0
        for size in unpack_sizes(self.sizes):
            parts.append(bytes(self.payloads[start : start + size]))
            start += size
        return parts


@dataclass(eq=False, slots=True)
class InFlight:
    """A run delivered to one consumer as its deliveries ``first_seq`` ... ``last_seq``.

    What is settled is a prefix while acks come in order (a consumer acks a long run as it goes),
    and a map of messages only once they do not."""

    run: Run
    first_seq: int
    left: int = -1  # deliveries not settled yet
    prefix: int = 0  # messages 0 .. prefix - 1 are settled (while ``settled`` is None)
    settled: bytearray | None = None  # per message, once acks came out of order

    def __post_init__(self) -> None:
        self.left = self.run.count

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.run.count - 1

    def settle(self, low: int, high: int, parts: bool) -> tuple[int, list[Run]]:
        """Settle messages ``low`` to ``high - 1`` of the run: how many were not settled before
        (an ack twice settles nothing the second time), and, with ``parts``, those as runs."""
        run = self.run
        if self.settled is None:
            if low == self.prefix:  # in order: the whole run, or the next part of it
                if high == run.count and low == 0:
                    self.left = 0
                    return run.count, [run] if parts else []
                self.prefix = high
                self.left -= high - low
                return high - low, [run.part(low, high)] if parts else []
            self.settled = bytearray(run.count)
            self.settled[: self.prefix] = b"\x01" * self.prefix
        settled = self.settled
        count, found = 0, []
        for match in _UNSETTLED.finditer(settled, low, high):
            start, end = match.span()
            if parts:
                found.append(run.part(start, end))
            settled[start:end] = b"\x01" * (end - start)
            count += end - start
        self.left -= count
        return count, found

    def unsettled(self) -> list[Run]:
        """What is not settled, in order (given back when the consumer leaves)."""
        run = self.run
        if self.settled is None:
            if not self.left:
                return []
            return [run.part(self.prefix, run.count) if self.prefix else run]
        return [run.part(*match.span()) for match in _UNSETTLED.finditer(self.settled)]


def overlapping(in_flight: dict[int, InFlight], first: int, last: int) -> list[InFlight]:
    """The runs in flight (by first sequence number) that hold a delivery of ``first`` to
    ``last``."""
    entry = in_flight.get(first)
    if entry is not None and entry.last_seq >= last:
        return [entry]  # the common case: one ack entry per delivered run
    found = []
    if entry is not None:
        # Runs delivered one after the other have consecutive sequence numbers: an ack that
        # covers several (coalesced by the consumer) is found by their starts.
        while entry is not None and entry.first_seq <= last:
            found.append(entry)
            entry = in_flight.get(entry.last_seq + 1)
        if found[-1].last_seq >= last:
            return found
    # A range that starts or goes on where nothing is in flight (settled, or never sent).
    return [e for e in in_flight.values() if e.first_seq <= last and e.last_seq >= first]
