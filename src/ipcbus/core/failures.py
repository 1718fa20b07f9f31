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

import threading

__all__ = ["is_handler_failure"]


def is_handler_failure(exc: BaseException) -> bool:
    """True when ``exc``, raised by a handler or a predicate, is a failure of that call; False
    when it must propagate (``KeyboardInterrupt`` or ``SystemExit`` on the main thread)."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return threading.current_thread() is not threading.main_thread()
    return True
