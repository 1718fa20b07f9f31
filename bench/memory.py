"""The memory of the process in the middle: the ipcbus hub beside nats-server and redis-server,
idle and while a publisher floods a slow subscriber.

Each repetition starts fresh ones (a ``Hub()`` per run, the servers of ``servers.py`` per
repetition), so their resident memory is theirs alone, then per contender:

1. one subscriber connects (the server's one client) and subscribes: the server's **idle**
   resident memory is read then (``VmRSS`` of ``/proc/<pid>/status``);
2. one publisher floods ``Flood.messages`` messages of ``Flood.size`` bytes as fast as it can
   while the subscriber's handler blocks ``Flood.slow`` seconds per message (``time.sleep``, as a
   handler doing synchronous work: on nats-py it holds the client's event loop, on redis-py its
   reading loop, on ipcbus its dispatcher thread while the I/O thread reads on);
3. once the subscriber has accounted for every message, the server's **peak** resident memory
   is its high-water mark (``VmHWM``: the largest it ever was, no sampling missed).

What the backlog costs lands where each design puts it: ipcbus's hub holds at most its pipes
(``hwm`` batches) and then stops reading the publisher, nats-py reads ahead into its client
(up to its pending limits, then drops and says so), redis-server keeps it in the subscriber's
output buffer (unbounded here: ``servers.py`` lifts the pub/sub limit).

Counting: the subscriber counts what arrived (each sequence number once) and what its library
reported lost (ipcbus: ``HubBroker.gaps``; nats-py: one ``SlowConsumerError`` per dropped
message; redis-py reports nothing). Received + reported lost must equal sent, with no duplicate,
or the run FAILED.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from harness import (
    FRESH,
    STALL,
    START_TIMEOUT,
    Blob,
    big_payload,
    reap,
    redis_messages,
    redis_subscribed,
)
from ipcbus import Hub, connect
from servers import running

IPCBUS = "ipcbus hub"
CONTENDERS = (IPCBUS, "nats-server", "redis-server")
SUBJECT = "ipcbus.bench.memory"
SETTLE = 0.1  # after the subscriber's subscription, before the idle reading


@dataclass(frozen=True)
class Flood:
    messages: int = 20_000
    size: int = 4096  # bytes of payload per message
    slow: float = 0.0002  # the subscriber's handler blocks this long per message
    deadline: float = 300.0
    stall: float = STALL  # nothing more accounted for this long: what is missing is lost


QUICK_FLOOD = Flood(messages=600, size=4096)


@dataclass
class MemoryRow:
    contender: str
    idle_mb: list[float] = field(default_factory=list)  # MiB, one per run
    peak_mb: list[float] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    reported_lost: list[int] = field(default_factory=list)
    failure: str | None = None
    skipped: str | None = None

    @property
    def idle(self) -> float | None:
        return statistics.median(self.idle_mb) if self.idle_mb and not self.failure else None

    @property
    def peak(self) -> float | None:
        return statistics.median(self.peak_mb) if self.peak_mb and not self.failure else None


def available() -> str | None:
    """Why memory cannot be read here (no /proc), or None."""
    return None if os.path.exists(f"/proc/{os.getpid()}/status") else "no /proc on this system"


def measure(
    flood: Flood, repeat: int, progress: Callable[[str], None], contenders: set[str]
) -> list[MemoryRow]:
    rows = {name: MemoryRow(name) for name in CONTENDERS if name in contenders}
    why = available()
    if why is not None:
        for row in rows.values():
            row.skipped = why
        return list(rows.values())
    for round_ in range(1, repeat + 1):
        want_nats, want_redis = "nats-server" in rows, "redis-server" in rows
        with running(want_nats, want_redis) as servers:
            for name, row in rows.items():
                server = {"nats-server": "nats", "redis-server": "redis"}.get(name)
                if server is not None and servers.skipped and server in servers.skipped:
                    row.skipped = servers.skipped[server]
                if row.skipped or row.failure:
                    continue
                progress(f"memory {round_}/{repeat}: {name} under a slow consumer")
                if server is None:
                    with Hub() as hub:
                        assert hub.pid is not None
                        outcome = _run(flood, hub.pid, *_ipcbus(hub.address))
                else:
                    address = servers.addresses()[server]
                    roles = _nats(address) if server == "nats" else _redis(address)
                    outcome = _run(flood, servers.pids[server], *roles)
                if isinstance(outcome, str):
                    row.failure = f"round {round_}: {outcome}"
                    continue
                idle, peak, received, lost = outcome
                row.idle_mb.append(idle)
                row.peak_mb.append(peak)
                row.received.append(received)
                row.reported_lost.append(lost)
    return list(rows.values())


def report(rows: list[MemoryRow], flood: Flood, repeat: int) -> bool:
    """Prints the table; False when ipcbus failed."""
    print(
        f"server memory (RSS, MiB), median of {repeat}: idle with one subscriber; peak while 1 "
        f"publisher floods {flood.messages:,} x {flood.size:,} B and the subscriber's handler "
        f"blocks {flood.slow * 1e3:g} ms per message"
    )
    print(f"  {'server':14} {'idle':>8} {'peak':>8} {'ipcbus/it':>10} {'received':>10} {'lost':>6}")
    ours = next((row.peak for row in rows if row.contender == IPCBUS), None)
    for row in rows:
        if row.skipped:
            print(f"  {row.contender:14} skipped: {row.skipped}")
        elif row.failure or row.idle is None or row.peak is None:
            print(f"  {row.contender:14} FAILED: {row.failure}")
        else:
            ratio = f"{ours / row.peak:.2f}x" if ours and row.contender != IPCBUS else ""
            received = statistics.median(row.received)
            lost = statistics.median(row.reported_lost)
            print(
                f"  {row.contender:14} {row.idle:>8.1f} {row.peak:>8.1f} {ratio:>10} "
                f"{received:>10,.0f} {lost:>6,.0f}"
            )
    print("  (received + reported lost = sent in every run: ipcbus counts HubBroker.gaps, ")
    print("   nats-py its SlowConsumerErrors, redis-py reports nothing)")
    return not any(row.failure for row in rows if row.contender == IPCBUS)


def as_json(rows: list[MemoryRow], flood: Flood) -> dict[str, Any]:
    ours = next((row.peak for row in rows if row.contender == IPCBUS), None)
    entries: dict[str, Any] = {}
    for row in rows:
        entry: dict[str, Any] = {**row.__dict__, "idle_mb_median": row.idle}
        entry["peak_mb_median"] = row.peak
        if ours and row.peak and row.contender != IPCBUS:
            entry["ipcbus_peak_ratio"] = ours / row.peak
        entries[row.contender] = entry
    return {"flood": flood.__dict__, "cases": entries}


# -- one run -----------------------------------------------------------------------------------

Role = tuple[Callable[..., None], tuple[Any, ...]]


def _mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def _run(flood: Flood, pid: int, subscriber: Role, publisher: Role) -> tuple[Any, ...] | str:
    """(idle MiB, peak MiB, received, reported lost), or what went wrong."""
    counts = FRESH.Array("q", 3, lock=False)  # received, reported lost, duplicated or unexpected
    ready, stop = FRESH.Event(), FRESH.Event()
    started: list[Any] = []
    try:
        target, args = subscriber
        arguments = (*args, flood.messages, flood.slow, counts, ready, stop)
        started.append(FRESH.Process(target=target, args=arguments, daemon=True))
        started[-1].start()
        if not ready.wait(START_TIMEOUT):
            return "the subscriber did not start"
        time.sleep(SETTLE)
        idle = _mb(pid, "VmRSS")
        target, args = publisher
        arguments = (*args, flood.messages, flood.size)
        started.append(FRESH.Process(target=target, args=arguments, daemon=True))
        started[-1].start()
        _wait(flood, counts, started)
        time.sleep(0.2)  # a duplicate on its way is counted too
        peak = _mb(pid, "VmHWM")
        received, lost, extra = counts[0], counts[1], counts[2]
        started[-1].join(60)
        if started[-1].exitcode != 0:
            return f"the publisher did not finish (exit code {started[-1].exitcode})"
        if extra:
            return f"{extra} messages arrived twice or were not sent"
        if received + lost != flood.messages:
            missing = flood.messages - received - lost
            return f"{received:,} received + {lost:,} reported lost; {missing:,} unaccounted for"
        return idle, peak, received, lost
    finally:
        stop.set()
        reap(started)


def _wait(flood: Flood, counts: Any, started: list[Any]) -> None:
    deadline = time.monotonic() + flood.deadline
    progress, progressed = -1, time.monotonic()
    while (done := counts[0] + counts[1]) < flood.messages:
        now = time.monotonic()
        if now > deadline or any(p.exitcode not in (None, 0) for p in started):
            return
        if done != progress:
            progress, progressed = done, now
        elif now - progressed > flood.stall:
            return  # nothing more is coming: the accounting says what is missing
        time.sleep(0.01)


class _Count:
    """The subscriber's count: each message once, in the shared counts (one writer per slot:
    received and duplicates from the handler's thread, reported lost from the other)."""

    def __init__(self, counts: Any, total: int) -> None:
        self.counts = counts
        self.seen = bytearray(total)

    def add(self, data: Any) -> None:
        seq = pickle.loads(data).seq if isinstance(data, bytes) else data.seq
        if 0 <= seq < len(self.seen) and not self.seen[seq]:
            self.seen[seq] = 1
        else:
            self.counts[2] += 1
        self.counts[0] += 1


