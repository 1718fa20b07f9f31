"""Consumer processes of one queue group, on either broker that serves groups across processes:
a hub (``HubSpec``) or NATS JetStream (``NatsSpec``). Each process appends "seq attempt" to a
log of its own when a handler completes, so a test reads what was done, by whom, on which
attempt, even after the process was killed."""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipcbus import AsyncMessageContext, Broker, connect
from ipcbus.nats import NatsBroker

from .hubtools import reap
from .messages import Tick

__all__ = ["SPAWN", "Consumers", "HubSpec", "NatsSpec", "Spec"]

SPAWN: Any = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class HubSpec:
    """How a process reaches a hub (picklable: spawned consumers connect with it)."""

    address: str

    def connect(self) -> Broker:
        return connect(self.address)


@dataclass(frozen=True)
class NatsSpec:
    """How a process reaches a nats-server, in a namespace of the test's own."""

    url: str
    namespace: str
    secret: str
    # A delivery of a killed consumer comes back after a second, not JetStream's 30.
    ack_wait: float = 1.0

    def connect(self) -> Broker:
        return NatsBroker(
            self.url, namespace=self.namespace, secret=self.secret, ack_wait=self.ack_wait
        )


Spec = HubSpec | NatsSpec


def _consume(
    spec: Spec,
    queue_name: str,
    log_path: str,
    ready: Any,
    stop: Any,
    delay: float,
    prefetch: int,
    max_attempts: int,
) -> None:
    """Consumer process: returns when the parent sends on or closes ``stop`` (its end of a
    pipe: setting a shared Event waits for every sleeper, and a killed one never wakes)."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Tick) -> None:
        if delay:
            threading.Event().wait(delay)  # the work; a kill -9 lands in the middle of it
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%d %d\n" % (message.seq, attempt))  # one O_APPEND write: atomic

    broker = spec.connect()
    broker.subscribe_async(Tick, handle, queue_name, prefetch=prefetch, max_attempts=max_attempts)
    ready.set()
    stop.poll(300)
    broker.close()
    os.close(log)


class Consumers:
    """Consumer processes of one queue group, each logging to its own file."""

    def __init__(self, spec: Spec, directory: Path, queue_name: str = "work") -> None:
        self.spec = spec
        self.directory = directory
        self.queue_name = queue_name
        self.processes: list[Any] = []

    def start(
        self,
        delay: float = 0.0,
        prefetch: int = 10,
        name: str | None = None,
        max_attempts: int = 3,
    ) -> Any:
        ready = SPAWN.Event()
        stop, child_stop = SPAWN.Pipe()
        log = self.directory / f"{name or len(self.processes)}-{self.queue_name}.log"
        process = SPAWN.Process(
            target=_consume,
            args=(
                self.spec,
                self.queue_name,
                str(log),
                ready,
                child_stop,
                delay,
                prefetch,
                max_attempts,
            ),
            daemon=True,
        )
        process.start()
        child_stop.close()
        process.log = log
        process.stop = stop
        self.processes.append(process)  # before waiting: close() stops it whatever happens
        assert ready.wait(60), "consumer did not subscribe in time"
        return process

    def entries(self, process: Any | None = None) -> list[tuple[int, int]]:
        """(seq, attempt) of every completed handler call, of one process or of all."""
        paths = [process.log] if process else self.directory.glob(f"*-{self.queue_name}.log")
        found = []
        for path in paths:
            if Path(path).exists():
                for line in Path(path).read_text().splitlines():
                    seq, attempt = line.split()
                    found.append((int(seq), int(attempt)))
        return found

    def done(self) -> set[int]:
        return {seq for seq, _ in self.entries()}

    def stop(self, process: Any) -> None:
        process.stop.close()
        process.join(30)

    def close(self) -> None:
        for process in self.processes:
            process.stop.close()
        reap(self.processes)
