"""Serialisation of messages: pickle by reference first, cloudpickle only when pickle cannot.

Measured on the target machines (DESIGN.md §4): ``pickle.dumps`` of a small frozen dataclass costs
2.5-5 µs and 78 B, ``cloudpickle.dumps`` of the same class defined in ``__main__`` 281 µs and
4 860 B; pickling a batch costs ~0.9 µs per message, and pickling a batch as the messages'
``__dict__`` rebuilt with ``object.__new__`` + ``__dict__.update`` 0.18 µs. Hence two codecs:

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
from collections.abc import Sequence
from functools import cache
from typing import Any

import cloudpickle

from .exceptions import MessageSerializationError
from .message import Message

__all__ = ["DATACLASS", "OBJECTS", "PROTOCOL", "decode_batch", "encode_batch", "is_plain_dataclass"]

PROTOCOL = 5
DATACLASS = b"D"
OBJECTS = b"P"

_PICKLING_HOOKS = ("__reduce__", "__reduce_ex__", "__getstate__")


@cache
def is_plain_dataclass(cls: type) -> bool:
    """True when pickling an instance is exactly "the class, then its ``__dict__``"."""
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


def decode_batch(codec: bytes, frames: Sequence[Any], cls: type | None) -> list[Message]:
    """Rebuild a batch; ``cls`` is this process's class for the topic (needed for DATACLASS)."""
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


def _dumps(obj: Any, cls: type) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
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
    return [payload, *(buffer.raw() for buffer in buffers)]
