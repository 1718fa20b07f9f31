"""The coroutine side of a client's queue runner (worker process): ``async def`` handlers run
as tasks of an event loop the runner owns, on a thread of its own (``runner.py``)."""

from __future__ import annotations

import asyncio
import logging
import threading

from ..core.contract import AsyncMessageContext
from ..core.handlers import is_cancellation
from ..core.loops import run_loop_forever
from ..message import Message
from ..wire import protocol as wire
from .acks import AckBuffer
from .jobs import Job, ok
from .runner_outcomes import Outcomes
from .threads import OnDeath, start_thread

__all__ = ["CoroutineRuns"]

logger = logging.getLogger("ipcbus.client.runner")


class CoroutineRuns(Outcomes):
    """The event loop of :class:`~ipcbus.client.runner.QueueRunner`."""

    _lock: threading.Lock
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread: threading.Thread | None
    _on_death: OnDeath
    _tasks: set[asyncio.Task[None]]
    _acks: AckBuffer

    def _prepare(
        self, job: Job, index: int, payload: bytes
    ) -> tuple[Message, AsyncMessageContext] | wire.Ack:
        raise NotImplementedError

    def _done(self, count: int, coroutine: bool = False) -> bool:
        raise NotImplementedError

    def flush_acks(self) -> None:
        raise NotImplementedError

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = self._loop = asyncio.new_event_loop()
                self._loop_thread = start_thread(
                    "ipcbus-queue-loop",
                    lambda: run_loop_forever(loop),
                    self._on_death,
                    handlers=True,
                )
            return self._loop

    def _start_tasks(self, deliveries: list[tuple[Job, int, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        for job, index, payload in deliveries:
            task = loop.create_task(self._run_coroutine(job, index, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_coroutine(self, job: Job, index: int, payload: bytes) -> None:
        try:
            prepared = self._prepare(job, index, payload)
            if isinstance(prepared, wire.Ack):
                self._acks.add(prepared)
                return
            message, context = prepared
            AsyncMessageContext._current.set(context)  # this task's own context
            seq = job.run.first_seq + index
            try:
                result = await job.subscription.handler(message)
            except BaseException as exc:
                if is_cancellation(exc):
                    raise  # the loop stops (close): the hub gets the delivery back
                # A failed attempt (module docstring). Let through, SystemExit would stop the
                # loop (asyncio re-raises it from run_forever) and a CancelledError the handler
                # raised itself would leave the delivery unacked.
                self._acks.add(self._failed(job, index, message, context, exc))
            else:
                self._answer(job, result)
                self._acks.add(ok(job.run.stream, seq, seq))
        except Exception:
            logger.exception("ipcbus could not run a queue delivery")
        finally:
            self._done(1, coroutine=True)
            # The acks of one loop turn travel together: one wake-up of the I/O thread.
            if not self._acks.flush_scheduled:
                self._acks.flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush_acks)
