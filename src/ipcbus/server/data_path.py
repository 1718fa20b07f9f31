"""What the hub does with each request on its data socket (hub process): a PUBLISH checked,
counted, held for its topic's queue groups and relayed on XPUB; a FLUSH answered once what the
client sent before it is relayed (and journaled). A numbered PUBLISH (a split batch) sent again
to this hub after another died is dropped if this hub has it already, else held as delivered
once (``positions``). Never unpickles: malformed input raises ``ValueError``, which the
serving loop counts and drops (docs/security.md)."""

from __future__ import annotations

import logging

import zmq

from ..wire import protocol as wire
from .fanout import Fanout
from .journal import Journal
from .queues import QueueBook
from .sending import send_reply
from .unrouted import Unrouted

__all__ = ["DataPath"]

logger = logging.getLogger(__name__)

Socket = zmq.Socket[bytes]


class DataPath:
    def __init__(self, book: QueueBook) -> None:
        self._book = book
        self.fanout: Fanout | None = None  # set once the hub's XPUB socket is bound
        self.journal: Journal | None = None
        self.batches = self.messages = self.bytes = 0
        self.unsplittable = 0  # messages of a grouped topic that came unsplit: no group got them
        self.duplicates = 0  # messages sent again that this hub had taken already: dropped
        self.unrouted = Unrouted()
        # A batch of a topic with queue groups came since this was last cleared: the control
        # plane has work (the serving loop skips it otherwise until its timers are due).
        self.grouped = False

    def handle(self, data: Socket, frames: list[zmq.Frame]) -> None:
        """One request, ``frames`` with the client's identity first."""
        identity, head = frames[0].bytes, frames[1].bytes
        kind = wire.parse_data_kind(head)
        if kind == wire.PUBLISH:
            self._publish(identity, *wire.parse_publish_head(head), frames)
        elif kind == wire.NUMBERED:
            self._numbered(identity, head, frames)
        elif kind == wire.FLUSH and len(frames) == 3:
            answer = wire.flushed(identity, frames[2].bytes, self._book.hub_id)
            if self.journal is not None:  # confirmed once what came before is journaled
                self.journal.answer_later(data, answer)
            else:
                send_reply(data, answer)
        else:
            raise ValueError(f"unknown data request {kind!r}")

    def _numbered(self, identity: bytes, head: bytes, frames: list[zmq.Frame]) -> None:
        flags, position, topic, meta = wire.parse_numbered_head(head)
        positions = self._book.positions
        again = flags & wire.AGAIN  # sent again: the hub before this one did not confirm it
        run = positions.run(identity, position)
        if again and positions.taken(identity, position):
            # Taken already: from the client's pipe (ZeroMQ hands it to the next hub), or
            # journaled by the hub before (restored). Checked as any batch, so that what is
            # counted is what it held (a malformed one is malformed, not a duplicate).
            self.duplicates += _checked(meta, frames)[0]
            positions.note(identity, run)  # read: the run goes on
            return
        # Sent again, the hub before may have delivered it: as delivered once (attempt 2 next).
        self._publish(identity, topic, meta, frames, 1 if again else 0, run)
        positions.note(identity, run)  # once it passed the checks

    def _publish(
        self,
        identity: bytes,
        topic: bytes,
        meta: bytes,
        frames: list[zmq.Frame],
        attempt: int = 0,
        run: tuple[int, int] | None = None,
    ) -> None:
        fanout = self.fanout
        assert fanout is not None
        count, split = _checked(meta, frames)
        if split:
            # The payloads as a view of the received frame: the hub copies no payload
            # (8 MB messages, issue 12); queue runs are views of it in turn.
            sizes, payloads = frames[2].bytes, frames[3].buffer
        self.batches += 1
        self.messages += count
        # Topic, meta and payload: what the hub relays of it.
        self.bytes += sum(map(len, frames[1:])) - wire.HEADER_LEN
        book = self._book
        grouped = book.has_groups(topic)
        if not grouped and fanout.topics.get(topic, 0) == 0:
            self.unrouted.add(topic, count)
        if grouped:
            self.grouped = True
            if split:
                # Kept whole: the book cuts it only where a consumer's credit needs it.
                publisher = None if run is None else (identity, *run)
                book.enqueue_batch(topic, meta, sizes, payloads, attempt, publisher)
            else:
                # Encoded before its publisher learned the topic has queue groups, i.e.
                # published before the group's first subscribe_async() returned.
                self.unsplittable += count
                logger.warning("%d messages of %r reached no queue group", count, topic)
        fanout.relay(topic, meta, count, frames[2:], identity)


def _checked(meta: bytes, frames: list[zmq.Frame]) -> tuple[int, bool]:
    """The message count and whether it is split, of a PUBLISH whose frames are
    ``[identity, head, payload, ...]``; ``ValueError`` when they do not hold what it says."""
    if len(frames) < 3:
        raise ValueError("PUBLISH without payload")
    codec, count, _ = wire.unpack_meta(meta)
    split = codec in wire.SPLIT_CODECS
    if split:
        if len(frames) != 4:
            raise ValueError(f"a split batch in {len(frames) - 2} frames, not 2")
        wire.check_split(count, frames[2].bytes, frames[3].buffer)
    return count, split
