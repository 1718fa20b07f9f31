"""Runs a proxy's queue deliveries and answers each with an ack.

Handlers never run on the I/O thread (a slow handler must not stall acks or heartbeats):
coroutine handlers run as tasks of an event loop this runner owns; plain functions run on a pool
of worker threads (``threads``), which take deliveries straight from the I/O thread. Measured:
sending plain handlers through ``asyncio.to_thread`` cost one self-pipe write per completion and
capped a consumer at ~10 k msg/s; the pool does without the loop. The number of deliveries in
hand at once is bounded by the hub (``prefetch`` per subscription).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from . import _codec, _queues, _wire
from ._base import (
    AsyncMessageContext,
    Subscription,
    call_to_completion,
    describe_error,
    publish_dead_letter,
)
from ._loops import start_loop_thread
from .message import Message

__all__ = ["QueueRunner"]

logger = logging.getLogger(__name__)

SendAcks = Callable[[list[bytes]], None]
# A delivery as the hub described it: its subscription, then the DELIVER fields.
Job = tuple[Subscription, bytes, bytes, bytes, bytes, bytes, bytes]


class QueueRunner:
    def __init__(
        self,
        lookup: Callable[[bytes], Subscription | None],
        send_acks: SendAcks,
        publish: Callable[[Message], None],
        *,
        threads: int = 4,
    ) -> None:
        self._lookup = lookup
        self._send_acks = send_acks
        self._publish = publish
        self._thread_count = threads
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = threading.Condition()
        self._running = 0
        self._acks: list[bytes] = []  # (delivery_id, outcome, error) * n, sent in bursts
        self._flush_scheduled = False

    # -- called by the I/O thread -------------------------------------------------------------

    def submit(self, frames: list[bytes]) -> None:
        """One DELIVER: ``(descriptor, meta, payload) * n``."""
        if not frames or len(frames) % 3:
            logger.error("malformed DELIVER with %d frames ignored", len(frames))
            return
        coroutines: list[Job] = []
        with self._idle:
            self._running += len(frames) // 3
        for index in range(0, len(frames), 3):
            descriptor, meta, payload = frames[index : index + 3]
            subscription_id, delivery_id, message_id, attempt, final, _topic = descriptor.split(
                b" ", 5
            )
            subscription = self._lookup(subscription_id)
            if subscription is None or not subscription.active:
                # Cancelled while the delivery was on its way: another consumer takes it.
                self._ack(delivery_id, _queues.OUTCOME_REJECTED, "")
                self._done()
                continue
            job = (subscription, delivery_id, message_id, attempt, final, meta, payload)
            if inspect.iscoroutinefunction(subscription.handler):
                coroutines.append(job)
            else:
                self._ensure_workers()
                self._jobs.put(job)
        if coroutines:
            self._ensure_loop().call_soon_threadsafe(self._start_tasks, coroutines)
        self.flush_acks()  # the rejections above, if any

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every submitted delivery was handled and its ack handed to the I/O."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def stop(self, timeout: float | None) -> None:
        with self._lock:
            loop, loop_thread, workers = self._loop, self._loop_thread, self._workers
            self._loop = self._loop_thread = None
            self._workers = []
        for _ in workers:
            self._jobs.put(None)
        if loop is not None and loop_thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join(timeout)
        for worker in workers:
            worker.join(timeout)

    # -- both kinds of handler ----------------------------------------------------------------

    def _prepare(self, job: Job) -> tuple[Message, AsyncMessageContext] | None:
        """Decode and filter; answers the hub itself (and returns None) when not to run."""
        subscription, delivery_id, message_id, attempt, _final, meta, payload = job
        queue_name = subscription.queue_name
        assert queue_name is not None
        codec, _count, published_at = _wire.unpack_meta(meta)
        try:
            message = _codec.decode_one(codec, payload, subscription.message_type)
        except Exception as exc:
            logger.exception("queue %r could not decode message %s", queue_name, message_id)
            self._ack(delivery_id, _queues.OUTCOME_DEAD, f"undecodable: {describe_error(exc)}")
            return None
        if not subscription.accepts(message):
            self._ack(delivery_id, _queues.OUTCOME_REJECTED, "")
            return None
        return message, AsyncMessageContext(
            queue_name, message_id.decode(), int(attempt), published_at
        )

    def _conclude(
        self, job: Job, message: Message, context: AsyncMessageContext, exc: Exception | None
    ) -> None:
        subscription, delivery_id, _message_id, _attempt, final, _meta, _payload = job
        if exc is None:
            self._ack(delivery_id, _queues.OUTCOME_OK, "")
            return
        logger.error(
            "queue %r handler %r raised on %r (attempt %d)",
            context.queue_name,
            subscription.handler,
            message,
            context.attempt,
            exc_info=exc,
        )
        if final != b"1":
            self._ack(delivery_id, _queues.OUTCOME_FAILED, describe_error(exc))
            return
        publish_dead_letter(self._publish, context.queue_name, message, context.attempt, exc)
        self._ack(delivery_id, _queues.OUTCOME_DEAD, describe_error(exc))

    def _ack(self, delivery_id: bytes, outcome: bytes, error: str) -> None:
        with self._lock:
            self._acks += (delivery_id, outcome, error.encode())

    def flush_acks(self) -> None:
        """Hand the acks collected so far to the I/O thread (any thread may call it)."""
        with self._lock:
            acks, self._acks = self._acks, []
            self._flush_scheduled = False
        if acks:
            self._send_acks(acks)

    def _done(self) -> bool:
        """One delivery less in hand; True when none is left."""
        with self._idle:
            self._running -= 1
            idle = self._running == 0
            if idle:
                self._idle.notify_all()
        return idle

    # -- plain functions: worker threads ------------------------------------------------------

    def _ensure_workers(self) -> None:
        if self._workers:
            return
        with self._lock:
            while len(self._workers) < self._thread_count:
                worker = threading.Thread(
                    target=self._work, name="ipcbus-queue-worker", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._run_plain(job)
            except Exception:
                logger.exception("ipcbus could not run a queue delivery")
            finally:
                # Acks leave in bursts: when this worker has nothing queued behind it.
                idle = self._done()
                if idle or self._jobs.empty() or len(self._acks) >= 3 * _wire.MAX_ACKS:
                    self.flush_acks()

    def _run_plain(self, job: Job) -> None:
        prepared = self._prepare(job)
        if prepared is None:
            return
        message, context = prepared
        try:
            call_to_completion(job[0], message, context)
        except Exception as exc:
            self._conclude(job, message, context, exc)
        else:
            self._conclude(job, message, context, None)

    # -- coroutine functions: the event loop --------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop, self._loop_thread = start_loop_thread("ipcbus-queue-loop")
            return self._loop

    def _start_tasks(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            task = loop.create_task(self._run_coroutine(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_coroutine(self, job: Job) -> None:
        try:
            prepared = self._prepare(job)
            if prepared is None:
                return
            message, context = prepared
            AsyncMessageContext._current.set(context)  # this task's own context
            try:
                await job[0].handler(message)
            except Exception as exc:
                self._conclude(job, message, context, exc)
            else:
                self._conclude(job, message, context, None)
        except Exception:
            logger.exception("ipcbus could not run a queue delivery")
        finally:
            self._done()
            # The acks of one loop turn travel together: one wake-up of the I/O thread.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush_acks)


async def _await(awaitable: Any) -> None:
    await awaitable
