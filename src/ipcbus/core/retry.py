"""The retry / dead-letter rule of queue groups, in one place for every broker.

A handler is called at most ``max_attempts`` times with one message; attempt ``n`` (n >= 2) waits
``retry_backoff * 2 ** (n - 2)`` seconds first, capped at :data:`MAX_RETRY_DELAY`. After the last
attempt the message is dead-lettered: published as a :class:`~ipcbus.message.DeadLetter`. Across
processes the consumer makes this decision and tells the hub (the hub never sees the handler, the
exception or the policy): the hub only waits the delay the consumer sent before redelivering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..message import DeadLetter, Message
from .failures import Brief, describe

__all__ = [
    "DEFAULT_PREFETCH",
    "MAX_RETRY_DELAY",
    "QueuePolicy",
    "Verdict",
    "after_failure",
    "publish_dead_letter",
]

logger = logging.getLogger(__name__)

# However large max_attempts and retry_backoff are, a retry waits at most this long.
MAX_RETRY_DELAY = 300.0

# Unacknowledged deliveries a consumer may hold (across processes). A consumer's throughput is at
# most its prefetch per round trip to the hub and back, and on the 2-core machine, shared, a round
# trip under load takes milliseconds: 1 producer -> 2 consumers ran at 0.3x multiprocessing.Queue
# with 10, 2.1x with 100, 2.5x with 250, 2.9x with 500 and 3.3x with 1000 (medians of 4, in one
# quiet session; 1 -> 4 and 4 -> 4 alike). The cost is fairness for long jobs: a consumer may take
# up to this many while another is idle; such consumers pass about their worker threads (4).
DEFAULT_PREFETCH = 1000


@dataclass(frozen=True)
class QueuePolicy:
    """How a queue group retries a delivery whose handler raised.

    A handler is called at most ``max_attempts`` times with one message; attempt ``n`` (n >= 2)
    waits ``retry_backoff * 2 ** (n - 2)`` seconds first, at most ``MAX_RETRY_DELAY`` (brokers
    that run deterministically, like :class:`~ipcbus.broker.TestBroker`, skip the wait). After the
    last attempt the message is dead-lettered: published as a :class:`~ipcbus.message.DeadLetter`.
    Across processes a consumer holds at most ``prefetch`` unacknowledged deliveries (fair
    dispatch); in-process brokers have nothing to prefetch. The default (``DEFAULT_PREFETCH``,
    1000; 10 before) is for throughput: for long jobs, pass about the consumer's worker threads
    (4), or a consumer may hold jobs another one, idle, could run.
    """

    max_attempts: int = 3
    retry_backoff: float = 0.05
    prefetch: int = DEFAULT_PREFETCH

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, not {self.prefetch!r}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        if not self.retry_backoff >= 0:  # also refuses NaN
            raise ValueError(f"retry_backoff must be >= 0, not {self.retry_backoff!r}")

    def delay_before(self, attempt: int) -> float:
        """How long attempt number ``attempt`` waits (0 for the first)."""
        if attempt <= 1 or self.retry_backoff == 0:
            return 0.0
        # The exponent is bounded first: 2.0 ** 10_000 would overflow.
        exponent = min(attempt - 2, 32)
        return float(min(MAX_RETRY_DELAY, self.retry_backoff * 2.0**exponent))


@dataclass(frozen=True)
class Verdict:
    """What becomes of a delivery whose handler failed: another attempt after ``delay``
    seconds, or (``retry`` false) a dead letter."""

    retry: bool
    delay: float


def after_failure(
    policy: QueuePolicy,
    queue_name: str,
    handler: Any,
    message: Message,
    attempt: int,
    exc: BaseException,
) -> Verdict:
    """Log a failed attempt (the same text for every broker) and decide what comes next."""
    logger.error(
        "queue %r handler %r raised on %r (attempt %d of %d)",
        queue_name,
        handler,
        Brief(message),
        attempt,
        policy.max_attempts,
        exc_info=exc,
    )
    if attempt >= policy.max_attempts:
        return Verdict(retry=False, delay=0.0)
    return Verdict(retry=True, delay=policy.delay_before(attempt + 1))


def publish_dead_letter(
    publish: Callable[[Message], None],
    queue_name: str,
    message: Message,
    attempts: int,
    exc: BaseException,
) -> None:
    """The end of a message whose handler failed ``attempts`` times: log, publish a DeadLetter.

    A failing DeadLetter handler is not dead-lettered again (it would feed itself forever), and a
    DeadLetter that cannot be published (the broker closed meanwhile) is logged, not raised.
    """
    logger.error(
        "queue %r dead-lettered %r after %d attempts", queue_name, Brief(message), attempts
    )
    if isinstance(message, DeadLetter):
        return
    try:
        publish(DeadLetter(queue_name, message, attempts, describe(exc)))
    except Exception:
        logger.exception("could not publish the DeadLetter for %r", Brief(message))
