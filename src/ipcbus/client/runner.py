"""Runs a client's queue deliveries (in the worker process) and answers each with an ack.

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

from ..core import codec
from ..core.contract import AsyncMessageContext, Subscription
from ..core.handlers import call_to_completion
from ..core.loops import start_loop_thread
from ..core.retry import after_failure, describe_error, publish_dead_letter
from ..message import Message
from ..wire import protocol as wire

__all__ = ["QueueRunner"]

logger = logging.getLogger(__name__)

SendAcks = Callable[[list[wire.Ack]], None]
# A delivery as the hub described it, and the subscription it is for.
Job = tuple[Subscription, wire.Deliver]


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
        self._acks: list[wire.Ack] = []  # sent in bursts
        self._flush_scheduled = False

    # -- called by the I/O thread -------------------------------------------------------------

    def submit(self, body: list[bytes]) -> None:
        """One DELIVER request's body."""
        try:
            deliveries = wire.parse_deliver(body)
        except (ValueError, IndexError) as exc:
            logger.error("ignored a malformed DELIVER: %s", exc)
            return
        coroutines: list[Job] = []
        with self._idle:
            self._running += len(deliveries)
        for delivery in deliveries:
            subscription = self._lookup(delivery.subscription_id)
            if subscription is None or not subscription.active:
                # Cancelled while the delivery was on its way: another consumer takes it.
                self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_REJECTED))
                self._done()
                continue
            job = (subscription, delivery)
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
        subscription, delivery = job
        queue_name = subscription.queue_name
        assert queue_name is not None
        try:
            codec_id, _count, published_at = wire.unpack_meta(delivery.meta)
            message = codec.decode_one(codec_id, delivery.payload, subscription.message_type)
        except Exception as exc:
            logger.exception(
                "queue %r could not decode message %s", queue_name, delivery.message_id
            )
            error = f"undecodable: {describe_error(exc)}"
            self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_DEAD, error=error))
            return None
        if not subscription.accepts(message):
            self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_REJECTED))
            return None
        return message, AsyncMessageContext(
            queue_name, delivery.message_id.decode(), delivery.attempt, published_at
        )

    def _conclude(
        self, job: Job, message: Message, context: AsyncMessageContext, exc: Exception | None
    ) -> None:
        subscription, delivery = job
        if exc is None:
            self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_OK))
            return
        verdict = after_failure(
            subscription.policy,
            context.queue_name,
            subscription.handler,
            message,
            context.attempt,
            exc,
        )
        error = describe_error(exc)
        if verdict.retry:
            self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_FAILED, verdict.delay, error))
            return
        publish_dead_letter(self._publish, context.queue_name, message, context.attempt, exc)
        self._ack(wire.Ack(delivery.delivery_id, wire.OUTCOME_DEAD, error=error))

    def _ack(self, ack: wire.Ack) -> None:
        with self._lock:
            self._acks.append(ack)

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
                if idle or self._jobs.empty() or len(self._acks) >= wire.MAX_ACKS:
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
