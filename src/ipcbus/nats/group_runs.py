"""A queue group's deliveries on the handler loop (worker process, ``ipcbus-nats-queue-loop``):
each runs its member's handler, reports progress while it runs, and settles it with JetStream's
ack protocol: ack, nak with the retry backoff, or the dead letter and an ack. The pull side that
feeds them is :mod:`ipcbus.nats.groups`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg

from ..core.contract import AsyncMessageContext, Subscription
from ..core.retry import after_failure, publish_dead_letter
from ..core.routing import RouteTable
from ..exceptions import ConsumerDiedError
from ..message import Message
from .calls import NOT_RUN, run_returning
from .envelope import Envelope

__all__ = ["ACK", "NAK", "TERM", "Answer", "GroupRuns", "nak"]

Answer = Callable[[Envelope, Any, BaseException | None], None]

# What a consumer publishes on a delivery's ack subject (JetStream's ack protocol).
ACK = b"+ACK"
NAK = b"-NAK"
IN_PROGRESS = b"+WPI"
TERM = b"+TERM"  # and rejections.py


class GroupRuns:
    """The handler-loop half of :class:`~ipcbus.nats.groups.GroupConsumer` (its state is set
    there)."""

    queue_name: str
    durable: str
    topic: str
    _routes: RouteTable
    _client_loop: asyncio.AbstractEventLoop | None
    _ack_wait: float
    _send: Callable[[str, bytes], None]
    _answer: Answer
    _publish: Callable[[Message], None]
    _lock: threading.Lock
    _in_hand: int
    _waiting: bool
    _tasks: set[asyncio.Future[None]]

    def _wake(self) -> None:  # any thread: the pull loop has room again
        raise NotImplementedError

    def _give_back(self, msg: Msg) -> None:  # the client's loop
        raise NotImplementedError

    async def _run(self, burst: list[tuple[Any, ...]]) -> None:  # the handler loop
        for member, message, envelope, msg, attempt in burst:
            if member is None:
                self._last_attempt_lost(message, msg, attempt - 1)
            else:
                # Kept referenced while they run: the loop holds tasks only weakly.
                task = asyncio.ensure_future(self._handle(member, message, envelope, msg, attempt))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(
        self,
        member: Subscription,
        message: Message,
        envelope: Envelope,
        msg: Msg,
        attempt: int,
    ) -> None:  # the handler loop
        # One id per message and group, the same on every attempt.
        context = AsyncMessageContext._of(
            self.queue_name, f"{envelope.message_id}/{self.durable}", attempt, envelope.published_at
        )
        AsyncMessageContext._current.set(context)
        while True:
            if not member.active:  # cancelled since the delivery was taken: another member
                picked = self._routes.pick(self.topic, self.queue_name, message)
                if picked is None:
                    loop = self._client_loop
                    if loop is not None and not loop.is_closed():
                        loop.call_soon_threadsafe(self._give_back, msg)
                    self._done()
                    return
                member = picked
            task = asyncio.ensure_future(run_returning(member, message))
            try:
                while not (await asyncio.wait({task}, timeout=self._ack_wait / 3))[0]:
                    self._send(msg.reply, IN_PROGRESS)
            except asyncio.CancelledError:
                # The broker closes: the delivery goes back to the group at once.
                task.cancel()
                self._send(msg.reply, NAK)
                self._done()
                raise
            result, failure = task.result()
            if result is not NOT_RUN:
                break
        if failure is None:
            self._send(msg.reply, ACK)
            if envelope.reply:
                self._answer(envelope, result, None)
        else:
            verdict = after_failure(
                member.policy, self.queue_name, member.handler, message, attempt, failure
            )
            if verdict.retry:
                self._send(msg.reply, nak(verdict.delay))
            else:
                publish_dead_letter(self._publish, self.queue_name, message, attempt, failure)
                self._send(msg.reply, ACK)
                if envelope.reply:
                    self._answer(envelope, None, failure)
        self._done()

    def _last_attempt_lost(self, message: Message, msg: Msg, attempts: int) -> None:
        """The handler loop (publishing from the client's loop could wait for that loop)."""
        lost = ConsumerDiedError(
            "the process that ran its last attempt died before acknowledging it"
        )
        publish_dead_letter(self._publish, self.queue_name, message, attempts, lost)
        self._send(msg.reply, ACK)
        self._done()

    def _done(self) -> None:  # the handler loop
        with self._lock:
            self._in_hand -= 1
            wake, self._waiting = self._waiting, False
        if wake:
            self._wake()


def nak(delay: float) -> bytes:
    """A ``nak``: delivered again after ``delay`` seconds."""
    return NAK if not delay else b'-NAK {"delay": %d}' % (delay * 1e9)
