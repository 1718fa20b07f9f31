"""Requests a client makes of a hub without joining the bus (``ipcbus stats``, health checks)."""

from __future__ import annotations

from typing import Any

import zmq

from ..exceptions import HubUnavailableError
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import prove, read_bus_secret
from ..wire.statistics import HubStatistics

__all__ = ["request_statistics"]


def request_statistics(address: str, timeout: float = 5.0) -> HubStatistics:
    """One STATS round trip to the hub at ``address``."""
    try:
        parsed = Address.parse(address)
        secret = read_bus_secret(parsed)
    except (ValueError, HubUnavailableError) as exc:
        raise HubUnavailableError(f"no hub answered at {address}: {exc}") from exc
    context = zmq.Context()
    dealer: zmq.Socket[Any] = context.socket(zmq.DEALER)
    try:
        dealer.linger = 0
        prove(dealer, secret)
        dealer.connect(address)
        dealer.send_multipart([wire.header(wire.STATS)])
        if not dealer.poll(int(timeout * 1000)):
            raise HubUnavailableError(f"no hub answered at {address} within {timeout} s")
        head, body = dealer.recv_multipart()
        if head != wire.header(wire.STATS):
            raise HubUnavailableError(f"unexpected answer from {address}: {head!r}")
        return HubStatistics.from_json(body)
    finally:
        dealer.close(linger=0)
        context.term()
