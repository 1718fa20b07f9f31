"""ipcbus demo: a hub, four worker processes (forked and spawned), broadcast with predicates
and a queue group.

Run with `make demo`. Exits 0 when every worker received exactly what its predicate selects and
the queue group handled every order exactly once, spread over the workers.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipcbus import Hub, Message, connect, get_message_broker, set_message_broker

TICKS = 20_000
ORDERS = 2_000
SYMBOLS = ("ACME", "GLOBEX", "INITECH", "UMBRELLA")


@dataclass(frozen=True)
class PriceTick(Message):
    seq: int
    symbol: str
    price: float


@dataclass(frozen=True)
class Order(Message):
    order_id: int
    amount: float


@dataclass(frozen=True)
class EndOfDay(Message):
    ticks: int


@dataclass(frozen=True)
class WorkerReport(Message):
    name: str
    pid: int
    start_method: str
    received: int
    in_order: bool
    orders: tuple[int, ...]


# What each worker listens to: name -> (start method, predicate). Predicates run in the worker.
WORKERS: dict[str, tuple[str, Callable[[PriceTick], bool]]] = {
    "acme-watcher": ("fork", lambda t: t.symbol == "ACME"),
    "big-moves": ("spawn", lambda t: t.price >= 150.0),
    "everything": ("spawn", lambda t: True),
    "cheap-globex": ("fork", lambda t: t.symbol == "GLOBEX" and t.price < 100.0),
}


def make_tick(seq: int) -> PriceTick:
    return PriceTick(seq, SYMBOLS[seq % len(SYMBOLS)], 50.0 + (seq * 7919) % 150)


def worker(name: str, start_method: str, ready: Any) -> None:
    """A worker process: its own broker, a predicate-filtered subscription, a queue group."""
    if start_method == "fork":
        broker = get_message_broker()  # forked: a broker of its own to the parent's hub
    else:
        broker = connect()  # spawned: finds the hub through IPCBUS_ADDRESS
        set_message_broker(broker)
    seqs: list[int] = []
    orders: list[int] = []
    done = threading.Event()
    broker.subscribe(PriceTick, lambda t: seqs.append(t.seq), WORKERS[name][1])
    # Every worker joins the "fulfil" queue group: each order goes to one of them.
    broker.subscribe_async(Order, lambda o: orders.append(o.order_id), queue_name="fulfil")
    broker.subscribe(EndOfDay, lambda _: done.set())
    ready.set()
    done.wait(60)
    report = WorkerReport(
        name, os.getpid(), start_method, len(seqs), seqs == sorted(seqs), tuple(orders)
    )
    broker.publish(report)
    broker.close()  # flushes the report


def main() -> int:
    started = time.perf_counter()
    with Hub() as hub:
        print(f"hub      {hub.address} (pid {hub.pid})")
        broker = connect(hub.address)
        set_message_broker(broker)
        reports: list[WorkerReport] = []
        all_in = threading.Event()

        def on_report(report: WorkerReport) -> None:
            reports.append(report)
            if len(reports) == len(WORKERS):
                all_in.set()

        broker.subscribe(WorkerReport, on_report)
        processes = []
        for name, (start_method, _) in WORKERS.items():
            context: Any = multiprocessing.get_context(start_method)
            ready = context.Event()
            process = context.Process(target=worker, args=(name, start_method, ready), name=name)
            process.start()
            if not ready.wait(30):
                print(f"worker {name} did not start", file=sys.stderr)
                return 1
            processes.append(process)
        print(
            f"workers  {len(processes)} started: "
            + ", ".join(f"{p.name} ({WORKERS[p.name][0]}, pid {p.pid})" for p in processes)
        )
        t0 = time.perf_counter()
        ticks = [make_tick(seq) for seq in range(TICKS)]
        for tick in ticks:
            broker.publish(tick)
        broker.flush(30)
        publish_seconds = time.perf_counter() - t0
        for order_id in range(ORDERS):
            broker.publish(Order(order_id, amount=10.0 + order_id % 90))
        broker.flush(30)
        fulfil = "__main__.Order/fulfil"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the hub holds no order and awaits no ack
            group = hub.statistics().queues.get(fulfil, {})
            if group.get("acked") == ORDERS and not group.get("in_flight"):
                break
            time.sleep(0.05)
        broker.publish(EndOfDay(TICKS))
        broker.flush(30)
        ok = all_in.wait(30)
        for process in processes:
            process.join(20)
        statistics = hub.statistics()
        broker.close()

    print(f"published {TICKS} ticks in {publish_seconds:.3f} s ({TICKS / publish_seconds:,.0f}/s)")
    relayed, batches = statistics.messages_relayed, statistics.batches_relayed
    print(f"hub relayed {relayed} messages in {batches} batches")
    print()
    print("broadcast: each worker subscribes to PriceTick with a predicate of its own")
    print(
        f"{'worker':14} {'start':6} {'pid':>7} {'received':>9} {'expected':>9} {'order':6} result"
    )
    failures = 0 if ok else 1
    for report in sorted(reports, key=lambda r: r.name):
        expected = sum(1 for tick in ticks if WORKERS[report.name][1](tick))
        good = report.received == expected and report.in_order
        failures += not good
        print(
            f"{report.name:14} {report.start_method:6} {report.pid:>7} {report.received:>9} "
            f"{expected:>9} {'kept' if report.in_order else 'BROKEN':6} {'ok' if good else 'FAIL'}"
        )
    print()
    print(f"queue group 'fulfil': {ORDERS} orders, each to one of the workers")
    handled = sorted(order for report in reports for order in report.orders)
    for report in sorted(reports, key=lambda r: r.name):
        print(f"{report.name:14} {len(report.orders):>6} orders")
    exactly_once = handled == list(range(ORDERS))
    spread = all(report.orders for report in reports)
    failures += not exactly_once
    outcome = "each exactly once" if exactly_once else "LOST OR DUPLICATED"
    print(f"{'total':14} {len(handled):>6} orders, {outcome}" + (", all workers" * spread))
    exit_codes = [process.exitcode for process in processes]
    failures += sum(code != 0 for code in exit_codes)
    print()
    verdict = "every worker got exactly its messages" if not failures else f"{failures} problems"
    if not failures:
        verdict += " and every order was handled once"
    print(f"{verdict}; {time.perf_counter() - started:.1f} s in all")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
