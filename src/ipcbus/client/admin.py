"""Requests a client makes of a hub without joining the bus (``ipcbus stats``, ``ipcbus
clients``, health checks): one round trip on a socket that proves the bus secret."""

from __future__ import annotations

import json
from typing import Any

import zmq

from ..exceptions import HubUnavailableError
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import prove, read_bus_secret
from ..wire.statistics import HubStatistics

__all__ = ["request_clients", "request_statistics", "round_trip"]


def request_statistics(address: str, timeout: float = 5.0) -> HubStatistics:
    """The hub's statistics (a STATS round trip)."""
    return HubStatistics.from_json(_ask(address, wire.STATS, timeout))


def request_clients(address: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Who is connected to the hub (a CLIENTS round trip): each client's id, since when, and
    what it says about itself (pid, host, program, start method, subscriptions, queues)."""
    clients = json.loads(_ask(address, wire.CLIENTS, timeout))
    if not isinstance(clients, list):
        raise HubUnavailableError(f"unexpected answer from {address}: not a list of clients")
    return clients


def _ask(address: str, kind: bytes, timeout: float) -> bytes:
    answer = round_trip(address, [wire.header(kind)], timeout)
    if len(answer) != 1:
        raise HubUnavailableError(f"unexpected answer from {address}: {len(answer)} frames")
    return answer[0]


def round_trip(address: str, frames: list[bytes], timeout: float | None) -> list[bytes]:
    """Send ``frames`` (their first is the header) to the hub at ``address`` on a socket of
    its own that proves the bus secret, and return the answer's frames after its header, which
    must be the request's. ``timeout`` is checked already (``None``: wait for ever)."""
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
        dealer.send_multipart(frames)
        if not dealer.poll(None if timeout is None else int(timeout * 1000)):
            raise HubUnavailableError(f"no hub answered at {address} within {timeout} s")
        head, *rest = dealer.recv_multipart()
        if head != frames[0]:
            raise HubUnavailableError(f"unexpected answer from {address}: {head!r}")
        return rest
    finally:
        dealer.close(linger=0)
        context.term()
