"""In-process demo of the ipcbus API (the hub demo replaces it once the hub exists)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from ipcbus import AsyncMessageContext, Consumer, MemoryBroker, Message, set_message_broker


@dataclass(frozen=True)
class OrderPlaced(Message):
    order_id: int
    amount: float


audit = Consumer(OrderPlaced)
counts: Counter[str] = Counter()


@audit.on_message(predicate=lambda m: m.amount >= 100)
def big_orders(message: OrderPlaced) -> None:
    counts["audit (amount >= 100)"] += 1


def main() -> None:
    with MemoryBroker() as broker:
        set_message_broker(broker)
        for worker in ("w1", "w2"):

            async def ship(message: OrderPlaced, worker: str = worker) -> None:
                await asyncio.sleep(0)
                counts[f"shipping/{worker} (attempt {AsyncMessageContext.current().attempt})"] += 1

            broker.subscribe_async(OrderPlaced, ship, queue_name="shipping")
        broker.subscribe(OrderPlaced, lambda m: counts.update(["broadcast"]))
        for order_id in range(100):
            broker.publish(OrderPlaced(order_id, amount=order_id * 2.0))
        broker.flush(timeout=10)
    for name, count in sorted(counts.items()):
        print(f"{name:40} {count:5}")


if __name__ == "__main__":
    main()
