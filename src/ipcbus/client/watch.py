"""What a client's I/O thread learns from its sockets' monitors (client side): a connection to
the hub that closed (the hub is gone: noticed at once, not at the heartbeat timeout) and a
handshake with a peer that could not prove the bus secret (an impostor at the hub's address:
counted and logged, and nothing of it is ever read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["ConnectionWatch"]

logger = logging.getLogger(__name__)

Socket = zmq.Socket[bytes]

HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# A peer that fails the handshake is retried by ZeroMQ every reconnect interval: log at most
# once per this many seconds (the count is kept).
_AUTH_LOG_PERIOD = 10.0


class ConnectionWatch:
    def __init__(self, endpoint: str, on_disconnect: Callable[[str], None]) -> None:
        self._endpoint = endpoint
        self._on_disconnect = on_disconnect
        self._monitors: dict[Socket, Socket] = {}  # socket -> its monitor
        self.auth_failures = 0  # handshakes with a peer that did not prove the bus secret
        self._logged_at = -_AUTH_LOG_PERIOD

    def watch(self, sock: Socket, events: int = 0) -> Socket:
        """Monitor ``sock`` for failed handshakes (and ``events``); its monitor socket."""
        monitor = self._monitors[sock] = sock.get_monitor_socket(HANDSHAKE_FAILED | events)
        return monitor

    def monitors(self) -> Iterator[Socket]:
        return iter(list(self._monitors.values()))

    def read(self, monitor: Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._on_disconnect("its connection closed")
            elif event["event"] & HANDSHAKE_FAILED:
                self._authentication_failed()

    def close(self) -> None:
        for watched, monitor in self._monitors.items():
            watched.disable_monitor()
            monitor.close(linger=0)
        self._monitors.clear()

    def _authentication_failed(self) -> None:
        self.auth_failures += 1
        now = time.monotonic()
        if now - self._logged_at >= _AUTH_LOG_PERIOD:
            self._logged_at = now
            logger.error(
                "the peer at %s failed to prove the bus secret (%d handshakes so far): it is not "
                "our hub, nothing of it is read",
                self._endpoint,
                self.auth_failures,
            )
