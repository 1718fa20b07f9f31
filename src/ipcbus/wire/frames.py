"""The shared vocabulary of the wire protocol (see ``protocol``): the version, the kinds, the
limits, headers, topics, the meta, seq and sizes frames, and the checks every parser uses.
Imports neither side, nor zmq."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Version 2: the consumer alone decides retries: ACK carries the retry delay it chose, and neither
# CONSUME nor DELIVER carries the retry policy.
# Version 3: WELCOME carries the hub's max_message_size (clients split batches below it); fan-out
# seq counts messages, not batches; sync answers carry seqs and replace the gap markers; LOSSY,
# FULL and DELETE/DELETED.
# Version 4: queue traffic by runs, not by message: a split batch is two frames (sizes and
# payloads, not one frame per message), DELIVER carries runs of a consumer's delivery stream and
# ACK settles ranges of it. Measured on the 2-core machine, pyzmq costs 3-6 us per frame sent or
# received: one frame per message (three per DELIVER, four per ACK) held queue groups at
# 0.2-0.35x multiprocessing.Queue.
# Version 5: request/reply. The meta frame of a PUBLISH may carry a route after its 13 bytes: a
# request's correlation id and reply topic, or a reply's correlation id and status (see Route).
# A peer of version 4 is refused at its first request (bad header), as every version before.
# Version 6: a fan-out batch's seq frame is followed, in the same frame, by its publisher's
# client id (ipcbus tail names who published; a frame more would cost 3-6 us per batch).
# Version 7: the spool. WELCOME names the hub's spool directory (empty: none); a batch whose big
# out-of-band buffers were written there has a spooled codec and a spool index frame after its
# payload (wire.spool). 8 MB payloads through CURVE sockets ran at 0.35-1x multiprocessing.Queue:
# 82 % of the hub's ZeroMQ thread was encryption.
# Version 8: a batch's small frames are one. A PUBLISH is ``[head, payload, ...]``, its head the
# header, topic and meta end to end; a fan-out batch ``[head, payload, ...]``, its head the topic,
# seq, publisher and meta (``wire.data_frames``). Each frame cost 3-6 us in pyzmq at
# each end and a CURVE box in ZeroMQ's I/O threads: a round trip crossed eight frames more than
# it needed.
# Version 9: a split batch (a topic with queue groups) is a numbered PUBLISH: its head carries the
# publisher's position (messages it sent up to this batch's last) and a flag for a copy sent again
# to a new hub, so that the new hub drops the copies of batches it has (out of the client's pipe,
# or journaled by the dead hub) and delivers the rest with ``attempt`` 2 (they may have been
# delivered once). FLUSHED carries the hub's id: a client takes it only from the hub that
# welcomed it.
VERSION = 9
HEADER_LEN = 2

# control, client -> hub
HELLO = b"H"
INFO = b"I"
CLIENTS = b"l"
STATS = b"S"
PING = b"h"
CONSUME = b"C"
CANCEL = b"X"
ACK = b"A"
GROUPS_ACK = b"g"
BYE = b"B"
DELETE = b"K"
DECLARE = b"Y"
QUEUE_ADMIN = b"q"  # and its answer (wire.queue_admin): queues, dead letters, requeue, purge
# control, hub -> client
WELCOME = b"W"
PONG = b"o"
CONSUMING = b"c"
DELIVER = b"D"
GROUPS = b"G"
RESET = b"R"
STOPPING = b"Q"
LOSSY = b"L"
FULL = b"U"
DELETED = b"k"
DECLARED = b"y"
# data, client -> hub and back
PUBLISH = b"P"
NUMBERED = b"N"  # a PUBLISH of a split batch, with the publisher's position (data_frames)
FLUSH = b"F"
FLUSHED = b"f"

# The outcome of one queue delivery, in an ACK.
OUTCOME_OK = b"ok"
OUTCOME_FAILED = b"failed"  # to be retried after the delay the consumer sent
OUTCOME_REJECTED = b"rejected"  # the consumer's predicate said no: offer it to another
OUTCOME_DEAD = b"dead"  # the last attempt failed: the consumer published the DeadLetter
OUTCOMES = frozenset({OUTCOME_OK, OUTCOME_FAILED, OUTCOME_REJECTED, OUTCOME_DEAD})

# How a batch's payload is encoded (the meta frame names it). See ipcbus.core.codec.
CODEC_DATACLASS = b"D"  # one pickled list of the messages' __dict__
CODEC_OBJECTS = b"P"  # one pickled list of the messages
# The same two, each message pickled alone (a split batch: sizes and payloads), for topics that
# have queue groups: the hub hands parts of a batch to consumers without unpickling.
CODEC_SPLIT_DATACLASS = b"d"
CODEC_SPLIT_OBJECTS = b"p"
SPLIT_CODECS = frozenset({CODEC_SPLIT_DATACLASS, CODEC_SPLIT_OBJECTS})
# The same two as DATACLASS and OBJECTS, with big out-of-band buffers in spool files: the frames
# after the payload are the spool index, then the buffers (empty where a file holds one).
CODEC_SPOOL_DATACLASS = b"B"
CODEC_SPOOL_OBJECTS = b"b"
SPOOL_CODECS = {CODEC_SPOOL_DATACLASS: CODEC_DATACLASS, CODEC_SPOOL_OBJECTS: CODEC_OBJECTS}

# At most this many out-of-band buffers in a batch: each is a frame, and the hub drops requests
# with more than MAX_FRAMES frames (bounded input, docs/security.md).
MAX_BUFFERS = 64
MAX_FRAMES = 3 + MAX_BUFFERS + 1  # identity, head, payload, spool index, buffers
# An ACK carries one frame per entry, so a client sends at most this many in one.
MAX_ACKS = MAX_FRAMES - 2
# A retry delay a consumer asks for is clamped to this (bounded input).
MAX_RETRY_DELAY = 3600.0

TOPIC_END = b"\x00"
SYNC_PREFIX = b"\x00sync:"
# A unique name is "<module>.<qualname>"; anything longer than this is not one of ours.
MAX_TOPIC_LEN = 1024


def header(kind: bytes) -> bytes:
    return bytes((VERSION,)) + kind


def parse_kind(head: bytes) -> bytes:
    """The kind of a request from its header frame; ``ValueError`` for a bad header."""
    if len(head) != HEADER_LEN or head[0] != VERSION:
        raise ValueError(f"bad header {head[:8]!r}")
    return head[1:]


# -- topics -----------------------------------------------------------------------------------


def topic_for(unique_name: str) -> bytes:
    return unique_name.encode() + TOPIC_END


def unique_name_of(topic: bytes) -> str:
    return topic[:-1].decode()


def is_sync_topic(topic: bytes) -> bool:
    return topic.startswith(SYNC_PREFIX)


def sync_topic(client_id: bytes, number: int) -> bytes:
    return SYNC_PREFIX + client_id + b":%d" % number


SYNC_BASELINE = b"b"
SYNC_CHECK = b"c"
_SYNC_KINDS = frozenset({SYNC_BASELINE, SYNC_CHECK})


def seq_sync_topic(client_id: bytes, number: int, kind: bytes, topics: Iterable[bytes]) -> bytes:
    """A sync topic whose answer carries the seqs of ``topics`` (see the module docstring)."""
    return sync_topic(client_id, number) + b":" + kind + b":" + b"".join(topics)


def parse_seq_sync(sync: bytes) -> tuple[bytes, list[bytes]] | None:
    """The kind and topics a sync topic asks about; ``None`` for a sync topic of another form
    (answered without seqs). Topics end with TOPIC_END, which no topic holds before its end."""
    parts = sync[len(SYNC_PREFIX) :].split(b":", 3)
    if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in _SYNC_KINDS:
        return None
    names = parts[3]
    if not names.endswith(TOPIC_END):
        return None
    return parts[2], [name + TOPIC_END for name in names[:-1].split(TOPIC_END)]


def sync_reply(sync: bytes, seqs: Iterable[int]) -> list[bytes]:
    return [sync, b"".join(_SEQ.pack(seq) for seq in seqs)]


@dataclass(frozen=True)
class SyncReply:
    """An answer to a seq sync topic: the seq of each topic it named."""

    kind: bytes
    seqs: tuple[tuple[bytes, int], ...]

    @classmethod
    def parse(cls, frames: Sequence[Any]) -> SyncReply:
        sync, packed = frames[0].bytes, frames[1].bytes
        asked = parse_seq_sync(sync)
        if asked is None or len(packed) != _SEQ.size * len(asked[1]):
            raise ValueError(f"bad sync answer {sync[:64]!r}")
        kind, topics = asked
        seqs = (seq for (seq,) in _SEQ.iter_unpack(packed))
        return cls(kind, tuple(zip(topics, seqs, strict=True)))


# Reply topics: one per requesting client, "ipcbus:reply:<client id>" and the terminator. No
# unique name ("<module>.<qualname>") contains ":", so none is ever a message type's topic.
REPLY_PREFIX = b"ipcbus:reply:"


def reply_topic(client_id: bytes) -> bytes:
    return REPLY_PREFIX + client_id + TOPIC_END


# Topics found good, so that a topic is checked once, not in every batch (the hub checks every
# PUBLISH's). Bounded: emptied when full (a peer naming ever new topics costs only the checks).
_GOOD_TOPICS: set[bytes] = set()
_GOOD_TOPICS_MAX = 4096


def check_topic(topic: bytes) -> bytes:
    """A unique name plus terminator, or ``ValueError`` (input from peers is checked here)."""
    if type(topic) is bytes and topic in _GOOD_TOPICS:  # bytes exactly: hashable
        return topic
    if (
        len(topic) < 2  # a name, then its terminator
        or not topic.endswith(TOPIC_END)
        or is_sync_topic(topic)
        or len(topic) > MAX_TOPIC_LEN
        or TOPIC_END in topic[:-1]
    ):
        raise ValueError(f"bad topic {topic[:64]!r}")
    topic[:-1].decode()  # UnicodeDecodeError is a ValueError
    if type(topic) is bytes:
        if len(_GOOD_TOPICS) >= _GOOD_TOPICS_MAX:
            _GOOD_TOPICS.clear()
        _GOOD_TOPICS.add(topic)
    return topic


# -- meta and seq frames ----------------------------------------------------------------------

# meta frame: codec (1 byte), message count (uint32), publisher's time.time() at publish (double)
_META = struct.Struct("!cId")
META_LEN = _META.size
Meta = tuple[bytes, int, float]

# The route a request or reply carries after the meta (version 5): kind (1 byte), correlation id
# (uint64, the requester's own numbering), and for a request the reply topic. Such a batch holds
# exactly one message.
ROUTE_REQUEST = b"q"
ROUTE_REPLY = b"r"  # the payload is the reply message, pickled itself (codec OBJECTS)
ROUTE_FAILURE = b"e"  # the payload is the responder's failure (pack_failure)
_ROUTE = struct.Struct("!cQ")
# A failure's text is cut to this many bytes (bounded input; a traceback does not travel).
MAX_FAILURE_TEXT = 4096


@dataclass(frozen=True, slots=True)
class Route:
    """Where the answer to a request goes (``kind`` ROUTE_REQUEST, with ``reply_topic``), or
    which request an answer is for (ROUTE_REPLY, ROUTE_FAILURE)."""

    kind: bytes
    correlation: int
    reply_topic: bytes = b""


def pack_meta(codec: bytes, count: int, published_at: float) -> bytes:
    return _META.pack(codec, count, published_at)


def pack_request_meta(
    codec: bytes, published_at: float, correlation: int, reply_to: bytes
) -> bytes:
    """The meta of a request: one message, whose answer goes to ``reply_to`` (a reply topic)."""
    return _META.pack(codec, 1, published_at) + _ROUTE.pack(ROUTE_REQUEST, correlation) + reply_to


def pack_reply_meta(codec: bytes, published_at: float, correlation: int, failed: bool) -> bytes:
    kind = ROUTE_FAILURE if failed else ROUTE_REPLY
    return _META.pack(codec, 1, published_at) + _ROUTE.pack(kind, correlation)


def unpack_meta(frame: bytes) -> Meta:
    """Raises ``ValueError`` on a malformed frame (a route included: see ``route_of``)."""
    try:
        codec, count, published_at = _META.unpack_from(frame)
    except struct.error as exc:
        raise ValueError(f"bad meta frame: {exc}") from None
    if len(frame) != META_LEN:
        _parse_route(frame)
        if count != 1:
            raise ValueError(f"a request or reply of {count} messages")
    return codec, count, published_at


def route_of(frame: bytes) -> Route | None:
    """The route a meta frame carries; ``None`` for a plain batch. ``ValueError`` when bad."""
    if len(frame) == META_LEN:
        return None
    return _parse_route(frame)


def _parse_route(frame: bytes) -> Route:
    try:
        kind, correlation = _ROUTE.unpack_from(frame, META_LEN)
    except struct.error as exc:
        raise ValueError(f"bad meta frame: {exc}") from None
    rest = frame[META_LEN + _ROUTE.size :]
    if kind == ROUTE_REQUEST:
        if not rest.startswith(REPLY_PREFIX):
            raise ValueError(f"bad reply topic {rest[:64]!r}")
        return Route(kind, correlation, check_topic(rest))
    if kind not in (ROUTE_REPLY, ROUTE_FAILURE) or rest:
        raise ValueError(f"bad route {frame[META_LEN : META_LEN + 64]!r}")
    return Route(kind, correlation)


def pack_failure(remote_type: str, remote_message: str) -> bytes:
    """A responder's failure: its type's name and its text (cut to MAX_FAILURE_TEXT bytes)."""
    text = remote_message.encode(errors="replace")[:MAX_FAILURE_TEXT]
    return remote_type.encode(errors="replace")[:MAX_TOPIC_LEN] + b"\x00" + text


def parse_failure(payload: bytes) -> tuple[str, str]:
    remote_type, separator, text = payload.partition(b"\x00")
    if not separator:
        raise ValueError("a failure without its separator")
    return remote_type.decode(errors="replace"), text.decode(errors="replace")


_SEQ = struct.Struct("!Q")


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(frame: bytes) -> int:
    try:
        (seq,) = _SEQ.unpack(frame)
    except struct.error as exc:
        raise ValueError(f"bad seq frame: {exc}") from None
    return int(seq)


# -- checks -----------------------------------------------------------------------------------


def _positive_float(text: bytes) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a positive number: {text[:32]!r}")
    return value


def _count(text: bytes) -> int:
    """A number >= 0 that fits 63 bits (sequence numbers, attempts, ids)."""
    value = int(text)
    if not 0 <= value < 2**63:
        raise ValueError(f"not a count: {text[:32]!r}")
    return value


def _at_least_one(text: bytes) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"not a positive count: {text[:32]!r}")
    return value
