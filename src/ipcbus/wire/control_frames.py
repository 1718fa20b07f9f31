"""Control frames of the handshake and the hub's notices to every client: HELLO and WELCOME,
GROUPS and GROUPS_ACK, LOSSY, FULL. Built and parsed here for both sides; ``protocol``
re-exports them and documents them with every other frame."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .frames import (
    FULL,
    GROUPS,
    GROUPS_ACK,
    HELLO,
    LOSSY,
    WELCOME,
    _at_least_one,
    _positive_float,
    header,
)

__all__ = [
    "hello",
    "parse_hello",
    "Welcome",
    "groups",
    "parse_groups",
    "groups_ack",
    "parse_groups_ack",
    "lossy",
    "full",
    "parse_full",
]


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
    spool_dir: str = ""

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
            self.spool_dir.encode(),
            *self.grouped_topics,
        ]

    @classmethod
    def parse(cls, body: Sequence[bytes]) -> Welcome:
        publish, fanout, hub_id, interval, timeout, max_size, spool_dir, *grouped = body
        return cls(
            publish.decode(),
            fanout.decode(),
            hub_id,
            _positive_float(interval),
            _positive_float(timeout),
            _at_least_one(max_size),
            tuple(grouped),
            spool_dir.decode(),
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
