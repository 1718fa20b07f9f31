"""A subscriber for the bench's memory case that loses messages for real (tests/test_bench.py):
nats-py with a pending limit of 20 messages drops what does not fit while its handler is slow,
and reports each drop as a SlowConsumerError, which this subscriber counts or ignores. Runs in
the bench's fresh processes, with bench/ on the path."""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import Any


def nats_dropping(
    url: str, counted: bool, total: int, slow: float, counts: Any, ready: Any, stop: Any
) -> None:
    import nats
    from nats.errors import SlowConsumerError

    async def main() -> None:
        async def on_error(error: Exception) -> None:
            if counted and isinstance(error, SlowConsumerError):
                counts[1] += 1

        client = await nats.connect(url, max_reconnect_attempts=0, error_cb=on_error)

        async def on_message(message: Any) -> None:
            time.sleep(slow)
            pickle.loads(message.data)
            counts[0] += 1

        await client.subscribe("ipcbus.bench.memory", cb=on_message, pending_msgs_limit=20)
        await client.flush()
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        await client.close()

    asyncio.run(main())
