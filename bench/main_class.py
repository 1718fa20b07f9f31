"""Broadcast 1 -> 1 of a message class defined in ``__main__``, beside an importable one.

Users define message classes in their main script. Such a class cannot be imported by another
process, so a bus that pickled classes by reference would fail, and one that cloudpickled them
would pay for it on every message (``cloudpickle.dumps`` of a ``__main__`` class: 281 µs and
4 860 B against 2.5-5 µs and 78 B, core/codec.py). ipcbus sends the fields only and the receiver
rebuilds its own class of the topic: the ``__main__`` case should run as fast as the importable
one (the same messages, field for field, as ``throughput.py``'s broadcast 1 -> 1).

Each process of a case runs ``main_script.py`` as ``__main__`` (runpy), the publisher's and the
subscriber's; counting and timing are ``harness.measure``'s.

- ``ipcbus``: the ``__main__`` class; ``ipcbus, importable class``: ``harness.Tick``, the ratio
  of the two is the cost of ``__main__``.
- ``multiprocessing.Queue``: the ``__main__`` class, pickled by reference: it works because the
  consumer runs the same script as ``__main__`` (a Queue between processes that do not, e.g. a
  ``python -c`` parent, fails to unpickle it).
"""

from __future__ import annotations

import os
import runpy
from typing import Any

from harness import FRESH, Case, Outcome, Settings, measure
from throughput import ipcbus_broadcast

SCENARIO = "__main__ class 1 -> 1"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main_script.py")
NOTES = (
    "ipcbus: fields only, the subscriber rebuilds its own __main__.MainTick; "
    "multiprocessing.Queue: pickled by reference, found because both ends run the same script "
    "as __main__"
)


def cases(settings: Settings) -> list[Case]:
    return [
        Case(SCENARIO, "ipcbus", ipcbus_main, note=NOTES),
        Case(SCENARIO, "ipcbus, importable class", lambda s: ipcbus_broadcast(s, 1)),
        Case(SCENARIO, "multiprocessing.Queue", queue_main),
    ]


def _as_main(role: str, *arguments: Any) -> None:
    """Runs ``main_script.py`` as this process's ``__main__``, in the given role."""
    runpy.run_path(SCRIPT, init_globals={"BENCH": (role, arguments)}, run_name="__main__")


def _subscriber(address: str, probe: Any, stop: Any) -> None:
    _as_main("ipcbus subscriber", address, probe, stop)


def _publisher(address: str, seqs: range, ready: Any, go: Any) -> None:
    _as_main("ipcbus publisher", address, seqs, ready, go)


def _consumer(queue: Any, probe: Any, stop: Any) -> None:
    _as_main("queue consumer", queue, probe, stop)


def _producer(queue: Any, seqs: range, ready: Any, go: Any) -> None:
    _as_main("queue producer", queue, seqs, ready, go)


def ipcbus_main(settings: Settings) -> Outcome:
    address = settings.hub_address
    return measure(
        settings, [(_subscriber, (address,))], [(_publisher, (address,))], settings.messages, True
    )


def queue_main(settings: Settings) -> Outcome:
    queue = FRESH.Queue()
    return measure(
        settings,
        [(_consumer, (queue,))],
        [(_producer, (queue,))],
        settings.messages,
        True,
        lambda: queue.put(None),
    )
