"""ipcbus: publish / subscribe / subscribe_async, in-process or across processes."""

from ._proxy import HubBroker as HubBroker
from ._proxy import connect as connect
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
from .consumer import Consumer as Consumer
from .exceptions import BrokerClosedError as BrokerClosedError
from .exceptions import BrokerNotInitializedError as BrokerNotInitializedError
from .exceptions import ConsumerAlreadyRegisteredError as ConsumerAlreadyRegisteredError
from .exceptions import HubUnavailableError as HubUnavailableError
from .exceptions import MessageSerializationError as MessageSerializationError
from .exceptions import PublishTimeoutError as PublishTimeoutError
from .exceptions import PubSubError as PubSubError
from .hub import Hub as Hub
from .hub import HubAddressError as HubAddressError
from .hub import HubStatistics as HubStatistics
from .message import DeadLetter as DeadLetter
from .message import Message as Message

__version__ = "0.1.0"

__all__ = [
    "AsyncMessageContext",
    "Broker",
    "BrokerClosedError",
    "BrokerNotInitializedError",
    "Consumer",
    "ConsumerAlreadyRegisteredError",
    "DeadLetter",
    "Hub",
    "HubAddressError",
    "HubBroker",
    "HubStatistics",
    "HubUnavailableError",
    "MemoryBroker",
    "Message",
    "MessageSerializationError",
    "NullBroker",
    "PubSubError",
    "PublishTimeoutError",
    "QueuePolicy",
    "Subscription",
    "TestBroker",
    "connect",
    "get_message_broker",
    "get_unique_name_for_message",
    "override_message_broker",
    "set_message_broker",
]
