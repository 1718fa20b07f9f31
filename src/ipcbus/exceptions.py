"""Every error a user of ipcbus catches descends from :class:`PubSubError`.

The names say who broke what (trio's habit): ``BrokerClosedError`` means *you* closed the broker,
``HubUnavailableError`` means the *hub* is gone or never answered. Foreign errors (``zmq.ZMQError``,
pickling errors) are translated at the boundary and chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "BrokerClosedError",
    "BrokerNotInitializedError",
    "ConsumerAlreadyRegisteredError",
    "HubAddressError",
    "HubUnavailableError",
    "MessageSerializationError",
    "PubSubError",
    "PublishTimeoutError",
    "QueueInUseError",
]


class PubSubError(Exception):
    """Root of every ipcbus error."""


class ConsumerAlreadyRegisteredError(PubSubError):
    """A :class:`~ipcbus.consumer.Consumer` was given a second handler."""


class BrokerNotInitializedError(PubSubError):
    """``get_message_broker()`` was called in a process that installed no broker."""


class MessageSerializationError(PubSubError):
    """A message could not be serialised (pickled, then cloudpickled); nothing was sent."""


class BrokerClosedError(PubSubError):
    """The broker was closed by its owner (or belongs to another process) and cannot be used."""


class HubUnavailableError(PubSubError):
    """The hub did not answer: it is not running, not reachable, or stopped answering."""


class HubAddressError(PubSubError, ValueError):
    """The hub cannot serve at this address: malformed, too long, or already served."""


class QueueInUseError(PubSubError):
    """``delete_queue()`` was asked to delete a queue group that still has consumers (in this
    process or another): cancel them first. Nothing was deleted."""


class PublishTimeoutError(PubSubError, TimeoutError):
    """``publish(timeout=...)`` or ``flush(timeout)`` ran out of time under backpressure."""
