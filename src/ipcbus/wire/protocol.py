"""The wire protocol between the hub and its clients: every frame of every message is built and
parsed here, in both directions. Imported by the hub and by clients; imports neither, nor zmq.

Every request starts with a two-byte header: the wire version, then the kind. The hub routes on
that header and the topic frame alone and relays payload frames as opaque bytes: it never
unpickles (docs/security.md).

A hub has three sockets. Control and data are separate so that backpressure on the data path
never blocks the control path (a stalled hub still answers HELLO and STATS):

client control DEALER → hub control ROUTER (the hub's address)     ``[header, *body]``
    HELLO    ``[client_id, info?]``  → WELCOME ``[publish_endpoint, fanout_endpoint, hub_id,
                                heartbeat_interval, heartbeat_timeout, max_message_size,
                                *grouped_topics]``: max_message_size is the largest frame the
                                hub accepts (a larger one costs the sender its connection)
    STATS    ``[]``           → STATS ``[json]``
    CLIENTS  ``[]``           → CLIENTS ``[json]``: who is connected (``ipcbus clients``)
    INFO     ``[json]``       what the client says about itself changed (its subscriptions)
    PING     ``[]``           → PONG ``[]``  (every heartbeat_interval, both ways alive)
    CONSUME  ``[subscription_id, topic, queue_name, prefetch]``
                              → CONSUMING ``[subscription_id]`` once every client knows the
                                topic is grouped (so it publishes it in a split codec)
    CANCEL   ``[subscription_id]``  no new deliveries; those in flight may still be acked
    ACK      ``[entry * n]``, entry = ``b" ".join([stream, first, last, outcome, retry_delay,
                                error])``: the deliveries ``first`` to ``last`` of one stream
                                (below) had that outcome: ok, failed, rejected, dead;
                                retry_delay (seconds) only for failed. One entry settles a
                                whole range (cumulative): a consumer acks a batch it ran in
                                one entry, and lists failures, rejections and dead letters
                                in entries of their own
    BYE      ``[]``           the client leaves: its unacknowledged deliveries go to others
    DECLARE  ``[request_id, topic, queue_name]`` → DECLARED ``[request_id]`` once the group
                                exists (it holds what is published until consumers come) and
                                every client knows the topic is grouped
    DELETE   ``[request_id, topic, queue_name]`` → DELETED ``[request_id, status, dropped]``:
                                the group and what it holds are gone (status ``ok``), or it
                                still has consumers and stays (status ``in-use``)
  hub → client, unasked:
    DELIVER  ``[(descriptor, meta, sizes, payloads) * n]``: runs of consecutive messages of
                                one producer batch, descriptor = ``b" ".join([subscription_id,
                                stream, first_seq, attempt, id_prefix, first_id, topic])``,
                                sizes and payloads as in a split PUBLISH. Each consumer has a
                                delivery stream (its name starts with the hub's id: unique
                                across hubs, and across the consumer's comings and goings)
                                whose sequence numbers count its deliveries: a run's messages
                                are ``first_seq``, ``first_seq + 1``, ..., their message ids
                                ``<id_prefix>-<first_id>``, ``<id_prefix>-<first_id + 1>``,
                                .... The consumer decides retries and dead letters
                                (ipcbus.core.retry)
    GROUPS   ``[version, *grouped_topics]`` → GROUPS_ACK ``[version]``
    FULL     ``[version, *full_topics]``  topics a queue group of which holds ``max_held``
                                messages: publish() of them waits until the hub lists them no
                                more (after every WELCOME the list is empty until a FULL)
    RESET    ``[]``           the hub does not know this client (it restarted, or declared the
                                client gone): say HELLO and CONSUME again
    STOPPING ``[]``           the hub is shutting down: reconnect to the next one
    LOSSY    ``[]``           the hub sent without waiting for a stalled subscriber (its
                                stall_timeout) and has stopped: a subscriber asks for the
                                sequence numbers of its topics (a check sync, below)
client data DEALER → hub data ROUTER (``<address>.in``)
    PUBLISH  ``[topic, meta, payload, *frames]``  relayed on XPUB without the header; with a split
                                codec ``[topic, meta, sizes, payloads]``: every message is
                                pickled alone, ``payloads`` holds them end to end and ``sizes``
                                their sizes (uint32, little-endian), so that the hub can hand
                                parts of a batch to queue consumers without unpickling
    FLUSH    ``[token]``      → FLUSHED ``[token]`` once every earlier PUBLISH of this client was
                                handed to the XPUB socket (one DEALER: the order is kept)
hub XPUB (``<address>.pub``) → client SUB   ``[topic, meta, seq, *payload]`` or a sync answer
    seq counts the *messages* of the topic the hub has relayed, this batch's included, since a
    subscriber last held the topic (the hub forgets the count of a topic nobody holds): a
    subscriber that sees ``seq - count`` (count from meta) beyond the last seq it saw knows the
    hub dropped that many messages for it (it had accepted nothing for the hub's stall_timeout)

Topics are the message type's unique name plus a terminator byte, so ``a.Tick`` is not a prefix of
``a.TickV2`` for the SUB socket's prefix matching. Sync topics start with ``\\x00`` (no unique name
does): a proxy subscribes to its topic and then to a fresh sync topic on the same SUB socket; the
XPUB socket applies subscriptions of one connection in order, so when the hub sees the sync
subscription the topic is live, and it answers on the sync topic. That is how ``subscribe()`` knows
it will miss nothing published afterwards (no slow joiner, docs/guarantees.md).

A client's sync topic names the topics it asks about (``seq_sync_topic``), and the answer carries
their seqs: ``[sync_topic, seqs]`` (8 bytes per topic named, in order). Sent through the same pipe
as the batches, after every batch the hub sent to it before, it tells exactly how many messages of
each topic the subscriber missed. ``baseline`` answers (a new subscription, a new hub) set the
count a subscriber starts from; ``check`` answers (the hub said LOSSY, a reconnect to the same
hub) count the messages missed since the last batch seen, the tail included: after one drop,
ZeroMQ sends nothing more to that pipe (batches, answers) until its reader catches up, so a client
asks again until it is answered. A sync topic of another form is answered ``[sync_topic]``.

Parsers raise ``ValueError`` (or ``IndexError``) on malformed input: the hub counts and drops it.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACK",
    "BYE",
    "CANCEL",
    "CODEC_DATACLASS",
    "CODEC_OBJECTS",
    "CODEC_SPLIT_DATACLASS",
    "CODEC_SPLIT_OBJECTS",
    "CONSUME",
    "CONSUMING",
    "DECLARE",
    "DECLARED",
    "DELETE",
    "DELETED",
    "DELIVER",
    "FLUSH",
    "FLUSHED",
    "FULL",
    "GROUPS",
    "GROUPS_ACK",
    "HEADER_LEN",
    "CLIENTS",
    "HELLO",
    "INFO",
    "MAX_ACKS",
    "MAX_BUFFERS",
    "MAX_FRAMES",
    "MAX_RETRY_DELAY",
    "MAX_TOPIC_LEN",
    "OUTCOMES",
    "OUTCOME_DEAD",
    "OUTCOME_FAILED",
    "OUTCOME_OK",
    "OUTCOME_REJECTED",
    "PING",
    "PONG",
    "PUBLISH",
    "RESET",
    "SPLIT_CODECS",
    "STATS",
    "STOPPING",
    "SYNC_BASELINE",
    "SYNC_CHECK",
    "LOSSY",
    "SYNC_PREFIX",
    "TOPIC_END",
    "VERSION",
    "WELCOME",
    "Ack",
    "Consume",
    "DeclareQueue",
    "DeleteQueue",
    "Deliver",
    "Fanout",
    "Meta",
    "SyncReply",
    "Welcome",
    "check_split",
    "check_topic",
    "header",
    "is_sync_topic",
    "pack_meta",
    "pack_seq",
    "pack_sizes",
    "parse_acks",
    "parse_kind",
    "parse_seq_sync",
    "seq_sync_topic",
    "split_payloads",
    "sync_reply",
    "topic_for",
    "unique_name_of",
    "unpack_meta",
    "unpack_seq",
    "unpack_sizes",
]

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
VERSION = 4
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

# At most this many out-of-band buffers in a batch: each is a frame, and the hub drops requests
# with more than MAX_FRAMES frames (bounded input, docs/security.md).
MAX_BUFFERS = 64
MAX_FRAMES = 4 + MAX_BUFFERS + 1  # identity, header, topic, meta, payload, buffers
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


def check_topic(topic: bytes) -> bytes:
    """A unique name plus terminator, or ``ValueError`` (input from peers is checked here)."""
    if (
        not topic.endswith(TOPIC_END)
        or is_sync_topic(topic)
        or len(topic) > MAX_TOPIC_LEN
        or TOPIC_END in topic[:-1]
    ):
        raise ValueError(f"bad topic {topic[:64]!r}")
    topic[:-1].decode()  # UnicodeDecodeError is a ValueError
    return topic


# -- meta and seq frames ----------------------------------------------------------------------

# meta frame: codec (1 byte), message count (uint32), publisher's time.time() at publish (double)
_META = struct.Struct("!cId")
Meta = tuple[bytes, int, float]


def pack_meta(codec: bytes, count: int, published_at: float) -> bytes:
    return _META.pack(codec, count, published_at)


def unpack_meta(frame: bytes) -> Meta:
    """Raises ``ValueError`` on a malformed frame."""
    try:
        codec, count, published_at = _META.unpack(frame)
    except struct.error as exc:
        raise ValueError(f"bad meta frame: {exc}") from None
    return codec, count, published_at


_SEQ = struct.Struct("!Q")


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(frame: bytes) -> int:
    try:
        (seq,) = _SEQ.unpack(frame)
    except struct.error as exc:
        raise ValueError(f"bad seq frame: {exc}") from None
    return int(seq)


# -- split batches: sizes and payloads --------------------------------------------------------

# One uint32 per message, little-endian whatever the host (a tcp:// bus may mix them).
_SIZE_BYTES = 4
if array("I").itemsize != _SIZE_BYTES:  # pragma: no cover - no such CPython platform known
    raise ImportError("ipcbus needs array('I') of 4 bytes")
_SWAP = sys.byteorder != "little"


def pack_sizes(sizes: Iterable[int]) -> bytes:
    packed = array("I", sizes)
    if _SWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def unpack_sizes(frame: Any) -> array[int]:
    """The sizes a sizes frame (bytes-like) holds; ``ValueError`` when it holds no whole number
    of them."""
    if len(frame) % _SIZE_BYTES:
        raise ValueError(f"a sizes frame of {len(frame)} bytes")
    sizes = array("I")
    sizes.frombytes(frame)
    if _SWAP:  # pragma: no cover - big-endian hosts
        sizes.byteswap()
    return sizes


def check_split(count: int, sizes: Any, payloads: Any) -> None:
    """``ValueError`` unless ``sizes`` holds ``count`` sizes that add up to ``payloads``."""
    if len(sizes) != _SIZE_BYTES * count:
        raise ValueError(f"{len(sizes)} bytes of sizes for {count} messages")
    if sum(unpack_sizes(sizes)) != len(payloads):
        raise ValueError(f"sizes that do not add up to the {len(payloads)} bytes of payloads")


def split_payloads(sizes: Any, payloads: Any) -> list[memoryview]:
    """Each message's payload (a view, not a copy) of a split batch."""
    view = memoryview(payloads)
    parts = []
    start = 0
    for size in unpack_sizes(sizes):
        end = start + size
        parts.append(view[start:end])
        start = end
    if start != len(view):
        raise ValueError(f"sizes that do not add up to the {len(view)} bytes of payloads")
    return parts


