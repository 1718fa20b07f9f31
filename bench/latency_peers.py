"""The peers of bench/latency.py, each a round trip between two fresh processes: the tiny
dataclasses they exchange, the timing loop, and the processes' lifecycle.

- ``multiprocessing.Pipe``: ``send()`` / ``recv()`` of the dataclass, both ways.
- pyzmq REQ/REP: raw pyzmq over ``ipc://``, the dataclass pickled.
- the raw relay floor: the shape of ipcbus without ipcbus: single-threaded raw pyzmq clients, a
  minimal Python relay (DEALER -> ROUTER -> XPUB -> SUB, there and back), no authentication.
- nats-py request/reply through ``nats-server``; redis pub/sub ping-pong through ``redis-server``
  (both started by ``servers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from harness import FRESH
from ipcbus import Message

DEADLINE = 60.0  # seconds for one repetition of one case: past it the run fails
STOP = b"stop"  # the nats pinger tells its echo it is done

RoundTrip = Callable[[int], None]
# What a pinging process reports: its round trips (ns), and per round trip the CPU time (µs)
# and the voluntary context switches (wake-ups) of every process of the case; or an error.
Outcome = dict[str, Any] | str


@dataclass(frozen=True)
class Ping(Message):
    seq: int


@dataclass(frozen=True)
class Pong(Message):
    seq: int


def usage(pids: list[int]) -> tuple[float, int] | None:
    """CPU seconds and voluntary context switches of every thread of ``pids`` (Linux /proc);
    ``None`` where there is no /proc."""
    cpu, switches = 0, 0
    try:
        for pid in pids:
            for task in glob.glob(f"/proc/{pid}/task/*"):
                with open(f"{task}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                cpu += int(fields[11]) + int(fields[12])  # utime, stime
                with open(f"{task}/status") as status:
                    for line in status:
                        if line.startswith("voluntary_ctxt_switches"):
                            switches += int(line.split()[1])
    except OSError:
        return None
    return cpu / os.sysconf("SC_CLK_TCK"), switches


def per_round_trip(
    before: tuple[float, int] | None, after: tuple[float, int] | None, rounds: int
) -> dict[str, float]:
    """CPU µs and wake-ups per round trip between two ``usage()`` readings."""
    if before is None or after is None:
        return {}
    return {
        "cpu_us": (after[0] - before[0]) / rounds * 1e6,
        "switches": (after[1] - before[1]) / rounds,
    }


def time_round_trips(
    round_trip: RoundTrip, rounds: int, warmup: int, watch: list[int] | None = None
) -> dict[str, Any]:
    """Round trips back to back: the durations of those after the warm-up (ns), and with
    ``watch`` (the other processes of the case), what all of them spent per round trip."""
    pids = [os.getpid(), *(watch or ())]
    for seq in range(warmup):
        round_trip(seq)
    samples = []
    before = usage(pids) if watch else None
    for seq in range(warmup, warmup + rounds):
        start = time.perf_counter_ns()
        round_trip(seq)
        samples.append(time.perf_counter_ns() - start)
    after = usage(pids) if watch else None
    return {"samples": samples, **per_round_trip(before, after, rounds)}


def check_pong(pong: Any, seq: int) -> None:
    if not isinstance(pong, Pong) or pong.seq != seq:
        raise RuntimeError(f"round trip {seq} got {pong!r}")


# -- processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(*processes: Any) -> Iterator[None]:
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


def ping(pinger: Callable[..., None], args: tuple[Any, ...]) -> Outcome:
    """Run ``pinger(*args, results)`` in a fresh process; its samples, or what went wrong."""
    results = FRESH.Queue()
    process = FRESH.Process(target=pinger, args=(*args, results))
    with processes(process):
        try:
            outcome: Outcome = results.get(timeout=DEADLINE * 2)
        except Exception:
            return f"the pinging process gave no result (exit code {process.exitcode})"
    return outcome


# -- multiprocessing.Pipe -------------------------------------------------------------------


def _pipe_echo(conn: Any) -> None:
    while (ping := conn.recv()) is not None:
        conn.send(Pong(ping.seq))


def _pipe_pinger(conn: Any, rounds: int, warmup: int, results: Any) -> None:
    def round_trip(seq: int) -> None:
        conn.send(Ping(seq))
        check_pong(conn.recv(), seq)

    results.put(time_round_trips(round_trip, rounds, warmup))
    conn.send(None)


def run_pipe(rounds: int, warmup: int, _servers: dict[str, Any]) -> Outcome:
    mine, theirs = FRESH.Pipe()
    with processes(FRESH.Process(target=_pipe_echo, args=(theirs,))):
        return ping(_pipe_pinger, (mine, rounds, warmup))


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
            check_pong(pickle.loads(req.recv()), seq)

        results.put(time_round_trips(round_trip, rounds, warmup))
        req.send(pickle.dumps(None))
        req.recv()


def run_req_rep(rounds: int, warmup: int, _servers: dict[str, Any]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="ipcbus-bench-") as directory:
        endpoint = f"ipc://{directory}/rep"
        ready = FRESH.Event()
        with processes(FRESH.Process(target=_rep_echo, args=(endpoint, ready))):
            if not ready.wait(DEADLINE):
                return "the REP process did not bind"
            return ping(_req_pinger, (endpoint, rounds, warmup))


# -- nats-py request/reply through nats-server ----------------------------------------------


def _nats_echo(url: str, ready: Any) -> None:
    import nats

    async def main() -> None:
        client = await nats.connect(url)
        done = asyncio.Event()

        async def answer(msg: Any) -> None:
            if msg.data == STOP:
                done.set()
                return
            ping = pickle.loads(msg.data)
            await msg.respond(pickle.dumps(Pong(ping.seq), protocol=5))

        await client.subscribe("ping", cb=answer)
        await client.flush()
        ready.set()
        # Until the pinger is done: an echo left to its deadline held every run 5 s longer
        # (processes() waits that long before it terminates what is left).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), DEADLINE * 5)
        await client.close()

    asyncio.run(main())


def _nats_pinger(url: str, rounds: int, warmup: int, results: Any) -> None:
    import nats

    async def main() -> dict[str, Any]:
        client = await nats.connect(url)
        samples = []
        for seq in range(warmup + rounds):
            start = time.perf_counter_ns()
            reply = await client.request("ping", pickle.dumps(Ping(seq), protocol=5), timeout=10)
            check_pong(pickle.loads(reply.data), seq)
            if seq >= warmup:
                samples.append(time.perf_counter_ns() - start)
        await client.publish("ping", STOP)
        await client.flush()
        await client.close()
        return {"samples": samples}

    results.put(asyncio.run(main()))


def run_nats(rounds: int, warmup: int, servers: dict[str, Any]) -> Outcome:
    url = servers["nats"]
    ready = FRESH.Event()
    with processes(FRESH.Process(target=_nats_echo, args=(url, ready))):
        if not ready.wait(DEADLINE):
            return "the nats echo process did not subscribe"
        return ping(_nats_pinger, (url, rounds, warmup))


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
    while (ping := _redis_receive(pubsub, DEADLINE * 5)) is not None:
        client.publish("pong", pickle.dumps(Pong(ping.seq), protocol=5))


def _redis_pinger(port: int, rounds: int, warmup: int, results: Any) -> None:
    client, pubsub = _redis_subscriber(port, "pong")

    def round_trip(seq: int) -> None:
        client.publish("ping", pickle.dumps(Ping(seq), protocol=5))
        check_pong(_redis_receive(pubsub, 10), seq)

    results.put(time_round_trips(round_trip, rounds, warmup))
    client.publish("ping", pickle.dumps(None))


def run_redis(rounds: int, warmup: int, servers: dict[str, Any]) -> Outcome:
    port = servers["redis"]
    ready = FRESH.Event()
    with processes(FRESH.Process(target=_redis_echo, args=(port, ready))):
        if not ready.wait(DEADLINE):
            return "the redis echo process did not subscribe"
        return ping(_redis_pinger, (port, rounds, warmup))
