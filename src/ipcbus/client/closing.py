"""``HubBroker.close()``: flush within the linger, let the queue deliveries in hand finish,
stop the threads, and report what could not be delivered (logged and counted)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..exceptions import (
    BrokerFailedError,
    HubUnavailableError,
    MessageSerializationError,
    PublishTimeoutError,
)
from .subscribing import Subscribing

if TYPE_CHECKING:
    from .notify import StateNotifier
    from .runner import QueueRunner

__all__ = ["Closing"]

# The broker's logger, as before the split: what close() reports is searched for under it.
logger = logging.getLogger("ipcbus.client.broker")


class Closing(Subscribing):
    """How :class:`~ipcbus.client.broker.HubBroker` closes (see its docstring)."""

    undelivered: int
    _runner: QueueRunner
    _notifier: StateNotifier

    def _close(self) -> None:
        linger = self.options.linger
        # The deliveries in hand and every thread that runs handlers share one linger: each
        # stuck handler thread waited for a linger of its own (close() took 2 + n lingers).
        deadline = time.monotonic() + linger
        if self._foreign():
            return  # the sockets and threads belong to the parent: drop nothing, touch nothing
        if threading.current_thread() is self._dispatcher.thread:
            # close() in a broadcast handler: no handler runs after it, and what arrives
            # meanwhile is dropped, not held (held, it would stall the hub, and the flush below).
            self._dispatcher.abandon()
        if self._failed is None and self._io.alive and self._io.hub_alive:
            self._finishing = True
            flushed = self._close_flush()
            # Take no new queue deliveries; finish (and ack) those in hand, within the linger.
            # What is still unfinished then goes back to the hub with our goodbye.
            for subscription_id in list(self._queue_subscriptions):
                self._io.cancel_consume(subscription_id)
            deadline = time.monotonic() + linger  # after the flush, which has its own
            if not self._runner.wait_idle(linger):
                logger.warning("closing %r with queue deliveries unfinished", self)
            self._finishing = False  # a handler still running now publishes nothing more
            self._runner.flush_acks()
            if flushed and self._io.outbox.unconfirmed() and self._io.hub_alive:
                self._close_flush()  # what the handlers published meanwhile
        self._io.stop(linger)  # runs no handler: quick, bounded on its own
        self._runner.stop(_left(deadline))
        self._dispatcher.stop(_left(deadline))
        self._notifier.stop(_left(deadline))
        self._gate.wake_all()
        self._report_at_close()

    def _close_flush(self) -> bool:
        """Flush within the linger; False when the hub did not confirm everything."""
        try:
            self._flush(self.options.linger, while_hub_alive=True)
        except (PublishTimeoutError, HubUnavailableError, BrokerFailedError) as exc:
            logger.warning("closing %r without a complete flush: %s", self, exc)
            return False
        except MessageSerializationError as exc:
            logger.error("closing %r: %s", self, exc)
        return True

    def _report_at_close(self) -> None:
        rejections = self._rejections.take()
        if rejections is not None:
            logger.error("closing %r: %s", self, rejections)
        self.undelivered = self._io.outbox.unconfirmed()
        if self.undelivered:
            logger.error(
                "closing %r: %d messages publish() had accepted were not delivered: no hub "
                "confirmed them (%d never left this process); they are lost",
                self,
                self.undelivered,
                self._io.outbox.never_sent(),
            )


def _left(deadline: float) -> float:
    """What is left of the linger; once spent, a moment for a thread that is merely finishing,
    not another linger for one that is stuck."""
    return max(0.1, deadline - time.monotonic())
