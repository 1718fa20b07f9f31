"""ipcbus: publish / subscribe / subscribe_async, in-process or across processes.

Names are imported on first use (PEP 562), so ``from ipcbus import TestBroker`` loads neither
ZeroMQ nor the client side, and the hub process loads only what it serves with.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "AsyncMessageContext": "ipcbus.broker",
    "Broker": "ipcbus.broker",
    "MemoryBroker": "ipcbus.broker",
    "NullBroker": "ipcbus.broker",
    "QueuePolicy": "ipcbus.broker",
    "Subscription": "ipcbus.broker",
    "TestBroker": "ipcbus.broker",
    "get_message_broker": "ipcbus.broker",
    "get_unique_name_for_message": "ipcbus.broker",
    "override_message_broker": "ipcbus.broker",
    "set_message_broker": "ipcbus.broker",
    "Consumer": "ipcbus.consumer",
    "BrokerClosedError": "ipcbus.exceptions",
    "BrokerFailedError": "ipcbus.exceptions",
    "BrokerNotInitializedError": "ipcbus.exceptions",
    "ConsumerAlreadyRegisteredError": "ipcbus.exceptions",
    "HubAddressError": "ipcbus.exceptions",
    "HubUnavailableError": "ipcbus.exceptions",
    "MessageSerializationError": "ipcbus.exceptions",
    "MessageTooLargeError": "ipcbus.exceptions",
    "MissingDependencyError": "ipcbus.exceptions",
    "PublishTimeoutError": "ipcbus.exceptions",
    "PubSubError": "ipcbus.exceptions",
    "QueueInUseError": "ipcbus.exceptions",
    "RemoteError": "ipcbus.exceptions",
    "RequestTimeoutError": "ipcbus.exceptions",
    "SpoolError": "ipcbus.exceptions",
    "UnknownQueueError": "ipcbus.exceptions",
    "decode_dead_letter": "ipcbus.client.queue_admin",
    "Hub": "ipcbus.hub",
    "HubStatistics": "ipcbus.hub",
    "HubBroker": "ipcbus.client.broker",
    "connect": "ipcbus.client.broker",
    "ClientOptions": "ipcbus.config",
    "HubOptions": "ipcbus.config",
    "DeadLetter": "ipcbus.message",
    "Message": "ipcbus.message",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipcbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from .broker import AsyncMessageContext as AsyncMessageContext
    from .broker import Broker as Broker
    from .broker import MemoryBroker as MemoryBroker
    from .broker import NullBroker as NullBroker
    from .broker import QueuePolicy as QueuePolicy
    from .broker import Subscription as Subscription
    from .broker import TestBroker as TestBroker
    from .broker import get_message_broker as get_message_broker
    from .broker import get_unique_name_for_message as get_unique_name_for_message
    from .broker import override_message_broker as override_message_broker
    from .broker import set_message_broker as set_message_broker
    from .client.broker import HubBroker as HubBroker
    from .client.broker import connect as connect
    from .client.queue_admin import decode_dead_letter as decode_dead_letter
    from .config import ClientOptions as ClientOptions
    from .config import HubOptions as HubOptions
    from .consumer import Consumer as Consumer
    from .exceptions import BrokerClosedError as BrokerClosedError
    from .exceptions import BrokerFailedError as BrokerFailedError
    from .exceptions import BrokerNotInitializedError as BrokerNotInitializedError
    from .exceptions import ConsumerAlreadyRegisteredError as ConsumerAlreadyRegisteredError
    from .exceptions import HubAddressError as HubAddressError
    from .exceptions import HubUnavailableError as HubUnavailableError
    from .exceptions import MessageSerializationError as MessageSerializationError
    from .exceptions import MessageTooLargeError as MessageTooLargeError
    from .exceptions import MissingDependencyError as MissingDependencyError
    from .exceptions import PublishTimeoutError as PublishTimeoutError
    from .exceptions import PubSubError as PubSubError
    from .exceptions import QueueInUseError as QueueInUseError
    from .exceptions import RemoteError as RemoteError
    from .exceptions import RequestTimeoutError as RequestTimeoutError
    from .exceptions import SpoolError as SpoolError
    from .exceptions import UnknownQueueError as UnknownQueueError
    from .hub import Hub as Hub
    from .hub import HubStatistics as HubStatistics
    from .message import DeadLetter as DeadLetter
    from .message import Message as Message
