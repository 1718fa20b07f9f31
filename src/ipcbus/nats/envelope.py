"""One message as it travels on NATS: a signed envelope around the pickled message, no headers.

The NATS payload is::

    b"ipcbus1" | meta length (2 bytes, big endian) | meta | reply length (2) | reply
              | signature (32 bytes) | the message, pickled

- the message is pickled alone by the codec of every broker (:mod:`ipcbus.core.codec`: a plain
  dataclass as its ``__dict__``, rebuilt with the receiver's own class; anything else pickled by
  reference, cloudpickled when pickle cannot);
- meta is ``<message id> <codec> <published_at>``, and for an answer that carries a responder's
  exception `` <its type name>`` (its text is then the payload);
- reply is the inbox the answer to a request goes to (empty otherwise); it travels here, not as
  the NATS reply subject, which JetStream replaces with its ack subject in a stored message;
- the signature is the HMAC-SHA256, with the bus secret, of the subject (length-prefixed),
  everything before the signature and the payload (:mod:`ipcbus.nats.signing`). It is checked
  before a byte is unpickled.

No NATS headers: nats-py validates and encodes them per message, and a header-less ``PUB`` is
what :class:`~ipcbus.nats.connection.NatsConnection` builds in the caller's thread.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from dataclasses import dataclass

from ..core.codec import (
    PROTOCOL,
    dumps_inband,
    encode_split,
    is_plain_dataclass,
    split_decoder,
    split_messages,
)
from ..core.failures import is_handler_failure
from ..message import Message

__all__ = [
    "ERROR_CODEC",
    "Envelope",
    "Signer",
    "encode_message",
    "encode_object",
    "open_envelope",
    "open_note",
    "seal",
    "sign_note",
]

MAGIC = b"ipcbus1"
OBJECT_CODEC = "p"
ERROR_CODEC = "e"
_SIGNATURE = 32
_MAX_FIELD = 0xFFFF


def encode_message(message: Message) -> tuple[str, bytes]:
    """``(codec, payload)`` of one message; ``MessageSerializationError`` when it cannot be.

    The codec's split encoding of one message (``encode_split``), its common case inlined: one
    ``pickle.dumps`` (a plain dataclass as its ``__dict__``) instead of a batch of one."""
    cls = type(message)
    try:
        if is_plain_dataclass(cls):
            return "d", pickle.dumps(message.__dict__, PROTOCOL)
        return OBJECT_CODEC, pickle.dumps(message, PROTOCOL)
    except BaseException as exc:  # the message's own pickling code: BaseException too
        if not is_handler_failure(exc):
            raise
        # the by-value attempt, and its errors, are the codec's
    codec, frames = encode_split(cls, (message,))
    return codec.decode(), bytes(split_messages(frames)[0])


def encode_object(message: Message) -> tuple[str, bytes]:
    """A message pickled whole (its class by reference, else by value): for answers, whose
    type the requester may not have subscribed to."""
    return OBJECT_CODEC, dumps_inband(message, type(message))


class Signer:
    """HMAC-SHA256 with the bus secret, its keyed state computed once: a copy of it per
    message cost 4 µs where ``hmac.digest()`` cost 15 µs (OpenSSL sets the key up on every
    call; measured side by side on the loaded development machine), and the one-shot digest
    was the largest cost of a broadcast subscriber."""

    __slots__ = ("_keyed",)

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def mac(self, subject: bytes, head: bytes, payload: bytes) -> bytes:
        keyed = self._keyed.copy()
        keyed.update(b"%d:%s%s%s" % (len(subject), subject, head, payload))
        return keyed.digest()


def sign_note(signer: Signer, subject: str, text: str) -> bytes:
    """A short note between brokers of one bus (a rejection, an answer on a presence subject):
    its text, then the HMAC of ``subject`` and the text, in hex. Without it anyone allowed to
    publish there could lower a message's attempts (a poison message retried for ever) or keep
    a message nobody accepts from being dropped."""
    raw = text.encode()
    return raw + b" " + signer.mac(subject.encode(), b"note", raw).hex().encode()


def open_note(signer: Signer, subject: str, data: bytes) -> str | None:
    """The text of a note signed for ``subject`` (``sign_note``), or ``None`` when the
    signature does not hold."""
    raw, _, mac = data.rpartition(b" ")
    expected = signer.mac(subject.encode(), b"note", raw).hex().encode()
    if not raw or not hmac.compare_digest(mac, expected):
        return None
    return raw.decode("utf-8", "replace")


def seal(
    signer: Signer,
    subject: str,
    message_id: str,
    codec: str,
    published_at: float,
    payload: bytes,
    reply: str = "",
    error: str = "",
) -> bytes:
    """The signed envelope of one payload, ready to be the data of a NATS message."""
    meta = f"{message_id} {codec} {published_at!r}"
    if error:
        meta += f" {error}"
    meta_bytes, reply_bytes = meta.encode(), reply.encode()
    head = b"%s%s%s%s%s" % (
        MAGIC,
        len(meta_bytes).to_bytes(2, "big"),
        meta_bytes,
        len(reply_bytes).to_bytes(2, "big"),
        reply_bytes,
    )
    return head + signer.mac(subject.encode(), head, payload) + payload


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


def open_envelope(signer: Signer, subject: str, data: bytes) -> Envelope | None:
    """The checked envelope of received data; ``None`` when it is not signed with the secret
    (forged, altered, from another bus) or not an envelope at all."""
    if not data.startswith(MAGIC):
        return None
    try:
        offset = len(MAGIC)
        meta_length = int.from_bytes(data[offset : offset + 2], "big")
        meta = data[offset + 2 : offset + 2 + meta_length]
        offset += 2 + meta_length
        reply_length = int.from_bytes(data[offset : offset + 2], "big")
        reply = data[offset + 2 : offset + 2 + reply_length]
        head_end = offset + 2 + reply_length
        signature = data[head_end : head_end + _SIGNATURE]
        if len(signature) != _SIGNATURE:
            return None
        payload = data[head_end + _SIGNATURE :]
        expected = signer.mac(subject.encode(), data[:head_end], payload)
        if not hmac.compare_digest(expected, signature):
            return None
        parts = meta.decode().split(" ", 3)
        published_at = float(parts[2])
        error = parts[3] if len(parts) == 4 else ""
        return Envelope(parts[0], parts[1], published_at, reply.decode(), error, payload)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None  # signed but malformed: only a bug of ours, or of the secret's holder
