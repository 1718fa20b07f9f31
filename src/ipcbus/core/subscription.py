"""What a subscription is: :class:`Subscription` (a handler registered with a broker) and
:class:`AsyncMessageContext` (the context of one queue delivery). In-process core: never imports
zmq. Re-exported by :mod:`ipcbus.core.contract`, the contract they belong to.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..message import Message, get_unique_name_for_message
from .failures import is_handler_failure
from .retry import QueuePolicy

if TYPE_CHECKING:
    from .contract import Broker

__all__ = ["AsyncMessageContext", "Handler", "Predicate", "Subscription"]

logger = logging.getLogger(__name__)

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
