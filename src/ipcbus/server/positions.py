"""Which batches the hub took, by publisher (hub process): so that a copy a publisher sends again
to a new hub is dropped when that hub has the batch already.

A client numbers each batch of a topic with queue groups with its *position*: the messages it
sent up to the batch's last (``wire.publish_numbered``). One DEALER per client keeps its batches
in order, so a publisher's last position says which of its batches the hub took: every one at or
below it. When a hub dies, its clients send again, flagged (``wire.AGAIN``), what it did not
confirm; a copy is a duplicate when the new hub has the batch already:

- ZeroMQ hands what was still in a client's pipe when the old hub died to the new one, before
  the copies sent again (measured: a whole burst came twice, without a journal too);
- with a journal, the dead hub's positions come back with what it journaled (``POSITION``
  records, ``journal_records``): a batch it journaled is restored already.

Such a copy is dropped and counted (``duplicates_dropped``); the other copies sent again may
have been delivered by the dead hub, and the queue book delivers them as delivered once
(``attempt`` 2).

Bounded: the publishers that published last are kept (``MAX_PUBLISHERS``); one that fell out
published nothing while that many others did, so nothing of it waits to be confirmed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["MAX_PUBLISHERS", "Positions"]

MAX_PUBLISHERS = 65_536


class Positions:
    def __init__(self, limit: int = MAX_PUBLISHERS) -> None:
        self._last: OrderedDict[bytes, int] = OrderedDict()
        self._limit = limit

    def taken(self, publisher: bytes, position: int) -> bool:
        """Whether the batch ``publisher`` numbered ``position`` was taken already."""
        last = self._last.get(publisher)
        return last is not None and position <= last

    def note(self, publisher: bytes, position: int) -> None:
        """The batch ``publisher`` numbered ``position`` is taken."""
        last = self._last
        if publisher in last:
            last.move_to_end(publisher)
            if position <= last[publisher]:
                return
        last[publisher] = position
        if len(last) > self._limit:
            last.popitem(last=False)

    def items(self) -> Iterator[tuple[bytes, int]]:
        """Every publisher kept and its last position, the least recent first."""
        return iter(list(self._last.items()))

    def __len__(self) -> int:
        return len(self._last)
