"""Unit tests of message serialisation (ipcbus.core.codec)."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import cloudpickle
import pytest

from ipcbus import Message
from ipcbus.core import codec
from ipcbus.core.codec import (
    DATACLASS,
    OBJECTS,
    SPLIT_DATACLASS,
    SPLIT_OBJECTS,
    decode_batch,
    decode_one,
    encode_batch,
    encode_split,
    is_plain_dataclass,
    split_decoder,
    split_messages,
)
from ipcbus.exceptions import MessageSerializationError
from ipcbus.wire.protocol import MAX_BUFFERS

from .messages import Unpicklable


@dataclass(frozen=True)
class Plain(Message):
    order_id: int
    note: str = ""
    data: bytes = b""


@dataclass(frozen=True)
class PlainTwin(Message):
    """The same fields as Plain: the receiver's class is what DATACLASS rebuilds."""

    order_id: int
    note: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Slotted(Message):
    order_id: int
    note: str = ""


@dataclass(frozen=True)
class Reduced(Message):
    order_id: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (Reduced, (self.order_id,))


@dataclass(frozen=True)
class Stateful(Message):
    order_id: int
    cache: str = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"order_id": self.order_id, "cache": ""}  # the cache does not travel


@dataclass(frozen=True)
class WithSetstate(Message):
    order_id: int

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass(frozen=True)
class WithNewargs(Message):
    order_id: int

    def __getnewargs__(self) -> tuple[Any, ...]:
        return ()


class SlotsMixin:
    __slots__ = ()


@dataclass(frozen=True)
class InheritsSlots(Message, SlotsMixin):
    order_id: int


@dataclass(frozen=True)
class Carrier(Message):
    """Anything at all in its fields: buffers, callables."""

    seq: int
    value: Any = None
    extra: Any = None


class NotADataclass:
    pass


def plain_batch(count: int) -> list[Plain]:
    return [Plain(n, f"note-{n}", bytes([n % 256]) * (n + 1)) for n in range(count)]


def round_trip(cls: type, messages: list[Any], receiver: type | None = None) -> list[Any]:
    codec_id, frames = encode_batch(cls, messages)
    return decode_batch(codec_id, frames, receiver or cls)


