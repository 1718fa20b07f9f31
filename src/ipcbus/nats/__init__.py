"""The Broker API on a NATS server: ``NatsBroker`` (the optional extra ``ipcbus[nats]``).

- ``broker``: ``NatsBroker``, the public face of this package.
- ``connection``: the nats-py client on a private event loop thread; the outbox; the inbox of
  JetStream acks and request answers; ``flush``.
- ``dispatch``: the thread that calls broadcast handlers, in order, and the bounded hand-over
  from the client to it (slow consumers counted, never silent).
- ``groups``: queue groups as JetStream streams and durable pull consumers.
- ``requests``: ``request()``'s waiting room and its errors.
- ``envelope``: one message as it travels: payload and signed headers.
- ``signing``: the bus secret and the HMAC every payload carries.
- ``subjects``: message types as subjects, streams and consumer names.
- ``statistics``: what a NatsBroker counts.
"""

from __future__ import annotations

from .broker import NatsBroker
from .requests import RemoteError, RequestTimeoutError
from .statistics import GroupStatistics, NatsStatistics

__all__ = [
    "GroupStatistics",
    "NatsBroker",
    "NatsStatistics",
    "RemoteError",
    "RequestTimeoutError",
]
