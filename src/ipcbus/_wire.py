"""The wire format between hub and proxies. Imported by both; imports neither.

Every client→hub message starts with a two-byte header: the wire version, then the kind. The hub
routes on that header and the topic frame alone and relays payload frames as opaque bytes: it never
unpickles (DESIGN.md §3).

A hub has three sockets. Control and data are separate so that backpressure on the data path
never blocks the control path (a stalled hub still answers HELLO and STATS):

client control DEALER → hub control ROUTER (the hub's address)     ``[header, *body]``
    HELLO    ``[client_id]``  → WELCOME ``[publish_endpoint, fanout_endpoint, hub_id]``
    STATS    ``[]``           → STATS ``[json]``
client data DEALER → hub data ROUTER (``<address>.in``)
    PUBLISH  ``[topic, meta, payload, *buffers]``  relayed on XPUB without the header
    FLUSH    ``[token]``      → FLUSHED ``[token]`` once every earlier PUBLISH of this client was
                                handed to the XPUB socket (one DEALER: the order is kept)
hub XPUB (``<address>.pub``) → client SUB   ``[topic, meta, payload, *buffers]`` or ``[sync_topic]``

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
    "FLUSH",
    "FLUSHED",
    "HEADER_LEN",
    "HELLO",
    "MAX_TOPIC_LEN",
    "PUBLISH",
    "STATS",
    "SYNC_PREFIX",
    "VERSION",
    "WELCOME",
    "Meta",
    "header",
    "is_sync_topic",
    "pack_meta",
    "data_endpoints_for",
    "topic_for",
    "unpack_meta",
]

VERSION = 1
HEADER_LEN = 2

HELLO = b"H"
PUBLISH = b"P"
FLUSH = b"F"
STATS = b"S"
WELCOME = b"W"
FLUSHED = b"f"

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


def unpack_meta(frame: bytes) -> Meta:
    """Raises ``struct.error`` or ``ValueError`` on a malformed frame."""
    codec, count, published_at = _META.unpack(frame)
    return codec, count, published_at
