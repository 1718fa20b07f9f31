"""The base class of every message, and the name a message type is routed by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DeadLetter", "Message", "get_unique_name_for_message"]

# A class defined in the main script lives in ``__main__`` in the parent and in ``__mp_main__`` in a
# spawn/forkserver child; both must route under the same name (docs/architecture.md, "Names").
_MAIN_ALIASES = frozenset({"__main__", "__mp_main__"})


@dataclass(frozen=True)
class Message:
    """Base class for all messages.

    Subclasses are frozen (hence hashable) dataclasses and must be picklable::

        @dataclass(frozen=True)
        class OrderPlaced(Message):
            order_id: int
    """


@dataclass(frozen=True)
class DeadLetter(Message):
    """Published when a queue-group message used up its attempts.

    ``message`` is the original message, ``attempts`` how often a handler was called with it and
    ``error`` the last exception as text (``"ValueError: bad order"``).
    """

    queue_name: str
    message: Message
    attempts: int
    error: str


def get_unique_name_for_message(message_or_type: Message | type[Message] | Any) -> str:
    """Return ``"<module>.<qualname>"`` of a message or message type.

    The name is the same in every process of a program: ``__mp_main__`` (the main script as seen by
    a spawn or forkserver child) is reported as ``__main__``. Routing uses this name, never class
    identity, which differs between processes.
    """
    cls = message_or_type if isinstance(message_or_type, type) else type(message_or_type)
    module = cls.__module__
    if module in _MAIN_ALIASES:
        module = "__main__"
    return f"{module}.{cls.__qualname__}"
