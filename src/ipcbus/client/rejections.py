"""Messages ``publish()`` accepted and the outbox then rejected: the channel that reports them.

Only the first message of a type is serialised in the caller; the others are serialised a batch
at a time on the I/O thread (docs/architecture.md), where a failure has no caller to raise in. A
rejected message is logged at ERROR and counted the moment it is rejected, and the next
``flush()`` raises ``MessageSerializationError`` naming every rejection since the previous one
(``close()`` logs those no ``flush()`` reported).
"""

from __future__ import annotations

import logging
import threading

from ..exceptions import MessageSerializationError
from .outbox import Rejected

__all__ = ["Rejections"]

logger = logging.getLogger(__name__)

# Rejections one error names at most (the count covers the rest): a publisher that never flushes
# must not grow a list without bound.
_MAX_NAMED = 100


class Rejections:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self.count = 0
        self._named: list[Rejected] = []  # not reported by a flush() yet
        self._unnamed = 0  # past _MAX_NAMED

    def add(self, rejected: Rejected) -> None:  # I/O thread
        logger.error(
            "%s rejected %s #%d, which publish() had accepted: %s; it is not sent (the next "
            "flush() raises MessageSerializationError)",
            self._owner,
            rejected.type_name,
            rejected.position,
            rejected.reason,
        )
        with self._lock:
            self.count += 1
            if len(self._named) < _MAX_NAMED:
                self._named.append(rejected)
            else:
                self._unnamed += 1

    def take(self) -> MessageSerializationError | None:
        """The error naming the rejections not reported yet (which count as reported now)."""
        with self._lock:
            named, unnamed = self._named, self._unnamed
            self._named, self._unnamed = [], 0
        if not named:
            return None
        names = "; ".join(f"{r.type_name} #{r.position}: {r.reason}" for r in named)
        more = f"; and {unnamed} more" if unnamed else ""
        return MessageSerializationError(
            f"{len(named) + unnamed} messages publish() had accepted were rejected and not sent "
            f"(#n: how many messages this broker accepted before it): {names}{more}"
        )
