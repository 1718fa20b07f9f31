"""Names on a NATS server: the subject of each message type, its stream, each group's consumer.

A message type routes by :func:`~ipcbus.message.get_unique_name_for_message`, ``module.qualname``
(``tests.messages.OrderPlaced``, ``app.main.<locals>.Local``). A NATS subject is tokens separated
by ``.``; a token may not be empty nor hold whitespace, ``*`` or ``>``. The mapping:

- each dot-separated part of the name is one token, so ``tests.messages.OrderPlaced`` travels on
  ``<namespace>.m.tests.messages.OrderPlaced`` and a monitoring tool shows it readably;
- in a part, every byte of its UTF-8 other than ``A-Z a-z 0-9 _`` is written ``-XX`` (two hex
  digits, upper case), ``-`` itself included, so the mapping is injective:
  ``<locals>`` becomes ``-3Clocals-3E``; an empty part becomes ``-``.

Streams and durable consumers are named by a token that may hold no ``.`` either: a stream is
``<NAMESPACE>_<first 20 hex digits of sha256(type name)>`` (its description names the type), a
consumer ``g_`` and the escaped group name (or a hash of it, past 64 characters).
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "check_namespace",
    "consumer_name",
    "escape_token",
    "stream_name",
    "subject_for",
    "unescape_token",
]

_PLAIN = re.compile(rb"[A-Za-z0-9_]")
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_MAX_CONSUMER_NAME = 64


def check_namespace(namespace: str) -> str:
    """``namespace`` itself when it is a valid token of 1-32 ``A-Z a-z 0-9 _ -``."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"namespace must be 1-32 characters of A-Z a-z 0-9 _ -, not {namespace!r}")
    return namespace


def escape_token(part: str) -> str:
    """One subject token for ``part`` (see the module docstring)."""
    if not part:
        return "-"
    out = []
    for byte in part.encode():
        char = bytes((byte,))
        out.append(char.decode() if _PLAIN.fullmatch(char) else f"-{byte:02X}")
    return "".join(out)


def unescape_token(token: str) -> str:
    """The inverse of :func:`escape_token`."""
    if token == "-":
        return ""
    raw = bytearray()
    index = 0
    while index < len(token):
        if token[index] == "-":
            raw.append(int(token[index + 1 : index + 3], 16))
            index += 3
        else:
            raw += token[index].encode()
            index += 1
    return raw.decode()


def subject_for(namespace: str, unique_name: str) -> str:
    """The subject messages of the type named ``unique_name`` travel on."""
    return f"{namespace}.m." + ".".join(escape_token(part) for part in unique_name.split("."))


def stream_name(namespace: str, unique_name: str) -> str:
    """The JetStream stream that stores the type's messages once it has a queue group."""
    digest = hashlib.sha256(unique_name.encode()).hexdigest()[:20]
    return f"{namespace.upper()}_{digest}"


def consumer_name(queue_name: str) -> str:
    """The durable consumer of the queue group ``queue_name`` (on its type's stream)."""
    escaped = escape_token(queue_name)
    if len(escaped) > _MAX_CONSUMER_NAME:
        escaped = "h" + hashlib.sha256(queue_name.encode()).hexdigest()[:40]
    return f"g_{escaped}"