# -- control: handshake -----------------------------------------------------------------------


def hello(client_id: bytes, info: bytes = b"") -> list[bytes]:
    """``info``: what the client says about itself (JSON: pid, host, program, ...), for the
    hub's logs and ``ipcbus clients``; a description only, never used for routing."""
    return [header(HELLO), client_id, *([info] if info else [])]


def parse_hello(body: Sequence[bytes]) -> bytes | None:
    """The client's description in a HELLO, if any."""
    if not 1 <= len(body) <= 2:
        raise ValueError(f"HELLO with {len(body)} frames")
    return body[1] if len(body) == 2 else None


@dataclass(frozen=True)
class Welcome:
    """The hub's answer to HELLO: where to publish and subscribe, its heartbeat terms, and the
    largest frame it accepts."""

    publish_endpoint: str
    fanout_endpoint: str
    hub_id: bytes
    heartbeat_interval: float
    heartbeat_timeout: float
    max_message_size: int
    grouped_topics: tuple[bytes, ...] = ()

    def frames(self, identity: bytes) -> list[bytes]:
        return [
            identity,
            header(WELCOME),
            self.publish_endpoint.encode(),
            self.fanout_endpoint.encode(),
            self.hub_id,
            repr(self.heartbeat_interval).encode(),
            repr(self.heartbeat_timeout).encode(),
            b"%d" % self.max_message_size,
            *self.grouped_topics,
        ]

    @classmethod
    def parse(cls, body: Sequence[bytes]) -> Welcome:
        publish, fanout, hub_id, interval, timeout, max_size, *grouped = body
        return cls(
            publish.decode(),
            fanout.decode(),
            hub_id,
            _positive_float(interval),
            _positive_float(timeout),
            _at_least_one(max_size),
            tuple(grouped),
        )


