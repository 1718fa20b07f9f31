"""Testing handlers with the ipcbus pytest plugin: installing ipcbus is all it takes.

    pytest examples/test_with_plugin.py

The same handlers are tested twice: with ``ipcbus_test_broker`` (no processes: deterministic,
fast) and across real processes with ``ipcbus_hub`` / ``ipcbus_broker`` / ``ipcbus_worker``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ipcbus import Consumer, DeadLetter, HubBroker, Message, TestBroker, get_message_broker


@dataclass(frozen=True)
class OrderPlaced(Message):
    order_id: int
    amount: float


@dataclass(frozen=True)
class Invoice(Message):
    order_id: int
    total: float


VAT = 0.2

# Module-level declarations, as an application declares its handlers.
orders = Consumer(OrderPlaced)


@orders.on_message(queue_name="billing", predicate=lambda m: m.amount > 0)
def bill(message: OrderPlaced) -> None:
    get_message_broker().publish(Invoice(message.order_id, round(message.amount * (1 + VAT), 2)))


def test_billing_with_the_test_broker(ipcbus_test_broker: TestBroker) -> None:
    ipcbus_test_broker.publish(OrderPlaced(1, 100.0))
    ipcbus_test_broker.publish(OrderPlaced(2, 0.0))  # rejected by the predicate
    assert ipcbus_test_broker.process_messages() == 1  # handler calls made
    assert [m for m in ipcbus_test_broker.published if isinstance(m, Invoice)] == [
        Invoice(1, 120.0)
    ]


def test_a_failing_handler_is_retried_then_dead_lettered() -> None:
    """For tests about retries, collect failures instead of failing fast."""
    with TestBroker(fail_fast=False) as broker:

        def always_fails(message: OrderPlaced) -> None:
            raise ValueError("payment service down")

        broker.subscribe_async(OrderPlaced, always_fails, "payments", max_attempts=2)
        broker.publish(OrderPlaced(3, 10.0))
        assert broker.process_messages() == 2
        assert [f.attempt for f in broker.failures] == [1, 2]
        (dead,) = [m for m in broker.published if isinstance(m, DeadLetter)]
        assert dead.error == "ValueError: payment service down"


def place_orders(count: int) -> int:
    """Runs in a worker process: its process broker is connected to the test's hub."""
    broker = get_message_broker()
    for order_id in range(count):
        broker.publish(OrderPlaced(order_id, 10.0))
    broker.flush(30)
    return count


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_billing_across_processes(
    ipcbus_broker: HubBroker, ipcbus_worker: Callable[..., Any], start_method: str
) -> None:
    invoices: list[int] = []
    all_billed = threading.Event()

    def on_invoice(invoice: Invoice) -> None:
        invoices.append(invoice.order_id)
        if len(invoices) == 50:
            all_billed.set()

    ipcbus_broker.subscribe(Invoice, on_invoice)
    # `bill` is bound to this process's broker (ipcbus_broker): it takes the billing queue.
    assert ipcbus_worker(place_orders, 50, start_method=start_method) == 50
    assert all_billed.wait(30)
    assert sorted(invoices) == list(range(50))
