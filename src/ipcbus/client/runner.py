"""Runs a client's queue deliveries (in the worker process) and answers them with acks.

Handlers never run on the I/O thread (a slow handler must not stall acks or heartbeats):
coroutine handlers run as tasks of an event loop this runner owns; plain functions run on a pool
of worker threads (``threads``), which take deliveries straight from the I/O thread. Measured:
sending plain handlers through ``asyncio.to_thread`` cost one self-pipe write per completion and
capped a consumer at ~10 k msg/s; the pool does without the loop. The number of deliveries in
hand at once is bounded by the hub (``prefetch`` per subscription).

The hub delivers runs (consecutive messages of one batch). A plain handler's run goes to one
worker thread, which calls the handler for each message in order and acks the run in one entry
(failures, rejections and dead letters in entries of their own): a hand-off between threads
costs more than a small handler in CPython, and was made per message before. A long run acks
what it finished every ``_ACK_EVERY`` seconds; one whose handlers are slow (``_SLOW_HANDLER``
each) hands half of what is left to an idle worker: handlers that wait (on I/O, on a sleep)
still run on every worker thread, as they did one message per thread.

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
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

from ..core.contract import AsyncMessageContext, Subscription
from ..core.handlers import call_to_completion
from ..core.requests import ReplyTo
from ..message import Message
from ..wire import protocol as wire
from .acks import AckBuffer
from .jobs import Job, ok
from .runner_loop import CoroutineRuns
from .threads import OnDeath, start_thread

__all__ = ["QueueRunner"]

logger = logging.getLogger(__name__)

SendAcks = Callable[[list[wire.Ack]], None]
# A run that has taken this long acks what it finished so far (and so on, every as long).
_ACK_EVERY = 0.001
# A run whose handlers take this long on average shares what is left with idle workers: a
# hand-off costs tens of µs, and a handler that waits (I/O, a sleep) then does not hold up the
# rest of its run. Faster ones run on the thread that has the run (GIL-bound, sharing them only
# added hand-offs).
_SLOW_HANDLER = 0.0001


class QueueRunner(CoroutineRuns):
    def __init__(
        self,
        lookup: Callable[[bytes], Subscription | None],
        send_acks: SendAcks,
        publish: Callable[[Message], None],
        on_death: OnDeath,
        *,
        threads: int = 4,
        reply_to: Callable[[wire.Route], ReplyTo] | None = None,
    ) -> None:
        self._lookup = lookup
        self._reply_to = reply_to  # how a handler's answer to a request goes back
        self._publish = publish
        self._on_death = on_death
        self._thread_count = threads
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle_workers = 0  # waiting for a job (read without the lock: a hint)
        self._slow: dict[bytes, bool] = {}  # per subscription: were its handlers slow?
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = threading.Condition()
        self._running = 0  # messages in hand
        self._coroutines = 0  # of _running: deliveries for the event loop
        self._in_job = threading.local()  # a worker thread's job (its rest waits for it)
        self.undecodable = 0  # deliveries this process could not decode (dead-lettered)
        self._acks = AckBuffer(send_acks)

    # -- called by the I/O thread -------------------------------------------------------------

    def submit(self, body: list[bytes]) -> None:
        """One DELIVER request's body."""
        try:
            runs = wire.parse_deliver(body)
        except (ValueError, IndexError) as exc:
            logger.error("ignored a malformed DELIVER: %s", exc)
            return
        coroutines: list[tuple[Job, int, bytes]] = []
        with self._idle:
            self._running += sum(run.count for run in runs)
        for run in runs:
            subscription = self._lookup(run.subscription_id)
            if subscription is None or not subscription.active:
                # Cancelled while the delivery was on its way: another consumer takes it.
                self._acks.add(wire.Ack(run.stream, run.first_seq, run.last_seq, _REJECTED))
                self._done(run.count)
                continue
            job = Job.of(subscription, run)
            if inspect.iscoroutinefunction(subscription.handler):
                coroutines += zip(itertools.repeat(job), itertools.count(), job.payloads())
                continue
            self._ensure_workers()
            if self._slow.get(run.subscription_id) and run.count > 1:
                # Its handlers were slow last time: every worker takes a part from the start.
                parts = min(run.count, self._thread_count)
                for part in range(parts - 1, 0, -1):
                    self._jobs.put(job.part(run.count * part // parts))
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
        thread are not waited for: a worker's own (the rest of its run), or every coroutine's
        on the loop thread.
        """
        # On the loop thread, no coroutine delivery can progress while we wait.
        in_loop = threading.current_thread() is self._loop_thread
        job = getattr(self._in_job, "job", None)
        # A job's messages stay in hand until it ends, those handled before included.
        own = 0 if job is None else job.end - job.start

        def idle() -> bool:
            return self._running <= (self._coroutines if in_loop else own)

        with self._idle:
            return self._idle.wait_for(idle, timeout)

    def stop(self, timeout: float | None) -> None:
        """Stop the workers and the loop; never joins the calling thread (close() may be called
        from a handler), which ends once its handler returns. A run not finished by then is not
        (its deliveries go back to the hub with the goodbye)."""
        with self._lock:
            loop, loop_thread, workers = self._loop, self._loop_thread, self._workers
            self._loop = self._loop_thread = None
            self._workers = []
            self._stopped = True
        current = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout  # one for them all
        for _ in workers:
            self._jobs.put(None)
        if loop is not None and loop_thread is not None:
            with contextlib.suppress(RuntimeError):  # closed: the loop died already
                loop.call_soon_threadsafe(loop.stop)
            if loop_thread is not current:
                loop_thread.join(_left(deadline))
        for worker in workers:
            if worker is not current:
                worker.join(_left(deadline))

    def flush_acks(self) -> None:
        """Hand the acks collected so far to the I/O thread (any thread may call it)."""
        self._acks.flush()

    # -- both kinds of handler ----------------------------------------------------------------

    def _prepare(
        self, job: Job, index: int, payload: bytes
    ) -> tuple[Message, AsyncMessageContext] | wire.Ack:
        """Decode and filter; the answer to send instead when the handler is not to run."""
        subscription, run = job.subscription, job.run
        message_id = f"{job.id_prefix}{run.first_id + index}"
        try:
            message = job.decode(payload)
        except BaseException as exc:  # unpickling runs the classes' code: SystemExit included
            return self._undecodable(job, index, message_id, exc)
        if not subscription.accepts(message):
            seq = run.first_seq + index
            return wire.Ack(run.stream, seq, seq, _REJECTED)
        queue_name = subscription.queue_name
        assert queue_name is not None
        context = AsyncMessageContext._of(queue_name, message_id, run.attempt, job.published_at)
        return message, context

    def _done(self, count: int, coroutine: bool = False) -> bool:
        """``count`` messages less in hand; True when none is left."""
        with self._idle:
            self._running -= count
            if coroutine:
                self._coroutines -= count
            idle = self._running == 0
            if idle:
                self._idle.notify_all()
        return idle

    # -- plain functions: worker threads ------------------------------------------------------

    def _ensure_workers(self) -> None:
        if self._workers:
            return
        with self._lock:
            while len(self._workers) < self._thread_count and not self._stopped:
                worker = start_thread(
                    "ipcbus-queue-worker", self._work, self._on_death, handlers=True
                )
                self._workers.append(worker)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle_workers += 1
            job = self._jobs.get()
            with self._lock:
                self._idle_workers -= 1
            if job is None:
                return
            try:
                self._run_plain(job)
            except Exception:
                logger.exception("ipcbus could not run a queue delivery")
            finally:
                self._in_job.job = None
                # Acks leave in bursts: when this worker has nothing queued behind it.
                idle = self._done(job.end - job.start)
                if idle or self._jobs.empty() or len(self._acks) >= wire.MAX_ACKS:
                    self.flush_acks()

    def _run_plain(self, job: Job) -> None:
        """The job's messages in order, on this thread; one ack entry for those that went well.

        What ``_prepare`` and ``call_to_completion`` do, written out in the loop: it runs once
        per message, and each call it saves is ~0.1 µs of a ~4 µs message."""
        subscription, run = job.subscription, job.run
        queue_name = subscription.queue_name
        assert queue_name is not None
        stream, first_seq, first_id, attempt = run.stream, run.first_seq, run.first_id, run.attempt
        decode, prefix, published_at = job.decode, job.id_prefix, job.published_at
        sizes, payloads, offset = job.sizes, run.payloads, job.offset
        answers: list[wire.Ack] = []
        ok_from = index = since = job.start  # messages ok_from .. index - 1 went well
        mark = time.monotonic()  # when message ``since`` started
        self._in_job.job = job
        while index < job.end and not self._stopped:
            size = sizes[index]
            payload = payloads[offset : offset + size]
            offset += size
            message_id = f"{prefix}{first_id + index}"
            answer: wire.Ack | None = None
            try:
                message = decode(payload)
            except BaseException as exc:  # unpickling runs the classes' code: SystemExit too
                answer = self._undecodable(job, index, message_id, exc)
            else:
                if not subscription.accepts(message):
                    answer = wire.Ack(stream, first_seq + index, first_seq + index, _REJECTED)
                else:
                    context = AsyncMessageContext._of(queue_name, message_id, attempt, published_at)
                    try:
                        result = call_to_completion(subscription, message, context)
                    except BaseException as exc:  # a failed attempt, whatever it raised
                        answer = self._failed(job, index, message, context, exc)
                    else:
                        if result is not None and job.route is not None:
                            self._answer(job, result)
            if answer is not None:
                if ok_from < index:
                    answers.append(ok(stream, first_seq + ok_from, first_seq + index - 1))
                answers.append(answer)
                ok_from = index + 1
            index += 1
            if index < job.end and (now := time.monotonic()) - mark >= _ACK_EVERY:
                # A long run: ack what is done (the hub gets credit back as it goes)...
                if ok_from < index:
                    answers.append(ok(stream, first_seq + ok_from, first_seq + index - 1))
                    ok_from = index
                self._acks.extend(answers)
                answers = []
                self.flush_acks()
                # ... and if its handlers are slow, share the rest with an idle worker.
                slow = now - mark >= _SLOW_HANDLER * (index - since)
                self._slow[run.subscription_id] = slow
                if slow and self._idle_workers and job.end - index >= 2:
                    self._jobs.put(job.part(index + (job.end - index) // 2))
                mark, since = now, index
        if ok_from < index:  # stopped (closed) before the end: the rest goes back to the hub
            answers.append(ok(stream, first_seq + ok_from, first_seq + index - 1))
        self._acks.extend(answers)


_REJECTED = wire.OUTCOME_REJECTED


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.1, deadline - time.monotonic())
