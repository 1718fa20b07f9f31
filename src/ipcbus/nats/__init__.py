"""The Broker API on a NATS server: ``NatsBroker`` (the optional extra ``ipcbus[nats]``).

- ``broker``: ``NatsBroker``, the public face of this package.
- ``connection``: the nats-py client on a private event loop thread; the outbox; the inbox of
  JetStream acks and request answers; ``flush``.
- ``dispatch``: the thread that calls broadcast handlers, in order, and the bounded hand-over
  from the client to it (slow consumers counted, never silent).
- ``groups``: queue groups as JetStream streams and durable pull consumers.
- ``streams``: what a broker asks JetStream: stored types, groups, members, deletion.
- ``requests``: ``request()``'s waiting room and its errors.
- ``envelope``: one message as it travels: a signed envelope around the pickle.
- ``signing``: the bus secret and the HMAC every payload carries.
- ``subjects``: message types as subjects, streams and consumer names.
- ``statistics``: what a NatsBroker counts.

Names are imported on first use (PEP 562), as in ``ipcbus``: the submodules import each other,
never this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GroupStatistics": "ipcbus.nats.statistics",
    "NatsBroker": "ipcbus.nats.broker",
    "NatsStatistics": "ipcbus.nats.statistics",
    "RemoteError": "ipcbus.exceptions",
    "RequestTimeoutError": "ipcbus.exceptions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipcbus.nats' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from ..exceptions import RemoteError as RemoteError
    from ..exceptions import RequestTimeoutError as RequestTimeoutError
    from .broker import NatsBroker as NatsBroker
    from .statistics import GroupStatistics as GroupStatistics
    from .statistics import NatsStatistics as NatsStatistics
