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
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from ..exceptions import BrokerClosedError, QueueInUseError
from ..message import Message, get_unique_name_for_message
from .requests import PendingRequests, check_timeout
from .retry import DEFAULT_PREFETCH, QueuePolicy
from .subscription import AsyncMessageContext, Handler, Predicate, Subscription

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
    - ``request(message)`` publishes a request and returns the first reply (see ``request``).
    - ``close()`` is idempotent; a closed broker raises :class:`BrokerClosedError`. Brokers are
      context managers that close on exit.
    """

    def __init__(self) -> None:
        self._closed = False
        self._close_lock = threading.Lock()
        # The requests of this broker waiting for a reply (see request()).
        self._requests = PendingRequests()

    # -- public API -------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        """Send ``message`` to its subscribers.

        A non-:class:`Message` is a ``TypeError``; a message that cannot be serialised is a
        :class:`~ipcbus.exceptions.MessageSerializationError` raised here, and nothing is sent.
        """
        self._check_message(message)
        self._check_open()
        self._publish(message)

    def request(self, message: Message, timeout: float | None = 5.0) -> Message:
        """Publish ``message`` as a request and return the first reply, a ``Message``.

        **Delivery.** A request is published like ``publish(message)``: to every broadcast
        subscription of its exact type whose predicate accepts it, and to one member of each
        queue group (which retries a failing handler as for any message, ``max_attempts`` calls
        in all). It keeps its place in this broker's publish order.

        **Replying.** A responder is any handler that receives the request, ``subscribe`` and
        ``subscribe_async`` handlers alike: it replies by *returning* a ``Message`` (a coroutine
        handler by returning one from the coroutine). A return value that is not a ``Message``
        (``None``) is no reply. For a message that was not sent by ``request()`` the return value
        is ignored, as it always was.

        **Several responders.** The first reply to reach the requester wins; every later one is
        dropped and counted in :attr:`late_replies` (so is a reply that comes after the requester
        gave up). There is no order among responders: which one is first is a race.

        **Failures.** A responder that raises answers with the failure: ``request()`` raises
        :class:`~ipcbus.exceptions.RemoteError` at once (it does not wait for ``timeout``), with
        ``remote_type`` (the qualified name of the exception's class, ``"ValueError"`` for a
        builtin) and ``remote_message`` (its ``str``). A queue-group responder answers with its
        last attempt only: a failure that will be retried is no answer yet, and a request that is
        dead-lettered (its last attempt failed, or the responder's process could not decode it)
        answers ``RemoteError``. A reply that cannot be serialised answers ``RemoteError`` too
        (``remote_type`` ``"ipcbus.exceptions.MessageSerializationError"``). A failure is an
        answer like a reply: if it comes first, it wins.

        **No reply.** When no reply comes within ``timeout`` seconds (``None``: wait for ever),
        :class:`~ipcbus.exceptions.RequestTimeoutError` (also a ``TimeoutError``). A broker that
        can tell that no reply can come raises it at once (``TestBroker``: ``process_messages()``
        ran every responder; ``MemoryBroker``: the only responders run on the event loop of the
        calling thread, which ``request()`` would block).

        **Errors.** As ``publish()`` for the message (``TypeError``,
        ``MessageSerializationError``, ``BrokerClosedError``); a bad ``timeout`` is a
        ``TypeError`` or ``ValueError``. ``close()`` wakes every waiting requester with
        ``BrokerClosedError``.

        **Blocking.** ``request()`` blocks its thread until the reply. It may be called from a
        handler, but the thread it blocks runs no other handler meanwhile: a responder that
        would run on that very thread (a ``subscribe()`` handler of the same process while a
        ``subscribe()`` handler of a ``HubBroker`` waits; a coroutine responder on the event
        loop that a coroutine handler blocks) cannot answer until ``request()`` returns. Give
        such calls a ``timeout``; from a coroutine use ``await asyncio.to_thread(broker.request,
        message)``.

        **Resources.** Nothing is kept per request once it returns or raises: its entry in the
        table of waiting requests (and, across processes, what routes its reply) is removed on
        the reply, on the timeout and on ``close()``. A forked child never receives its
        parent's replies.

        **Implementing it.** A broker provides ``_request(message, timeout)``, called with a
        checked message and timeout on an open broker; it returns the reply or raises as above.
        :mod:`ipcbus.core.requests` has the pieces: ``self._requests`` (a
        :class:`~ipcbus.core.requests.PendingRequests`: ``open()`` an entry, ``wait()`` for it
        with the timeout, ``resolve()`` it from the thread that receives an answer; it counts
        late answers and is closed by ``close()``), :class:`~ipcbus.core.requests.Failure` (what
        travels instead of an exception), ``call_responder()`` and ``answer()`` for the responder
        side (a handler's return value or exception, sent through a ``ReplyTo``), and
        ``result_of()`` (the reply, ``RemoteError`` or ``RequestTimeoutError``). Across
        processes, the correlation id and the reply address travel with the request; the reply
        path must be private to the requester and set up once per broker, not per request.
        """
        self._check_message(message)
        timeout = check_timeout(timeout)
        self._check_open()
        return self._request(message, timeout)

    @property
    def late_replies(self) -> int:
        """Replies dropped because their request already had its answer (a second responder),
        or no longer waited (it timed out, or raised)."""
        return self._requests.late

    @property
    def pending_requests(self) -> int:
        """Requests of this broker waiting for their reply now."""
        return len(self._requests)

    def subscribe(
        self,
        message_type: type[M],
        handler: Callable[[M], Any],
        predicate: Callable[[M], bool] | None = None,
    ) -> Subscription:
        """Call ``handler(message)`` for every message of exactly ``message_type`` (broadcast).

        Once ``subscribe()`` has returned, every message published afterwards by any process
        reaches it. ``handler`` is a plain callable; coroutine functions (and objects whose
        ``__call__`` is one) belong to ``subscribe_async``: ``TypeError``. A handler that returns
        an awaitable all the same (a coroutine function behind a plain decorator) fails that
        call: the awaitable is closed, unrun, and a ``TypeError`` logged (a request answered
        with it).
        """
        self._check_subscription(message_type, handler, predicate)
        # A callable's type has a __call__ (checked above): an object's may be a coroutine one.
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            type(handler).__call__
        ):
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
        self._requests.close(BrokerClosedError(f"{type(self).__name__} closed while waiting"))
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

    def _request(self, message: Message, timeout: float | None) -> Message:
        """Hook: send a request and wait for its first reply (see ``request``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement request()")

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


def close_at_exit(ref: weakref.ref[Broker]) -> None:
    """A broker's finalizer (``multiprocessing.util.Finalize``: it runs at interpreter exit and
    at the exit of multiprocessing children, which skip atexit): close it if it still lives. In
    a process that does not own it (a forked child) ``close()`` releases nothing of the owner's."""
    broker = ref()
    if broker is not None:
        broker.close()