def _blobs(messages: int, size: int) -> Iterator[Blob]:
    body = os.urandom(size)
    for seq in range(messages):
        yield Blob(seq, big_payload(seq, size, body))


# -- ipcbus ------------------------------------------------------------------------------------


def _ipcbus(address: str) -> tuple[Role, Role]:
    return (_ipcbus_subscriber, (address,)), (_ipcbus_publisher, (address,))


def _ipcbus_subscriber(
    address: str, total: int, slow: float, counts: Any, ready: Any, stop: Any
) -> None:
    broker = connect(address)
    count = _Count(counts, total)

    def on_blob(message: Blob) -> None:
        time.sleep(slow)
        count.add(message)

    broker.subscribe(Blob, on_blob)
    ready.set()
    while not stop.wait(0.05):
        counts[1] = broker.gaps  # the tail of a loss is counted once the hub says LOSSY
    broker.close()


def _ipcbus_publisher(address: str, messages: int, size: int) -> None:
    broker = connect(address)
    for message in _blobs(messages, size):
        broker.publish(message)
    broker.flush(600)
    broker.close()


# -- nats-py -----------------------------------------------------------------------------------


def _nats(url: str) -> tuple[Role, Role]:
    return (_nats_subscriber, (url,)), (_nats_publisher, (url,))


