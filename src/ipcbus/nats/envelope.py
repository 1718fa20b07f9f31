"""One message as it travels on NATS: a payload and a few headers, signed.

- payload: the message pickled alone by the codec of every broker
  (:mod:`ipcbus.core.codec`: a plain dataclass as its ``__dict__``, rebuilt with the receiver's
  own class; anything else pickled by reference, cloudpickled when pickle cannot);
- ``Ipcbus-Meta``: ``<message id> <codec> <published_at>``;
- ``Ipcbus-Reply`` (requests only): the inbox the answer goes to, which JetStream would not keep
  in a stored message's reply subject (that is its ack subject);
- ``Ipcbus-Sig``: the HMAC of the subject, the meta, the reply inbox and the payload
  (:mod:`ipcbus.nats.signing`), checked before anything is unpickled.

Answers to requests travel the same way to the requester's inbox; a responder's exception as
the exception's type name after the meta, with its text as payload, signed too.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..core.codec import (
    PROTOCOL,
    encode_split,
    is_plain_dataclass,
    split_decoder,
    split_messages,
)
from ..exceptions import MessageSerializationError
from ..message import Message
from .signing import SIGNATURE_HEADER, sign, verify

__all__ = [
    "META_HEADER",
    "REPLY_HEADER",
    "Envelope",
    "encode_message",
    "encode_object",
    "open_envelope",
    "seal",
]

META_HEADER = "Ipcbus-Meta"
REPLY_HEADER = "Ipcbus-Reply"
OBJECT_CODEC = "p"


def encode_message(message: Message) -> tuple[str, bytes]:
    """``(codec, payload)`` of one message; ``MessageSerializationError`` when it cannot be.

    The codec's split encoding of one message (``encode_split``), its common case inlined: one
    ``pickle.dumps`` (a plain dataclass as its ``__dict__``) instead of a batch of one."""
    cls = type(message)
    plain = is_plain_dataclass(cls)
    try:
        return (
            ("d", pickle.dumps(message.__dict__, PROTOCOL))
            if plain
            else (
                "p",
                pickle.dumps(message, PROTOCOL),
            )
        )
    except Exception:
        pass  # the by-value attempt, and its errors, are the codec's
    codec, frames = encode_split(cls, (message,))
    return codec.decode(), bytes(split_messages(frames)[0])


def encode_object(message: Message) -> tuple[str, bytes]:
    """A message pickled whole (its class by reference, else by value): for answers, whose
    type the requester may not have subscribed to."""
    try:
        return OBJECT_CODEC, pickle.dumps(message, PROTOCOL)
    except Exception:
        pass
    try:
        return OBJECT_CODEC, cloudpickle.dumps(message, protocol=PROTOCOL)
    except Exception as exc:
        raise MessageSerializationError(
            f"cannot serialise {type(message).__qualname__}: {type(exc).__name__}: {exc}"
        ) from exc


def seal(
    secret: bytes,
    subject: str,
    message_id: str,
    codec: str,
    published_at: float,
    payload: bytes,
    reply: str = "",
    error: str = "",
) -> dict[str, str]:
    """The headers of one signed payload."""
    meta = f"{message_id} {codec} {published_at!r}"
    if error:
        meta += f" {error}"
    headers = {META_HEADER: meta, SIGNATURE_HEADER: sign(secret, subject, meta, reply, payload)}
    if reply:
        headers[REPLY_HEADER] = reply
    return headers


@dataclass(frozen=True)
class Envelope:
    """A payload whose signature was checked; nothing unpickled yet."""

    message_id: str
    codec: str
    published_at: float
    reply: str
    error: str
    payload: bytes

    def decode(self, cls: type | None) -> Message:
        """The message (``cls``: this process's class for the subject, for plain dataclasses);
        raises what unpickling raises."""
        message: Message = split_decoder(self.codec.encode(), cls)(self.payload)
        if not isinstance(message, Message):
            raise TypeError(f"the payload holds a {type(message).__name__}, not a Message")
        return message


def open_envelope(
    secret: bytes, subject: str, headers: dict[str, str] | None, payload: bytes
) -> Envelope | None:
    """The checked envelope of a received payload; ``None`` when it is not signed with
    ``secret`` (forged, altered, or from another bus), or malformed."""
    if not headers:
        return None
    meta = headers.get(META_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if meta is None or signature is None:
        return None
    reply = headers.get(REPLY_HEADER, "")
    if not verify(secret, subject, meta, reply, payload, signature):
        return None
    parts: list[Any] = meta.split(" ", 3)
    if len(parts) < 3:
        return None
    try:
        published_at = float(parts[2])
    except ValueError:
        return None
    error = parts[3] if len(parts) == 4 else ""
    return Envelope(parts[0], parts[1], published_at, reply, error, payload)
