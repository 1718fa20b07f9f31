"""Serialisation of messages: pickle by reference first, cloudpickle only when pickle cannot.

In-process core (never imports zmq); the codec ids it writes are defined by the wire protocol.

Measured on the target machines (docs/architecture.md, "Measured facts"): ``pickle.dumps`` of a
small frozen dataclass costs 2.5-5 µs and 78 B, ``cloudpickle.dumps`` of the same class defined
in ``__main__`` 281 µs and 4 860 B; pickling a batch costs ~0.9 µs per message, and pickling a
batch as the messages' ``__dict__`` rebuilt with ``object.__new__`` + ``__dict__.update``
0.18 µs. Hence two codecs:

- ``DATACLASS`` for plain dataclasses (no ``__slots__``, no custom pickling hooks): the batch
  travels as a list of ``__dict__`` and the receiver rebuilds instances of *its own* class for the
  topic. No class crosses the wire at all, so a class defined in ``__main__`` works in spawn
  children and scripts started by hand without cloudpickling it.
- ``OBJECTS`` for everything else: the list of messages, pickled.

Either payload falls back to cloudpickle when pickle fails (lambdas, local classes). Protocol 5
out-of-band buffers (large arrays) travel as frames of their own, uncopied.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Sequence
from typing import Any

import cloudpickle

from ..exceptions import MessageSerializationError
from ..message import Message
from ..wire.protocol import (
    CODEC_DATACLASS,
    CODEC_OBJECTS,
    CODEC_SPLIT_DATACLASS,
    CODEC_SPLIT_OBJECTS,
    MAX_BUFFERS,
)

__all__ = [
    "DATACLASS",
    "OBJECTS",
    "PROTOCOL",
    "decode_batch",
    "decode_one",
    "encode_batch",
    "encode_split",
    "is_plain_dataclass",
]

PROTOCOL = 5
DATACLASS = CODEC_DATACLASS
OBJECTS = CODEC_OBJECTS
# The same two codecs, one frame per message (no out-of-band buffers), for topics that have queue
# groups: the hub hands each message to a group without unpickling. Costs ~1 µs more per message
# than a batch pickle (0.54 vs 0.15 µs dumps, 0.92 vs 0.25 µs loads), so only those topics pay.
SPLIT_DATACLASS = CODEC_SPLIT_DATACLASS
SPLIT_OBJECTS = CODEC_SPLIT_OBJECTS

_PICKLING_HOOKS = ("__reduce__", "__reduce_ex__", "__getstate__")

# Asked once per batch (a lookup costs ~150 ns), weak: programs that create message classes at run
# time (each ~10 KB) must get them back once they drop them.
_plain: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def is_plain_dataclass(cls: type) -> bool:
    """True when pickling an instance is exactly "the class, then its ``__dict__``"."""
    known = _plain.get(cls)
    if known is None:
        known = _plain[cls] = _is_plain_dataclass(cls)
    return known


def _is_plain_dataclass(cls: type) -> bool:
    if "__dataclass_fields__" not in dir(cls):
        return False
    for klass in cls.__mro__[:-1]:  # all but object
        if "__slots__" in vars(klass):
            return False
    if any(getattr(cls, hook) is not getattr(object, hook) for hook in _PICKLING_HOOKS):
        return False
    return not any(
        hasattr(cls, hook) for hook in ("__setstate__", "__getnewargs__", "__getnewargs_ex__")
    )


def encode_batch(cls: type, messages: Sequence[Message]) -> tuple[bytes, list[Any]]:
    """Serialise messages of type ``cls``: ``(codec, [payload, *out_of_band_buffers])``."""
    if is_plain_dataclass(cls):
        return DATACLASS, _dumps([message.__dict__ for message in messages], cls)
    return OBJECTS, _dumps(list(messages), cls)


def encode_split(cls: type, messages: Sequence[Message]) -> tuple[bytes, list[bytes]]:
    """Serialise each message into a frame of its own: ``(codec, [payload, ...])``."""
    if is_plain_dataclass(cls):
        return SPLIT_DATACLASS, [_dumps_inband(message.__dict__, cls) for message in messages]
    return SPLIT_OBJECTS, [_dumps_inband(message, cls) for message in messages]


def decode_one(codec: bytes, payload: Any, cls: type | None) -> Message:
    """Rebuild one message of a split batch."""
    decoded = pickle.loads(payload)
    if codec == SPLIT_OBJECTS:
        return decoded  # type: ignore[no-any-return]
    if codec != SPLIT_DATACLASS or cls is None:
        raise ValueError(f"cannot decode codec {codec!r} for class {cls!r}")
    message: Message = object.__new__(cls)
    message.__dict__.update(decoded)
    return message


def decode_batch(codec: bytes, frames: Sequence[Any], cls: type | None) -> list[Message]:
    """Rebuild a batch; ``cls`` is this process's class for the topic (needed for DATACLASS)."""
    if codec in (SPLIT_DATACLASS, SPLIT_OBJECTS):
        return [decode_one(codec, frame, cls) for frame in frames]
    payload, *buffers = frames
    decoded = pickle.loads(payload, buffers=buffers)
    if codec == OBJECTS:
        return list(decoded)
    if codec != DATACLASS or cls is None:
        raise ValueError(f"cannot decode codec {codec!r} for class {cls!r}")
    new = object.__new__
    messages = []
    for state in decoded:
        message: Message = new(cls)
        message.__dict__.update(state)
        messages.append(message)
    return messages


def _dumps_inband(obj: Any, cls: type) -> bytes:
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        pass  # as in _dumps: the by-value attempt
    try:
        data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise MessageSerializationError(
            f"cannot serialise {cls.__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc
    return data


def _dumps(obj: Any, cls: type) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        if len(buffers) > MAX_BUFFERS:
            # Frames are bounded on the wire: this many buffers travel in-band instead.
            return [_dumps_inband(obj, cls)]
    except Exception:
        # Local classes, lambdas and closures: pickle raises PicklingError, AttributeError or
        # TypeError depending on the object; all of them deserve the by-value attempt.
        buffers.clear()
        try:
            payload = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        except Exception as exc:
            raise MessageSerializationError(
                f"cannot serialise {cls.__qualname__}: {type(exc).__name__}: {exc}"
            ) from exc
        if len(buffers) > MAX_BUFFERS:
            return [_dumps_inband(obj, cls)]  # as above: frames are bounded on the wire
    return [payload, *(buffer.raw() for buffer in buffers)]
