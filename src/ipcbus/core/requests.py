"""Request/reply, the same way for every broker (in-process core: never imports zmq).

A requester opens an entry in its broker's :class:`PendingRequests` and waits on it; whatever
answers first resolves it, and every later answer for the same request (a second responder, a
reply after the timeout) finds no entry and is counted in ``late``. A responder answers through
a :class:`ReplyTo`: what its handler returns (a ``Message`` is a reply, anything else is not) or
what it raised (a :class:`Failure`, raised in the requester as ``RemoteError``).

The table holds an entry only while its requester waits: it is removed by the reply, by the
requester giving up (timeout) and by ``close()``, which wakes every waiting requester with
``BrokerClosedError``. In a forked child every table is emptied: the threads that waited on its
entries exist only in the parent.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..exceptions import RemoteError, RequestTimeoutError
from ..message import Message, get_unique_name_for_message
from .failures import check_sync_result, is_handler_failure, text_of

if TYPE_CHECKING:
    from .subscription import Subscription

__all__ = [
    "Failure",
    "LocalReply",
    "Pending",
    "PendingRequests",
    "ReplyTo",
    "answer",
    "call_responder",
    "check_timeout",
    "result_of",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Failure:
    """What a responder raised, as text: what travels back instead of the exception object."""

    remote_type: str
    remote_message: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        kind = type(exc)
        module = kind.__module__
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        return cls(name, text_of(exc))

    def error(self) -> RemoteError:
        return RemoteError(self.remote_type, self.remote_message)


class ReplyTo(Protocol):
    """Where a responder's answer goes: to the requester's table (in-process brokers) or over
    the hub to the requester's reply topic."""

    def reply(self, message: Message) -> None: ...

    def fail(self, failure: Failure) -> None: ...


@dataclass(slots=True)
class Pending:
    """One request waiting for its answer."""

    request_id: int
    done: threading.Event
    outcome: object = None  # a Message, a Failure, or what the broker resolved it with


class _Closed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_tables: weakref.WeakSet[PendingRequests] = weakref.WeakSet()


class PendingRequests:
    """The requests of one broker that wait for their reply, by request id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._closed: BaseException | None = None
        self.late = 0  # answers that found no waiting request (a later responder, a timeout)
        _tables.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def open(self) -> Pending:
        """A new request, whose answer ``wait`` returns. Raises what closed the table."""
        with self._lock:
            if self._closed is not None:
                raise self._closed
            pending = Pending(next(self._ids), threading.Event())
            self._entries[pending.request_id] = pending
            return pending

    def resolve(self, request_id: int, outcome: object) -> bool:
        """The first answer wins; a later one (or one for a request given up) is counted in
        ``late`` and False is returned. Any thread."""
        with self._lock:
            pending = self._entries.pop(request_id, None)
            if pending is None:
                self.late += 1
                return False
            pending.outcome = outcome
        pending.done.set()
        return True

    def wait(self, pending: Pending, timeout: float | None) -> tuple[bool, object]:
        """``(True, outcome)`` once answered, ``(False, None)`` after ``timeout`` (the request
        is then given up: a reply that comes later is late). Raises what closed the table, and
        gives the request up when the wait raises (a signal handler's exception, Ctrl-C)."""
        try:
            answered = pending.done.wait(timeout)
        except BaseException:
            self.forget(pending.request_id)
            raise
        if not answered:
            with self._lock:
                if self._entries.pop(pending.request_id, None) is not None:
                    return False, None
            # Answered (or closed) between the wait and the lock: the outcome is set.
        if isinstance(pending.outcome, _Closed):
            raise pending.outcome.error
        return True, pending.outcome

    def forget(self, request_id: int) -> None:
        """Give a request up (its requester raised): a reply that comes later is late."""
        with self._lock:
            self._entries.pop(request_id, None)

    def close(self, error: BaseException) -> None:
        """Wake every waiting requester with ``error``; later ``open()`` raises it too."""
        with self._lock:
            self._closed = error
        self.fail_waiting(error)

    def fail_waiting(self, error: BaseException) -> None:
        """Wake every waiting requester with ``error`` (later requests are not affected)."""
        with self._lock:
            entries, self._entries = self._entries, {}
            for pending in entries.values():
                pending.outcome = _Closed(error)
        for pending in entries.values():
            pending.done.set()

    def _forget_parent(self) -> None:
        self._lock = threading.Lock()  # another thread of the parent may have held it
        self._entries = {}


def _after_fork_in_child() -> None:
    for table in list(_tables):
        table._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LocalReply:
    """A responder in the requester's own broker: answers go straight to its table."""

    __slots__ = ("_request_id", "_table")

    def __init__(self, table: PendingRequests, request_id: int) -> None:
        self._table = table
        self._request_id = request_id

    def reply(self, message: Message) -> None:
        self._table.resolve(self._request_id, message)

    def fail(self, failure: Failure) -> None:
        self._table.resolve(self._request_id, failure)


def answer(reply_to: ReplyTo, result: Any) -> None:
    """A handler returned ``result``: a ``Message`` is the reply; anything else (``None``) is
    no reply."""
    if isinstance(result, Message):
        reply_to.reply(result)


def call_responder(subscription: Subscription, message: Message, reply_to: ReplyTo) -> None:
    """Call a broadcast handler with a request: what it returns answers, what it raises is
    logged (as :func:`~ipcbus.core.handlers.call_handler` does) and answers as a failure."""
    try:
        result = subscription.handler(message)
        check_sync_result(subscription.handler, result)
    except BaseException as exc:
        if not is_handler_failure(exc):
            raise
        logger.error("handler %r raised on %r", subscription.handler, message, exc_info=exc)
        reply_to.fail(Failure.of(exc))
        return
    answer(reply_to, result)


def check_timeout(timeout: object) -> float | None:
    """A request's timeout: ``None`` (wait for ever) or a finite number of seconds >= 0. One
    past what a wait can take (``threading.TIMEOUT_MAX``, ~292 years on Linux) waits that long:
    passed on, it would raise ``OverflowError`` from the wait."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if not math.isfinite(timeout) or timeout < 0:
        raise ValueError(f"timeout must be finite and >= 0, not {timeout!r}")
    return min(float(timeout), threading.TIMEOUT_MAX)


def result_of(request: Message, got: bool, outcome: object, timeout: float | None) -> Message:
    """What ``request()`` returns for ``PendingRequests.wait``'s answer: the reply, or raise
    ``RemoteError`` (a failure) or ``RequestTimeoutError`` (none came)."""
    if not got:
        raise RequestTimeoutError(
            f"no reply to the {get_unique_name_for_message(request)} request within "
            f"{timeout} s: no responder answered"
        )
    if isinstance(outcome, Failure):
        raise outcome.error()
    assert isinstance(outcome, Message), outcome
    return outcome
