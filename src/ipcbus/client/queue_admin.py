"""Looking after queue groups from any process (``Hub`` and ``HubBroker`` methods, ``ipcbus
queues`` and friends): one round trip to the hub on a connection that proves the bus secret,
without joining the bus.

A queue is named by its message type (the class, or its unique name ``module.Qualname``) and its
queue name; the commands write it ``module.Qualname/queue_name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..core import codec
from ..core.requests import check_timeout
from ..exceptions import HubUnavailableError, QueueInUseError, UnknownQueueError
from ..message import Message, get_unique_name_for_message
from ..wire import queue_admin as wire
from ..wire.frames import topic_for
from .admin import round_trip

__all__ = [
    "DeadLetterRecord",
    "QueueAdminMixin",
    "QueueStatistics",
    "Requeued",
    "decode_dead_letter",
    "parse_queue",
    "request_dead_letters",
    "request_delete",
    "request_purge",
    "request_queues",
    "request_requeue",
]

DeadLetterRecord = wire.DeadLetterRecord
QueueStatistics = wire.QueueStatistics
MessageType = type[Message] | str
_MAX_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class Requeued:
    """What ``requeue()`` did: how many dead letters went back, and the ids it did not find."""

    requeued: int
    missing: tuple[str, ...]


def parse_queue(queue: str) -> tuple[str, str]:
    """``"module.Qualname/queue_name"`` as (type name, queue name); ``ValueError`` if it is not
    one (a type name holds no ``/``)."""
    type_name, slash, queue_name = queue.partition("/")
    if not (slash and type_name and queue_name):
        raise ValueError(f"{queue!r} is not a queue: write it module.Type/queue_name")
    return type_name, queue_name


def request_queues(address: str, timeout: float | None = 5.0) -> list[QueueStatistics]:
    """Every queue group of the hub at ``address``, with its counts and rates."""
    answer = _ask(address, wire.request(wire.QUEUES), timeout)
    return [QueueStatistics.from_row(row) for row in answer.body]


def request_dead_letters(
    address: str,
    message_type: MessageType,
    queue_name: str,
    *,
    limit: int = 0,
    payloads: bool = True,
    timeout: float | None = 5.0,
) -> list[DeadLetterRecord]:
    """The dead letters a group keeps, oldest first (the ``limit`` latest; 0: all), with their
    payloads unless ``payloads`` is false. ``UnknownQueueError`` for no such group."""
    if not (isinstance(limit, int) and limit >= 0):
        raise ValueError(f"limit must be an int >= 0, not {limit!r}")
    frames = _queue_request(wire.DEAD_LETTERS, message_type, queue_name)
    # A group keeps at most max_dead_letters; the hub drops a limit past 63 bits as malformed.
    limit = min(limit, _MAX_LIMIT)
    answer = _ask(address, [*frames, b"%d" % limit, b"1" if payloads else b"0"], timeout)
    rows = answer.body["dead_letters"]
    if payloads and len(answer.payloads) != len(rows):
        raise HubUnavailableError(f"unexpected answer from {address}: payloads missing")
    found = answer.payloads if payloads else [None] * len(rows)
    return [
        DeadLetterRecord.from_row(row, payload) for row, payload in zip(rows, found, strict=True)
    ]


def request_requeue(
    address: str,
    message_type: MessageType,
    queue_name: str,
    ids: list[str] | None = None,
    *,
    timeout: float | None = 5.0,
) -> Requeued:
    """Put dead letters (those of ``ids``; all for ``None``) back at the end of their group,
    with their attempts counted from 1 again."""
    if ids is not None and any(not i or any(c.isspace() for c in i) for i in ids):
        raise ValueError(f"bad message ids {ids!r}")
    frames = _queue_request(wire.REQUEUE, message_type, queue_name)
    body = " ".join(ids).encode() if ids else b""
    if ids is not None and not ids:
        return Requeued(0, ())
    answer = _ask(address, [*frames, body], timeout)
    return Requeued(answer.body["requeued"], tuple(answer.body["missing"]))


def request_purge(
    address: str, message_type: MessageType, queue_name: str, *, timeout: float | None = 5.0
) -> int:
    """Drop every message the group holds (not those in flight): how many."""
    frames = _queue_request(wire.PURGE, message_type, queue_name)
    return int(_ask(address, frames, timeout).body["purged"])


def request_delete(
    address: str, message_type: MessageType, queue_name: str, *, timeout: float | None = 5.0
) -> int:
    """Delete a group without consumers and what it holds (how many), as ``delete_queue()``
    does; ``QueueInUseError`` while it has consumers, ``UnknownQueueError`` for no such group."""
    frames = _queue_request(wire.DELETE, message_type, queue_name)
    return int(_ask(address, frames, timeout).body["dropped"])


def decode_dead_letter(
    record: DeadLetterRecord, message_type: MessageType | None = None
) -> Message:
    """The message of a dead letter, rebuilt with this process's class: ``message_type``, or
    the group's type (``record.queue`` before the ``/``) imported by its name. Unpickles: only
    for dead letters of a hub you trust as you trust its publishers. Raises whatever rebuilding
    raises (``ImportError`` for a class not found, ...)."""
    if record.payload is None:
        raise ValueError(f"dead letter {record.message_id} was fetched without its payload")
    if isinstance(message_type, type):
        name, cls = get_unique_name_for_message(message_type), message_type
    else:
        name, cls = message_type or parse_queue(record.queue)[0], None
    if cls is None and record.codec == codec.SPLIT_DATACLASS.decode():
        cls = _find_class(name)
    message = codec.decode_one(record.codec.encode(), record.payload, cls)
    if not isinstance(message, Message) or get_unique_name_for_message(message) != name:
        raise TypeError(f"dead letter {record.message_id} is a {type(message)!r}, not {name}")
    return message


def _find_class(name: str) -> type:
    """The class of unique name ``module.Qualname``, imported; ``ImportError`` if not found."""
    import importlib

    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            break
        if isinstance(found, type):
            return found
    raise ImportError(f"no importable class {name}")


class _Administered(Protocol):
    @property
    def address(self) -> str: ...

    def _before_admin(self) -> None: ...


class QueueAdminMixin:
    """The queue administration methods of ``Hub`` and ``HubBroker``."""

    def _before_admin(self) -> None:
        """Raise when the object cannot be used (a closed broker)."""

    def queues(self: _Administered, timeout: float | None = 5.0) -> list[QueueStatistics]:
        """Every queue group of the hub, with its counts and rates (``ipcbus queues``)."""
        self._before_admin()
        return request_queues(self.address, timeout)

    def dead_letters(
        self: _Administered,
        message_type: MessageType,
        queue_name: str,
        *,
        limit: int = 0,
        timeout: float | None = 5.0,
    ) -> list[DeadLetterRecord]:
        """The dead letters the hub keeps for a group, oldest first, with their payloads
        (``decode_dead_letter`` rebuilds the message)."""
        self._before_admin()
        return request_dead_letters(
            self.address, message_type, queue_name, limit=limit, timeout=timeout
        )

    def requeue(
        self: _Administered,
        message_type: MessageType,
        queue_name: str,
        ids: list[str] | None = None,
        *,
        timeout: float | None = 5.0,
    ) -> Requeued:
        """Put dead letters (``ids``, or all) back into their group, attempts counted anew."""
        self._before_admin()
        return request_requeue(self.address, message_type, queue_name, ids, timeout=timeout)

    def purge(
        self: _Administered,
        message_type: MessageType,
        queue_name: str,
        *,
        timeout: float | None = 5.0,
    ) -> int:
        """Drop what the group holds (not what consumers hold): how many messages."""
        self._before_admin()
        return request_purge(self.address, message_type, queue_name, timeout=timeout)


def _queue_request(op: bytes, message_type: MessageType, queue_name: str) -> list[bytes]:
    if isinstance(message_type, str):
        type_name = message_type
    elif isinstance(message_type, type) and issubclass(message_type, Message):
        type_name = get_unique_name_for_message(message_type)
    else:
        raise TypeError(f"message_type must be a Message type or its name, not {message_type!r}")
    if not isinstance(queue_name, str) or not queue_name:
        raise TypeError(f"queue_name must be a non-empty str, not {queue_name!r}")
    if not type_name or "/" in type_name or "\0" in type_name:
        raise ValueError(f"{type_name!r} is not a message type name")
    return wire.request(op, topic_for(type_name), queue_name.encode())


def _ask(address: str, frames: list[bytes], timeout: float | None) -> wire.Reply:
    # As request()'s: a negative one would poll for ever (ZeroMQ's -1), NaN fail in int().
    rest = round_trip(address, frames, check_timeout(timeout))
    try:
        answer = wire.Reply.parse(rest)
    except (ValueError, IndexError) as exc:
        raise HubUnavailableError(f"unexpected answer from {address}: {exc}") from exc
    if answer.status == wire.STATUS_UNKNOWN:
        raise UnknownQueueError(f"the hub at {address} has no queue group {answer.body['queue']}")
    if answer.status == wire.STATUS_IN_USE:
        raise QueueInUseError(
            f"queue group {answer.body['queue']} still has consumers: cancel them first"
        )
    return answer
