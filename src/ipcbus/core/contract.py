"""The :class:`Broker` contract: its docstrings *are* the semantics every broker implements.

Part of the in-process core: runs in every process, never imports zmq.

Implementations document only where they differ, and say why (dramatiq's habit). Argument checks
live here, in the public methods, so every broker rejects bad input the same way; subclasses
implement the ``_publish`` / ``_subscribe`` / ``_cancel`` / ``_close`` hooks.
"""

from __future__ import annotations

import inspect
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

from ..exceptions import BrokerClosedError, QueueInUseError
from ..message import Message, get_unique_name_for_message
from .failures import is_handler_failure
from .retry import DEFAULT_PREFETCH, QueuePolicy

__all__ = [
    "AsyncMessageContext",
    "Broker",
    "Handler",
    "Predicate",
    "QueuePolicy",
    "Subscription",
]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Any], Any | Awaitable[Any]]
Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class AsyncMessageContext:
    """The context of one delivery to a ``subscribe_async`` handler.

    ``attempt`` is 1 on the first delivery and grows with each retry or redelivery;
    ``published_at`` is the publisher's ``time.time()`` at ``publish()``.
    """

    queue_name: str
    message_id: str
    attempt: int
    published_at: float

    _current: ClassVar[ContextVar[AsyncMessageContext]] = ContextVar("ipcbus_async_context")

    @classmethod
    def _of(
        cls, queue_name: str, message_id: str, attempt: int, published_at: float
    ) -> AsyncMessageContext:
        """The same as the constructor, for a consumer's hot path: a frozen dataclass's
        ``__init__`` sets each field through ``object.__setattr__`` (0.8 µs a context; this,
        0.4 µs)."""
        context: AsyncMessageContext = object.__new__(cls)
        fields = {
            "queue_name": queue_name,
            "message_id": message_id,
            "attempt": attempt,
            "published_at": published_at,
        }
        object.__setattr__(context, "__dict__", fields)
        return context

    @classmethod
    def current(cls) -> AsyncMessageContext:
        """The context of the queue delivery being handled; ``LookupError`` outside a handler."""
        try:
            return cls._current.get()
        except LookupError:
            raise LookupError(
                "AsyncMessageContext.current() is only available inside a subscribe_async handler"
            ) from None


class Subscription:
    """A handler registered with a broker. ``cancel()`` stops delivery and is idempotent."""

    __slots__ = (
        "_broker",
        "_cancelled",
        "handler",
        "message_type",
        "policy",
        "predicate",
        "queue_name",
        "topic",
    )

    def __init__(
        self,
        broker: Broker,
        message_type: type[Message],
        handler: Handler,
        predicate: Predicate | None,
        queue_name: str | None,
        policy: QueuePolicy | None = None,
    ) -> None:
        self._broker = broker
        self._cancelled = False
        self.message_type = message_type
        self.topic = get_unique_name_for_message(message_type)
        self.handler = handler
        self.predicate = predicate
        self.queue_name = queue_name
        self.policy = policy or QueuePolicy()

    @property
    def active(self) -> bool:
        return not self._cancelled

    def cancel(self) -> None:
        """Stop delivering to this handler. Calling it again does nothing."""
        if self._cancelled:
            return
        self._cancelled = True
        self._broker._cancel(self)

    def accepts(self, message: Message) -> bool:
        """Run the predicate in this process. A predicate that raises rejects (and is logged),
        ``BaseException`` included (:mod:`ipcbus.core.failures`)."""
        if self._cancelled:
            return False
        if self.predicate is None:
            return True
        try:
            return bool(self.predicate(message))
        except BaseException as exc:
            if not is_handler_failure(exc):
                raise
            logger.error(
                "predicate %r raised on %r: message rejected", self.predicate, message, exc_info=exc
            )
            return False

    def __repr__(self) -> str:
        kind = f"queue {self.queue_name!r}" if self.queue_name is not None else "broadcast"
        state = "cancelled" if self._cancelled else "active"
        return f"<Subscription {self.topic} {kind} {self.handler!r} {state}>"


