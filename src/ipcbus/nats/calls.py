"""How a NatsBroker queue handler is called on the handler loop: coroutines as tasks there,
plain functions in its thread pool; what it returned or raised comes back as a value."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from ..core.contract import Subscription
from ..core.handlers import is_cancellation
from ..message import Message

__all__ = ["NOT_RUN", "run_returning", "running_queue_handler"]

# What run_returning() returns for a handler whose subscription was cancelled before it began.
NOT_RUN: Any = object()

_local = threading.local()


def running_queue_handler() -> bool:
    """True in a thread that runs a plain-function queue handler now (``close()`` there must
    not wait for that very handler)."""
    return getattr(_local, "active", False)


def _call_marked(subscription: Subscription, message: Message) -> tuple[Any, BaseException | None]:
    """Call a plain handler in a worker thread: what it returned, or what it raised (any
    ``BaseException``: a failure of the call, never an exception of the pool or the loop).
    A subscription cancelled while the call waited for a thread is not called (``NOT_RUN``)."""
    if not subscription.active:
        return NOT_RUN, None
    _local.active = True
    try:
        return subscription.handler(message), None
    except BaseException as exc:
        return None, exc
    finally:
        _local.active = False


async def run_returning(
    subscription: Subscription, message: Message
) -> tuple[Any, BaseException | None]:
    """:func:`ipcbus.core.handlers.run_queue_handler`: what the handler returned, or what it
    raised; ``NOT_RUN`` when its subscription was cancelled before it began. Whatever it
    raises, ``BaseException`` included, is a failure of that call (:mod:`ipcbus.core.failures`):
    let out of this task, ``SystemExit`` or ``KeyboardInterrupt`` would end the handler loop's
    ``run_forever`` and, with it, every queue delivery of the broker. Only the task's own
    cancellation (the broker closing) goes through."""
    handler: Callable[[Message], Any] = subscription.handler
    try:
        if inspect.iscoroutinefunction(handler):
            if not subscription.active:
                return NOT_RUN, None
            return await handler(message), None
        result, failure = await asyncio.to_thread(_call_marked, subscription, message)
        if failure is None and result is not NOT_RUN and inspect.isawaitable(result):
            result = await result
        return result, failure
    except BaseException as exc:
        if is_cancellation(exc):
            raise
        return None, exc
