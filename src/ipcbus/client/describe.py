"""What a client says about itself to the hub, in HELLO and INFO (client side): pid, host,
program, how the process started, what it subscribes to. A description for the hub's logs and
``ipcbus clients``, never used for routing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import sys
from collections.abc import Iterable

from ..wire import protocol as wire

__all__ = ["describe"]


def describe(topics: Iterable[bytes], queues: list[str]) -> bytes:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "program": _program(),
            "start_method": _start_method(),
            "subscriptions": sorted(wire.unique_name_of(topic) for topic in topics),
            "queues": queues,
        }
    ).encode()


# The pid this module was imported in: a broker made in another pid is in a forked child.
_IMPORTED_IN = os.getpid()


def _program() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return os.path.basename(path) or "python"


def _start_method() -> str:
    """How this process started, as far as it can tell: by hand ("main"), forked from a
    process that used ipcbus ("fork"), or by multiprocessing ("spawn or forkserver")."""
    if os.getpid() != _IMPORTED_IN:
        return "fork"
    if multiprocessing.parent_process() is not None:
        return "spawn or forkserver"
    return "main"
