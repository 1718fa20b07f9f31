"""How handlers are called, the same way by every broker. In-process core: never imports zmq.

Broadcast handlers are called and their exceptions logged, never raised (``BaseException``
included: :mod:`ipcbus.core.failures`). Queue handlers run to completion (coroutines awaited,
plain functions on a thread) with their :class:`~ipcbus.core.contract.AsyncMessageContext` set,
and raise what they raised, for the retry rule (:mod:`ipcbus.core.retry`) to judge.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ..message import Message
from .contract import AsyncMessageContext, Subscription
from .failures import Brief, check_sync_result, is_handler_failure, text_of

__all__ = [
    "call_handler",
    "call_in_thread",
    "call_to_completion",
    "is_cancellation",
    "run_queue_handler",
]

logger = logging.getLogger(__name__)


def call_handler(
    subscription: Subscription, message: Message, *, base_exceptions: bool = True
) -> None:
    """Call a broadcast handler, logging (never raising) what it raises: any exception, and any
    ``BaseException`` that :func:`~ipcbus.core.failures.is_handler_failure` calls a failure.
    ``base_exceptions=False`` logs only ``Exception`` and lets every other propagate
    (``TestBroker``'s behaviour, kept for now)."""
    try:
        result = subscription.handler(message)
        if result is not None:  # the usual handler returns nothing: no call on the hot path
            check_sync_result(subscription.handler, result)
    except Exception:
        logger.exception("handler %r raised on %r", subscription.handler, Brief(message))
    except BaseException as exc:
        if not base_exceptions or not is_handler_failure(exc):
            raise
        logger.error("handler %r raised on %r", subscription.handler, Brief(message), exc_info=exc)


def is_cancellation(exc: BaseException) -> bool:
    """True when ``exc`` is the current task being cancelled (the broker stopping its loop), not
    a ``CancelledError`` that a handler raised of its own accord (a failure like any other)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return False
    return task is not None and task.cancelling() > 0


async def run_queue_handler(subscription: Subscription, message: Message) -> Any:
    """Run a queue handler to completion and return what it returned (a reply, for a request):
    coroutines are awaited, plain functions get a thread.

    A plain function runs in a worker thread (``asyncio.to_thread`` copies the context, so
    ``AsyncMessageContext.current()`` works there too) and cannot stall the event loop.
    """
    handler = subscription.handler
    if inspect.iscoroutinefunction(handler):
        return await handler(message)
    result = await asyncio.to_thread(call_in_thread, handler, message)
    if inspect.isawaitable(result):
        return await result
    return result


def call_in_thread(handler: Callable[[Message], Any], message: Message) -> Any:
    """Call a plain queue handler on a worker thread whose outcome goes into an asyncio Future
    (``asyncio.to_thread``, an executor): return what it returned, raise what it raised, except
    ``StopIteration`` (``next()`` on an empty iterator), which a Future cannot hold: set on one,
    it raises ``TypeError`` in a loop callback and the Future never completes, so the delivery
    would never end (no retry, no dead letter, ``flush()`` and ``close()`` waiting for it). It
    becomes a ``RuntimeError`` caused by it, as Python does for a coroutine (PEP 479): a failure
    of that call like any other."""
    try:
        return handler(message)
    except StopIteration as exc:
        raise RuntimeError(f"handler raised StopIteration: {text_of(exc)}") from exc


def call_to_completion(
    subscription: Subscription, message: Message, context: AsyncMessageContext
) -> Any:
    """Run one queue handler to completion in this thread, with its context set, and return
    what it returned (a reply, for a request); raises what the handler raised. A coroutine it
    returns is awaited on a private loop."""
    token = AsyncMessageContext._current.set(context)
    try:
        result = subscription.handler(message)
        # Most handlers return None: isawaitable() (ABC checks) cost ~1 µs per message.
        if result is not None and inspect.isawaitable(result):
            return _await(result)
        return result
    finally:
        AsyncMessageContext._current.reset(token)


def _await(awaitable: Awaitable[Any]) -> Any:
    async def wrapper() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wrapper())
    # Called from async code: this thread's loop is busy running the caller, so the coroutine gets
    # a private loop on a helper thread while the caller waits (still one delivery at a time).
    errors: list[BaseException] = []
    results: list[Any] = []

    def in_thread() -> None:
        try:
            results.append(asyncio.run(wrapper()))
        except BaseException as exc:
            errors.append(exc)

    # Run in a copy of this context, so AsyncMessageContext.current() works in the handler.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(in_thread,), name="ipcbus-test-delivery")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]
