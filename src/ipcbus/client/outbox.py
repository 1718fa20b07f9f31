"""The outbox of a client process: what ``publish()`` queued, turned into PUBLISH requests.

Publishers append messages (any thread); the I/O thread takes them out in batches. Natural
batching: each turn sends whatever the outbox holds, as one request per run of consecutive
messages of the same type (never reordering across types: docs/guarantees.md). When idle a batch
is one message, so latency does not suffer; under load batches grow up to ``max_batch``, and up to
what fits in one frame: the hub announces the largest frame it accepts (``max_message_size``;
ZeroMQ drops the connection of a peer that sends a larger one, and every message in the pipe with
it). The outbox learns, per type, how many bytes a message adds to a batch, takes no more messages
than fit, and splits a batch that turns out larger before it is sent.

A message that cannot go (it cannot be serialised, or alone it is over the limit) is rejected
alone: counted by its position (how many messages ``publish()`` had accepted before it) and handed
to ``on_reject``; its neighbours are sent.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import big_fields, codec
from ..exceptions import MessageSerializationError, MessageTooLargeError
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from .confirm import Unconfirmed
from .spool import Spool
from .spool_counts import SpoolCounts

__all__ = ["FRAME_MARGIN", "FlushMarker", "Kind", "Outbox", "Prepared", "Rejected"]

logger = logging.getLogger(__name__)

# Bytes kept free below the hub's max_message_size in every frame. ZeroMQ compares the size of the
# frame as it travels: over ipc:// and plain tcp:// that is the frame itself, under CURVE
# (tcp:// hubs) the encrypted frame, 33 bytes longer (measured with libzmq 4.3.5: a frame of
# limit - 33 bytes passes, one of limit - 32 costs the connection).
FRAME_MARGIN = 64
# Out-of-band bytes in one batch at most, and bytes of a split batch (queue groups); a message
# alone may bring more. A subscriber gets nothing of a batch until all of it has arrived, and the
# hub relays a batch only once it has all of it: 64 8 MB payloads went as batches of 248 MB (what
# fits the hub's limit), each hop waited for the whole of the one before, and the subscriber saw
# nothing for 3.8 s, then 31 at once. One payload a batch: the first after 0.2 s, peak RSS of the
# subscriber 570-770 -> 60-70 MB and of the hub 370 -> 110-240 MB, CPU of all processes -23 %.
# Batching saves a few us per frame: nothing beside a MiB.
BIG_BATCH_BYTES = 1024 * 1024

Encode = Callable[[type, Sequence[Message]], tuple[bytes, list[Any]]]


class FlushMarker:
    """Placed in the outbox by ``flush()``: done once the hub confirmed everything before it."""

    __slots__ = ("done", "sent", "token")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.done = threading.Event()
        self.sent = 0  # messages sent before this marker (set when it is taken)


class Prepared:
    """A request its caller built already (a ``request()``, a reply): sent alone, as it is, in
    its place in publish order. Counts as one message."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[Any]) -> None:
        self.frames = frames


@dataclass(slots=True)
class Kind:
    """What the outbox knows of one message type. Never the class itself: the table of kinds is
    weak, and a value that referred to its class would keep it alive."""

    topic: bytes
    # Bytes one message adds to a batch's payload frame, as last measured (the first message of
    # the type is measured in publish()): how many to take so that a batch fits in one frame.
    per_message: int
    # Out-of-band buffers (protocol 5: large arrays) per message, as last measured: a batch
    # holding more than MAX_BUFFERS would be pickled in-band, copying every one of them.
    buffers: int = 0
    # Their bytes per message, as last measured: a batch takes no more messages than keep all
    # its frames together within the hub's limit (8 MB payloads: a batch of 64 would be 512 MB).
    buffer_bytes: int = 0
    # Messages of the type have brought out-of-band buffers: publish() measures the fields of
    # each of them against the limit (never reset: big and small ones may alternate).
    big: bool = False


@dataclass(frozen=True)
class Rejected:
    """A message ``publish()`` accepted and the outbox could not send."""

    type_name: str
    position: int  # how many messages publish() had accepted before it (0-based)
    reason: str


