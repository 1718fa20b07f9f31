"""A data pipeline across processes, with fan-out: one source, two stages that each see every
reading (broadcast), a parse stage spread over two workers (a queue group), and a sink.

    source ──Reading──┬──> stats   (every reading: count, mean)
                      ├──> alerts  (only readings over a threshold: a predicate)
                      └──> enrich x2 (a queue group: each reading once) ──Enriched──> sink

    python examples/pipeline.py [--readings 5000]

Exits 0 when every stage saw exactly what it should.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ipcbus import Hub, Message, connect, get_message_broker, set_message_broker

THRESHOLD = 90.0


@dataclass(frozen=True)
class Reading(Message):
    seq: int
    sensor: str
    value: float


@dataclass(frozen=True)
class Enriched(Message):
    seq: int
    sensor: str
    celsius: float
    fahrenheit: float


@dataclass(frozen=True)
class Done(Message):
    """The source's last word: how many readings it sent."""

    readings: int


@dataclass(frozen=True)
class Report(Message):
    stage: str
    count: int
    detail: float


def reading(seq: int) -> Reading:
    return Reading(seq, f"sensor-{seq % 7}", 50.0 + 50.0 * math.sin(seq / 10.0))


def stage(name: str, ready: Any) -> None:
    """One stage's process: subscribe, say ready, work until the source is done, report."""
    broker = connect()
    set_message_broker(broker)
    finished = threading.Event()
    values: list[float] = []
    expected: list[int] = []

    def on_done(done: Done) -> None:
        expected.append(done.readings)
        finished.set()

    if name == "stats":
        broker.subscribe(Reading, lambda r: values.append(r.value))
    elif name == "alerts":
        broker.subscribe(Reading, lambda r: values.append(r.value), lambda r: r.value > THRESHOLD)
    elif name == "enrich":

        def enrich(r: Reading) -> None:
            fahrenheit = r.value * 9 / 5 + 32
            get_message_broker().publish(Enriched(r.seq, r.sensor, r.value, fahrenheit))

        broker.subscribe_async(Reading, enrich, queue_name="enrich")
    broker.subscribe(Done, on_done)
    ready.release()
    finished.wait(120)
    broker.flush(30)  # what this stage published is with the hub before it reports
    mean = sum(values) / len(values) if values else 0.0
    broker.publish(Report(name, len(values), mean))
    broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=5000)
    args = parser.parse_args(argv)
    count = args.readings
    spawn = multiprocessing.get_context("spawn")
    with Hub():
        broker = connect()
        set_message_broker(broker)
        enriched: set[int] = set()
        reports: dict[str, Report] = {}
        all_in = threading.Condition()

        def on_enriched(message: Enriched) -> None:
            with all_in:
                enriched.add(message.seq)
                all_in.notify_all()

        def on_report(report: Report) -> None:
            with all_in:
                reports[report.stage] = report
                all_in.notify_all()

        broker.subscribe(Enriched, on_enriched)
        broker.subscribe(Report, on_report)
        ready = spawn.Semaphore(0)
        names = ["stats", "alerts", "enrich", "enrich"]
        processes = [spawn.Process(target=stage, args=(name, ready)) for name in names]
        for process in processes:
            process.start()
        for _ in processes:
            if not ready.acquire(timeout=60):
                raise SystemExit("a stage did not start within 60 s")
        # The source: this process. Distinct readings, then Done.
        for seq in range(count):
            broker.publish(reading(seq))
        with all_in:
            all_in.wait_for(lambda: len(enriched) == count, timeout=120)
        broker.publish(Done(count))
        with all_in:
            all_in.wait_for(lambda: len(reports) == 3, timeout=120)
        for process in processes:
            process.join(30)
        broker.close()
    values = [reading(seq).value for seq in range(count)]
    alerts = [v for v in values if v > THRESHOLD]
    ok = (
        enriched == set(range(count))
        and reports["stats"].count == count
        and math.isclose(reports["stats"].detail, sum(values) / count)
        and reports["alerts"].count == len(alerts)
        and reports["enrich"].count == 0
    )
    print(
        f"{count} readings: stats saw {reports['stats'].count} (mean "
        f"{reports['stats'].detail:.2f}), alerts {reports['alerts'].count} over {THRESHOLD}, "
        f"{len(enriched)} enriched by the queue group"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
