"""A client's first words with its hub (worker process, I/O thread): the control DEALER says
HELLO and waits for WELCOME, then the data DEALER and the SUB socket connect to the endpoints
it names. Every socket proves the bus secret in its handshake (``wire.keys.prove``); a peer
that fails to prove it is counted by the connection watch, and named in the error when no
WELCOME comes."""

from __future__ import annotations

import time
from typing import Any

import zmq

from ..exceptions import HubUnavailableError
from ..wire import protocol as wire
from ..wire.keys import prove
from .watch import ConnectionWatch

__all__ = ["data_sockets", "greet", "hub_socket"]

Socket = zmq.Socket[bytes]


def hub_socket(context: zmq.Context[Any], kind: int, secret: bytes) -> Socket:
    """A socket that proves the bus secret in its handshake (the hub's ZAP handler)."""
    sock: Socket = context.socket(kind)
    sock.linger = 0
    prove(sock, secret)
    return sock


def greet(
    control: Socket,
    watch: ConnectionWatch,
    endpoint: str,
    hello: list[bytes],
    timeout: float | None,
) -> wire.Welcome:
    """Connect ``control`` to the hub, say ``hello`` and wait for its WELCOME;
    ``HubUnavailableError`` when none comes within ``timeout`` or it is not one."""
    monitor = watch.watch(control)
    control.connect(endpoint)
    control.send_multipart(hello)
    deadline = None if timeout is None else time.monotonic() + timeout
    poller = zmq.Poller()
    poller.register(control, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while not control.poll(0):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            why = "no hub answered"
            if watch.auth_failures:
                why = (
                    "the peer there failed to prove the bus secret "
                    f"({watch.auth_failures} handshakes): it is not our hub"
                )
            raise HubUnavailableError(f"{why} at {endpoint} within {timeout} s")
        poller.poll(None if left is None else int(left * 1000) + 1)
        watch.read(monitor)
    head, *body = control.recv_multipart()
    try:
        if head != wire.header(wire.WELCOME):
            raise ValueError(f"unexpected answer {head[:8]!r}")
        return wire.Welcome.parse(body)
    except (ValueError, IndexError) as exc:
        raise HubUnavailableError(f"bad WELCOME from {endpoint}: {exc}") from None


def data_sockets(
    context: zmq.Context[Any],
    secret: bytes,
    welcome: wire.Welcome,
    client_id: bytes,
    hwm: int,
    watch: ConnectionWatch,
) -> tuple[Socket, Socket]:
    """The data DEALER and the SUB socket, connected to the endpoints ``welcome`` names (closed
    again if that fails: a socket left open would hang the context's termination)."""
    made: list[Socket] = []
    try:
        dealer = hub_socket(context, zmq.DEALER, secret)
        made.append(dealer)
        dealer.sndhwm = dealer.rcvhwm = hwm
        dealer.routing_id = client_id
        watch.watch(dealer, zmq.EVENT_DISCONNECTED)
        dealer.connect(welcome.publish_endpoint)
        sub = hub_socket(context, zmq.SUB, secret)
        made.append(sub)
        sub.rcvhwm = hwm
        watch.watch(sub)
        sub.connect(welcome.fanout_endpoint)
    except BaseException:
        for sock in made:
            sock.close(linger=0)
        raise
    return dealer, sub