def groups(identity: bytes, version: int, topics: Iterable[bytes]) -> list[bytes]:
    return [identity, header(GROUPS), b"%d" % version, *topics]


def parse_groups(body: Sequence[bytes]) -> tuple[int, frozenset[bytes]]:
    version, *topics = body
    return int(version), frozenset(topics)


def groups_ack(version: int) -> list[bytes]:
    return [header(GROUPS_ACK), b"%d" % version]


def parse_groups_ack(body: Sequence[bytes]) -> int:
    (version,) = body
    return int(version)


def lossy(identity: bytes) -> list[bytes]:
    return [identity, header(LOSSY)]


def full(identity: bytes, version: int, topics: Iterable[bytes]) -> list[bytes]:
    return [identity, header(FULL), b"%d" % version, *topics]


def parse_full(body: Sequence[bytes]) -> tuple[int, frozenset[bytes]]:
    version, *topics = body
    return int(version), frozenset(topics)


# -- control: queue consumers -----------------------------------------------------------------


@dataclass(frozen=True)
class Consume:
    """A queue consumer joining ``queue_name`` on ``topic``."""

    subscription_id: bytes
    topic: bytes
    queue_name: str
    prefetch: int

    def frames(self) -> list[bytes]:
        return [
            header(CONSUME),
            self.subscription_id,
            self.topic,
            self.queue_name.encode(),
            b"%d" % self.prefetch,
        ]

    @classmethod
    def parse(cls, body: Sequence[bytes]) -> Consume:
        subscription_id, topic, queue_name, prefetch = body
        if b" " in subscription_id or not subscription_id:
            raise ValueError(f"bad subscription id {subscription_id[:32]!r}")
        name = queue_name.decode()
        if not name:
            raise ValueError("empty queue name")
        return cls(subscription_id, check_topic(topic), name, _at_least_one(prefetch))


