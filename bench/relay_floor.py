"""The raw relay floor of the round-trip bench (``latency.py``): the shape of ipcbus without
ipcbus. Single-threaded raw pyzmq clients and a minimal Python relay, DEALER -> ROUTER -> XPUB ->
SUB, there and back, pickling a tiny dataclass; without authentication (``run_floor``, the
target's yardstick), and with CURVE on its four sockets as ipcbus has them
(``run_curve_floor``: what the security model costs the shape)."""

from __future__ import annotations

import contextlib
import pickle
import tempfile
import time
from typing import Any

import zmq

from harness import FRESH
from latency_peers import (
    DEADLINE,
    Outcome,
    Ping,
    Pong,
    check_pong,
    ping,
    processes,
    time_round_trips,
)

__all__ = ["run_curve_floor", "run_floor"]

# The floor with encryption: the server's key pair, then the clients' (Z85), as ipcbus's sockets
# use them (CURVE on every socket), so the table shows what the security model costs the shape.
CurveKeys = tuple[bytes, bytes, bytes, bytes]


def _relay(inbound: str, outbound: str, ready: Any, keys: CurveKeys | None = None) -> None:
    """The least a Python relay of ipcbus's shape does: read a request, send it on XPUB."""
    context = zmq.Context()
    router, xpub = context.socket(zmq.ROUTER), context.socket(zmq.XPUB)
    for sock in (router, xpub):
        sock.linger = 0
        if keys is not None:
            sock.curve_server = True
            sock.curve_secretkey = keys[1]
    router.bind(inbound)
    xpub.bind(outbound)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(xpub, zmq.POLLIN)
    ready.set()
    while True:
        events = dict(poller.poll())
        if xpub in events:
            with contextlib.suppress(zmq.Again):
                while True:
                    xpub.recv(zmq.NOBLOCK)  # subscription events
        if router in events:
            with contextlib.suppress(zmq.Again):
                while True:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    if frames[1].bytes == b"stop":
                        return
                    xpub.send_multipart(frames[1:], copy=False)


def _relay_client(
    context: zmq.Context[Any], inbound: str, outbound: str, topic: bytes, keys: CurveKeys | None
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    dealer, sub = context.socket(zmq.DEALER), context.socket(zmq.SUB)
    for sock in (dealer, sub):
        sock.linger = 0
        if keys is not None:
            sock.curve_serverkey = keys[0]
            sock.curve_publickey, sock.curve_secretkey = keys[2], keys[3]
    dealer.connect(inbound)
    sub.connect(outbound)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return dealer, sub


def _relay_echo(inbound: str, outbound: str, ready: Any, keys: CurveKeys | None) -> None:
    with zmq.Context() as context:
        dealer, sub = _relay_client(context, inbound, outbound, b"ping", keys)
        ready.set()
        while (ping := pickle.loads(sub.recv_multipart()[1])) is not None:
            dealer.send_multipart([b"pong", pickle.dumps(Pong(ping.seq), protocol=5)])


def _relay_pinger(
    inbound: str,
    outbound: str,
    keys: CurveKeys | None,
    watch: list[int],
    rounds: int,
    warmup: int,
    results: Any,
) -> None:
    with zmq.Context() as context:
        dealer, sub = _relay_client(context, inbound, outbound, b"pong", keys)
        # Subscriptions travel asynchronously: ping until the first pong proves both are live.
        while True:
            dealer.send_multipart([b"ping", pickle.dumps(Ping(-1), protocol=5)])
            if sub.poll(50):
                break
        time.sleep(0.1)
        with contextlib.suppress(zmq.Again):
            while True:
                sub.recv_multipart(zmq.NOBLOCK)

        def round_trip(seq: int) -> None:
            dealer.send_multipart([b"ping", pickle.dumps(Ping(seq), protocol=5)])
            check_pong(pickle.loads(sub.recv_multipart()[1]), seq)

        results.put(time_round_trips(round_trip, rounds, warmup, watch))
        dealer.send_multipart([b"ping", pickle.dumps(None)])
        time.sleep(0.05)
        dealer.send_multipart([b"stop"])
        time.sleep(0.05)


def run_floor(rounds: int, warmup: int, _servers: dict[str, Any]) -> Outcome:
    return _run_relay(rounds, warmup, None)


def run_curve_floor(rounds: int, warmup: int, _servers: dict[str, Any]) -> Outcome:
    """The floor with CURVE on its four sockets, as ipcbus's (no ZAP handler: the handshake is
    done before the timed round trips)."""
    return _run_relay(rounds, warmup, (*zmq.curve_keypair(), *zmq.curve_keypair()))


def _run_relay(rounds: int, warmup: int, keys: CurveKeys | None) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as directory:
        inbound, outbound = f"ipc://{directory}/in", f"ipc://{directory}/pub"
        relay_ready, echo_ready = FRESH.Event(), FRESH.Event()
        relay = FRESH.Process(target=_relay, args=(inbound, outbound, relay_ready, keys))
        echo = FRESH.Process(target=_relay_echo, args=(inbound, outbound, echo_ready, keys))
        with processes(relay, echo):
            if not (relay_ready.wait(DEADLINE) and echo_ready.wait(DEADLINE)):
                return "the relay or its echo process did not start"
            watch = [relay.pid, echo.pid]
            return ping(_relay_pinger, (inbound, outbound, keys, watch, rounds, warmup))
