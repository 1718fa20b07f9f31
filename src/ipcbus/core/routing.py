"""The in-process routing table shared by MemoryBroker and TestBroker.

Routing is by topic (the message type's unique name). Broadcast subscriptions are kept in
subscription order; queue groups pick one accepting member round-robin. A queue group exists from
its declaration (or first member) on; while it has no member it holds what is published for it
(the brokers decide the bound), handed out when a member comes.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from ..message import Message
from .contract import Subscription

__all__ = ["RouteTable"]


class RouteTable:
    """Subscriptions by topic. Readers get immutable snapshots, so handlers may (un)subscribe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._broadcast: dict[str, tuple[Subscription, ...]] = {}
        self._groups: dict[str, dict[str, tuple[Subscription, ...]]] = {}
        self._cursor: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], deque[Any]] = {}

    def declare(self, topic: str, queue_name: str) -> None:
        """Make the group exist (holding what is published) if it does not."""
        with self._lock:
            self._groups.setdefault(topic, {}).setdefault(queue_name, ())

    def has_members(self, topic: str, queue_name: str) -> bool:
        return any(m.active for m in self._groups.get(topic, {}).get(queue_name, ()))

    def hold(self, topic: str, queue_name: str, item: Any, limit: int) -> bool:
        """Keep ``item`` for the group's first member; False when it holds ``limit`` already."""
        with self._lock:
            held = self._held.setdefault((topic, queue_name), deque())
            if len(held) >= limit:
                return False
            held.append(item)
            return True

    def take_held(self, topic: str, queue_name: str) -> list[Any]:
        """What the group held, in publish order, now handed to its members."""
        with self._lock:
            held = self._held.pop((topic, queue_name), None)
        return list(held) if held else []

    def held(self, topic: str, queue_name: str) -> int:
        return len(self._held.get((topic, queue_name), ()))

    def add(self, subscription: Subscription) -> None:
        topic = subscription.topic
        with self._lock:
            if subscription.queue_name is None:
                self._broadcast[topic] = (*self._broadcast.get(topic, ()), subscription)
            else:
                groups = self._groups.setdefault(topic, {})
                name = subscription.queue_name
                groups[name] = (*groups.get(name, ()), subscription)

    def remove(self, subscription: Subscription) -> None:
        topic = subscription.topic
        with self._lock:
            if subscription.queue_name is None:
                subs = tuple(s for s in self._broadcast.get(topic, ()) if s is not subscription)
                self._broadcast[topic] = subs
            else:
                # The group itself stays: it outlives the absence of its members
                # (docs/guarantees.md).
                groups = self._groups.get(topic, {})
                name = subscription.queue_name
                groups[name] = tuple(s for s in groups.get(name, ()) if s is not subscription)

    def delete_group(self, topic: str, queue_name: str) -> int | None:
        """Forget the group ``queue_name`` of ``topic`` and what it held: the number of held
        items dropped, or ``None`` (nothing done) while it has active members."""
        with self._lock:
            groups = self._groups.get(topic, {})
            if any(member.active for member in groups.get(queue_name, ())):
                return None
            groups.pop(queue_name, None)
            self._cursor.pop((topic, queue_name), None)
            if not groups:
                self._groups.pop(topic, None)
            return len(self._held.pop((topic, queue_name), ()))

    def broadcast(self, topic: str) -> tuple[Subscription, ...]:
        return self._broadcast.get(topic, ())

    def queue_names(self, topic: str) -> tuple[str, ...]:
        return tuple(self._groups.get(topic, {}))

    def pick(self, topic: str, queue_name: str, message: Message) -> Subscription | None:
        """The next member of the group (round-robin) whose predicate accepts ``message``."""
        members = self._groups.get(topic, {}).get(queue_name, ())
        if not members:
            return None
        key = (topic, queue_name)
        start = self._cursor.get(key, 0)
        count = len(members)
        for step in range(count):
            index = (start + step) % count
            member = members[index]
            if member.accepts(message):
                self._cursor[key] = index + 1
                return member
        return None

    def clear(self) -> None:
        with self._lock:
            self._broadcast.clear()
            self._groups.clear()
            self._cursor.clear()
            self._held.clear()