def _nats_subscriber(url: str, total: int, slow: float, counts: Any, ready: Any, stop: Any) -> None:
    import nats
    from nats.errors import SlowConsumerError

    async def main() -> None:
        count = _Count(counts, total)

        async def on_error(error: Exception) -> None:
            if isinstance(error, SlowConsumerError):
                counts[1] += 1  # nats-py reports each message it drops, on the loop's thread

        client = await nats.connect(url, max_reconnect_attempts=0, error_cb=on_error)

        async def on_message(message: Any) -> None:
            time.sleep(slow)
            count.add(message.data)

        await client.subscribe(SUBJECT, cb=on_message)  # nats-py's default pending limits
        await client.flush()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await client.close()

    asyncio.run(main())


def _nats_publisher(url: str, messages: int, size: int) -> None:
    import nats

    async def main() -> None:
        client = await nats.connect(url, max_reconnect_attempts=0)
        for message in _blobs(messages, size):
            await client.publish(SUBJECT, pickle.dumps(message, 5))
        await client.flush(600)
        await client.close()

    asyncio.run(main())


# -- redis-py ----------------------------------------------------------------------------------


def _redis(port: int) -> tuple[Role, Role]:
    return (_redis_subscriber, (port,)), (_redis_publisher, (port,))


def _redis_subscriber(
    port: int, total: int, slow: float, counts: Any, ready: Any, stop: Any
) -> None:
    import redis

    client = redis.Redis(port=port)
    pubsub = client.pubsub()
    redis_subscribed(pubsub, SUBJECT)
    count = _Count(counts, total)
    ready.set()
    for data in redis_messages(pubsub, stop):
        time.sleep(slow)
        count.add(data)
    pubsub.close()
    client.close()


def _redis_publisher(port: int, messages: int, size: int) -> None:
    import redis

    client = redis.Redis(port=port)
    pipeline = client.pipeline(transaction=False)
    for message in _blobs(messages, size):
        pipeline.publish(SUBJECT, pickle.dumps(message, 5))
        if len(pipeline) >= 200:
            pipeline.execute()
    pipeline.execute()
    client.close()
