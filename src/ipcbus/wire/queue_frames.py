"""The wire frames of queue groups (see ``protocol``): CONSUME, CANCEL, DECLARE, DELETE and
their answers, DELIVER runs and ACK ranges. Imports neither side, nor zmq."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .frames import (
    ACK,
    CANCEL,
    CONSUME,
    CONSUMING,
    DECLARE,
    DECLARED,
    DELETE,
    DELETED,
    DELIVER,
    MAX_ACKS,
    MAX_RETRY_DELAY,
    OUTCOMES,
    _at_least_one,
    _count,
    check_topic,
    header,
)
from .sizes import SIZE_BYTES, check_split

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
        return len(self.sizes) // SIZE_BYTES

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
        check_split(len(sizes) // SIZE_BYTES, sizes, payloads)
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
