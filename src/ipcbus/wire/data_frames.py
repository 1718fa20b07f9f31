"""The data path's frames, in both directions: PUBLISH and FLUSH (client data DEALER -> hub data
ROUTER), FLUSHED back, and a fan-out batch (hub XPUB -> client SUB). The reference is
``wire.protocol``'s docstring. Imported by the hub and by clients; imports neither, nor zmq."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .frames import (
    _SEQ,
    FLUSH,
    FLUSHED,
    HEADER_LEN,
    NUMBERED,
    PUBLISH,
    TOPIC_END,
    VERSION,
    Meta,
    check_topic,
    header,
    parse_kind,
    unpack_meta,
)

__all__ = [
    "AGAIN",
    "Fanout",
    "fanout",
    "fanout_head",
    "flush",
    "flushed",
    "parse_data_kind",
    "parse_fanout_head",
    "parse_flushed",
    "parse_numbered_head",
    "parse_publish_head",
    "publish",
    "publish_head",
    "publish_numbered",
    "sent_again",
]


# -- the head frame of a batch (version 8) ----------------------------------------------------

_PUBLISH_HEADER = bytes((VERSION,)) + PUBLISH


def publish_head(topic: bytes, meta: bytes) -> bytes:
    """A PUBLISH's first frame: header, topic (its terminator included), meta."""
    return _PUBLISH_HEADER + topic + meta


def parse_publish_head(head: bytes) -> tuple[bytes, bytes]:
    """The topic (checked) and the meta (unchecked: ``unpack_meta``) of a PUBLISH head whose
    header was checked; ``ValueError`` when it has no topic."""
    end = head.find(TOPIC_END, HEADER_LEN) + 1
    if end <= 0:
        raise ValueError("a PUBLISH head without a topic")
    return check_topic(head[HEADER_LEN:end]), head[end:]


def fanout_head(topic: bytes, seq: int, publisher: bytes, meta: bytes) -> bytes:
    """A fan-out batch's first frame: topic (terminator included, so the SUB socket's prefix
    match sees it first), seq, the publisher's client id (length first: ZeroMQ routing ids are
    1 to 255 bytes), meta."""
    return topic + _SEQ.pack(seq) + bytes((len(publisher),)) + publisher + meta


def parse_fanout_head(head: bytes) -> tuple[bytes, int, bytes, bytes]:
    """The topic, seq, publisher and meta (unchecked: ``unpack_meta``) of a fan-out head;
    ``ValueError`` when malformed."""
    end = head.find(TOPIC_END) + 1
    if end <= 0:
        raise ValueError("a fan-out head without a topic")
    try:
        (seq,) = _SEQ.unpack_from(head, end)
        start = end + _SEQ.size + 1
        stop = start + head[start - 1]
    except (struct.error, IndexError):
        raise ValueError(f"a fan-out head of {len(head)} bytes") from None
    if stop > len(head):
        raise ValueError(f"a fan-out head of {len(head)} bytes")
    return head[:end], int(seq), head[start:stop], head[stop:]


# -- data -------------------------------------------------------------------------------------


def publish(topic: bytes, meta: bytes, payload: Sequence[Any]) -> list[Any]:
    return [_PUBLISH_HEADER + topic + meta, *payload]  # publish_head(), one call fewer


# -- numbered: a split batch (version 9) ------------------------------------------------------

_NUMBERED_HEADER = bytes((VERSION,)) + NUMBERED
_NUMBER = struct.Struct("<BQ")  # flags, position
AGAIN = 1  # flag: a copy sent again to a new hub (its predecessor did not confirm it)
_MAX_POSITION = 1 << 63


def publish_numbered(topic: bytes, meta: bytes, payload: Sequence[Any], position: int) -> list[Any]:
    """A split batch: as ``publish()``, its head numbered with the publisher's ``position``
    (messages it sent up to this batch's last)."""
    return [_NUMBERED_HEADER + _NUMBER.pack(0, position) + topic + meta, *payload]


def sent_again(request: list[Any]) -> None:
    """Flag a numbered request as a copy sent again to a new hub (in place; anything else is
    left as it is)."""
    head = bytes(request[0])
    if head[:HEADER_LEN] == _NUMBERED_HEADER and len(head) > HEADER_LEN + _NUMBER.size:
        request[0] = head[:HEADER_LEN] + bytes((head[HEADER_LEN] | AGAIN,)) + head[HEADER_LEN + 1 :]


def parse_numbered_head(head: bytes) -> tuple[int, int, bytes, bytes]:
    """The flags, position, topic (checked) and meta (unchecked) of a numbered head whose
    header was checked; ``ValueError`` when malformed."""
    start = HEADER_LEN + _NUMBER.size
    if len(head) <= start:
        raise ValueError(f"a numbered PUBLISH head of {len(head)} bytes")
    flags, position = _NUMBER.unpack_from(head, HEADER_LEN)
    if flags & ~AGAIN or position >= _MAX_POSITION:
        raise ValueError(f"a numbered PUBLISH head with flags {flags}, position {position}")
    end = head.find(TOPIC_END, start) + 1
    if end <= 0:
        raise ValueError("a numbered PUBLISH head without a topic")
    return flags, position, check_topic(head[start:end]), head[end:]


def parse_data_kind(head: bytes) -> bytes:
    """The kind of a request on the data socket: a PUBLISH's head holds more than its header
    (``publish_head``); ``ValueError`` for a bad header."""
    if head[:HEADER_LEN] == _PUBLISH_HEADER and len(head) > HEADER_LEN:
        return PUBLISH
    if head[:HEADER_LEN] == _NUMBERED_HEADER:
        return NUMBERED
    return parse_kind(head)


def flush(token: bytes) -> list[bytes]:
    return [header(FLUSH), token]


def flushed(identity: bytes, token: bytes, hub_id: bytes) -> list[bytes]:
    """The answer to a FLUSH, with the id of the hub that gives it: a client takes it only
    from the hub it was welcomed by (a FLUSH still in its pipe when its hub died reaches the
    next hub, whose answer would confirm what the dead one lost)."""
    return [identity, header(FLUSHED), token, hub_id]


def parse_flushed(frames: Sequence[bytes]) -> tuple[bytes, bytes] | None:
    """The token and hub id of a FLUSHED reply, or ``None`` for anything else."""
    if len(frames) == 3 and frames[0] == header(FLUSHED):
        return frames[1], frames[2]
    return None


# -- fan-out ----------------------------------------------------------------------------------


def fanout(
    topic: bytes, meta: bytes, seq: int, payload: Sequence[Any], publisher: bytes = b""
) -> list[Any]:
    return [fanout_head(topic, seq, publisher, meta), *payload]


@dataclass(frozen=True)
class Fanout:
    """A batch as a subscriber receives it; ``publisher`` is the client id of the process that
    published it (empty from a hub that did not say)."""

    topic: bytes
    meta: Meta
    seq: int
    payload: Sequence[Any]
    publisher: bytes = b""

    @classmethod
    def parse(cls, frames: Sequence[Any]) -> Fanout:
        if len(frames) < 2:
            raise ValueError(f"a fan-out batch of {len(frames)} frames")
        topic, seq, publisher, meta = parse_fanout_head(frames[0].bytes)
        return cls(topic, unpack_meta(meta), seq, frames[1:], publisher)
