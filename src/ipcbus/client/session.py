"""A client's session with its hub: is the hub there, when to ping it, when to say HELLO again.

Pure state, no sockets: the I/O thread asks it what is due and tells it what it heard. The hub
is declared gone when it is silent for its ``heartbeat_timeout``, when the data connection
closes, or when it says RESET or STOPPING; from then on the client says HELLO, with backoff,
until a hub (the same one back, or a new one at the address) says WELCOME. After such a
reconnect, publishing waits until the new hub has this process's subscriptions (``resynced``),
so the process hears its own held publishes. A hub unreachable for ``lost_timeout`` seconds
(``ClientOptions.hub_lost_timeout``) is gone for good (``available`` false) until one says
WELCOME again.
"""

from __future__ import annotations

import logging
import threading
import time

from ..exceptions import HubUnavailableError
from ..wire.protocol import Welcome

__all__ = ["Session"]

logger = logging.getLogger(__name__)

_HELLO_BACKOFF_MIN = 0.05
_HELLO_BACKOFF_MAX = 1.0


class Session:
    def __init__(self, endpoint: str, lost_timeout: float | None = None) -> None:
        self.endpoint = endpoint
        self.hub_id = b""  # of the hub that welcomed this client last
        self.hub_alive = True
        # False once the hub has been unreachable for lost_timeout (read by publishers).
        self.available = True
        self.lost_timeout = lost_timeout
        self.lost_at = 0.0
        self.heartbeat_interval = 0.5
        self.hub_timeout = 3.0
        self.last_heard = time.monotonic()
        self.next_ping = 0.0
        self.next_hello = 0.0
        self._hello_backoff = _HELLO_BACKOFF_MIN
        self.resynced = threading.Event()
        self.resynced.set()
        self._resync_deadline = 0.0

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def welcome(self, welcome: Welcome, resync: bool) -> bool:
        """A hub said WELCOME; True when it ends an outage (a reconnect). With ``resync``,
        publishing waits for ``resynced`` (at most a heartbeat timeout)."""
        self.hub_id = welcome.hub_id
        self.heartbeat_interval = welcome.heartbeat_interval
        self.hub_timeout = welcome.heartbeat_timeout
        reconnected = not self.hub_alive
        if not self.available:
            logger.warning("the hub at %s is back: publishing again", self.endpoint)
            self.available = True
        if reconnected:
            logger.warning("reconnected to the hub at %s", self.endpoint)
            if resync:
                self.resynced = threading.Event()
                self._resync_deadline = time.monotonic() + self.hub_timeout
        self.hub_alive = True
        self._hello_backoff = _HELLO_BACKOFF_MIN
        return reconnected

    def lost(self, why: str) -> bool:
        """The hub is gone; True when this is news (then say HELLO at once)."""
        if not self.hub_alive:
            return False  # already saying HELLO, with backoff
        logger.warning("the hub at %s is gone (%s): reconnecting", self.endpoint, why)
        self.hub_alive = False
        self.lost_at = time.monotonic()
        self.next_hello = 0.0
        return True

    def expired(self, now: float) -> bool:
        """True once, when the hub has been unreachable for ``lost_timeout``."""
        if self.hub_alive or not self.available or self.lost_timeout is None:
            return False
        if now - self.lost_at < self.lost_timeout:
            return False
        logger.error(
            "the hub at %s has been unreachable for %.1f s (hub_lost_timeout): publish() raises "
            "HubUnavailableError until a hub is back",
            self.endpoint,
            now - self.lost_at,
        )
        self.available = False
        return True

    def due(self, now: float, can_send: bool) -> str | None:
        """What to send now: ``"ping"``, ``"hello"``, ``"lost"`` (the hub fell silent) or
        ``None``. ``can_send`` is false while control requests still wait to leave."""
        if not self.resynced.is_set() and now >= self._resync_deadline:
            logger.warning(
                "the hub at %s did not confirm our subscriptions: going on", self.endpoint
            )
            self.resynced.set()
        if self.hub_alive:
            if now - self.last_heard > self.hub_timeout:
                return "lost"
            if now >= self.next_ping:
                self.next_ping = now + self.heartbeat_interval
                return "ping"
            return None
        if now >= self.next_hello and can_send:
            self.next_hello = now + self._hello_backoff
            self._hello_backoff = min(2 * self._hello_backoff, _HELLO_BACKOFF_MAX)
            return "hello"
        return None

    def unavailable(self, waiting: int) -> HubUnavailableError:
        """What publish(), flush() and subscribe() raise while ``available`` is false."""
        return HubUnavailableError(
            f"the hub at {self.endpoint} has been unreachable for more than {self.lost_timeout} s "
            f"(hub_lost_timeout); {waiting} messages published before wait for it"
        )

    def wake_at(self) -> float:
        if self.hub_alive:
            return self.next_ping
        if self.available and self.lost_timeout is not None:
            return min(self.next_hello, self.lost_at + self.lost_timeout)
        return self.next_hello

    def silence(self, now: float) -> float:
        return now - self.last_heard
