"""Where ``publish()`` waits, in the publishing thread (client side): for room in the outbox
(``max_pending``: backpressure from a slow hub or subscriber), and for a full queue group's topic
to reopen (the hub's FULL) before the message enters the outbox, so that its publisher's later
messages of other types cannot overtake it.

Threads that run handlers never wait here (``client.threads.runs_handlers``): the hub may be
waiting for that very thread while it stops reading this process (a circle that stopped the bus).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .io import IOThread

__all__ = ["PublishGate"]


class PublishGate:
    def __init__(self, io: IOThread, stopped: Callable[[], bool]) -> None:
        self._io = io
        self._stopped = stopped  # closed, failed, or the I/O thread is gone: stop waiting
        self._space = threading.Condition()
        self._waiting = 0

    def notify(self) -> None:  # I/O thread: room was freed, or the hub's state changed
        if self._waiting:
            with self._space:
                self._space.notify_all()

    def wake_all(self) -> None:
        with self._space:
            self._space.notify_all()

    def wait_while_full(self, topic: bytes, limit: float | None) -> tuple[bool, float | None]:
        """Wait up to ``limit`` while ``topic`` is full; (opened, what is left of ``limit``)."""
        deadline = None if limit is None else time.monotonic() + limit
        opened = self._wait(lambda: topic not in self._io.full_topics, limit)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return opened, left

    def wait_for_space(self, limit: int, timeout: float | None) -> bool:
        """Wait up to ``timeout`` until fewer than ``limit`` messages wait in the outbox."""
        outbox = self._io.outbox
        return self._wait(lambda: len(outbox) < limit, timeout) and len(outbox) < limit

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        session = self._io.session
        with self._space:
            self._waiting += 1
            try:
                return self._space.wait_for(
                    lambda: ready() or self._stopped() or not session.available, timeout
                )
            finally:
                self._waiting -= 1
