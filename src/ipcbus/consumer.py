"""Consumer[T]: a module-level declaration of a handler, bound to every process broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from .core import registry
from .core.contract import Broker, Subscription
from .exceptions import ConsumerAlreadyRegisteredError
from .message import Message, get_unique_name_for_message

__all__ = ["Consumer"]

T = TypeVar("T", bound=Message)
H = TypeVar("H", bound=Callable[..., Any])


class Consumer(Generic[T]):
    """Declares, once, how this program handles a message type::

        orders = Consumer(OrderPlaced)

        @orders.on_message                      # broadcast: subscribe()
        def audit(message: OrderPlaced) -> None: ...

        shipping = Consumer(OrderPlaced)

        @shipping.on_message(queue_name="ship")  # competing consumers: subscribe_async()
        async def ship(message: OrderPlaced) -> None: ...

    The handler binds, once each, to every broker that becomes this process's broker: at once if
    one is installed, later through ``set_message_broker`` or inside ``override_message_broker``,
    and in every new process that imports the declaration and installs a broker.
    """

    def __init__(self, message_type: type[T]) -> None:
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            raise TypeError(f"Consumer() takes a Message subclass, not {message_type!r}")
        self.message_type = message_type
        self.handler: Callable[[T], Any] | None = None
        self.predicate: Callable[[T], bool] | None = None
        self.queue_name: str | None = None

    @overload
    def on_message(self, handler: H, /) -> H: ...

    @overload
    def on_message(
        self,
        *,
        predicate: Callable[[T], bool] | None = None,
        queue_name: str | None = None,
    ) -> Callable[[H], H]: ...

    def on_message(
        self,
        handler: Any = None,
        *,
        predicate: Callable[[T], bool] | None = None,
        queue_name: str | None = None,
    ) -> Any:
        """Register the handler (usable as ``@on_message`` or ``@on_message(...)``); once only."""

        def register(function: H) -> H:
            if self.handler is not None:
                raise ConsumerAlreadyRegisteredError(
                    f"Consumer({get_unique_name_for_message(self.message_type)}) already has "
                    f"handler {self.handler!r}"
                )
            # Fail at declaration, not at the first bind, on what subscribe would reject.
            Broker._check_subscription(self.message_type, function, predicate)
            if queue_name is not None and (not isinstance(queue_name, str) or not queue_name):
                raise TypeError(f"queue_name must be a non-empty str, not {queue_name!r}")
            self.handler = function
            self.predicate = predicate
            self.queue_name = queue_name
            registry.register_consumer(self)
            return function

        if handler is not None:
            return register(handler)
        return register

    def _bind(self, broker: Broker) -> Subscription:
        assert self.handler is not None
        if self.queue_name is None:
            return broker.subscribe(self.message_type, self.handler, self.predicate)
        # Declared first: the group exists (and holds) even if this subscription fails.
        broker.declare_queue(self.message_type, self.queue_name)
        return broker.subscribe_async(
            self.message_type, self.handler, self.queue_name, self.predicate
        )

    def __repr__(self) -> str:
        name = get_unique_name_for_message(self.message_type)
        return f"<Consumer {name} handler={self.handler!r} queue_name={self.queue_name!r}>"
