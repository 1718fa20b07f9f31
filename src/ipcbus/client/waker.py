"""An eventfd that wakes a thread blocked in a poll: the I/O thread, the dispatcher."""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["Waker"]


class Waker:
    """The eventfd that wakes a thread's poll.

    Any thread may ``wake()`` it, also after ``close()`` (a queue worker acking once ``close()``
    gave up waiting for it): writes and the close share a lock, and nothing is written once it is
    closed. Before, such a late ack wrote 8 bytes into whatever file had reused the fd number.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        self._pending = False

    def wake(self) -> None:
        if not self._pending:
            with self._lock:
                if self._closed:
                    return  # nobody reads it any more, and the number may be another file's
                self._pending = True
                os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        """The polling thread saw the fd readable."""
        # Read, *then* clear the flag (the pump runs after both). Clearing first would let this
        # read swallow the write of a publisher that set the flag meanwhile, leaving the flag set
        # with nothing to wake the poll: later publishes would wait for the idle timeout (seen as
        # 10x slower runs).
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
