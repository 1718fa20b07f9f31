"""The threads of a client process, each guarded: none of them ends without a word.

A thread body that raises (a bug of ipcbus, a ``BaseException`` that got through) is logged
CRITICAL and reported to its broker, which then fails loudly: ``publish()`` and ``flush()`` raise
``BrokerFailedError`` naming the thread, and the I/O thread says goodbye to the hub, which hands
this process's queue deliveries to other consumers. Before, such a thread just ended: a dead
dispatcher or queue worker went unnoticed while the process kept heartbeating, its deliveries in
flight forever.

The threads that run handlers (the dispatcher, the queue workers, the queue event loop) are marked:
``publish()`` from them never waits for room in the outbox (``runs_handlers``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

__all__ = ["OnDeath", "guarded", "runs_handlers", "start_thread"]

logger = logging.getLogger(__name__)

# Called with the thread's name and what ended it.
OnDeath = Callable[[str, BaseException], None]

_local = threading.local()


def _forget_in_child() -> None:
    # A handler that forks: the child's only thread is no handler thread of the child.
    _local.runs_handlers = False


os.register_at_fork(after_in_child=_forget_in_child)


def runs_handlers() -> bool:
    """True on a thread of ipcbus that runs handlers (of any broker of this process)."""
    return getattr(_local, "runs_handlers", False)


def guarded(
    name: str, body: Callable[[], None], on_death: OnDeath, *, handlers: bool = False
) -> Callable[[], None]:
    """``body`` as a thread target that reports its death to ``on_death`` instead of ending
    silently; ``handlers`` marks the thread as one that runs handlers."""

    def run() -> None:
        _local.runs_handlers = handlers
        try:
            body()
        except BaseException as exc:
            logger.critical(
                "the ipcbus thread %s died (%s: %s): its broker fails",
                name,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
            try:
                on_death(name, exc)
            except BaseException:
                logger.exception("could not report the death of the ipcbus thread %s", name)

    return run


def start_thread(
    name: str, body: Callable[[], None], on_death: OnDeath, *, handlers: bool = False
) -> threading.Thread:
    """Start ``body`` on a guarded daemon thread called ``name``."""
    thread = threading.Thread(
        target=guarded(name, body, on_death, handlers=handlers), name=name, daemon=True
    )
    thread.start()
    return thread
