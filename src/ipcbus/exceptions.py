"""Every error a user of ipcbus catches descends from :class:`PubSubError`.

The names say who broke what (trio's habit): ``BrokerClosedError`` means *you* closed the broker,
``HubUnavailableError`` means the *hub* is gone or never answered. Foreign errors (``zmq.ZMQError``,
pickling errors) are translated at the boundary and chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "BrokerClosedError",
    "BrokerFailedError",
    "BrokerNotInitializedError",
    "ConsumerAlreadyRegisteredError",
    "ConsumerDiedError",
    "HubAddressError",
    "HubUnavailableError",
    "InsecurePathError",
    "JournalError",
    "MessageSerializationError",
    "MessageTooLargeError",
    "MissingDependencyError",
    "PubSubError",
    "PublishTimeoutError",
    "QueueInUseError",
    "RemoteError",
    "RequestTimeoutError",
    "SpoolError",
    "UnknownQueueError",
]


class PubSubError(Exception):
    """Root of every ipcbus error."""


class ConsumerAlreadyRegisteredError(PubSubError):
    """A :class:`~ipcbus.consumer.Consumer` was given a second handler."""


class BrokerNotInitializedError(PubSubError):
    """``get_message_broker()`` was called in a process that installed no broker."""


class MessageSerializationError(PubSubError):
    """A message could not be serialised (pickled, then cloudpickled); nothing was sent.

    Raised by ``publish()`` for a message checked there, and by ``HubBroker.flush()`` for
    messages ``publish()`` had accepted and the broker rejected later (it names their types and
    positions).
    """


class MessageTooLargeError(MessageSerializationError):
    """A message encodes to a frame larger than the hub accepts (``HubOptions.max_message_size``,
    which the hub announces to each client); nothing was sent."""


class SpoolError(PubSubError):
    """A big payload could not be read back from the hub's spool (it expired, or the file is
    not the one its publisher wrote): the batch that named it is dropped, counted as
    undecodable and logged by the subscriber (docs/guarantees.md, "Big payloads")."""


class BrokerClosedError(PubSubError):
    """The broker was closed by its owner (or belongs to another process) and cannot be used."""


class BrokerFailedError(PubSubError):
    """A thread of the broker died (a bug of ipcbus, or something no handler guard caught): the
    broker cannot deliver any more. The message names the thread; close the broker and connect
    a new one."""


class HubUnavailableError(PubSubError):
    """The hub did not answer: it is not running, not reachable, or stopped answering."""


class HubAddressError(PubSubError, ValueError):
    """The hub cannot serve at this address: malformed, too long, or already served."""


class InsecurePathError(PubSubError, PermissionError):
    """A directory or file another user could control was refused (see docs/security.md)."""


class JournalError(HubAddressError):
    """The hub cannot use its journal directory: another user's or open to others, a symlink,
    in use by another hub, or unreadable. The hub does not start."""


class QueueInUseError(PubSubError):
    """``delete_queue()`` was asked to delete a queue group that still has consumers (in this
    process or another): cancel them first. Nothing was deleted."""


class UnknownQueueError(PubSubError, LookupError):
    """A queue administration request (``purge()``, ``requeue()``, ``ipcbus dead-letters``, ...)
    named a queue group the hub does not have. Nothing was done."""


class PublishTimeoutError(PubSubError, TimeoutError):
    """``publish(timeout=...)`` or ``flush(timeout)`` ran out of time under backpressure."""


class ConsumerDiedError(PubSubError):
    """The error a DeadLetter names when a queue message's last attempt died with its process
    (it comes back once more, and is dead-lettered then without running the handler)."""


class RequestTimeoutError(PubSubError, TimeoutError):
    """``request(message, timeout)`` got no reply within ``timeout``: no responder took the
    message, or none returned a ``Message``. ``TestBroker`` raises it at once when
    ``process_messages()`` brought no reply."""


class RemoteError(PubSubError):
    """The responder of a ``request()`` raised: ``remote_type`` is the qualified name of what it
    raised (``"builtins.ValueError"``, ``"orders.OutOfStock"``), ``remote_message`` its text.
    Only the text travels, never the exception object (it may not exist, or not unpickle, in the
    requester's process)."""

    def __init__(self, remote_type: str, remote_message: str) -> None:
        super().__init__(f"the responder raised {remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str]]:
        return type(self), (self.remote_type, self.remote_message)


class MissingDependencyError(PubSubError, ImportError):
    """A feature was asked for whose optional dependency is not installed (hub metrics need
    the ``ipcbus[metrics]`` extra); the message says what to install."""
