"""Runs a proxy's queue deliveries on an event loop of its own, and answers each with an ack.

Handlers never run on the I/O thread (a slow handler must not stall acks or heartbeats):
coroutine handlers run as tasks of this loop, plain functions in its worker threads. The number
of deliveries running at once is bounded by the hub (``prefetch`` per subscription).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from . import _codec, _queues, _wire
from ._base import AsyncMessageContext, Subscription, describe_error, run_queue_handler
from .message import DeadLetter, Message

__all__ = ["QueueRunner", "run_loop_forever"]

logger = logging.getLogger(__name__)

Ack = Callable[[bytes, bytes, str], None]


class QueueRunner:
    def __init__(
        self,
        lookup: Callable[[bytes], Subscription | None],
        ack: Ack,
        publish: Callable[[Message], None],
    ) -> None:
        self._lookup = lookup
        self._ack = ack
        self._publish = publish
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = threading.Condition()
        self._running = 0

    def submit(self, frames: list[bytes]) -> None:
        """Called by the I/O thread for each DELIVER."""
        loop = self._ensure_loop()
        with self._idle:
            self._running += 1
        loop.call_soon_threadsafe(self._start, frames)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until every submitted delivery was handled and acked."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def stop(self, timeout: float | None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=run_loop_forever, args=(loop,), name="ipcbus-queue", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _start(self, frames: list[bytes]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(frames))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, frames: list[bytes]) -> None:
        try:
            await self._handle(*frames)
        except Exception:
            logger.exception("ipcbus could not run a queue delivery")
        finally:
            with self._idle:
                self._running -= 1
                if self._running == 0:
                    self._idle.notify_all()

    async def _handle(
        self,
        subscription_id: bytes,
        delivery_id: bytes,
        message_id: bytes,
        attempt: bytes,
        final: bytes,
        topic: bytes,
        meta: bytes,
        payload: bytes,
    ) -> None:
        subscription = self._lookup(subscription_id)
        if subscription is None or not subscription.active:
            # Cancelled while the delivery was on its way: another consumer takes it.
            self._ack(delivery_id, _queues.OUTCOME_REJECTED, "")
            return
        queue_name = subscription.queue_name
        assert queue_name is not None
        codec, _count, published_at = _wire.unpack_meta(meta)
        try:
            message = _codec.decode_one(codec, payload, subscription.message_type)
        except Exception as exc:
            logger.exception("queue %r could not decode message %s", queue_name, message_id)
            self._ack(delivery_id, _queues.OUTCOME_DEAD, f"undecodable: {describe_error(exc)}")
            return
        if not subscription.accepts(message):
            self._ack(delivery_id, _queues.OUTCOME_REJECTED, "")
            return
        context = AsyncMessageContext(queue_name, message_id.decode(), int(attempt), published_at)
        token = AsyncMessageContext._current.set(context)
        try:
            await run_queue_handler(subscription, message)
        except Exception as exc:
            logger.exception(
                "queue %r handler %r raised on %r (attempt %s)",
                queue_name,
                subscription.handler,
                message,
                context.attempt,
            )
            if final == b"1":
                self._dead_letter(queue_name, message, context.attempt, exc)
                self._ack(delivery_id, _queues.OUTCOME_DEAD, describe_error(exc))
            else:
                self._ack(delivery_id, _queues.OUTCOME_FAILED, describe_error(exc))
            return
        finally:
            AsyncMessageContext._current.reset(token)
        self._ack(delivery_id, _queues.OUTCOME_OK, "")

    def _dead_letter(
        self, queue_name: str, message: Message, attempts: int, exc: Exception
    ) -> None:
        logger.error("queue %r dead-lettered %r after %d attempts", queue_name, message, attempts)
        if isinstance(message, DeadLetter):
            return  # a failing dead-letter handler must not feed itself forever
        try:
            self._publish(DeadLetter(queue_name, message, attempts, describe_error(exc)))
        except Exception:
            logger.exception("could not publish the DeadLetter for %r", message)


def run_loop_forever(loop: asyncio.AbstractEventLoop) -> None:
    """Thread body for a loop of our own: run it; once stopped, cancel what is left and close."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
