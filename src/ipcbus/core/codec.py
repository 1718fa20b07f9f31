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
out-of-band buffers (large arrays, ``pickle.PickleBuffer``) travel as frames of their own,
uncopied. So do big ``bytes`` and ``bytearray`` fields of plain dataclasses, which pickle would
copy into the payload: each is pickled as "rebuild me from this buffer", the buffer out-of-band
(``big_fields``). The receiver gets read-only views of the frames as buffers: a ``bytes`` field
arrives as ``bytes`` and a ``bytearray`` as ``bytearray`` (each one copy, out of the frame), a
``PickleBuffer`` as a read-only ``memoryview`` of the frame (no copy).

A batch that holds an instance of a class this process cannot import (a module only the
publisher has, a class of the publisher's ``__main__``) costs only the messages that hold one:
the batch is unpickled again with a stand-in for each missing class, and exactly the messages that
reach a stand-in are left out (``decode_batch(..., undecodable=[])``). The retry runs only after
``pickle.loads`` failed, so good batches decode exactly as fast as before.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Callable, Sequence
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
    SPOOL_CODECS,
    pack_sizes,
    split_payloads,
)
from . import big_fields
from .failures import describe, is_handler_failure
from .stand_ins import StandIn as StandIn
from .stand_ins import loads_with_stand_ins, stand_ins_in

__all__ = [
    "DATACLASS",
    "OBJECTS",
    "PROTOCOL",
    "StandIn",
    "decode_batch",
    "decode_one",
    "dumps_inband",
    "encode_batch",
    "encode_objects",
    "encode_split",
    "split_decoder",
    "split_messages",
    "is_plain_dataclass",
]

PROTOCOL = 5
DATACLASS = CODEC_DATACLASS
OBJECTS = CODEC_OBJECTS
# The same two codecs, each message pickled alone (no out-of-band buffers), for topics that have
# queue groups: the hub hands parts of a batch to consumers without unpickling. Travels as two
# frames, the messages' sizes and their payloads end to end (a frame per message cost 3-6 µs of
# pyzmq per frame at each hop). Costs ~1 µs more per message than a batch pickle (0.54 vs 0.15 µs
# dumps, 0.92 vs 0.25 µs loads), so only those topics pay.
SPLIT_DATACLASS = CODEC_SPLIT_DATACLASS
SPLIT_OBJECTS = CODEC_SPLIT_OBJECTS

_PICKLING_HOOKS = ("__reduce__", "__reduce_ex__", "__getstate__")

# Asked once per batch (a lookup costs ~150 ns), weak: programs that create message classes at run
# time (each ~10 KB) must get them back once they drop them.
_plain: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


# The class asked last, and its answer: a publisher of one type asks about the same class each
# time, and a WeakKeyDictionary lookup makes a weak reference and a Python call each time.
_last_plain: tuple[Callable[[], type | None], bool] = (lambda: None, False)


def is_plain_dataclass(cls: type) -> bool:
    """True when pickling an instance is exactly "the class, then its ``__dict__``"."""
    global _last_plain
    last, answer = _last_plain
    if last() is cls:
        return answer
    known = _plain.get(cls)
    if known is None:
        known = _plain[cls] = _is_plain_dataclass(cls)
    _last_plain = (weakref.ref(cls), known)
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
        if big_fields.some and cls in big_fields.types:
            return DATACLASS, _dumps(big_fields.states(messages), cls)
        if len(messages) == 1:  # a quiet publisher's batch: no list comprehension to run
            frames = _dumps([messages[0].__dict__], cls)
        else:
            frames = _dumps([message.__dict__ for message in messages], cls)
        if len(frames[0]) >= big_fields.BIG_FIELD * len(messages) and big_fields.any_big(messages):
            # Big fields went in-band, copied into the payload: from now on, not for this type.
            big_fields.mark(cls)
            frames = _dumps(big_fields.states(messages), cls)
        return DATACLASS, frames
    return OBJECTS, _dumps(list(messages), cls)


def encode_objects(cls: type, messages: Sequence[Message]) -> tuple[bytes, list[Any]]:
    """As ``encode_batch``, but always the messages themselves (``OBJECTS``): for a receiver
    that cannot tell the class from the topic (a reply travels on its requester's reply
    topic)."""
    return OBJECTS, _dumps(list(messages), cls)


def encode_split(cls: type, messages: Sequence[Message]) -> tuple[bytes, list[bytes]]:
    """Serialise each message alone: ``(codec, [sizes, payloads])`` (see ``split_messages``)."""
    states: list[Any]
    if is_plain_dataclass(cls):
        codec, states = SPLIT_DATACLASS, [message.__dict__ for message in messages]
    else:
        codec, states = SPLIT_OBJECTS, list(messages)
    dumps = pickle.dumps
    try:  # the common case in one comprehension: a call less per message
        parts = [dumps(state, PROTOCOL) for state in states]
    except BaseException as exc:
        _unless_an_interrupt(exc)
        parts = [dumps_inband(state, cls) for state in states]
    return codec, [pack_sizes(map(len, parts)), b"".join(parts)]


def split_messages(frames: Sequence[Any]) -> list[memoryview]:
    """The payload of each message of a split batch, from its frames ``[sizes, payloads]``
    (bytes-like, or ZeroMQ frames); ``ValueError`` when they do not fit together."""
    sizes, payloads = frames
    return split_payloads(_buffer(sizes), _buffer(payloads))


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode_one(codec: bytes, payload: Any, cls: type | None) -> Message:
    """Rebuild one message of a split batch."""
    return _rebuild_one(codec, pickle.loads(payload), cls)


