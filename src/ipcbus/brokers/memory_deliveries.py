"""MemoryBroker's queue deliveries: which event loop runs each, how many are in flight, waiting
for them, and what becomes of those whose loop ends first.

A delivery runs on the running loop of the publishing thread if it has one (a *foreign* loop),
else on the loop the broker owns, on a thread of its own. Both kinds are counted: ``wait_idle``
waits for them all, except those on the calling thread's own running loop (waiting would block
them). A foreign loop may end before its deliveries finish: ``asyncio.run()`` cancels what is
left, and a loop may be closed with tasks never run. Such a delivery is handed over to the owned
loop, from the attempt it had reached (its handler may run again: at least once); once the
broker is closed it can no longer be, and it is counted in ``undelivered`` and logged at ERROR.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..core.contract import Subscription
from ..core.failures import Brief
from ..core.loops import start_loop_thread
from ..core.requests import ReplyTo
from ..exceptions import BrokerClosedError
from ..message import Message

__all__ = ["Deliveries", "Job"]

logger = logging.getLogger("ipcbus.brokers.memory")

# How often wait_idle() looks for foreign loops closed with deliveries never run (seconds).
_SWEEP_INTERVAL = 0.05


@dataclass
class Job:
    """One message for one queue group; ``member`` and ``attempt`` follow its retries."""

    member: Subscription
    message: Message
    message_id: str
    published_at: float
    reply_to: ReplyTo | None
    attempt: int = 1
    # Handed over to another loop: what is left of this run (a coroutine closed when its
    # dead loop's task is collected) does nothing more.
    abandoned: bool = False


Run = Callable[[Job], Coroutine[Any, Any, None]]


class Deliveries:
    """The queue deliveries of one ``MemoryBroker`` (see the module docstring)."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._stopped = False
        self._idle = threading.Condition()  # an RLock: a sweep hands over while holding it
        self._owned = 0
        self._owned_tasks: set[asyncio.Task[None]] = set()
        self._foreign: dict[asyncio.Task[None], tuple[asyncio.AbstractEventLoop, Job]] = {}
        self.undelivered = 0

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._owned + len(self._foreign)

    def schedule(self, job: Job) -> bool:
        """Start a delivery; True when it runs on the caller's own running loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is self._loop:
            # Published by a handler running on the owned loop: counted like any owned delivery.
            with self._idle:
                self._owned += 1
            task = running.create_task(self._run(job))
            self._owned_tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._owned_task_done)
            return True
        if running is not None:
            task = running.create_task(self._run(job))
            with self._idle:
                self._foreign[task] = (running, job)
            task.add_done_callback(self._foreign_done)
            return True
        self._on_owned_loop(job)
        return False

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no delivery is in flight (but those on the caller's own running loop);
        False on the timeout."""
        try:
            mine: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            mine = None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while True:
                self._sweep()
                if self._owned + sum(loop is not mine for loop, _ in self._foreign.values()) == 0:
                    return True
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return False
                if self._foreign:
                    wait = _SWEEP_INTERVAL if wait is None else min(wait, _SWEEP_INTERVAL)
                self._idle.wait(wait)

    def stop(self, linger: float) -> None:
        """Stop the owned loop (it cancels what is left on it) and wait for its thread at most
        ``linger`` seconds; no delivery is handed over to it afterwards."""
        with self._loop_lock:
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
            self._stopped = True
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)  # run_loop_forever cancels what is left
            thread.join(timeout=linger)

    # -- the owned loop ----------------------------------------------------------------------

    def _on_owned_loop(self, job: Job) -> None:
        loop = self._owned_loop()
        with self._idle:
            self._owned += 1
        future = asyncio.run_coroutine_threadsafe(self._run(job), loop)
        future.add_done_callback(lambda _: self._owned_done())

    def _owned_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._stopped:
                raise BrokerClosedError("MemoryBroker is closed")
            if self._loop is None:
                self._loop, self._loop_thread = start_loop_thread("ipcbus-memory-loop")
            return self._loop

    def _owned_task_done(self, task: asyncio.Task[None]) -> None:
        self._owned_tasks.discard(task)
        self._owned_done()

    def _owned_done(self) -> None:
        with self._idle:
            self._owned -= 1
            if self._owned == 0:
                self._idle.notify_all()

    # -- foreign loops -----------------------------------------------------------------------

    def _foreign_done(self, task: asyncio.Task[None]) -> None:
        """On the foreign loop: a delivery ended; cancelled, its loop gave it up (asyncio.run()
        cancels what is left when its coroutine returns)."""
        with self._idle:
            entry = self._foreign.get(task)
            if entry is None:
                return  # a sweep took it over already
            if task.cancelled():
                self._hand_over(entry[1], "was cancelled by its event loop (ending)")
            del self._foreign[task]
            self._idle.notify_all()

    def _sweep(self) -> None:
        """Take over the deliveries of foreign loops closed without running them (with
        ``_idle`` held)."""
        for task, (loop, job) in list(self._foreign.items()):
            if loop.is_closed() and not task.done():
                self._hand_over(job, "was left unrun by its event loop (closed)")
                del self._foreign[task]
                self._idle.notify_all()

    def _hand_over(self, job: Job, why: str) -> None:
        """Run ``job`` again on the owned loop, or count it lost if the broker is closed (with
        ``_idle`` held: counted before its foreign entry goes, flush never sees a gap)."""
        job.abandoned = True
        try:
            self._on_owned_loop(dataclasses.replace(job, abandoned=False))
        except BrokerClosedError:
            self.undelivered += 1
            logger.error(
                "queue %r delivery of %r %s after the MemoryBroker closed: it is lost",
                job.member.queue_name,
                Brief(job.message),
                why,
            )
        else:
            logger.debug(
                "queue %r delivery of %r %s: handed over to the broker's loop",
                job.member.queue_name,
                Brief(job.message),
                why,
            )
