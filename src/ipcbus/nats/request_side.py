"""``NatsBroker``'s request/reply: ``request()`` waits on this connection's inbox for the first
signed answer, and a handler's answer goes back to the requester's. The waiting room is
``requests.py``; the broker itself is in ``broker.py``."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

from ..core import process_id
from ..core.contract import Broker
from ..exceptions import (
    BrokerClosedError,
    HubUnavailableError,
    RemoteError,
    RequestTimeoutError,
)
from ..message import Message
from .envelope import Envelope, seal
from .requests import PendingRequests, answer_payload

if TYPE_CHECKING:
    from .connection import NatsConnection
    from .envelope import Signer

__all__ = ["NatsRequesting"]


class NatsRequesting(Broker):
    """The request side of :class:`~ipcbus.nats.broker.NatsBroker`."""

    _owner: int
    _conn: NatsConnection
    _signer: Signer
    _answers_to_me: PendingRequests
    _ids: itertools.count[int]
    _id_prefix: str

    def _check_usable(self) -> None:
        raise NotImplementedError

    def _publish(self, message: Message, reply: str = "") -> None:
        raise NotImplementedError

    @property
    def late_replies(self) -> int:
        return self._answers_to_me.late

    @property
    def pending_requests(self) -> int:
        return len(self._answers_to_me)

    def _request(self, message: Message, timeout: float | None) -> Message:
        """See ``Broker.request``: the answer comes to this connection's inbox, signed."""
        self._check_usable()
        token, waiting = self._answers_to_me.open()
        try:
            self._publish(message, reply=f"{self._conn.inbox}.r.{token}")
            if self._conn.lost:  # the request could not leave (counted in unsent)
                waiting.lost = True
                answered = False
            else:
                answered = waiting.done.wait(timeout)
        finally:
            self._answers_to_me.forget(token)
        if waiting.closed:
            raise BrokerClosedError(f"{self!r} was closed while request() waited")
        if waiting.lost:
            raise HubUnavailableError(
                f"the connection of {self!r} to its NATS server closed for good while "
                "request() waited"
            )
        envelope = waiting.envelope
        if not answered or envelope is None:
            raise RequestTimeoutError(
                f"no answer to {type(message).__qualname__} within {timeout} s: no subscriber "
                "of its type returned a Message"
            )
        if envelope.error:
            raise RemoteError(envelope.error, envelope.payload.decode(errors="replace"))
        reply: Message = envelope.decode(None)
        return reply

    def _answer(self, envelope: Envelope, result: Any, exc: BaseException | None) -> None:
        """Send a handler's answer to a request (dispatcher thread, handler loop)."""
        answer = answer_payload(result, exc)
        if answer is None:
            return  # it returned no Message: no answer
        codec, payload, error = answer
        if self._closed and process_id.pid != self._owner:
            return
        message_id = f"{self._id_prefix}{next(self._ids)}"
        data = seal(
            self._signer, envelope.reply, message_id, codec, time.time(), payload, error=error
        )
        self._conn.send(envelope.reply, data)
