"""The wire format between hub and proxies. Imported by both; imports neither.

Every client→hub message starts with a two-byte header: the wire version, then the kind. The hub
routes on that header and the topic frame alone and relays payload frames as opaque bytes: it never
unpickles (DESIGN.md §3).

A hub has three sockets. Control and data are separate so that backpressure on the data path
never blocks the control path (a stalled hub still answers HELLO and STATS):

client control DEALER → hub control ROUTER (the hub's address)     ``[header, *body]``
    HELLO    ``[client_id]``  → WELCOME ``[publish_endpoint, fanout_endpoint, hub_id,
                                heartbeat_interval, heartbeat_timeout, *grouped_topics]``
    STATS    ``[]``           → STATS ``[json]``
    PING     ``[]``           → PONG ``[]``  (every heartbeat_interval, both ways alive)
    CONSUME  ``[subscription_id, topic, queue_name, prefetch, max_attempts, retry_backoff]``
                              → CONSUMING ``[subscription_id]`` once every client knows the
                                topic is grouped (so it publishes it in a split codec)
    CANCEL   ``[subscription_id]``  no new deliveries; those in flight may still be acked
    ACK      ``[(delivery_id, outcome, error) * n]``  outcome: ok, failed, rejected, dead
    BYE      ``[]``           the client leaves: its unacknowledged deliveries go to others
  hub → client, unasked:
    DELIVER  ``[(descriptor, meta, payload) * n]``, descriptor = ``b" ".join([subscription_id,
                                delivery_id, message_id, attempt, final, topic])``
    GROUPS   ``[version, *grouped_topics]`` → GROUPS_ACK ``[version]``
    RESET    ``[]``           the hub does not know this client (it restarted, or declared the
                                client gone): say HELLO and CONSUME again
    STOPPING ``[]``           the hub is shutting down: reconnect to the next one
client data DEALER → hub data ROUTER (``<address>.in``)
    PUBLISH  ``[topic, meta, payload, *frames]``  relayed on XPUB without the header; with a split
                                codec each frame after meta is one message
    FLUSH    ``[token]``      → FLUSHED ``[token]`` once every earlier PUBLISH of this client was
                                handed to the XPUB socket (one DEALER: the order is kept)
hub XPUB (``<address>.pub``) → client SUB   ``[topic, meta, seq, *payload]`` or ``[sync_topic]``
    seq numbers the hub's batches of each topic: a subscriber that sees one skipped knows the
    hub dropped messages for it (it had accepted nothing for the hub's stall_timeout); after
    such drops the hub sends ``[topic, b"", seq]`` (no meta, no payload) with the latest seq,
    so a gap at the end is seen too

Topics are the message type's unique name plus a terminator byte, so ``a.Tick`` is not a prefix of
``a.TickV2`` for the SUB socket's prefix matching. Sync topics start with ``\\x00`` (no unique name
does): a proxy subscribes to its topic and then to a fresh sync topic on the same SUB socket; the
XPUB socket applies subscriptions of one connection in order, so when the hub sees the sync
subscription the topic is live, and it answers on the sync topic. That is how ``subscribe()`` knows
it will miss nothing published afterwards (no slow joiner, DESIGN.md §2.3).
"""

from __future__ import annotations

import struct

__all__ = [
    "ACK",
    "BYE",
    "CANCEL",
    "CONSUME",
    "CONSUMING",
    "DELIVER",
    "FLUSH",
    "FLUSHED",
    "GROUPS",
    "GROUPS_ACK",
    "HEADER_LEN",
    "HELLO",
    "MAX_ACKS",
    "MAX_BUFFERS",
    "MAX_FRAMES",
    "MAX_SPLIT_BATCH",
    "MAX_TOPIC_LEN",
    "PING",
    "PONG",
    "PUBLISH",
    "RESET",
    "SPLIT_CODECS",
    "STATS",
    "STOPPING",
    "SYNC_PREFIX",
    "VERSION",
    "WELCOME",
    "Meta",
    "check_topic",
    "header",
    "is_sync_topic",
    "pack_meta",
    "pack_seq",
    "data_endpoints_for",
    "topic_for",
    "unpack_meta",
    "unpack_seq",
]

VERSION = 1
HEADER_LEN = 2

# control, client -> hub
HELLO = b"H"
STATS = b"S"
PING = b"h"
CONSUME = b"C"
CANCEL = b"X"
ACK = b"A"
GROUPS_ACK = b"g"
BYE = b"B"
# control, hub -> client
WELCOME = b"W"
PONG = b"o"
CONSUMING = b"c"
DELIVER = b"D"
GROUPS = b"G"
RESET = b"R"
STOPPING = b"Q"
# data, client -> hub and back
PUBLISH = b"P"
FLUSH = b"F"
FLUSHED = b"f"

# Codecs whose payload is one frame per message (see _codec): the hub can hand each message of
# such a batch to a queue group without unpickling anything.
SPLIT_CODECS = frozenset({b"d", b"p"})
# At most this many messages in a split batch, and out-of-band buffers in a batch: each is a frame,
# and the hub drops requests with more than MAX_FRAMES frames (bounded input, DESIGN.md §3).
MAX_SPLIT_BATCH = 64
MAX_BUFFERS = 64
MAX_FRAMES = 4 + max(MAX_SPLIT_BATCH, MAX_BUFFERS + 1)  # identity, header, topic, meta
# An ACK carries three frames per delivery, so a client sends at most this many in one.
MAX_ACKS = (MAX_FRAMES - 2) // 3

TOPIC_END = b"\x00"
SYNC_PREFIX = b"\x00sync:"
# A unique name is "<module>.<qualname>"; anything longer than this is not one of ours.
MAX_TOPIC_LEN = 1024


def header(kind: bytes) -> bytes:
    return bytes((VERSION,)) + kind


def topic_for(unique_name: str) -> bytes:
    return unique_name.encode() + TOPIC_END


def is_sync_topic(topic: bytes) -> bool:
    return topic.startswith(SYNC_PREFIX)


def data_endpoints_for(endpoint: str) -> tuple[str, str]:
    """The hub's publish and fan-out endpoints beside its control endpoint."""
    if endpoint.startswith("ipc://"):
        return endpoint + ".in", endpoint + ".pub"
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
        return f"tcp://{host}:*", f"tcp://{host}:*"  # the hub reports its ports in WELCOME
    raise ValueError(f"unsupported address {endpoint!r}: use ipc:// or tcp://")


# meta frame: codec (1 byte), message count (uint32), publisher's time.time() at publish (double)
_META = struct.Struct("!cId")
Meta = tuple[bytes, int, float]


def pack_meta(codec: bytes, count: int, published_at: float) -> bytes:
    return _META.pack(codec, count, published_at)


_SEQ = struct.Struct("!Q")


def pack_seq(seq: int) -> bytes:
    return _SEQ.pack(seq)


def unpack_seq(frame: bytes) -> int:
    try:
        (seq,) = _SEQ.unpack(frame)
    except struct.error as exc:
        raise ValueError(f"bad seq frame: {exc}") from None
    return int(seq)


def unpack_meta(frame: bytes) -> Meta:
    """Raises ``ValueError`` on a malformed frame."""
    try:
        codec, count, published_at = _META.unpack(frame)
    except struct.error as exc:
        raise ValueError(f"bad meta frame: {exc}") from None
    return codec, count, published_at


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
