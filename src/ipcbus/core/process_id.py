"""This process's pid, kept current across fork (every process).

``os.getpid()`` is a system call, too slow for the publish() hot paths, where it guards against a
forked child using its parent's broker. Read it as ``process_id.pid`` (an attribute of the module,
so a child sees its own after fork), never import the name itself.
"""

from __future__ import annotations

import os

__all__ = ["pid"]

pid = os.getpid()


def _update() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_update)
