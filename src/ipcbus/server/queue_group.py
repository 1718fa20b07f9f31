"""One queue group inside the hub (``QueueGroup``): the runs it holds, its consumers with the
deliveries they hold, its counts and dead letters. The rules are in :mod:`ipcbus.server.queues`."""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from ..wire.protocol import Deliver
from .dead_letters import DeadLetters
from .runs import InFlight, Run

__all__ = ["ConsumerKey", "DeadRecord", "Delivery", "QueueConsumer", "QueueGroup"]

ConsumerKey = tuple[bytes, bytes]  # (client identity, subscription id)


@dataclass(eq=False)
class QueueConsumer:
    key: ConsumerKey
    prefetch: int
    stream: bytes  # its delivery stream (unique per hub and per coming of the consumer)
    next_seq: int = 1
    # Runs delivered and not settled, by first sequence number (ascending: insertion order).
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    unacked: int = 0  # messages in flight
    cancelled: bool = False  # takes nothing new; leaves once its deliveries are settled

    @property
    def credit(self) -> int:
        return self.prefetch - self.unacked


@dataclass(frozen=True)
class Delivery:
    """A run handed to one consumer; the control plane sends it in a DELIVER request."""

    consumer: QueueConsumer
    run: Run
    first_seq: int
    topic: bytes
    id_prefix: bytes

    @property
    def identity(self) -> bytes:
        return self.consumer.key[0]

    @property
    def subscription_id(self) -> bytes:
        return self.consumer.key[1]

    @property
    def stream(self) -> bytes:
        return self.consumer.stream

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.run.count - 1

    def wire(self) -> Deliver:
        run = self.run
        return Deliver(
            self.subscription_id,
            self.consumer.stream,
            self.first_seq,
            run.attempt,
            self.id_prefix,
            run.first_id,
            self.topic,
            run.meta,
            run.sizes,
            run.payloads,
        )


@dataclass(frozen=True)
class DeadRecord:
    message_id: str
    attempts: int
    error: str


class QueueGroup:
    """One ``queue_name`` on one topic."""

    def __init__(
        self, name: str, topic: bytes, max_held: int, max_dead: int, max_dead_bytes: int
    ) -> None:
        self.name = name
        self.topic = topic
        self.max_held = max_held
        self.pending: deque[Run] = deque()
        self.pending_messages = 0
        self.delayed: list[tuple[float, int, Run]] = []  # retries waiting for backoff
        self.delayed_messages = 0
        # What the held messages' payloads take (views of the frames they came in: a run of a
        # batch keeps the batch's frame alive, so this is a lower bound of the memory).
        self.held_bytes = 0
        self.consumers: dict[ConsumerKey, QueueConsumer] = {}
        self.cursor = 0
        self.dead = DeadLetters(max_dead, max_dead_bytes)  # with their payloads, bounded
        self.counts = {
            "published": 0,
            "delivered": 0,
            "acked": 0,
            "redelivered": 0,
            "retried": 0,
            "dead_lettered": 0,
            "rejected_dropped": 0,
        }

    @property
    def held(self) -> int:
        return self.pending_messages + self.delayed_messages

    @property
    def in_flight(self) -> int:
        return sum(consumer.unacked for consumer in self.consumers.values())

    def push(self, run: Run) -> None:
        self.pending.append(run)
        self.pending_messages += run.count
        self.held_bytes += len(run.payloads)

    def push_front(self, runs: list[Run]) -> None:
        """``runs``, in order, before everything held."""
        self.pending.extendleft(reversed(runs))
        self.pending_messages += sum(run.count for run in runs)
        self.held_bytes += sum(len(run.payloads) for run in runs)

    def pop(self) -> Run:
        run = self.pending.popleft()
        self.pending_messages -= run.count
        self.held_bytes -= len(run.payloads)
        return run

    def take_front(self, count: int) -> Run:
        """The first ``count`` messages of the first run (fewer than it holds)."""
        run = self.pending[0].split_off(count)
        self.pending_messages -= count
        self.held_bytes -= len(run.payloads)
        return run

    def delay(self, due: float, order: int, run: Run) -> None:
        """``run`` waits until ``due`` (a retry's backoff), held all the same."""
        heapq.heappush(self.delayed, (due, order, run))
        self.delayed_messages += run.count
        self.held_bytes += len(run.payloads)

    def undelay(self) -> Run:
        """The retry due first, no longer waiting."""
        run = heapq.heappop(self.delayed)[2]
        self.delayed_messages -= run.count
        self.held_bytes -= len(run.payloads)
        return run

    def clear(self) -> int:
        """Drop everything held (``purge``); how many messages that was."""
        dropped = self.held
        self.pending.clear()
        self.delayed.clear()
        self.pending_messages = self.delayed_messages = self.held_bytes = 0
        return dropped

    def statistics(self) -> dict[str, int]:
        return {
            **self.counts,
            "consumers": len(self.consumers),
            "held": self.held,
            "held_bytes": self.held_bytes,
            "in_flight": self.in_flight,
            "dead_letters_kept": len(self.dead),
        }
