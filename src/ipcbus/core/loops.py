"""Event loops of our own, each on a daemon thread (MemoryBroker's, a proxy's queue runner)."""

from __future__ import annotations

import asyncio
import threading

__all__ = ["start_loop_thread"]


def start_loop_thread(name: str) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """An event loop of our own, running on a daemon thread (stop it with ``loop.stop``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=run_loop_forever, args=(loop,), name=name, daemon=True)
    thread.start()
    return loop, thread


def run_loop_forever(loop: asyncio.AbstractEventLoop) -> None:
    """Thread body for a loop of our own: run it; once stopped, cancel what is left and close."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