def split_decoder(codec: bytes, cls: type | None) -> Callable[[Any], Message]:
    """``decode_one`` for the messages of one split batch, its checks made once: a consumer
    decodes a delivered run of thousands with it."""
    if codec == SPLIT_OBJECTS:
        return pickle.loads
    if codec != SPLIT_DATACLASS or cls is None:

        def refuse(payload: Any) -> Message:
            raise ValueError(f"cannot decode codec {codec!r} for class {cls!r}")

        return refuse
    new, loads = object.__new__, pickle.loads

    def rebuild(payload: Any) -> Message:
        message: Message = new(cls)
        message.__dict__.update(loads(payload))
        return message

    return rebuild


def _rebuild_one(codec: bytes, decoded: Any, cls: type | None) -> Message:
    if codec == SPLIT_OBJECTS:
        return decoded  # type: ignore[no-any-return]
    if codec != SPLIT_DATACLASS or cls is None:
        raise ValueError(f"cannot decode codec {codec!r} for class {cls!r}")
    message: Message = object.__new__(cls)
    message.__dict__.update(decoded)
    return message


def decode_batch(
    codec: bytes, frames: Sequence[Any], cls: type | None, undecodable: list[str] | None = None
) -> list[Message]:
    """Rebuild a batch; ``cls`` is this process's class for the topic (needed for DATACLASS).

    Without ``undecodable``, raises what unpickling raised. With it, a message that holds an
    instance of a class this process cannot import is left out, and the missing class names
    appended to ``undecodable`` (one entry per message left out); anything else that makes the
    batch undecodable still raises.
    """
    if codec in (SPLIT_DATACLASS, SPLIT_OBJECTS):
        payloads = split_messages(frames)
        if undecodable is None:
            return [decode_one(codec, payload, cls) for payload in payloads]
        return _decode_split(codec, payloads, cls, undecodable)
    spooled = SPOOL_CODECS.get(codec)
    if spooled is not None:  # the spool index, then buffers already read back from their files
        codec = spooled
        payload, _index, *buffer_frames = frames
        for frame in buffer_frames:
            if isinstance(frame, BaseException):  # a file that could not be read: why
                raise frame
    else:
        payload, *buffer_frames = frames
    # Read-only views: what arrives is one object for every subscription of this process, and
    # a PickleBuffer field arrives as the view itself (never as a ZeroMQ frame object).
    buffers = [memoryview(frame).toreadonly() for frame in buffer_frames] if buffer_frames else ()
    try:
        decoded = pickle.loads(payload, buffers=buffers)
    except Exception:
        if undecodable is None:
            raise
        # Only now pay for the stand-ins: a good batch never gets here.
        decoded = loads_with_stand_ins(payload, buffers)
        kept = []
        for item in decoded:
            missing = stand_ins_in(item)
            if missing:
                undecodable.append(missing)
            else:
                kept.append(item)
        decoded = kept
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


def _decode_split(
    codec: bytes, frames: Sequence[Any], cls: type | None, undecodable: list[str]
) -> list[Message]:
    """Each message pickled alone: one that cannot be decoded costs only itself."""
    messages = []
    for frame in frames:
        try:
            decoded = pickle.loads(frame)
        except Exception as exc:
            try:
                decoded = loads_with_stand_ins(frame, ())
            except Exception:
                undecodable.append(describe(exc))
                continue
            missing = stand_ins_in(decoded)
            if missing:
                undecodable.append(missing)
                continue
        messages.append(_rebuild_one(codec, decoded, cls))
    return messages


def _unless_an_interrupt(exc: BaseException) -> None:
    """Pickling runs the message's own code (``__reduce__``, ``__getstate__``): whatever it raises
    is this message's failure, ``BaseException`` included (raised on the I/O thread, it ended
    that thread and lost the batch), unless it is a real interrupt of the main thread."""
    if not is_handler_failure(exc):
        raise exc


def _cannot(cls: type, exc: BaseException) -> MessageSerializationError:
    return MessageSerializationError(f"cannot serialise {cls.__qualname__}: {describe(exc)}")


def dumps_inband(obj: Any, cls: type) -> bytes:
    """``obj`` pickled in one piece (buffers in-band), by reference, else by value
    (cloudpickle); ``MessageSerializationError`` naming ``cls`` when neither can, whatever the
    object's own pickling code raised (but a real interrupt of the main thread)."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except BaseException as exc:
        _unless_an_interrupt(exc)  # as in _dumps: then the by-value attempt
    try:
        data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    except BaseException as exc:
        _unless_an_interrupt(exc)
        raise _cannot(cls, exc) from exc
    return data


def _dumps(obj: Any, cls: type) -> list[Any]:
    buffers: list[pickle.PickleBuffer] = []
    try:
        payload = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        if len(buffers) > MAX_BUFFERS:
            # Frames are bounded on the wire: this many buffers travel in-band instead.
            return [dumps_inband(obj, cls)]
    except BaseException as exc:
        _unless_an_interrupt(exc)
        # Local classes, lambdas and closures: pickle raises PicklingError, AttributeError or
        # TypeError depending on the object; all of them deserve the by-value attempt.
        buffers.clear()
        try:
            payload = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        except BaseException as exc:
            _unless_an_interrupt(exc)
            raise _cannot(cls, exc) from exc
        if len(buffers) > MAX_BUFFERS:
            return [dumps_inband(obj, cls)]  # as above: frames are bounded on the wire
    if not buffers:
        return [payload]  # the usual message: no generator to run
    return [payload, *(buffer.raw() for buffer in buffers)]
