"""Throughput cases of the peers: raw pyzmq PUB -> SUB, nats-py through nats-server, redis-py
pub/sub through redis-server. Each message is pickled alone, in the timed loop, as ipcbus pickles
its messages in the timed loop; the messages themselves are built before the clock starts.

- pyzmq: each subscriber binds its own ipc endpoint and the publisher connects to them all (a
  connecting PUB queues for a connection still being made instead of dropping), both high-water
  marks unlimited: as used, raw PUB/SUB drops what a slow subscriber cannot take.
- nats-py: core NATS, one asyncio loop per process; queue groups (``queue="work"``) for the queue
  cases: at most once, nothing acknowledged.
- redis-py: PUBLISH in pipelines of 200 (one round trip per message would measure the round
  trip), a subscriber reading with ``get_message``. No queue cases.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import tempfile
from typing import Any

from harness import (
    Blob,
    Case,
    Outcome,
    Probe,
    Settings,
    Target,
    big_payload,
    big_scenario,
    big_seq,
    measure,
    redis_messages,
    redis_subscribed,
    tick,
)

MB = 1_000_000
PIPELINE = 200
NATS_SUBJECT = "ipcbus.bench"
REDIS_CHANNEL = "ipcbus.bench"


def cases(settings: Settings) -> list[Case]:
    found = []
    for name, run, needs in (
        ("pyzmq PUB/SUB", zmq_run, ""),
        ("nats-py", nats_run, "nats"),
        ("redis-py", redis_run, "redis"),
    ):
        found += [
            Case("broadcast 1 -> 1", name, _bind(run, "broadcast", 1, 1), needs=needs),
            Case("fan-out 1 -> 4", name, _bind(run, "broadcast", 1, 4), needs=needs),
            Case(big_scenario(settings), name, _bind(run, "big", 1, 1), "MB/s", needs),
        ]
    for producers, consumers in settings.queue_shapes:
        run = _bind(nats_run, "queue", producers, consumers)
        found.append(Case(f"queue {producers} -> {consumers}", "nats-py", run, needs="nats"))
    return found


def _bind(run: Any, mode: str, producers: int, consumers: int) -> Any:
    return lambda settings: run(settings, mode, producers, consumers)


def _plan(settings: Settings, mode: str) -> tuple[int, float | None]:
    """How many messages a run sends, and its volume in MB for the big payload case."""
    if mode == "big":
        return settings.big_messages, settings.big_messages * settings.big_size / MB
    return (settings.queue_messages if mode == "queue" else settings.messages), None


def _messages(mode: str, size: int, seqs: range) -> list[Any]:
    if mode != "big":
        return [tick(seq) for seq in seqs]
    body = os.urandom(size)
    return [Blob(seq, big_payload(seq, size, body)) for seq in seqs]


def _receive(probe: Probe, data: Any, mode: str, size: int) -> None:
    message = pickle.loads(data)
    if mode == "big" and big_seq(message.data, size) != message.seq:
        probe.reject(f"a damaged payload (seq {message.seq})")
    else:
        probe.add(message.seq)


# -- raw pyzmq -------------------------------------------------------------------------------


def _zmq_subscriber(endpoint: str, mode: str, size: int, probe: Probe, stop: Any) -> None:
    import zmq

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.LINGER, 0)
    sub.subscribe(b"")
    sub.bind(endpoint)
    probe.ready()
    while not stop.is_set():
        if not sub.poll(100):
            continue
        while True:
            try:
                data = sub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            _receive(probe, data.buffer, mode, size)
    sub.close()
    context.term()
    probe.report()


def _zmq_publisher(
    endpoints: list[str], mode: str, size: int, seqs: range, ready: Any, go: Any
) -> None:
    import zmq

    context = zmq.Context()
    # XPUB: a PUB socket as it sends, but it reads the subscriptions, so the publisher starts
    # once every subscriber's has arrived (before, PUB drops: the slow joiner).
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 60_000)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, not only the first
    for endpoint in endpoints:
        pub.connect(endpoint)
    for _ in endpoints:
        if not pub.poll(60_000):
            raise RuntimeError("a subscriber's subscription never arrived")
        pub.recv()
    messages = _messages(mode, size, seqs)
    ready.set()
    go.wait(3600)
    send, dumps = pub.send, pickle.dumps
    for message in messages:
        send(dumps(message, 5), copy=False)
    pub.close()
    context.term()


def zmq_run(settings: Settings, mode: str, producers: int, consumers: int) -> Outcome:
    count, volume = _plan(settings, mode)
    directory = tempfile.mkdtemp(prefix="ipcbus-bench-zmq-")
    try:
        endpoints = [f"ipc://{directory}/sub{index}" for index in range(consumers)]
        size = settings.big_size
        subscribers: list[Target] = [
            (_zmq_subscriber, (endpoint, mode, size)) for endpoint in endpoints
        ]
        publisher: Target = (_zmq_publisher, (endpoints, mode, size))
        return measure(settings, subscribers, [publisher], count, True, volume=volume)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- nats-py ---------------------------------------------------------------------------------


def _nats_subscriber(url: str, group: str, mode: str, size: int, probe: Probe, stop: Any) -> None:
    import nats

    async def main() -> None:
        client = await nats.connect(url, max_reconnect_attempts=0)

        async def on_message(message: Any) -> None:
            _receive(probe, message.data, mode, size)

        await client.subscribe(
            NATS_SUBJECT,
            queue=group,
            cb=on_message,
            pending_msgs_limit=100_000_000,
            pending_bytes_limit=1 << 34,
        )
        await client.flush()
        probe.ready()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await client.close()

    asyncio.run(main())
    probe.report()


def _nats_publisher(url: str, mode: str, size: int, seqs: range, ready: Any, go: Any) -> None:
    import nats

    async def main() -> None:
        client = await nats.connect(url, max_reconnect_attempts=0)
        messages = _messages(mode, size, seqs)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 3600)
        publish, dumps = client.publish, pickle.dumps
        for message in messages:
            await publish(NATS_SUBJECT, dumps(message, 5))
        await client.flush(600)
        await client.close()

    asyncio.run(main())


def nats_run(settings: Settings, mode: str, producers: int, consumers: int) -> Outcome:
    url = settings.nats_url
    assert url is not None
    count, volume = _plan(settings, mode)
    group = "work" if mode == "queue" else ""
    size = settings.big_size
    return measure(
        settings,
        [(_nats_subscriber, (url, group, mode, size))] * consumers,
        [(_nats_publisher, (url, mode, size))] * producers,
        count,
        mode != "queue",
        volume=volume,
    )


# -- redis-py --------------------------------------------------------------------------------


def _redis_subscriber(port: int, mode: str, size: int, probe: Probe, stop: Any) -> None:
    import redis

    client = redis.Redis(port=port)
    pubsub = client.pubsub()
    redis_subscribed(pubsub, REDIS_CHANNEL)
    probe.ready()
    for data in redis_messages(pubsub, stop):
        _receive(probe, data, mode, size)
    pubsub.close()
    client.close()
    probe.report()


def _redis_publisher(port: int, mode: str, size: int, seqs: range, ready: Any, go: Any) -> None:
    import redis

    client = redis.Redis(port=port)
    messages = _messages(mode, size, seqs)
    ready.set()
    go.wait(3600)
    step = 1 if mode == "big" else PIPELINE
    dumps = pickle.dumps
    for start in range(0, len(messages), step):
        pipeline = client.pipeline(transaction=False)
        for message in messages[start : start + step]:
            pipeline.publish(REDIS_CHANNEL, dumps(message, 5))
        pipeline.execute()
    client.close()


def redis_run(settings: Settings, mode: str, producers: int, consumers: int) -> Outcome:
    port = settings.redis_port
    assert port is not None
    count, volume = _plan(settings, mode)
    size = settings.big_size
    return measure(
        settings,
        [(_redis_subscriber, (port, mode, size))] * consumers,
        [(_redis_publisher, (port, mode, size))],
        count,
        True,
        volume=volume,
    )
