"""What a handler's (or predicate's) exception means, the same way for every broker.

In-process core: never imports zmq. Every exception a handler raises is a failure of that call
(logged; for queue groups retried, then dead-lettered), ``BaseException`` included: ``SystemExit``,
``KeyboardInterrupt`` raised by a handler, ``GeneratorExit``, ``asyncio.CancelledError`` that a
handler raises itself, subclasses of the user's own. Let through, any of them would end the thread
that runs handlers (a dispatcher, a queue worker, an event loop) and, with it, delivery, without a
word while the process lives on.

The one exception: ``KeyboardInterrupt`` and ``SystemExit`` on the main thread. A broker that runs
a handler in its caller's thread (``MemoryBroker.publish()``'s broadcast, ``TestBroker``) lets them
end the program as they would without the broker; the caller sees them, nothing dies silently.
"""

from __future__ import annotations

import inspect
import logging
import reprlib
import threading
from typing import Any

__all__ = ["Brief", "check_sync_result", "describe", "is_handler_failure", "text_of"]

logger = logging.getLogger(__name__)


def is_handler_failure(exc: BaseException) -> bool:
    """True when ``exc``, raised by a handler or a predicate, is a failure of that call; False
    when it must propagate (``KeyboardInterrupt`` or ``SystemExit`` on the main thread)."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return threading.current_thread() is not threading.main_thread()
    return True


def check_sync_result(handler: Any, result: Any) -> None:
    """A ``subscribe()`` handler is called synchronously: one that returned an awaitable (a
    coroutine function behind a plain decorator, say) did nothing, and its coroutine would only
    warn "never awaited" when collected. Close it and raise ``TypeError``: a failure of that
    call, which the caller logs (and answers with, for a request)."""
    if result is None or not inspect.isawaitable(result):
        return
    close = getattr(result, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.debug("closing the awaitable %r that %r returned raised", result, handler)
    raise TypeError(
        f"subscribe() handler {handler!r} returned an awaitable ({type(result).__name__}), which "
        "a broadcast handler cannot run: use subscribe_async() for a coroutine handler, or a "
        "plain function"
    )


def text_of(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's own ``__str__`` raises: user code, never
    trusted to work (one that raised ended the thread that was describing it)."""
    try:
        return str(exc)
    except BaseException as inner:
        if not is_handler_failure(inner):
            raise
        return f"<str() of this {type(exc).__name__} raised {type(inner).__name__}>"


def describe(exc: BaseException) -> str:
    """``"TypeName: message"``, safely (``text_of``)."""
    return f"{type(exc).__name__}: {text_of(exc)}"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_BUFFERS = (bytes, bytearray, memoryview)


class Brief:
    """A message as log lines show it: its fields' reprs bounded, a big buffer by its size
    (a 16 MB payload logged whole made a 64 MB line per failed attempt, and froze the process
    while it was built). Lazy, as ``%r`` arguments are: built only when the line is emitted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return _brief(self.value, 3)


def _brief(value: Any, depth: int) -> str:
    if isinstance(value, _BUFFERS):
        size = memoryview(value).nbytes
        return f"<{type(value).__name__} of {size} bytes>" if size > 64 else repr(value)
    fields = getattr(type(value), "__dataclass_fields__", None)
    if fields is None:
        return _REPR.repr(value)
    if depth == 0:
        return f"{type(value).__qualname__}(...)"
    inner = ", ".join(f"{name}={_brief(getattr(value, name, None), depth - 1)}" for name in fields)
    return f"{type(value).__qualname__}({inner})"
