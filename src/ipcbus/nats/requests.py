"""Request/reply on NATS: the requester's waiting room, and the errors a request raises.

A request is published like any message, with the requester's reply inbox
(``<connection inbox>.r.<n>``) in its signed envelope; a responder, a handler that returned a
``Message``, publishes its answer there, signed. The first valid answer wins; later ones (other
responders) and answers after the requester gave up are dropped and counted
(``replies_dropped``). Nothing is kept per request once it returns.
"""

from __future__ import annotations

import logging
import threading
from itertools import count
from typing import Any

from nats.aio.msg import Msg

from ..core.requests import Failure
from ..exceptions import PubSubError
from ..message import Message
from .envelope import ERROR_CODEC, Envelope, Signer, encode_object, open_envelope
from .statistics import Counters

__all__ = ["PendingRequests", "answer_payload"]

logger = logging.getLogger("ipcbus.nats.broker")


class _Waiting:
    __slots__ = ("closed", "done", "envelope", "lost")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.envelope: Envelope | None = None
        self.closed = False
        self.lost = False  # the connection closed for good meanwhile


class PendingRequests:
    """The requests of one broker that wait for an answer."""

    def __init__(self, signer: Signer, counters: Counters) -> None:
        self._signer = signer
        self._counters = counters
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiting] = {}
        self._tokens = count(1)
        self.late = 0  # answers dropped: a first one had come, or the requester gave up

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self) -> tuple[str, _Waiting]:
        token = str(next(self._tokens))
        waiting = _Waiting()
        with self._lock:
            self._waiting[token] = waiting
        return token, waiting

    def forget(self, token: str) -> None:
        with self._lock:
            self._waiting.pop(token, None)

    def answer(self, token: str, msg: Msg) -> None:
        """An answer arrived on the inbox (the connection's loop): check it, keep the first."""
        envelope = open_envelope(self._signer, msg.subject, msg.data)
        if envelope is None:
            self._counters.add("rejected")
            return
        with self._lock:
            waiting = self._waiting.pop(token, None)
        if waiting is None:
            self.late += 1
            self._counters.add("replies_dropped")
            return
        waiting.envelope = envelope
        waiting.done.set()

    def close(self, error: BaseException) -> None:
        """``Broker.close()``: every waiting requester wakes (``BrokerClosedError``)."""
        self.close_all()

    def close_all(self) -> None:
        """The broker closes: every waiting requester wakes (``BrokerClosedError``)."""
        self._wake_all(closed=True)

    def connection_lost(self) -> None:
        """The connection closed for good (its reconnection gave up): every waiting requester
        wakes with ``HubUnavailableError``, whatever its timeout (``None`` waited for ever)."""
        self._wake_all(closed=False)

    def _wake_all(self, closed: bool) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting.values()), {}
        for each in waiting:
            each.closed, each.lost = closed, not closed
            each.done.set()


def answer_payload(result: Any, exc: BaseException | None) -> tuple[str, bytes, str] | None:
    """What a request's answer carries: ``(codec, payload, error)`` for the handler's failure or
    the ``Message`` it returned (one that cannot be serialised answers as a failure); ``None``
    when it returned anything else (no answer)."""
    if exc is not None:
        failure = Failure.of(exc)
        # A message may hold lone surrogates (a file name os.fsdecode() made): never raise here.
        return ERROR_CODEC, failure.remote_message.encode(errors="replace"), failure.remote_type
    if not isinstance(result, Message):
        return None
    try:
        codec, payload = encode_object(result)
    except PubSubError as failure:
        logger.error("cannot answer a request with %r: %s", result, failure)
        error = str(failure).encode(errors="replace")
        return ERROR_CODEC, error, "ipcbus.exceptions.MessageSerializationError"
    return codec, payload, ""
