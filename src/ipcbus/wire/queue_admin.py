"""The wire frames of queue administration (``ipcbus queues``, ``dead-letters``, ``requeue``,
``purge``, ``delete-queue`` and their Python API), and the records they answer with. Imports
neither side, nor zmq.

client control DEALER → hub control ROUTER, without HELLO (like STATS: one round trip on a
connection that proved the bus secret):

    QUEUE_ADMIN ``[op, *args]`` → QUEUE_ADMIN ``[status, json, *payloads]``
        ``queues``                                   every group, its counts and rates
        ``dead-letters`` topic, queue, limit, 0|1    the latest ``limit`` (0: all) dead letters,
                                                     with their payloads (one frame each) if 1
        ``requeue`` topic, queue, ids                dead letters back into the group, attempt
                                                     reset (ids space-separated; empty: all)
        ``purge`` topic, queue                       drop what the group holds (not in flight)
        ``delete`` topic, queue                      delete a group without consumers

status is ``ok``, ``unknown`` (no such group) or ``in-use`` (delete: it has consumers). A
malformed request raises ``ValueError`` in ``parse_request``: the hub counts and drops it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from .frames import QUEUE_ADMIN, _count, check_topic, header

__all__ = [
    "DEAD_LETTERS",
    "DELETE",
    "MAX_IDS_BYTES",
    "PURGE",
    "QUEUES",
    "QUEUE_ADMIN",
    "REQUEUE",
    "STATUS_IN_USE",
    "STATUS_OK",
    "STATUS_UNKNOWN",
    "AdminRequest",
    "DeadLetterRecord",
    "QueueStatistics",
    "Reply",
    "parse_request",
    "reply",
    "request",
]

QUEUES = b"queues"
DEAD_LETTERS = b"dead-letters"
REQUEUE = b"requeue"
PURGE = b"purge"
DELETE = b"delete"
_ARGS = {QUEUES: 0, DEAD_LETTERS: 4, REQUEUE: 3, PURGE: 2, DELETE: 2}

STATUS_OK = b"ok"
STATUS_UNKNOWN = b"unknown"
STATUS_IN_USE = b"in-use"
_STATUSES = frozenset({STATUS_OK, STATUS_UNKNOWN, STATUS_IN_USE})

# The ids of one requeue request: a group keeps at most max_dead_letters (1 000) of ~30 bytes
# each; anything much longer is not a request of ours.
MAX_IDS_BYTES = 1024 * 1024


def request(op: bytes, *args: bytes) -> list[bytes]:
    return [header(QUEUE_ADMIN), op, *args]


@dataclass(frozen=True)
class AdminRequest:
    op: bytes
    topic: bytes = b""
    queue_name: str = ""
    limit: int = 0
    payloads: bool = False
    ids: tuple[str, ...] | None = None  # requeue: None for all


def parse_request(body: Sequence[bytes]) -> AdminRequest:
    op, *args = body
    if op not in _ARGS or len(args) != _ARGS[op]:
        raise ValueError(f"bad queue admin request {op[:16]!r} with {len(args)} arguments")
    if op == QUEUES:
        return AdminRequest(op)
    topic, name = check_topic(args[0]), args[1].decode()
    if not name:
        raise ValueError("empty queue name")
    if op == DEAD_LETTERS:
        if args[3] not in (b"0", b"1"):
            raise ValueError(f"bad payloads flag {args[3][:8]!r}")
        return AdminRequest(op, topic, name, limit=_count(args[2]), payloads=args[3] == b"1")
    if op == REQUEUE:
        if len(args[2]) > MAX_IDS_BYTES:
            raise ValueError(f"{len(args[2])} bytes of message ids")
        ids = tuple(args[2].decode().split())
        return AdminRequest(op, topic, name, ids=ids or None)
    return AdminRequest(op, topic, name)


def reply(status: bytes, body: object, payloads: Sequence[bytes] = ()) -> list[bytes]:
    """The answer's frames after the ROUTER's identity."""
    return [header(QUEUE_ADMIN), status, json.dumps(body).encode(), *payloads]


@dataclass(frozen=True)
class Reply:
    status: bytes
    body: Any
    payloads: list[bytes]

    @classmethod
    def parse(cls, frames: Sequence[bytes]) -> Reply:
        """``frames`` after the header."""
        status, body, *payloads = frames
        if status not in _STATUSES:
            raise ValueError(f"unknown status {status[:16]!r}")
        return cls(status, json.loads(body), list(payloads))


def _known(cls: type, row: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``cls`` in ``row`` (a newer hub may send more)."""
    names = {field.name for field in fields(cls)}
    return {key: value for key, value in row.items() if key in names}


@dataclass(frozen=True)
class QueueStatistics:
    """One queue group as ``Hub.queues()`` / ``ipcbus queues`` report it. Counts are since the
    hub started; rates are per second over the last ~10 s."""

    queue: str  # "<message type>/<queue name>", as ipcbus commands take it
    consumers: int
    held: int  # waiting for a consumer, retries waiting out their delay included
    in_flight: int  # delivered, not settled
    published: int
    delivered: int
    acked: int
    redelivered: int  # given back by a consumer that left, to be delivered again
    retried: int
    dead_lettered: int
    rejected_dropped: int
    dead_letters: int  # kept now (bounded)
    dead_letter_bytes: int
    dead_letters_evicted: int  # dropped to stay within the bounds
    max_dead_letters: int  # the bounds (HubOptions)
    max_dead_letter_bytes: int
    requeued: int
    purged: int
    publish_rate: float
    ack_rate: float
    held_bytes: int = 0  # the payloads of what is held (a group is full at max_held_bytes)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> QueueStatistics:
        return cls(**_known(cls, row))


@dataclass(frozen=True)
class DeadLetterRecord:
    """A dead letter the hub keeps: its message as the publisher pickled it (``payload``; ``None``
    when not asked for), ``codec`` the codec id it is encoded with."""

    queue: str
    message_id: str
    attempts: int
    error: str
    when: float  # time.time() at the hub when the message was declared dead
    codec: str
    size: int
    payload: bytes | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], payload: bytes | None) -> DeadLetterRecord:
        return cls(**_known(cls, row), payload=payload)
