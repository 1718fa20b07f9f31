"""The hub's sockets (hub process): made, secured, bound and watched for the serving loop
(``relay.py``), and the answers to every handshake: the ZAP handler's, and the failures and
disconnections the monitors report. Also what a hub binds besides: a port picked for
``tcp://host:0``, the metrics server, the socket files' mode."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..config import HubOptions
from ..exceptions import HubAddressError
from ..wire.address import Address, endpoint_file
from ..wire.keys import USERNAME, admits, serve_securely
from .metrics import HubMetrics
from .preauth import PendingHandshakes

__all__ = [
    "answer_zap",
    "bind_sockets",
    "read_monitor",
    "restrict_ipc_files",
    "serve_metrics",
    "watch_handshakes",
    "with_picked_port",
]

logger = logging.getLogger("ipcbus.server.relay")

Socket = zmq.Socket[bytes]

_BURST = 256  # requests or events read before the loop polls again


def bind_sockets(
    context: zmq.Context[Socket],
    sockets: list[Socket],
    options: HubOptions,
    secret: bytes,
    endpoints: tuple[str, str, str],
) -> tuple[Socket, Socket, Socket, Socket]:
    """The ZAP handler, then the control and data ROUTERs and the XPUB, bound at
    ``endpoints`` (control, data, fan-out); each is added to ``sockets`` (closed by the
    caller) as soon as it exists. ``HubAddressError`` when an endpoint cannot be bound."""
    control_endpoint, in_endpoint, pub_endpoint = endpoints
    # The ZAP handler must be bound before any socket that uses it.
    zap = context.socket(zmq.REP)
    sockets.append(zap)
    zap.linger = 0
    zap.bind("inproc://zeromq.zap.01")
    control = context.socket(zmq.ROUTER)
    data = context.socket(zmq.ROUTER)
    xpub = context.socket(zmq.XPUB)
    sockets += [control, data, xpub]
    for server in (control, data, xpub):
        server.linger = 0
        serve_securely(server, secret)
        server.setsockopt(zmq.HANDSHAKE_IVL, int(options.handshake_timeout * 1000))
        server.setsockopt(zmq.MAXMSGSIZE, options.max_message_size)
    for router in (control, data):
        router.rcvhwm = router.sndhwm = options.hwm
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable peer raises
    xpub.sndhwm = options.hwm
    xpub.setsockopt(zmq.XPUB_NODROP, 1)
    for server, endpoint in (
        (control, control_endpoint),
        (data, in_endpoint),
        (xpub, pub_endpoint),
    ):
        try:
            server.bind(endpoint)
        except zmq.ZMQError as exc:  # a port in use, an address not of this host
            raise HubAddressError(f"cannot serve at {endpoint}: {exc}") from exc
    return zap, control, data, xpub


def watch_handshakes(
    servers: tuple[Socket, Socket, Socket],
    tcp: bool,
    options: HubOptions,
    pending: dict[Socket, PendingHandshakes],
) -> list[Socket]:
    """A monitor socket per server socket (control, data, fan-out), in that order; on tcp each
    also counts the connections that have not completed their handshake yet (``pending``,
    preauth)."""
    control = servers[0]
    # Peers that fail the handshake before the ZAP handler is asked (wrong mechanism,
    # garbage instead of ZMTP) are counted from the sockets' monitors.
    # The control socket's disconnections too: a client process that died (kill -9,
    # an unhandled SIGTERM) is found at once by probing, not at its heartbeat timeout.
    failed = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    # On tcp, accepted connections are counted until their handshake succeeds (preauth).
    tcp_events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED if tcp else 0
    monitors = []
    for server in servers:
        events = failed | tcp_events | (zmq.EVENT_DISCONNECTED if server is control else 0)
        monitor = server.get_monitor_socket(events)
        monitors.append(monitor)
        if tcp_events:
            port = int(server.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
            pending[monitor] = PendingHandshakes(options.max_pending_handshakes, port)
    return monitors


def answer_zap(zap: Socket, secret: bytes) -> int:
    """Answer ZAP requests: the handshake of every connection to every hub socket. Returns how
    many were refused (they did not prove the bus secret)."""
    refused = 0
    for _ in range(_BURST):
        try:
            request = zap.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        version, request_id, _domain, _address, _identity, mechanism, *credentials = request
        allowed = admits(secret, mechanism, credentials)
        if not allowed:
            refused += 1
            logger.warning("refused a connection that did not prove the bus secret")
        status = (b"200", b"OK") if allowed else (b"400", b"no valid bus secret")
        zap.send_multipart([version, request_id, *status, USERNAME if allowed else b"", b""])
    return refused


def read_monitor(
    monitor: Socket,
    pending: PendingHandshakes | None,
    on_disconnect: Callable[[], None] | None,
) -> int:
    """Read a server socket's monitor: connections accepted and closed (``pending``, on tcp),
    a disconnection (``on_disconnect``). Returns the handshakes that failed (a wrong mechanism,
    garbage instead of ZMTP: the ZAP handler was never asked)."""
    failed = 0
    for _ in range(_BURST):
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            break
        kind, value = event["event"], int(event["value"])
        if kind == zmq.EVENT_ACCEPTED:
            if pending is not None:
                pending.accepted(value)
        elif kind == zmq.EVENT_DISCONNECTED:
            if pending is not None:
                pending.closed(value)
            if on_disconnect is not None:
                on_disconnect()
        else:
            failed += 1
    if pending is not None:
        pending.enforce()
    return failed


def with_picked_port(address: Address) -> Address:
    """``tcp://host:0``: the address with a port the system gives now. Its key file and lock are
    named after the port, so the port must be known before them; another process could take it
    before the bind (then the hub fails to start, saying so)."""
    host = address.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    picked = address.with_port(port)
    logger.info("serving at %s (port %d picked by the system)", picked, port)
    return picked


def serve_metrics(host: str, port: int) -> HubMetrics:
    try:
        return HubMetrics(host, port)
    except OSError as exc:  # the port is taken, the host is not of this machine
        raise HubAddressError(f"cannot serve metrics at {host}:{port}: {exc}") from exc


def restrict_ipc_files(*endpoints: str) -> None:
    """Sockets 0600: only this user may connect (docs/security.md). tcp endpoints have none."""
    for endpoint in endpoints:
        path = endpoint_file(endpoint)
        if path is not None:
            os.chmod(path, 0o600)
