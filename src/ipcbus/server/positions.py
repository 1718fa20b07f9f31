"""Which batches the hub took, by publisher (hub process): so that a copy a publisher sends again
to a new hub is dropped when that hub has the batch already.

A client numbers each batch of a topic with queue groups with its *position*: the messages it
sent up to the batch's last (``wire.publish_numbered``). One DEALER per client keeps its batches
in order and loses none while its connection lives, so what one hub read of a publisher is a set
of *runs*: from the first batch it read in a row to the last, every batch the publisher sent in
between came. A run is broken when a position goes back (a copy sent again, after the batches
ZeroMQ handed over). When a hub dies, its clients send again, flagged (``wire.AGAIN``), what it
did not confirm; a copy is a duplicate when its position is in one of the runs:

- ZeroMQ hands what was still in a client's pipe when the old hub died to the new one, before
  the copies sent again (measured: a whole burst came twice, without a journal too). What the
  old hub had already taken out of the pipe and never read (the socket buffers) is not there:
  its copies come below the pipe's positions, and are news to the new hub (measured: a burst
  to a stopped hub lost its first 1 000 of 20 000 jobs when a last position stood for them);
- with a journal, the dead hub's runs come back with what it journaled (``POSITION`` records,
  ``journal_records``): a batch it journaled is restored already.

Such a copy is dropped and counted (``duplicates_dropped``); the other copies sent again may
have been delivered by the dead hub, and the queue book delivers them as delivered once
(``attempt`` 2).

Bounded: the publishers that published last are kept (``MAX_PUBLISHERS``), each with its latest
runs (``MAX_RUNS``; a new run comes only with a copy sent again, i.e. a hub's death). One that
fell out published nothing while that many others did, so nothing of it waits to be confirmed;
a run forgotten only makes its copies come with ``attempt`` 2, never drops one.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["MAX_PUBLISHERS", "MAX_RUNS", "Positions"]

MAX_PUBLISHERS = 65_536
MAX_RUNS = 64


class _Runs:
    """One publisher's runs: disjoint, sorted ``[low, high]`` position ranges; and where this
    hub's own reading of it stands (``start``, ``last``: the run it extends)."""

    __slots__ = ("highs", "last", "lows", "start")

    def __init__(self) -> None:
        self.lows: list[int] = []
        self.highs: list[int] = []
        self.start: int | None = None
        self.last: int | None = None

    def covers(self, position: int) -> bool:
        index = bisect.bisect_right(self.lows, position) - 1
        return index >= 0 and position <= self.highs[index]

    def add(self, low: int, high: int) -> None:
        lows, highs = self.lows, self.highs
        first = bisect.bisect_left(highs, low)  # the first run that ends at or after low
        end = bisect.bisect_right(lows, high)  # past the last run that starts at or before high
        if first < end:
            low, high = min(low, lows[first]), max(high, highs[end - 1])
        lows[first:end] = [low]
        highs[first:end] = [high]
        if len(lows) > MAX_RUNS:  # the oldest positions: confirmed long ago, most likely
            del lows[0], highs[0]


class Positions:
    def __init__(self, limit: int = MAX_PUBLISHERS) -> None:
        self._runs: OrderedDict[bytes, _Runs] = OrderedDict()
        self._limit = limit

    def taken(self, publisher: bytes, position: int) -> bool:
        """Whether the batch ``publisher`` numbered ``position`` was taken already."""
        runs = self._runs.get(publisher)
        return runs is not None and runs.covers(position)

    def run(self, publisher: bytes, position: int) -> tuple[int, int]:
        """The run the batch ``publisher`` numbered ``position`` belongs to if this hub takes
        it next (``note``): it continues the run of the batch read before it, unless it goes
        back."""
        runs = self._runs.get(publisher)
        if runs is None or runs.last is None or runs.start is None or position <= runs.last:
            return position, position
        return runs.start, position

    def note(self, publisher: bytes, run: tuple[int, int]) -> None:
        """The batch that ends ``run`` (``run()``) was read by this hub (taken, or dropped as
        one it had)."""
        low, high = run
        runs = self._keep(publisher)
        runs.add(low, high)
        runs.start, runs.last = low, high

    def restore(self, publisher: bytes, low: int, high: int) -> None:
        """A run a hub before this one journaled (this hub's reading of the publisher starts
        a run of its own)."""
        if 0 <= low <= high:
            self._keep(publisher).add(low, high)

    def _keep(self, publisher: bytes) -> _Runs:
        runs = self._runs.get(publisher)
        if runs is None:
            runs = self._runs[publisher] = _Runs()
            if len(self._runs) > self._limit:
                self._runs.popitem(last=False)
        else:
            self._runs.move_to_end(publisher)
        return runs

    def items(self) -> Iterator[tuple[bytes, int, int]]:
        """Every run kept (publisher, low, high), the least recent publisher first."""
        return iter(
            [
                (publisher, low, high)
                for publisher, runs in self._runs.items()
                for low, high in zip(runs.lows, runs.highs, strict=True)
            ]
        )
