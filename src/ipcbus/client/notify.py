"""The thread that tells the user's ``on_hub_state`` callback whether the hub is available.

Not the I/O thread (a callback that blocks, publishes or flushes would stall or deadlock it) and
not the dispatcher (a handler stuck for as long as the hub is away would hold the news back): a
thread of its own, started only when a callback is given. Calls are made in order, one at a time.
Without a callback it only wakes the publishers waiting for room (``on_change``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

__all__ = ["StateNotifier"]

logger = logging.getLogger(__name__)


class StateNotifier:
    def __init__(
        self, callback: Callable[[bool], object] | None, on_change: Callable[[], None]
    ) -> None:
        self._callback = callback
        self._on_change = on_change
        self._events: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(target=self._run, name="ipcbus-hub-state", daemon=True)
            self._thread.start()

    def notify(self, available: bool) -> None:  # the I/O thread
        self._on_change()
        if self._thread is not None:
            self._events.put(available)

    def _run(self) -> None:
        while True:
            available = self._events.get()
            if available is None:
                return
            try:
                assert self._callback is not None
                self._callback(available)
            except BaseException:
                # SystemExit included: a callback must not end the thread that calls the next.
                logger.exception("on_hub_state(%s) raised", available)

    def stop(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._events.put(None)
        if threading.current_thread() is self._thread:
            return  # close() called from the callback: the thread ends after it returns
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("on_hub_state did not return within %s s; not waiting for it", timeout)