class Outbox:
    """Messages and flush markers in publish order; ``take()`` makes the next request."""

    def __init__(self, max_batch: int, on_reject: Callable[[Rejected], None]) -> None:
        self.items: deque[Message | FlushMarker | Prepared] = deque()
        self._max_batch = max_batch
        self._on_reject = on_reject
        self.grouped: frozenset[bytes] = frozenset()  # topics with queue groups: split codec
        # Per message type, weak (types created at run time are not kept alive); one lookup per
        # batch.
        self.kinds: weakref.WeakKeyDictionary[type, Kind] = weakref.WeakKeyDictionary()
        # The type taken last and its kind: a WeakKeyDictionary lookup is a Python call, and a
        # quiet publisher's batches are one message each.
        self._last_kind: tuple[weakref.ref[type], Kind] | None = None
        self.flushes: dict[bytes, FlushMarker] = {}  # sent, waiting for FLUSHED
        self.max_message_size = 0  # the hub's, from its WELCOME
        self.spool: Spool | None = None  # the hub's spool directory, from its WELCOME
        self.spool_counts = SpoolCounts()  # what went through the spools of every hub
        self.frame_budget = 1  # the largest frame sent
        # Counted on the I/O thread: messages taken (sent or rejected), sent, and, of those sent,
        # confirmed by a FLUSHED.
        self.taken = 0
        self.sent = 0
        self.confirmed = 0
        self.confirm = Unconfirmed()  # what the hub has not confirmed: asked for, kept
        self._retokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self.items)

    def set_limit(self, max_message_size: int) -> None:
        """The hub's ``max_message_size`` (each WELCOME: a restarted hub may have another)."""
        self.max_message_size = max_message_size
        self.frame_budget = max(1, max_message_size - FRAME_MARGIN)

    def append(self, item: Message | FlushMarker | Prepared) -> None:
        self.items.append(item)

    def check(self, message: Message) -> Kind:
        """Encode the first message of a type as ``take()`` would (publisher's thread): raise
        ``MessageSerializationError`` or ``MessageTooLargeError`` if it cannot go, else learn
        the type."""
        cls = type(message)
        name = get_unique_name_for_message(cls)
        topic = wire.topic_for(name)
        encode = codec.encode_split if topic in self.grouped else codec.encode_batch
        _codec, frames = encode(cls, [message])
        biggest = max(len(frame) for frame in frames)
        if biggest > self.frame_budget:
            raise MessageTooLargeError(f"{name}: {self._too_large(biggest)}; nothing was sent")
        if topic in self.grouped:  # [sizes, payloads]
            kind = Kind(topic, max(1, len(frames[1])))
        else:
            buffers = frames[1:]
            kind = Kind(
                topic,
                max(1, len(frames[0])),
                len(buffers),
                sum(map(len, buffers)),
                bool(buffers),
            )
        return self._learn(cls, kind)

    def _learn(self, cls: type, kind: Kind) -> Kind:
        self.kinds[cls] = kind
        self._last_kind = (weakref.ref(cls), kind)
        return kind

    def _kind_of(self, cls: type) -> Kind:
        kind = self.kinds.get(cls)
        if kind is None:  # publish() learns each type; this is only a fallback
            kind = self._learn(cls, Kind(wire.topic_for(get_unique_name_for_message(cls)), 1))
        else:
            self._last_kind = (weakref.ref(cls), kind)
        return kind

    def check_fields(self, message: Message) -> None:
        """For a type whose messages bring big buffers, every message (publisher's thread):
        ``MessageTooLargeError`` when one of its fields alone is over the limit. Cheaper than
        encoding it (``check``), and it catches what would otherwise be rejected on the I/O
        thread, after ``publish()`` returned."""
        largest = big_fields.largest_field(message)
        if largest > self.frame_budget:
            name = get_unique_name_for_message(type(message))
            raise MessageTooLargeError(f"{name}: {self._too_large(largest)}; nothing was sent")

    def take(self, room: int | None = None) -> list[Any] | None:
        """The next request to send (``None``: nothing to send). Takes a run of messages of
        one type, or one flush marker (remembered until its FLUSHED comes back)."""
        confirm = self.confirm
        if confirm.resend:  # a new hub: first what the dead one did not confirm (grouped)
            return confirm.resend.popleft()
        token = confirm.ask(time.monotonic())
        if token is not None:
            return self.confirmation(token)
        return self.take_items(room)

    def take_items(self, room: int | None = None) -> list[Any] | None:
        """As ``take()``, from the queued items only: no confirmation asked first. ``room``:
        messages one batch may take at most (what is left below the unconfirmed bound)."""
        items = self.items
        while items:
            first = items.popleft()
            if isinstance(first, FlushMarker):
                first.sent = self.sent
                self.flushes[first.token] = first
                return wire.flush(first.token)
            if isinstance(first, Prepared):
                self.taken += 1
                self.sent += 1
                return first.frames
            cls = type(first)
            last = self._last_kind
            kind = last[1] if last is not None and last[0]() is cls else self._kind_of(cls)
            split = kind.topic in self.grouped
            batch = [first]
            if items and type(items[0]) is cls:  # a run of its type: a batch, up to the limit
                limit = self._batch_limit(kind, split)
                if room is not None:
                    limit = min(limit, max(1, room))
                while items and len(batch) < limit and type(items[0]) is cls:
                    batch.append(items.popleft())  # type: ignore[arg-type]
            waiting, taken = len(items), self.taken
            try:
                request = self._encode(cls, kind, split, batch)
            except BaseException:
                # Not a message's failure (those are rejected alone, and the codec makes any of
                # them one): a bug of ours, and the I/O thread ends. What it took goes back, for
                # close() to count in undelivered: the batch's first messages, less what _encode
                # put back itself (the last ones) and the one it rejected (counted already).
                kept = len(batch) - (len(items) - waiting) - (self.taken - taken)
                items.extendleft(reversed(batch[:kept]))
                raise
            if request is not None:
                return request
        return None

    def _batch_limit(self, kind: Kind, split: bool) -> int:
        """How many messages of ``kind`` one batch takes at most."""
        # A split batch is one frame too (sizes aside), and has no out-of-band buffers.
        limit = min(self._max_batch, self.frame_budget // kind.per_message)
        if split:  # the hub hands out nothing of a batch before it has all of it either
            limit = min(limit, BIG_BATCH_BYTES // kind.per_message)
        elif kind.buffers:
            limit = min(limit, wire.MAX_BUFFERS // kind.buffers)
            per_message = kind.per_message + kind.buffer_bytes
            limit = min(limit, min(self.frame_budget, BIG_BATCH_BYTES) // per_message)
        return max(1, limit)

    def confirmation(self, token: bytes) -> list[Any]:
        """A FLUSH of the client's own: the hub's answer confirms what was sent before it."""
        marker = FlushMarker(token)
        marker.sent = self.sent
        self.flushes[token] = marker
        return wire.flush(token)

    def flushed(self, token: bytes) -> None:
        marker = self.flushes.pop(token, None)
        if marker is not None:
            self.confirmed = max(self.confirmed, marker.sent)
            self.confirm.confirmed(marker.sent)
            marker.done.set()

    def resend_flushes(self) -> None:
        """Flushes a lost hub never confirmed: ask the next one, after what is queued, each
        under a new token. The first request may still be in the data pipe, which ZeroMQ hands
        to the next hub: its answer, coming before what is sent again, must not confirm it."""
        for marker in self.flushes.values():
            marker.token = b"%s/%d" % (marker.token.partition(b"/")[0], next(self._retokens))
            self.items.append(marker)
        self.flushes.clear()
        # A confirmation asked of the lost hub is no longer outstanding: it went back behind
        # what is queued, which the unconfirmed bound may hold back (DataChannel asks anew).
        self.confirm.asking = False

    def unconfirmed(self) -> int:
        """Messages accepted and not confirmed by a hub: still here, or sent and not confirmed
        by a FLUSHED (rejected ones are not counted: they were reported)."""
        return self.never_sent() + self.sent - self.confirmed

    def never_sent(self) -> int:
        return sum(not isinstance(item, FlushMarker) for item in list(self.items))

    # -- encoding ------------------------------------------------------------------------------

    def _encode(self, cls: type, kind: Kind, split: bool, batch: list[Message]) -> list[Any] | None:
        """The request for ``batch``, or for the part of it that can go now (the rest goes back
        to the front of the outbox); ``None`` when none of it can."""
        published_at = time.time()
        encode: Encode = codec.encode_split if split else codec.encode_batch
        try:
            codec_id, frames = encode(cls, batch)
        except MessageSerializationError:
            frames = []
        # The usual batch, one payload frame within the limit, is judged without a call.
        if not frames or (
            (len(frames) != 1 or len(frames[0]) > self.frame_budget)
            and self._too_big(frames, len(batch))
        ):
            # The hot path serialises whole batches; only a batch that failed, or came out too
            # large, is looked at message by message.
            batch = self._trim(encode, cls, split, batch)
            if not batch:
                return None
            try:
                codec_id, frames = encode(cls, batch)
                fits = not self._too_big(frames, len(batch))
            except MessageSerializationError:
                fits = False
            if not fits:  # each one is fine alone, not together (never seen): one at a time
                batch = self._put_back(batch, 1)
                try:
                    codec_id, frames = encode(cls, batch)
                except MessageSerializationError as exc:  # fine a moment ago: pickling varies
                    self._reject(cls, str(exc), self.taken)
                    return None
        count = len(batch)
        self.taken += count
        self.sent += count
        if split:  # [sizes, payloads]
            kind.per_message = max(1, -(-len(frames[1]) // count))
        else:
            kind.per_message = max(1, -(-len(frames[0]) // count))
            if len(frames) > 1:
                kind.buffers = -(-(len(frames) - 1) // count)
                kind.buffer_bytes = -(-sum(len(frame) for frame in frames[1:]) // count)
                kind.big = True
                if self.spool is not None:  # big buffers to files, not through the sockets
                    codec_id, frames = self.spool.store(kind.topic, codec_id, frames)
        meta = wire.pack_meta(codec_id, count, published_at)
        if split:  # numbered: a new hub with the journal drops a copy the dead one journaled
            request = wire.publish_numbered(kind.topic, meta, frames, self.sent)
            self.confirm.sent(self.sent, kind.topic, count, request)
        else:
            request = wire.publish(kind.topic, meta, frames)
            self.confirm.sent(self.sent, kind.topic, count, None)
        return request

    def _trim(self, encode: Encode, cls: type, split: bool, batch: list[Message]) -> list[Message]:
        """The longest prefix of ``batch`` whose messages can go, and fit one frame together
        (judged by the sum of their sizes alone, which exceeds the batch's: one pickle header
        each). A message after it that cannot go at all is rejected; the rest goes back."""
        budget = self.frame_budget
        total = 0
        for index, message in enumerate(batch):
            try:
                _codec, frames = encode(cls, [message])
            except MessageSerializationError as exc:
                reason = str(exc)
            else:
                biggest = max(len(frame) for frame in frames)
                if biggest > budget:
                    reason = self._too_large(biggest)
                else:
                    total += len(frames[1]) if split else sum(len(frame) for frame in frames)
                    if total <= budget or not index:  # alone, each of its frames fits
                        continue
                    return self._put_back(batch, index)  # fits alone: the next batch
            # Rejected once the messages before it are taken: that is its position.
            self.items.extendleft(reversed(batch[index + 1 :]))
            self._reject(cls, reason, self.taken + index)
            return batch[:index]
        return batch

    def _too_big(self, frames: list[Any], count: int) -> bool:
        """A frame over the limit (ZeroMQ would drop the connection), or several messages whose
        frames add up to more than it (one message alone may: each of its frames fits)."""
        budget = self.frame_budget
        if len(frames) == 1:  # the usual batch: one payload frame
            return len(frames[0]) > budget
        if max(len(frame) for frame in frames) > budget:
            return True
        return count > 1 and sum(len(frame) for frame in frames) > budget

    def _put_back(self, batch: list[Message], keep: int) -> list[Message]:
        """Keep ``batch[:keep]``; the rest goes back to the front of the outbox, in order."""
        self.items.extendleft(reversed(batch[keep:]))
        return batch[:keep]

    def _reject(self, cls: type, reason: str, position: int) -> None:
        self.taken += 1
        self._on_reject(Rejected(get_unique_name_for_message(cls), position, reason))

    def _too_large(self, size: int) -> str:
        return (
            f"it encodes to a frame of {size} bytes, over the {self.max_message_size} bytes the "
            f"hub accepts (HubOptions.max_message_size, less {FRAME_MARGIN} bytes of margin)"
        )
