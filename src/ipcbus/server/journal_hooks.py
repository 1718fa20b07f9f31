"""What the queue book tells a journal (``JournalHooks``, implemented by
:mod:`ipcbus.server.journal`): ids of messages and their settlement, never their content."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .dead_letters import DeadEntry

__all__ = ["JournalHooks"]


class JournalHooks(Protocol):
    """What the book tells a journal (server.journal): ids of messages, never their content."""

    full: bool

    def enqueued(
        self,
        topic: bytes,
        groups: Sequence[tuple[str, int]],
        meta: bytes,
        sizes: Any,
        data: Any,
        attempt: int = 0,
        publisher: tuple[bytes, int, int] | None = None,
    ) -> None: ...

    def delivered(self, first_id: int, count: int, attempt: int) -> None: ...

    def settled(self, first_id: int, count: int) -> None: ...

    def dropped(self, topic: bytes, name: str) -> None: ...

    def dead(self, topic: bytes, name: str, entry: DeadEntry) -> None: ...

    def rewrite(self) -> None: ...

    def write(self) -> bool: ...