@pytest.fixture
def cloudpickle_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every object the codec hands to cloudpickle."""
    calls: list[object] = []

    def dumps(obj: object, *args: Any, **kwargs: Any) -> bytes:
        calls.append(obj)
        data: bytes = cloudpickle.dumps(obj, *args, **kwargs)
        return data

    monkeypatch.setattr(codec, "cloudpickle", SimpleNamespace(dumps=dumps))
    return calls


# -- is_plain_dataclass -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "plain"),
    [
        (Plain, True),
        (PlainTwin, True),
        (Carrier, True),
        (Message, True),
        (Slotted, False),
        (Reduced, False),
        (Stateful, False),
        (WithSetstate, False),
        (WithNewargs, False),
        (InheritsSlots, False),
        (NotADataclass, False),
        (int, False),
    ],
)
def test_is_plain_dataclass(cls: type, plain: bool) -> None:
    assert is_plain_dataclass(cls) is plain


def test_is_plain_dataclass_of_local_classes() -> None:
    @dataclass(frozen=True)
    class LocalPlain(Message):
        x: int

    @dataclass(frozen=True, slots=True)
    class LocalSlotted(Message):
        x: int

    assert is_plain_dataclass(LocalPlain)
    assert not is_plain_dataclass(LocalSlotted)


# -- batches ----------------------------------------------------------------------------------


def test_plain_dataclasses_travel_as_dicts(cloudpickle_calls: list[object]) -> None:
    messages = plain_batch(5)
    codec_id, frames = encode_batch(Plain, messages)
    assert codec_id == DATACLASS
    assert len(frames) == 1
    assert b"Plain" not in bytes(frames[0])  # no class crosses the wire
    decoded = decode_batch(codec_id, frames, Plain)
    assert decoded == messages
    assert all(type(message) is Plain for message in decoded)
    assert cloudpickle_calls == []


def test_dataclass_payloads_are_rebuilt_as_the_receivers_class() -> None:
    messages = plain_batch(3)
    decoded = round_trip(Plain, messages, receiver=PlainTwin)
    assert [type(message) for message in decoded] == [PlainTwin] * 3
    assert [(m.order_id, m.note, m.data) for m in decoded] == [
        (m.order_id, m.note, m.data) for m in messages
    ]


def test_an_empty_batch_round_trips() -> None:
    assert round_trip(Plain, []) == []
    assert round_trip(Slotted, []) == []


@pytest.mark.parametrize(
    "messages",
    [
        [Slotted(1, "a"), Slotted(2, "b"), Slotted(3, "c")],
        [Reduced(10), Reduced(11)],
        [WithSetstate(20), WithSetstate(21)],
        [WithNewargs(30), WithNewargs(31)],
        [InheritsSlots(40), InheritsSlots(41)],
    ],
    ids=lambda messages: type(messages[0]).__name__,
)
def test_other_classes_travel_as_objects(
    messages: list[Any], cloudpickle_calls: list[object]
) -> None:
    cls = type(messages[0])
    codec_id, frames = encode_batch(cls, messages)
    assert codec_id == OBJECTS
    decoded = decode_batch(codec_id, frames, None)  # the class travels: none needed
    assert decoded == messages
    assert all(type(message) is cls for message in decoded)
    assert cloudpickle_calls == []


def test_a_custom_getstate_is_honoured() -> None:
    messages = [Stateful(1, "big cache 1"), Stateful(2, "big cache 2")]
    codec_id, frames = encode_batch(Stateful, messages)
    assert codec_id == OBJECTS
    decoded = decode_batch(codec_id, frames, Stateful)
    assert [(m.order_id, m.cache) for m in decoded] == [(1, ""), (2, "")]


def test_a_local_plain_dataclass_needs_no_cloudpickle(cloudpickle_calls: list[object]) -> None:
    @dataclass(frozen=True)
    class LocalPlain(Message):
        x: int
        y: str

    messages = [LocalPlain(1, "one"), LocalPlain(2, "two")]
    codec_id, frames = encode_batch(LocalPlain, messages)
    assert codec_id == DATACLASS
    assert decode_batch(codec_id, frames, LocalPlain) == messages
    assert cloudpickle_calls == []


def test_a_local_class_falls_back_to_cloudpickle(cloudpickle_calls: list[object]) -> None:
    @dataclass(frozen=True, slots=True)
    class LocalSlotted(Message):
        x: int
        y: str

    messages = [LocalSlotted(1, "one"), LocalSlotted(2, "two")]
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(messages, protocol=5)
    codec_id, frames = encode_batch(LocalSlotted, messages)
    assert codec_id == OBJECTS
    assert len(cloudpickle_calls) == 1
    decoded = decode_batch(codec_id, frames, None)
    assert decoded == messages
    assert all(type(message) is LocalSlotted for message in decoded)


def test_lambdas_in_fields_fall_back_to_cloudpickle(cloudpickle_calls: list[object]) -> None:
    offset = 100
    messages = [Carrier(1, lambda x: x + offset), Carrier(2, lambda x: x * 2)]
    codec_id, frames = encode_batch(Carrier, messages)
    assert codec_id == DATACLASS
    assert len(cloudpickle_calls) == 1
    first, second = decode_batch(codec_id, frames, Carrier)
    assert (first.seq, first.value(1)) == (1, 101)
    assert (second.seq, second.value(21)) == (2, 42)


def test_a_lambda_in_an_objects_message(cloudpickle_calls: list[object]) -> None:
    messages = [Slotted(1, "a"), Slotted(2, lambda: "called")]  # type: ignore[arg-type]
    codec_id, frames = encode_batch(Slotted, messages)
    assert codec_id == OBJECTS
    assert len(cloudpickle_calls) == 1
    first, second = decode_batch(codec_id, frames, None)
    assert first == Slotted(1, "a")
    assert second.note() == "called"  # type: ignore[operator]


# -- out-of-band buffers ----------------------------------------------------------------------


def test_pickle_buffers_travel_out_of_band_uncopied() -> None:
    first, second = bytearray(b"first buffer"), bytearray(b"second, longer buffer")
    messages = [
        Carrier(1, pickle.PickleBuffer(first)),
        Carrier(2, pickle.PickleBuffer(second), b"in-band"),
    ]
    codec_id, frames = encode_batch(Carrier, messages)
    assert codec_id == DATACLASS
    assert len(frames) == 3
    assert isinstance(frames[0], bytes)
    assert [bytes(frame) for frame in frames[1:]] == [b"first buffer", b"second, longer buffer"]
    first[0:5] = b"FIRST"  # the frame is a view of the message's own memory
    assert bytes(frames[1]).startswith(b"FIRST")
    one, two = decode_batch(codec_id, frames, Carrier)
    assert bytes(one.value) == b"FIRST buffer"
    assert bytes(two.value) == b"second, longer buffer"
    assert two.extra == b"in-band"


def test_bytearray_payloads_round_trip_as_dataclasses() -> None:
    messages = [Carrier(n, bytearray(b"payload %d" % n) * (n + 1)) for n in range(4)]
    decoded = round_trip(Carrier, messages)
    assert decoded == messages
    assert all(type(message.value) is bytearray for message in decoded)


def test_bytearray_payloads_round_trip_as_objects() -> None:
    messages = [Slotted(n, bytearray(b"slot %d" % n)) for n in range(4)]  # type: ignore[arg-type]
    decoded = round_trip(Slotted, messages)
    assert decoded == messages
    assert all(type(message.note) is bytearray for message in decoded)


def test_max_buffers_travel_out_of_band() -> None:
    chunks = tuple(pickle.PickleBuffer(bytearray(b"chunk %d" % n)) for n in range(MAX_BUFFERS))
    codec_id, frames = encode_batch(Carrier, [Carrier(1, chunks)])
    assert len(frames) == MAX_BUFFERS + 1
    (decoded,) = decode_batch(codec_id, frames, Carrier)
    assert [bytes(chunk) for chunk in decoded.value] == [
        b"chunk %d" % n for n in range(MAX_BUFFERS)
    ]


def test_more_than_max_buffers_travel_in_band() -> None:
    count = MAX_BUFFERS + 1
    chunks = tuple(pickle.PickleBuffer(bytearray(b"chunk %d" % n)) for n in range(count))
    codec_id, frames = encode_batch(Carrier, [Carrier(1, chunks), Carrier(2, b"second")])
    assert codec_id == DATACLASS
    assert len(frames) == 1
    assert isinstance(frames[0], bytes)
    first, second = decode_batch(codec_id, frames, Carrier)
    assert [bytes(chunk) for chunk in first.value] == [b"chunk %d" % n for n in range(count)]
    assert second == Carrier(2, b"second")


def test_more_than_max_buffers_travel_in_band_on_the_cloudpickle_path() -> None:
    count = MAX_BUFFERS + 1
    chunks = tuple(pickle.PickleBuffer(bytearray(b"chunk %d" % n)) for n in range(count))
    codec_id, frames = encode_batch(Carrier, [Carrier(1, chunks, lambda: "closure")])
    (decoded,) = decode_batch(codec_id, frames, Carrier)
    assert [bytes(chunk) for chunk in decoded.value] == [b"chunk %d" % n for n in range(count)]
    assert len(frames) <= MAX_BUFFERS + 1


# -- split batches ----------------------------------------------------------------------------


def test_split_plain_dataclasses_each_pickled_alone() -> None:
    messages = plain_batch(4)
    codec_id, frames = encode_split(Plain, messages)
    assert codec_id == SPLIT_DATACLASS
    assert len(frames) == 2  # sizes and payloads, however many messages
    assert all(isinstance(frame, bytes) for frame in frames)
    payloads = split_messages(frames)
    assert len(payloads) == 4
    assert [decode_one(codec_id, payload, Plain) for payload in payloads] == messages
    assert decode_batch(codec_id, frames, Plain) == messages
    assert decode_one(codec_id, payloads[2], PlainTwin) == PlainTwin(2, "note-2", b"\x02" * 3)
    decode = split_decoder(codec_id, Plain)
    assert [decode(payload) for payload in payloads] == messages


def test_split_objects_each_pickled_alone() -> None:
    messages = [Slotted(n, f"s{n}") for n in range(3)]
    codec_id, frames = encode_split(Slotted, messages)
    assert codec_id == SPLIT_OBJECTS
    payloads = split_messages(frames)
    assert len(payloads) == 3
    assert [decode_one(codec_id, payload, None) for payload in payloads] == messages
    assert decode_batch(codec_id, frames, None) == messages
    decode = split_decoder(codec_id, None)
    assert [decode(payload) for payload in payloads] == messages


def test_a_split_batch_decodes_from_received_frames() -> None:
    """What a subscriber receives are ZeroMQ frames: their ``buffer`` is read, not copied."""
    messages = plain_batch(3)
    codec_id, frames = encode_split(Plain, messages)
    received = [SimpleNamespace(buffer=memoryview(frame)) for frame in frames]
    assert decode_batch(codec_id, received, Plain) == messages


def test_split_keeps_buffers_in_band_and_falls_back_to_cloudpickle(
    cloudpickle_calls: list[object],
) -> None:
    messages = [
        Carrier(1, pickle.PickleBuffer(bytearray(b"buffer one"))),
        Carrier(2, lambda: "two"),
    ]
    codec_id, frames = encode_split(Carrier, messages)
    assert codec_id == SPLIT_DATACLASS
    assert len(frames) == 2
    assert len(cloudpickle_calls) == 1  # only the message with a lambda
    first, second = split_messages(frames)
    one = decode_one(codec_id, first, Carrier)
    two = decode_one(codec_id, second, Carrier)
    assert bytes(one.value) == b"buffer one"  # type: ignore[attr-defined]
    assert two.value() == "two"  # type: ignore[attr-defined]


def test_a_split_local_class_falls_back_to_cloudpickle() -> None:
    @dataclass(frozen=True, slots=True)
    class LocalSlotted(Message):
        x: int

    codec_id, frames = encode_split(LocalSlotted, [LocalSlotted(7), LocalSlotted(8)])
    assert codec_id == SPLIT_OBJECTS
    decoded = [decode_one(codec_id, payload, None) for payload in split_messages(frames)]
    assert [message.x for message in decoded] == [7, 8]  # type: ignore[attr-defined]


def test_a_split_batch_whose_sizes_do_not_fit_is_refused() -> None:
    _, (sizes, payloads) = encode_split(Plain, plain_batch(2))
    with pytest.raises(ValueError):
        split_messages([sizes, payloads + b"x"])
    with pytest.raises(ValueError):
        decode_batch(SPLIT_DATACLASS, [sizes[:-1], payloads], Plain)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_batch, encode_split])
def test_an_unpicklable_field_is_a_serialization_error(
    encode: Callable[[type, list[Any]], Any],
) -> None:
    with pytest.raises(MessageSerializationError, match="Unpicklable") as caught:
        encode(Unpicklable, [Unpicklable()])
    assert caught.value.__cause__ is not None
    assert "lock" in str(caught.value)


@pytest.mark.parametrize("encode", [encode_batch, encode_split])
def test_an_unpicklable_objects_message_names_its_class(
    encode: Callable[[type, list[Any]], Any],
) -> None:
    with pytest.raises(MessageSerializationError, match="cannot serialise Slotted"):
        encode(Slotted, [Slotted(1, "fine"), Slotted(2, threading.Lock())])  # type: ignore[arg-type]


def test_a_local_class_name_is_its_qualname_in_the_error() -> None:
    @dataclass(frozen=True)
    class LocalLocked(Message):
        lock: Any = field(default_factory=threading.Lock)

    with pytest.raises(MessageSerializationError, match=r"<locals>\.LocalLocked"):
        encode_batch(LocalLocked, [LocalLocked()])


@pytest.mark.parametrize(
    ("codec_id", "cls"),
    [(DATACLASS, None), (b"Z", Plain)],
)
def test_decode_batch_refuses_what_it_cannot_decode(codec_id: bytes, cls: type | None) -> None:
    _, frames = encode_batch(Plain, plain_batch(2))
    with pytest.raises(ValueError, match="cannot decode"):
        decode_batch(codec_id, frames, cls)


@pytest.mark.parametrize(
    ("codec_id", "cls"),
    [(SPLIT_DATACLASS, None), (DATACLASS, Plain), (b"Z", Plain)],
)
def test_decode_one_refuses_what_it_cannot_decode(codec_id: bytes, cls: type | None) -> None:
    _, frames = encode_split(Plain, plain_batch(1))
    (payload,) = split_messages(frames)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_one(codec_id, payload, cls)
    with pytest.raises(ValueError, match="cannot decode"):
        split_decoder(codec_id, cls)(payload)
