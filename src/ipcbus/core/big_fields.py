"""Big ``bytes``/``bytearray`` fields of messages (worker process): out-of-band, as frames of
their own, instead of copied into the pickled payload; and the size checks ``publish()`` makes
for the types that carry them. The codec (:mod:`ipcbus.core.codec`) asks here."""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Sequence
from typing import Any

from ..message import Message

__all__ = ["BIG_FIELD", "any_big", "largest_field", "mark", "some", "states", "types"]

# A bytes or bytearray field this large travels out-of-band, as a frame of its own. Below it the
# copy into the payload is cheaper than a frame (pyzmq: 3-6 us per frame; it copies frames under
# 64 KiB even when asked not to, its COPY_THRESHOLD).
BIG_FIELD = 64 * 1024
_BIG_TYPES = (bytes, bytearray)

# Types whose messages have had big fields (weak, as _plain): only they pay for looking at each
# field (~0.15 us per message), the hot path of small messages never does.
types: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
some = False  # a type is in types: until then no lookup there (a Python call each)


class _OutOfBand:
    """Stands for a big ``bytes``/``bytearray`` field while a batch is pickled: pickled as its
    type called with a ``PickleBuffer`` of it (out-of-band), so the receiver calls
    ``bytes(view)`` or ``bytearray(view)`` on a view of the frame and gets the same type."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return _rebuild_big, (type(self.value), pickle.PickleBuffer(self.value))


def _rebuild_big(kind: type, view: Any) -> bytes | bytearray:
    """A big field from the buffer it travelled in: a ``bytes`` buffer (read from a spool file)
    is the field itself, anything else (a frame) is copied once into a new ``bytes`` or
    ``bytearray`` (an 8 MB copy costs ~1-2 ms)."""
    source = view.obj if isinstance(view, memoryview) else view
    if kind is bytes and type(source) is bytes and len(source) == view.nbytes:
        return source
    if kind is bytearray:
        return bytearray(view)
    return bytes(view)


def mark(cls: type) -> None:
    """Messages of ``cls`` have brought big fields: from now on each is looked at."""
    global some
    types[cls] = True
    some = True


def _is_big(value: Any) -> bool:
    return type(value) in _BIG_TYPES and len(value) >= BIG_FIELD


def any_big(messages: Sequence[Message]) -> bool:
    return any(_is_big(value) for message in messages for value in message.__dict__.values())


def states(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages' ``__dict__``, each big field wrapped to travel out-of-band."""
    states = []
    for message in messages:
        state = message.__dict__
        if any(_is_big(value) for value in state.values()):
            state = {
                key: _OutOfBand(value) if _is_big(value) else value for key, value in state.items()
            }
        states.append(state)
    return states


def largest_field(message: Message) -> int:
    """The size of the largest buffer (``bytes``, ``bytearray``, ``PickleBuffer``, ...) among
    the message's fields (0 for a class without ``__dict__``): the size of the largest frame it
    brings, checked by ``publish()`` for types that carry big fields."""
    largest = 0
    for value in getattr(message, "__dict__", {}).values():
        if isinstance(value, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
            with memoryview(value) as view:
                largest = max(largest, view.nbytes)
    return largest