def consuming(identity: bytes, subscription_id: bytes) -> list[bytes]:
    return [identity, header(CONSUMING), subscription_id]


def cancel(subscription_id: bytes) -> list[bytes]:
    return [header(CANCEL), subscription_id]


def parse_cancel(body: Sequence[bytes]) -> bytes:
    (subscription_id,) = body
    return subscription_id


@dataclass(frozen=True)
class DeleteQueue:
    """A request to delete the queue group ``queue_name`` of ``topic``."""

    request_id: bytes
    topic: bytes
    queue_name: str

    def frames(self) -> list[bytes]:
        return [header(DELETE), self.request_id, self.topic, self.queue_name.encode()]

    @classmethod
    def parse(cls, body: Sequence[bytes]) -> DeleteQueue:
        request_id, topic, queue_name = body
        name = queue_name.decode()
        if not name:
            raise ValueError("empty queue name")
        return cls(request_id, check_topic(topic), name)


@dataclass(frozen=True)
class DeclareQueue:
    """A request to declare the queue group ``queue_name`` of ``topic``: it exists from then on
    and holds what is published until consumers come."""

    request_id: bytes
    topic: bytes
    queue_name: str

    def frames(self) -> list[bytes]:
        return [header(DECLARE), self.request_id, self.topic, self.queue_name.encode()]

    @classmethod
    def parse(cls, body: Sequence[bytes]) -> DeclareQueue:
        request_id, topic, queue_name = body
        name = queue_name.decode()
        if not name:
            raise ValueError("empty queue name")
        return cls(request_id, check_topic(topic), name)


