"""The broker API, with the import paths of ``shared.messaging``."""

from .brokers.memory import MemoryBroker as MemoryBroker
from .brokers.memory import NullBroker as NullBroker
from .brokers.testing import TestBroker as TestBroker
from .core.contract import AsyncMessageContext as AsyncMessageContext
from .core.contract import Broker as Broker
from .core.contract import Subscription as Subscription
from .core.registry import get_message_broker as get_message_broker
from .core.registry import override_message_broker as override_message_broker
from .core.registry import set_message_broker as set_message_broker
from .core.retry import QueuePolicy as QueuePolicy
from .message import get_unique_name_for_message as get_unique_name_for_message

__all__ = [
    "AsyncMessageContext",
    "Broker",
    "MemoryBroker",
    "NullBroker",
    "QueuePolicy",
    "Subscription",
    "TestBroker",
    "get_message_broker",
    "get_unique_name_for_message",
    "override_message_broker",
    "set_message_broker",
]
