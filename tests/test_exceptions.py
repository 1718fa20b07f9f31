"""The error hierarchy, the public import paths (docs/guarantees.md) and the nature of messages."""

from __future__ import annotations

import dataclasses
import importlib
import pickle

import pytest

import ipcbus
from ipcbus import exceptions

from .messages import OrderPlaced, PriorityOrderPlaced, Tick

ERROR_NAMES = [
    "PubSubError",
    "ConsumerAlreadyRegisteredError",
    "BrokerNotInitializedError",
    "MessageSerializationError",
    "HubUnavailableError",
    "PublishTimeoutError",
    "BrokerClosedError",
    "BrokerFailedError",
]

BROKER_NAMES = [
    "Broker",
    "MemoryBroker",
    "NullBroker",
    "TestBroker",
    "AsyncMessageContext",
    "Subscription",
    "get_message_broker",
    "set_message_broker",
    "override_message_broker",
    "get_unique_name_for_message",
]

PUBLIC = {
    "ipcbus.exceptions": ERROR_NAMES,
    "ipcbus.broker": BROKER_NAMES,
    "ipcbus.message": ["Message"],
    "ipcbus.consumer": ["Consumer"],
}


# -- hierarchy --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_every_error_is_a_pubsub_error(name: str) -> None:
    error_type = getattr(exceptions, name)
    assert issubclass(error_type, exceptions.PubSubError)
    assert issubclass(error_type, Exception)
    with pytest.raises(exceptions.PubSubError, match="detail"):
        raise error_type("detail")


def test_pubsub_error_is_the_root() -> None:
    assert exceptions.PubSubError.__bases__ == (Exception,)


def test_publish_timeout_is_also_a_timeout_error() -> None:
    assert issubclass(exceptions.PublishTimeoutError, TimeoutError)
    assert issubclass(exceptions.PublishTimeoutError, exceptions.PubSubError)
    with pytest.raises(TimeoutError):
        raise exceptions.PublishTimeoutError("slow")


@pytest.mark.parametrize("name", [n for n in ERROR_NAMES if n != "PublishTimeoutError"])
def test_other_errors_are_not_timeout_errors(name: str) -> None:
    assert not issubclass(getattr(exceptions, name), TimeoutError)


def test_the_errors_are_distinct_classes() -> None:
    classes = [getattr(exceptions, name) for name in ERROR_NAMES]
    assert len(set(classes)) == len(ERROR_NAMES)
    for error_type in classes[1:]:
        others = [c for c in classes[1:] if c is not error_type]
        assert not any(issubclass(error_type, other) for other in others), error_type


# -- import paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_name", "name"),
    [(module_name, name) for module_name, names in PUBLIC.items() for name in names],
)
def test_public_names_are_importable_from_their_module_and_from_ipcbus(
    module_name: str, name: str
) -> None:
    module = importlib.import_module(module_name)
    value = getattr(module, name)
    assert getattr(ipcbus, name) is value
    assert name in ipcbus.__all__


def test_the_package_exports_exactly_what_all_lists() -> None:
    for name in ipcbus.__all__:
        assert hasattr(ipcbus, name), name
    assert len(ipcbus.__all__) == len(set(ipcbus.__all__))


def test_test_broker_is_not_collected_by_pytest() -> None:
    assert ipcbus.TestBroker.__test__ is False


# -- messages ---------------------------------------------------------------------------------


def test_message_subclasses_are_frozen_dataclasses() -> None:
    message = OrderPlaced(1, 2.5)
    assert dataclasses.is_dataclass(message)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.order_id = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.extra = 1  # type: ignore[attr-defined]
    assert message == OrderPlaced(1, 2.5)


def test_message_subclasses_are_hashable_by_value() -> None:
    assert hash(OrderPlaced(1, 2.5)) == hash(OrderPlaced(1, 2.5))
    assert {OrderPlaced(1), OrderPlaced(1), OrderPlaced(2), Tick(1)} == {
        OrderPlaced(1),
        OrderPlaced(2),
        Tick(1),
    }
    counts = {OrderPlaced(1): "a"}
    assert counts[OrderPlaced(1)] == "a"


def test_messages_of_different_types_are_not_equal() -> None:
    assert OrderPlaced(1) != PriorityOrderPlaced(1)
    assert OrderPlaced(1) != Tick(1)


def test_messages_pickle_by_reference() -> None:
    for message in (OrderPlaced(1, 2.0), PriorityOrderPlaced(3), Tick(4, "src")):
        copy = pickle.loads(pickle.dumps(message))
        assert copy == message
        assert type(copy) is type(message)


def test_the_base_message_is_a_frozen_dataclass() -> None:
    message = ipcbus.Message()
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.anything = 1  # type: ignore[attr-defined]
    assert hash(message) == hash(ipcbus.Message())
