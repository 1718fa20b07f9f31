"""Runs a client's queue deliveries (in the worker process) and answers each with an ack.

Handlers never run on the I/O thread (a slow handler must not stall acks or heartbeats):
coroutine handlers run as tasks of an event loop this runner owns; plain functions run on a pool
of worker threads (``threads``), which take deliveries straight from the I/O thread. Measured:
sending plain handlers through ``asyncio.to_thread`` cost one self-pipe write per completion and
capped a consumer at ~10 k msg/s; the pool does without the loop. The number of deliveries in
hand at once is bounded by the hub (``prefetch`` per subscription).

Whatever a handler raises, ``BaseException`` included (``SystemExit``, ``KeyboardInterrupt``,
``GeneratorExit``, a ``CancelledError`` a coroutine handler raises itself), is a failed attempt:
retried, then dead-lettered (:mod:`ipcbus.core.retry`). Before, a ``SystemExit`` ended the worker
thread (0 of 4 alive after four of them) and a ``CancelledError`` left its delivery unacked,
while the process kept heartbeating: those deliveries stayed in flight forever. The threads are
guarded (:mod:`ipcbus.client.threads`): one that dies anyway fails the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
from collections.abc import Callable

from ..core import codec
from ..core.contract import AsyncMessageContext, Subscription
from ..core.handlers import call_to_completion, is_cancellation
from ..core.loops import run_loop_forever
from ..core.retry import after_failure, describe_error, publish_dead_letter
from ..message import Message
from ..wire import protocol as wire
from .threads import OnDeath, start_thread

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
        on_death: OnDeath,
        *,
        threads: int = 4,
    ) -> None:
        self._lookup = lookup
        self._send_acks = send_acks
        self._publish = publish
        self._on_death = on_death
        self._thread_count = threads
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = threading.Condition()
        self._running = 0
        self._coroutines = 0  # of _running: deliveries for the event loop
        self._in_job = threading.local()  # a worker thread's flag: inside a delivery
        self.undecodable = 0  # deliveries this process could not decode (dead-lettered)
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
            with self._idle:
                self._coroutines += len(coroutines)
            try:
                self._ensure_loop().call_soon_threadsafe(self._start_tasks, coroutines)
            except RuntimeError:  # the loop died (its broker fails): the hub gets them back
                logger.error(
                    "%d queue deliveries not started: the event loop is gone", len(coroutines)
                )
                with self._idle:
                    self._coroutines -= len(coroutines)
                    self._running -= len(coroutines)
                    self._idle.notify_all()
        self.flush_acks()  # the rejections above, if any

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every submitted delivery was handled and its ack handed to the I/O.

        Called from a handler (close() inside one), the deliveries that wait for this very
        thread are not waited for: a worker's own, or every coroutine's on the loop thread.
        """
        # On the loop thread, no coroutine delivery can progress while we wait.
        in_loop = threading.current_thread() is self._loop_thread
        own = 1 if getattr(self._in_job, "active", False) else 0

        def idle() -> bool:
            return self._running <= (self._coroutines if in_loop else own)

        with self._idle:
            return self._idle.wait_for(idle, timeout)

    def stop(self, timeout: float | None) -> None:
        """Stop the workers and the loop; never joins the calling thread (close() may be called
        from a handler), which ends once its handler returns."""
        with self._lock:
            loop, loop_thread, workers = self._loop, self._loop_thread, self._workers
            self._loop = self._loop_thread = None
            self._workers = []
        current = threading.current_thread()
        for _ in workers:
            self._jobs.put(None)
        if loop is not None and loop_thread is not None:
            with contextlib.suppress(RuntimeError):  # closed: the loop died already
                loop.call_soon_threadsafe(loop.stop)
            if loop_thread is not current:
                loop_thread.join(timeout)
        for worker in workers:
            if worker is not current:
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
        except BaseException as exc:  # unpickling runs the classes' code: SystemExit included
            with self._lock:  # workers decode concurrently
                self.undecodable += 1
            logger.error(
                "queue %r could not decode a %s message (%s): %s: %s",
                queue_name,
                subscription.topic,
                delivery.message_id.decode(errors="replace"),
                type(exc).__name__,
                exc,
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
        self, job: Job, message: Message, context: AsyncMessageContext, exc: BaseException | None
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

    def _done(self, coroutine: bool = False) -> bool:
        """One delivery less in hand; True when none is left."""
        with self._idle:
            self._running -= 1
            if coroutine:
                self._coroutines -= 1
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
                worker = start_thread(
                    "ipcbus-queue-worker", self._work, self._on_death, handlers=True
                )
                self._workers.append(worker)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._in_job.active = True
            try:
                self._run_plain(job)
            except Exception:
                logger.exception("ipcbus could not run a queue delivery")
            finally:
                self._in_job.active = False
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
        except BaseException as exc:  # a failed attempt, whatever it raised (module docstring)
            self._conclude(job, message, context, exc)
        else:
            self._conclude(job, message, context, None)

    # -- coroutine functions: the event loop --------------------------------------------------

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
            except BaseException as exc:
                if is_cancellation(exc):
                    raise  # the loop stops (close): the hub gets the delivery back
                # A failed attempt (module docstring). Let through, SystemExit would stop the
                # loop (asyncio re-raises it from run_forever) and a CancelledError the handler
                # raised itself would leave the delivery unacked.
                self._conclude(job, message, context, exc)
            else:
                self._conclude(job, message, context, None)
        except Exception:
            logger.exception("ipcbus could not run a queue delivery")
        finally:
            self._done(coroutine=True)
            # The acks of one loop turn travel together: one wake-up of the I/O thread.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self.flush_acks)