def declared(identity: bytes, request_id: bytes) -> list[bytes]:
    return [identity, header(DECLARED), request_id]


def parse_declared(body: Sequence[bytes]) -> bytes:
    (request_id,) = body
    return request_id


DELETED_OK = b"ok"
DELETED_IN_USE = b"in-use"


def deleted(identity: bytes, request_id: bytes, dropped: int | None) -> list[bytes]:
    """The answer to DELETE: how many held messages were dropped, ``None`` if refused."""
    if dropped is None:
        return [identity, header(DELETED), request_id, DELETED_IN_USE, b"0"]
    return [identity, header(DELETED), request_id, DELETED_OK, b"%d" % dropped]


def parse_deleted(body: Sequence[bytes]) -> tuple[bytes, int | None]:
    request_id, status, dropped = body
    if status not in (DELETED_OK, DELETED_IN_USE):
        raise ValueError(f"unknown DELETED status {status[:16]!r}")
    return request_id, int(dropped) if status == DELETED_OK else None


@dataclass(frozen=True)
class Deliver:
    """A run of consecutive messages of one producer batch, handed to one consumer: its
    deliveries ``first_seq`` to ``last_seq`` of ``stream``."""

    subscription_id: bytes
    stream: bytes
    first_seq: int
    attempt: int
    id_prefix: bytes
    first_id: int
    topic: bytes
    meta: bytes
    sizes: Any  # bytes-like, as in a split PUBLISH
    payloads: Any

    @property
    def count(self) -> int:
        return len(self.sizes) // _SIZE_BYTES

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1

    def message_id(self, index: int) -> str:
        """The message id of the run's ``index``-th message."""
        return f"{self.id_prefix.decode(errors='replace')}-{self.first_id + index}"


def deliver(identity: bytes, runs: Iterable[Deliver]) -> list[Any]:
    """One DELIVER request carrying runs to one client (four frames each)."""
    frames: list[Any] = [identity, header(DELIVER)]
    for run in runs:
        descriptor = b"%s %s %d %d %s %d %s" % (
            run.subscription_id,
            run.stream,
            run.first_seq,
            run.attempt,
            run.id_prefix,
            run.first_id,
            run.topic,
        )
        frames += (descriptor, run.meta, run.sizes, run.payloads)
    return frames


