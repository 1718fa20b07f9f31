"""Queue administration in the hub (hub process): answers QUEUE_ADMIN requests (``ipcbus
queues``, ``dead-letters``, ``requeue``, ``purge``, ``delete-queue``) from the queue book.

Pure bookkeeping, no sockets: the control plane hands it a request's frames and sends the frames
it returns. A malformed request raises ``ValueError`` before anything changes (the relay counts
and drops it); payloads stay opaque bytes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from ..wire import queue_admin as wire
from ..wire.frames import unique_name_of, unpack_meta
from ..wire.sizes import pack_sizes
from .queues import QueueBook, QueueGroup
from .runs import Run

__all__ = ["QueueAdmin"]

logger = logging.getLogger(__name__)

GroupKey = tuple[bytes, str]
# Rates are over this window, sampled once a second (a sample is one tuple per group).
_SAMPLE_EVERY = 1.0
_WINDOW = 10


class QueueAdmin:
    def __init__(self, book: QueueBook) -> None:
        self._book = book
        self._purged: dict[GroupKey, int] = {}
        self._samples: deque[tuple[float, dict[GroupKey, tuple[int, int]]]] = deque(
            maxlen=_WINDOW + 1
        )
        self._next_sample = 0.0

    def sample(self, now: float) -> None:
        """Called every loop turn; records (published, acked) per group once a second."""
        if now < self._next_sample:
            return
        self._next_sample = now + _SAMPLE_EVERY
        counts = {
            (group.topic, group.name): (group.counts["published"], group.counts["acked"])
            for group in self._book.groups()
        }
        self._samples.append((now, counts))

    def handle(
        self, body: list[bytes], now: float, delete: Callable[[bytes, str], int | None]
    ) -> list[bytes]:
        """The answer to one request (after the ROUTER identity); ``ValueError`` if malformed.

        ``delete(topic, name)`` deletes a group as ``delete_queue`` does (the control plane also
        rewrites the groups file and tells the clients): the messages dropped, ``None`` if the
        group has consumers."""
        request = wire.parse_request(body)
        if request.op == wire.QUEUES:
            return wire.reply(wire.STATUS_OK, [self._row(g, now) for g in self._book.groups()])
        label = f"{unique_name_of(request.topic)}/{request.queue_name}"
        group = self._book.group(request.topic, request.queue_name)
        if group is None:
            return wire.reply(wire.STATUS_UNKNOWN, {"queue": label})
        if request.op == wire.DEAD_LETTERS:
            return self._dead_letters(group, label, request.limit, request.payloads)
        if request.op == wire.REQUEUE:
            return self._requeue(group, label, request.ids)
        if request.op == wire.PURGE:
            return self._purge(group, label)
        dropped = delete(request.topic, request.queue_name)
        if dropped is None:
            return wire.reply(wire.STATUS_IN_USE, {"queue": label})
        self._purged.pop((request.topic, request.queue_name), None)
        return wire.reply(wire.STATUS_OK, {"dropped": dropped})

    def _row(self, group: QueueGroup, now: float) -> dict[str, object]:
        counts = group.statistics()
        dead = group.dead
        publish_rate = ack_rate = 0.0
        key = (group.topic, group.name)
        for when, sampled in self._samples:  # the oldest sample that knew the group
            if key in sampled and now - when <= _WINDOW + _SAMPLE_EVERY and now > when:
                published, acked = sampled[key]
                publish_rate = (counts["published"] - published) / (now - when)
                ack_rate = (counts["acked"] - acked) / (now - when)
                break
        return {
            "queue": f"{unique_name_of(group.topic)}/{group.name}",
            **{name: counts[name] for name in _COUNTS},
            "dead_letters": len(dead),
            "dead_letter_bytes": dead.bytes,
            "dead_letters_evicted": dead.evicted,
            "max_dead_letters": dead.max_count,
            "max_dead_letter_bytes": dead.max_bytes,
            "requeued": dead.requeued,
            "purged": self._purged.get(key, 0),
            "publish_rate": publish_rate,
            "ack_rate": ack_rate,
        }

    @staticmethod
    def _dead_letters(group: QueueGroup, label: str, limit: int, payloads: bool) -> list[bytes]:
        entries = group.dead.latest(limit)
        rows = [
            {
                "queue": label,
                "message_id": entry.message_id,
                "attempts": entry.attempts,
                "error": entry.error,
                "when": entry.when,
                "codec": _codec(entry.meta),
                "size": len(entry.payload),
            }
            for entry in entries
        ]
        body = {
            "dead_letters": rows,
            "kept": len(group.dead),
            "evicted": group.dead.evicted,
            "max_count": group.dead.max_count,
            "max_bytes": group.dead.max_bytes,
        }
        return wire.reply(
            wire.STATUS_OK, body, [entry.payload for entry in entries] if payloads else ()
        )

    def _requeue(self, group: QueueGroup, label: str, ids: tuple[str, ...] | None) -> list[bytes]:
        taken, missing = group.dead.take(ids)
        for entry in taken:
            # Back at the end of the group, as if published again, with its own id and a fresh
            # count of attempts (the consumer's policy applies anew).
            number = int(entry.message_id.rpartition("-")[2])
            payload = memoryview(entry.payload)
            sizes = memoryview(pack_sizes([len(entry.payload)]))
            group.push(Run(entry.meta, sizes, payload, number, 1))
        group.dead.requeued += len(taken)
        if taken and self._book.journal is not None:
            self._book.journal.rewrite()  # the journal has them dead: a checkpoint says otherwise
        if taken:
            logger.info("queue group %s: %d dead letters requeued", label, len(taken))
        return wire.reply(wire.STATUS_OK, {"requeued": len(taken), "missing": missing})

    def _purge(self, group: QueueGroup, label: str) -> list[bytes]:
        purged = group.clear()
        key = (group.topic, group.name)
        self._purged[key] = self._purged.get(key, 0) + purged
        if purged and self._book.journal is not None:
            self._book.journal.rewrite()  # the journal holds them: a checkpoint drops them
        logger.warning("queue group %s purged: %d held messages dropped", label, purged)
        return wire.reply(wire.STATUS_OK, {"purged": purged})


_COUNTS = (
    "consumers",
    "held",
    "in_flight",
    "published",
    "delivered",
    "acked",
    "redelivered",
    "retried",
    "dead_lettered",
    "rejected_dropped",
)


def _codec(meta: bytes) -> str:
    try:
        return unpack_meta(meta)[0].decode(errors="replace")
    except ValueError:  # pragma: no cover - the meta of a batch the hub accepted
        return "?"
