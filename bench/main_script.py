"""A program's main script, as users write them: its message class is defined in ``__main__``.

``main_class.py`` runs this file as ``__main__`` (``runpy.run_path(..., run_name="__main__")``)
in each fresh process of the case, the publisher's and the subscriber's, with ``BENCH`` set to
``(role, arguments)``. So ``MainTick.__module__`` is ``"__main__"`` on both sides, as in a
script started by hand, and no process can import the class from a module.

- ipcbus routes it as ``__main__.MainTick`` and its DATACLASS codec sends the fields only: the
  subscriber rebuilds its own ``MainTick`` from them (no class crosses the wire).
- ``multiprocessing.Queue`` pickles it by reference, as ``__main__.MainTick``: the consumer finds
  it because it runs this same script as ``__main__`` (as spawn children of a script do).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import publish_on_go
from ipcbus import Message, connect


@dataclass(frozen=True)
class MainTick(Message):
    seq: int
    symbol: str
    price: float


def main_tick(seq: int) -> MainTick:
    return MainTick(seq, "ACME", 100.0 + seq % 7)  # as harness.tick, field for field


def ipcbus_subscriber(address: str, probe: Any, stop: Any) -> None:
    broker = connect(address)
    lock = threading.Lock()

    def on_tick(message: MainTick) -> None:
        if type(message) is not MainTick:
            probe.reject(f"a {type(message).__qualname__}, not this script's MainTick")
            return
        with lock:
            probe.add(message.seq)

    broker.subscribe(MainTick, on_tick)
    probe.ready()
    stop.wait(3600)
    broker.close()
    probe.report()


def ipcbus_publisher(address: str, seqs: range, ready: Any, go: Any) -> None:
    broker = connect(address)
    publish_on_go(broker, [main_tick(seq) for seq in seqs], ready, go)


def queue_consumer(queue: Any, probe: Any, stop: Any) -> None:
    probe.ready()
    while (message := queue.get()) is not None:
        if type(message) is not MainTick:
            probe.reject(f"a {type(message).__qualname__}, not this script's MainTick")
        else:
            probe.add(message.seq)
    probe.report()


def queue_producer(queue: Any, seqs: range, ready: Any, go: Any) -> None:
    messages = [main_tick(seq) for seq in seqs]
    ready.set()
    go.wait(3600)
    for message in messages:
        queue.put(message)
    queue.close()
    queue.join_thread()  # the feeder thread pickles by reference while this runs as __main__


ROLES: dict[str, Callable[..., None]] = {
    "ipcbus subscriber": ipcbus_subscriber,
    "ipcbus publisher": ipcbus_publisher,
    "queue consumer": queue_consumer,
    "queue producer": queue_producer,
}

if __name__ == "__main__":
    role, arguments = globals()["BENCH"]
    if MainTick.__module__ != "__main__":
        raise RuntimeError(f"MainTick lives in {MainTick.__module__}, not __main__")
    ROLES[role](*arguments)