def parse_deliver(body: Sequence[Any]) -> list[Deliver]:
    if not body or len(body) % 4:
        raise ValueError(f"DELIVER with {len(body)} frames")
    runs = []
    for index in range(0, len(body), 4):
        descriptor, meta, sizes, payloads = body[index : index + 4]
        subscription_id, stream, first_seq, attempt, id_prefix, first_id, topic = descriptor.split(
            b" ", 6
        )
        if not subscription_id or not stream:
            raise ValueError(f"bad DELIVER descriptor {descriptor[:64]!r}")
        check_split(len(sizes) // _SIZE_BYTES, sizes, payloads)
        runs.append(
            Deliver(
                subscription_id,
                stream,
                _count(first_seq),
                _count(attempt),
                id_prefix,
                _count(first_id),
                topic,
                meta,
                sizes,
                payloads,
            )
        )
    return runs


@dataclass(frozen=True)
class Ack:
    """A consumer's answer for its deliveries ``first`` to ``last`` of ``stream`` (one outcome
    for the whole range)."""

    stream: bytes
    first: int
    last: int
    outcome: bytes
    retry_delay: float = 0.0  # only for OUTCOME_FAILED
    error: str = ""

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def acks(answers: Sequence[Ack]) -> list[list[bytes]]:
    """ACK requests carrying ``answers``, at most ``MAX_ACKS`` each (one frame per answer)."""
    return [
        [header(ACK), *map(_ack_entry, answers[start : start + MAX_ACKS])]
        for start in range(0, len(answers), MAX_ACKS)
    ]


def _ack_entry(answer: Ack) -> bytes:
    return b"%s %d %d %s %s %s" % (
        answer.stream,
        answer.first,
        answer.last,
        answer.outcome,
        repr(answer.retry_delay).encode(),
        answer.error.encode(errors="replace"),
    )


def parse_acks(body: Sequence[bytes]) -> list[Ack]:
    if not body:
        raise ValueError("ACK without entries")
    answers = []
    for entry in body:
        stream, first, last, outcome, delay, error = entry.split(b" ", 5)
        if not stream:
            raise ValueError("ACK entry without a stream")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome[:16]!r}")
        low, high = _count(first), _count(last)
        if high < low:
            raise ValueError(f"empty ACK range {first[:24]!r} {last[:24]!r}")
        seconds = float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"bad retry delay {delay[:32]!r}")
        answers.append(
            Ack(
                stream,
                low,
                high,
                outcome,
                min(seconds, MAX_RETRY_DELAY),
                error.decode(errors="replace"),
            )
        )
    return answers


# -- data -------------------------------------------------------------------------------------


def publish(topic: bytes, meta: bytes, payload: Sequence[Any]) -> list[Any]:
    return [header(PUBLISH), topic, meta, *payload]


def flush(token: bytes) -> list[bytes]:
    return [header(FLUSH), token]


def flushed(identity: bytes, token: bytes) -> list[bytes]:
    return [identity, header(FLUSHED), token]


def parse_flushed(frames: Sequence[bytes]) -> bytes | None:
    """The token of a FLUSHED reply, or ``None`` for anything else."""
    if len(frames) == 2 and frames[0] == header(FLUSHED):
        return frames[1]
    return None


# -- fan-out ----------------------------------------------------------------------------------


def fanout(topic: Any, meta: Any, seq: int, payload: Sequence[Any]) -> list[Any]:
    return [topic, meta, pack_seq(seq), *payload]


@dataclass(frozen=True)
class Fanout:
    """A batch as a subscriber receives it."""

    topic: bytes
    meta: Meta
    seq: int
    payload: Sequence[Any]

    @classmethod
    def parse(cls, frames: Sequence[Any]) -> Fanout:
        topic, meta, seq, *payload = (
            frames[0].bytes,
            frames[1].bytes,
            frames[2].bytes,
            *frames[3:],
        )
        return cls(topic, unpack_meta(meta), unpack_seq(seq), payload)


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
