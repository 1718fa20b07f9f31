"""The broker API, with the import paths of ``shared.messaging``."""

from ._base import AsyncMessageContext as AsyncMessageContext
from ._base import Broker as Broker
from ._base import QueuePolicy as QueuePolicy
from ._base import Subscription as Subscription
from ._memory import MemoryBroker as MemoryBroker
from ._memory import NullBroker as NullBroker
from ._registry import get_message_broker as get_message_broker
from ._registry import override_message_broker as override_message_broker
from ._registry import set_message_broker as set_message_broker
from ._testing import TestBroker as TestBroker
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
