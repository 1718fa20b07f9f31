"""Rejections in a queue group across processes: who rejected which message, so that a
rejection is no attempt, and a message is dropped only once every process with members
rejected it.

JetStream counts every delivery (``num_delivered``), a delivery that a process's predicates all
rejected as much as one that failed. So each process that rejects a message says so on
``<namespace>.rejected.<stream>.<consumer>`` (its stream sequence and the process's token),
before it gives the message back; every process with members of the group listens there, and a
delivery's attempt is ``num_delivered`` minus the rejections it heard of. The note goes out on
the same connection as the ``nak`` that follows it, and is read, as deliveries are, as the
client reads: on one server it arrives before the message can come back (in a cluster it may
come late, and that rejection then counts as an attempt, as it did before).

A message rejected again by a process that rejected it before is dropped when every process
with members of the group (a census on the group's presence subject, answered with tokens)
is among its rejecters; otherwise it is given back with a delay that doubles with each
rejection (``REJECT_DELAY`` up to ``MAX_REJECT_DELAY``), so that the members elsewhere get it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..core.failures import Brief
from ..message import Message
from .connection import Handover
from .envelope import Signer, open_note, sign_note
from .group_runs import NAK, TERM, nak

__all__ = ["CENSUS_WAIT", "Rejections", "Seen", "census"]

logger = logging.getLogger(__name__)

REJECT_DELAY = 0.02
MAX_REJECT_DELAY = 2.0
# How long a census waits for the processes with members to answer.
CENSUS_WAIT = 0.25
# Messages whose rejections a process remembers (the oldest are forgotten first).
_REMEMBERED = 100_000
# stream sequence -> (rejections, the tokens of the processes that rejected)
Seen = OrderedDict[int, tuple[int, frozenset[str]]]


class Rejections:
    """The rejections of one group's messages this process knows of (the client's loop)."""

    def __init__(
        self,
        client: Client,
        namespace: str,
        where: str,
        token: str,
        send: Callable[[str, bytes], None],
        seen: Seen,
        signer: Signer,
    ) -> None:
        self._client = client
        self._signer = signer  # notes and census answers are signed (envelope.sign_note)
        self.subject = f"{namespace}.rejected.{where}"
        self._presence = f"{namespace}.members.{where}"
        self._judging: set[asyncio.Task[None]] = set()
        self.token = token
        self._send = send
        # The broker's, for the group: kept while its members here come and go (a consumer
        # that joins again knows what the one before it gave back).
        self._seen = seen
        self._sub: NatsSubscription | None = None

    async def start(self) -> None:
        self._sub = await self._client.subscribe(self.subject, pending_bytes_limit=0)
        self._sub._pending_queue = Handover(self._noted)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def _noted(self, msg: Msg) -> None:
        text = open_note(self._signer, self.subject, msg.data)
        if text is None:
            logger.debug("ignored a rejection note without a valid signature on %s", msg.subject)
            return
        try:
            seq_text, token = text.split(" ", 1)
            seq = int(seq_text)
        except ValueError:
            return
        if token != self.token:  # our own are counted when made (the client may not echo)
            self._count(seq, token)

    def _count(self, seq: int, token: str) -> tuple[int, frozenset[str]]:
        count, tokens = self._seen.pop(seq, (0, frozenset()))
        entry = self._seen[seq] = (count + 1, tokens | {token})
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        return entry

    def count(self, seq: int) -> int:
        """How many times the message was rejected, as far as this process heard."""
        return self._seen.get(seq, (0, frozenset()))[0]

    def reject(self, seq: int) -> tuple[bool, frozenset[str], float]:
        """Say that this process rejects the message ``seq``: whether it rejected it before, who
        rejected it so far, and the delay of its ``nak``."""
        before = self.token in self._seen.get(seq, (0, frozenset()))[1]
        self._send(self.subject, sign_note(self._signer, self.subject, f"{seq} {self.token}"))
        count, tokens = self._count(seq, self.token)
        delay = min(MAX_REJECT_DELAY, REJECT_DELAY * 2.0 ** min(count - 1, 16))
        return before, tokens, delay

    def rejected(self, reply: str, message: Message, seq: int, queue_name: str) -> None:
        """No member of this process accepts the delivery: ``nak`` it with a delay, or, when
        this process rejected it before, drop it if every process with members did."""
        before, rejecters, delay = self.reject(seq)
        if not before:
            self._send(reply, nak(delay))
            return
        task = asyncio.get_running_loop().create_task(
            self._judge(reply, message, seq, rejecters, delay, queue_name)
        )
        self._judging.add(task)
        task.add_done_callback(self._judging.discard)

    async def _judge(
        self,
        reply: str,
        message: Message,
        seq: int,
        rejecters: frozenset[str],
        delay: float,
        queue_name: str,
    ) -> None:
        try:
            present = await census(self._client, self._presence, self._signer)
        except Exception as exc:
            logger.debug("queue group %r: no census (%s)", queue_name, exc)
            present = set()
        if present and present <= rejecters:
            logger.warning(
                "queue group %r: no member of any process accepted %r: dropped",
                queue_name,
                Brief(message),
            )
            self._send(reply, TERM)
            self._seen.pop(seq, None)
        else:
            self._send(reply, nak(delay))

    def give_back(self, reply: str, seq: int) -> None:
        """Back to the group at once, as a rejection (no attempt): a delivery no member here
        takes any more."""
        self.reject(seq)
        self._send(reply, NAK)


async def census(client: Client, presence: str, signer: Signer) -> set[str]:
    """The tokens of the processes that have members of a group now (those that answer on its
    presence subject within ``CENSUS_WAIT``, signed: ``Streams.join``)."""
    tokens: set[str] = set()
    inbox = client.new_inbox()

    async def answered(msg: Msg) -> None:
        token = open_note(signer, presence, msg.data)
        if token is not None:
            tokens.add(token)

    sub = await client.subscribe(inbox, cb=answered)
    try:
        await client.publish(presence, b"", reply=inbox)
        await asyncio.sleep(CENSUS_WAIT)
    finally:
        await sub.unsubscribe()
    return tokens
