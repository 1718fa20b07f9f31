"""The outbox of a client process: what ``publish()`` queued, turned into PUBLISH requests.

Publishers append messages (any thread); the I/O thread takes them out in batches. Natural
batching: each turn sends whatever the outbox holds, as one request per run of consecutive
messages of the same type (never reordering across types: docs/guarantees.md). When idle a batch
is one message, so latency does not suffer; under load batches grow up to ``max_batch``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..core import codec
from ..exceptions import MessageSerializationError
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire

__all__ = ["FlushMarker", "Outbox"]

logger = logging.getLogger(__name__)


class FlushMarker:
    """Placed in the outbox by ``flush()``: done once the hub confirmed everything before it."""

    __slots__ = ("done", "token")

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.done = threading.Event()


class Outbox:
    """Messages and flush markers in publish order; ``take()`` makes the next request."""

    def __init__(self, max_batch: int, on_error: Callable[[BaseException], None]) -> None:
        self.items: deque[Message | FlushMarker] = deque()
        self._max_batch = max_batch
        self._on_error = on_error
        self.grouped: frozenset[bytes] = frozenset()  # topics with queue groups: split codec
        self._topics: dict[type, bytes] = {}
        self.flushes: dict[bytes, FlushMarker] = {}  # sent, waiting for FLUSHED

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: Message | FlushMarker) -> None:
        self.items.append(item)

    def take(self) -> list[Any] | None:
        """The next request to send (``None``: nothing to send). Takes a run of messages of
        one type, or one flush marker (remembered until its FLUSHED comes back)."""
        items = self.items
        while items:
            first = items.popleft()
            if isinstance(first, FlushMarker):
                self.flushes[first.token] = first
                return wire.flush(first.token)
            cls = type(first)
            topic = self._topic(cls)
            split = topic in self.grouped
            limit = wire.MAX_SPLIT_BATCH if split else self._max_batch
            batch = [first]
            while items and len(batch) < limit and type(items[0]) is cls:
                batch.append(items.popleft())  # type: ignore[arg-type]
            request = self._encode(cls, topic, split, batch)
            if request is not None:
                return request
        return None

    def flushed(self, token: bytes) -> None:
        marker = self.flushes.pop(token, None)
        if marker is not None:
            marker.done.set()

    def resend_flushes(self) -> None:
        """Flushes a lost hub never confirmed: ask the next one, after what is queued."""
        self.items.extend(self.flushes.values())
        self.flushes.clear()

    def _topic(self, cls: type) -> bytes:
        topic = self._topics.get(cls)
        if topic is None:
            topic = self._topics[cls] = wire.topic_for(get_unique_name_for_message(cls))
        return topic

    def _encode(
        self, cls: type, topic: bytes, split: bool, batch: list[Message]
    ) -> list[Any] | None:
        published_at = time.time()
        encode = codec.encode_split if split else codec.encode_batch
        try:
            codec_id, frames = encode(cls, batch)
        except MessageSerializationError as exc:
            # Only the first message of a type is checked in publish(); a later one that cannot
            # be serialised is reported to the publisher's next publish()/flush() and logged.
            # It costs only itself: the rest of its batch is sent.
            self._on_error(exc)
            batch = [message for message in batch if _serialisable(cls, message)]
            logger.error("dropped %s that cannot be serialised: %s", cls.__qualname__, exc)
            if not batch:
                return None
            codec_id, frames = encode(cls, batch)
        meta = wire.pack_meta(codec_id, len(batch), published_at)
        return wire.publish(topic, meta, frames)


def _serialisable(cls: type, message: Message) -> bool:
    try:
        codec.encode_batch(cls, [message])
    except MessageSerializationError:
        return False
    return True
