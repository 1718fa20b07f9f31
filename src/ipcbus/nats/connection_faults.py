"""What a NATS connection does when the server misbehaves or goes (worker process, the
connection's loop): errors logged, a reconnection counted, and the stores JetStream had not
confirmed when the connection dropped counted in doubt; a connection closed for good wakes the
broker's waiting requesters. The connection itself is ``connection.py``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import nats

from .statistics import Counters

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["ConnectionFaults"]

logger = logging.getLogger("ipcbus.nats.connection")


class ConnectionFaults:
    """The fault callbacks of :class:`~ipcbus.nats.connection.NatsConnection`."""

    servers: str | list[str]
    client: Client
    _closing: bool
    _counters: Counters
    _acked: threading.Condition
    _unacked: dict[int, str]
    _on_closed: Callable[[], None]

    async def _error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            return  # counted and logged where it was dropped (dispatch.Inbox)
        logger.error("NATS client error on %s: %s: %s", self.servers, type(exc).__name__, exc)

    async def _disconnected(self) -> None:
        if self._closing:
            return
        logger.warning("disconnected from the NATS server at %s; reconnecting", self.servers)

    async def _reconnected(self) -> None:
        self._forget_unconfirmed("the connection to the server dropped")
        count = self._counters.add("reconnects")
        logger.warning(
            "reconnected to the NATS server at %s (reconnection %d): broadcast messages "
            "published meanwhile by others were not received",
            self.servers,
            count,
        )

    async def _closed(self) -> None:
        if self._closing:
            return
        logger.error("the connection to the NATS server at %s is closed for good", self.servers)
        self._forget_unconfirmed("the connection to the server closed")
        self._on_closed()

    @property
    def lost(self) -> bool:
        """Closed for good without close(): the reconnection gave up."""
        return bool(self.client.is_closed) and not self._closing

    def _forget_unconfirmed(self, why: str) -> None:
        """Stored publishes JetStream had not confirmed when the connection dropped: their
        confirmations went with it (counted in doubt; flush() waited for them for ever)."""
        with self._acked:
            doubtful, self._unacked = len(self._unacked), {}
            self._acked.notify_all()
        if doubtful:
            count = self._counters.add("store_in_doubt", doubtful)
            logger.error(
                "%s before JetStream confirmed storing %d messages: they may or may not be "
                "stored (%d in doubt so far)",
                why,
                doubtful,
                count,
            )
