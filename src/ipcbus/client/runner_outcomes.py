"""What a queue delivery's end is, when it is not a success (worker process): a retry or a
dead letter for a handler that raised, a dead letter for what cannot be decoded, and a request's
answer. The runner's threads and its loop
(``runner.py``, ``runner_loop.py``) call these."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..core.contract import AsyncMessageContext
from ..core.failures import describe
from ..core.requests import Failure, ReplyTo
from ..core.requests import answer as answer_request
from ..core.retry import after_failure, publish_dead_letter
from ..message import Message
from ..wire import protocol as wire
from .jobs import Job

__all__ = ["Outcomes"]

logger = logging.getLogger("ipcbus.client.runner")


class Outcomes:
    """The ends of deliveries of :class:`~ipcbus.client.runner.QueueRunner`."""

    _lock: threading.Lock
    _publish: Callable[[Message], None]
    _reply_to: Callable[[wire.Route], ReplyTo] | None
    undecodable: int

    def _undecodable(self, job: Job, index: int, message_id: str, exc: BaseException) -> wire.Ack:
        with self._lock:  # workers decode concurrently
            self.undecodable += 1
        error = f"undecodable: {describe(exc)}"
        logger.error(
            "queue %r could not decode a %s message (%s): %s",
            job.subscription.queue_name,
            job.subscription.topic,
            message_id,
            error,
        )
        seq = job.run.first_seq + index
        self._answer_failure(job, exc)
        return wire.Ack(job.run.stream, seq, seq, wire.OUTCOME_DEAD, error=error)

    def _answer(self, job: Job, result: object) -> None:
        """A request's handler returned ``result``: a Message answers."""
        if job.route is not None and self._reply_to is not None:
            answer_request(self._reply_to(job.route), result)

    def _answer_failure(self, job: Job, exc: BaseException) -> None:
        """A request's last attempt failed (dead-lettered): the failure answers."""
        if job.route is not None and self._reply_to is not None:
            self._reply_to(job.route).fail(Failure.of(exc))

    def _failed(
        self,
        job: Job,
        index: int,
        message: Message,
        context: AsyncMessageContext,
        exc: BaseException,
    ) -> wire.Ack:
        """The answer for a handler that raised: a retry, or a dead letter."""
        subscription, run = job.subscription, job.run
        seq = run.first_seq + index
        verdict = after_failure(
            subscription.policy,
            context.queue_name,
            subscription.handler,
            message,
            context.attempt,
            exc,
        )
        error = describe(exc)
        if verdict.retry:
            return wire.Ack(run.stream, seq, seq, wire.OUTCOME_FAILED, verdict.delay, error)
        publish_dead_letter(self._publish, context.queue_name, message, context.attempt, exc)
        self._answer_failure(job, exc)
        return wire.Ack(run.stream, seq, seq, wire.OUTCOME_DEAD, error=error)