class Broker(ABC):
    """A message broker: ``publish``, ``subscribe``, ``subscribe_async``.

    - ``publish(message)`` delivers ``message`` to every broadcast subscription of its exact type
      (routing is by :func:`~ipcbus.message.get_unique_name_for_message`, never by class identity)
      whose predicate accepts it, once each, and to one subscription of each queue group.
    - Predicates run in the subscriber's process; one that raises rejects and is logged.
    - Handler exceptions are logged with traceback and never stop delivery to other handlers or of
      later messages. Queue-group handlers that raise are retried (:class:`QueuePolicy`), then
      dead-lettered. ``BaseException`` counts as a failure too (``SystemExit``, ``GeneratorExit``,
      a ``CancelledError`` a handler raises itself...), except ``KeyboardInterrupt`` and
      ``SystemExit`` in the main thread, where a broker that runs handlers in its caller's thread
      lets them end the program (:mod:`ipcbus.core.failures`).
    - ``close()`` is idempotent; a closed broker raises :class:`BrokerClosedError`. Brokers are
      context managers that close on exit.
    """

    def __init__(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()

    # -- public API -------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        """Send ``message`` to its subscribers.

        A non-:class:`Message` is a ``TypeError``; a message that cannot be serialised is a
        :class:`~ipcbus.exceptions.MessageSerializationError` raised here, and nothing is sent.
        """
        self._check_message(message)
        self._check_open()
        self._publish(message)

    def subscribe(
        self,
        message_type: type[M],
        handler: Callable[[M], Any],
        predicate: Callable[[M], bool] | None = None,
    ) -> Subscription:
        """Call ``handler(message)`` for every message of exactly ``message_type`` (broadcast).

        Once ``subscribe()`` has returned, every message published afterwards by any process
        reaches it. ``handler`` is a plain callable; coroutine functions belong to
        ``subscribe_async``.
        """
        self._check_subscription(message_type, handler, predicate)
        if inspect.iscoroutinefunction(handler):
            raise TypeError(
                f"subscribe() handlers are called synchronously; {handler!r} is a coroutine "
                "function: use subscribe_async() for it"
            )
        self._check_open()
        subscription = Subscription(self, message_type, handler, predicate, None)
        self._subscribe(subscription)
        return subscription

    def subscribe_async(
        self,
        message_type: type[M],
        handler: Callable[[M], Any],
        queue_name: str,
        predicate: Callable[[M], bool] | None = None,
        *,
        max_attempts: int = 3,
        retry_backoff: float = 0.05,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> Subscription:
        """Join the queue group ``queue_name`` for ``message_type`` (competing consumers).

        Each message goes to **one** subscription of each group whose predicate accepts it; every
        group gets its own copy. ``handler`` may be a coroutine function or a plain function;
        inside it :meth:`AsyncMessageContext.current` describes the delivery. A handler that
        raises is retried up to ``max_attempts`` calls in all, then the message is published as a
        :class:`~ipcbus.message.DeadLetter`. Across processes a consumer holds at most
        ``prefetch`` unacknowledged deliveries (fair dispatch). The default, 1000, is for
        throughput; for long jobs pass about the consumer's worker threads (4), or one consumer
        may hold jobs another, idle, could run.
        """
        self._check_subscription(message_type, handler, predicate)
        if not isinstance(queue_name, str) or not queue_name:
            raise TypeError(f"queue_name must be a non-empty str, not {queue_name!r}")
        policy = QueuePolicy(
            max_attempts=max_attempts, retry_backoff=retry_backoff, prefetch=prefetch
        )
        self._check_open()
        subscription = Subscription(self, message_type, handler, predicate, queue_name, policy)
        self._subscribe(subscription)
        return subscription

    def declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        """Make the queue group ``queue_name`` of ``message_type`` exist now, before (or without)
        any ``subscribe_async``: from then on it holds what is published, until consumers come.

        A producer that may start before its workers declares its queues first, so no job is
        lost meanwhile. What a group holds is bounded (in-process brokers: ``max_held``; the hub:
        ``HubOptions.max_held``, then publishers of that type only wait). Declaring a group that
        exists does nothing. ``Consumer`` declarations with a ``queue_name`` declare their queue
        when they bind.
        """
        self._check_queue(message_type, queue_name)
        self._check_open()
        self._declare_queue(message_type, queue_name)

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:  # noqa: B027
        """Hook: create the group (brokers that hold messages override it)."""

    def delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        """Delete the queue group ``queue_name`` of ``message_type``; return how many messages
        it held, which are dropped with it (counted and logged where they were held).

        A group outlives the absence of its consumers (across processes also a hub restart) and
        holds what is published meanwhile; an abandoned one is deleted here. A group that still
        has consumers, in any process, is not deleted: it raises
        :class:`~ipcbus.exceptions.QueueInUseError` (cancel them first). Deleting a group that
        does not exist returns 0.
        In-process brokers hold nothing for a group without members, so they return 0; the hub
        proxy waits for the hub's answer (``subscribe_timeout``).
        """
        self._check_queue(message_type, queue_name)
        self._check_open()
        return self._delete_queue(message_type, queue_name)

    def flush(self, timeout: float | None = None) -> None:  # noqa: B027 - optional hook
        """Wait until everything published before this call has left this process's hands.

        In-process brokers have nothing in flight for broadcast; see each broker for its queues.
        """

    def close(self) -> None:
        """Release the broker. Idempotent; later use raises ``BrokerClosedError``."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hooks for implementations ----------------------------------------------------------

    @abstractmethod
    def _publish(self, message: Message) -> None: ...

    @abstractmethod
    def _subscribe(self, subscription: Subscription) -> None: ...

    @abstractmethod
    def _cancel(self, subscription: Subscription) -> None: ...

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        """Delete a queue group (see ``delete_queue``); a broker without groups has none."""
        return 0

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, by the first ``close()``."""

    def _for_child(self) -> Broker:
        """The broker a forked child gets from ``get_message_broker()``: fresh, not subscribed.

        In-process brokers return a new instance of their class; a hub proxy reconnects.
        """
        return type(self)()

    # -- shared checks ----------------------------------------------------------------------

    @staticmethod
    def _check_message(message: object) -> None:
        if not isinstance(message, Message):
            raise TypeError(f"publish() takes a Message instance, not {type(message).__name__}")

    @staticmethod
    def _check_queue(message_type: object, queue_name: object) -> None:
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            raise TypeError(f"message_type must be a Message subclass, not {message_type!r}")
        if not isinstance(queue_name, str) or not queue_name:
            raise TypeError(f"queue_name must be a non-empty str, not {queue_name!r}")

    @staticmethod
    def _refuse_deletion(message_type: type[Message], queue_name: str) -> QueueInUseError:
        return QueueInUseError(
            f"the queue group {queue_name!r} of {get_unique_name_for_message(message_type)} "
            "still has consumers: cancel them before deleting it"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerClosedError(f"{type(self).__name__} is closed")

    @staticmethod
    def _check_subscription(
        message_type: object, handler: object, predicate: object | None
    ) -> None:
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            raise TypeError(f"message_type must be a Message subclass, not {message_type!r}")
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {handler!r}")
        if predicate is not None and not callable(predicate):
            raise TypeError(f"predicate must be callable or None, not {predicate!r}")
