"""The in-process routing table shared by MemoryBroker and TestBroker.

Routing is by topic (the message type's unique name). Broadcast subscriptions are kept in
subscription order; queue groups pick one accepting member round-robin.
"""

from __future__ import annotations

import threading

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

    def delete_group(self, topic: str, queue_name: str) -> bool:
        """Forget the group ``queue_name`` of ``topic``; False (nothing done) while it has
        active members."""
        with self._lock:
            groups = self._groups.get(topic, {})
            if any(member.active for member in groups.get(queue_name, ())):
                return False
            groups.pop(queue_name, None)
            self._cursor.pop((topic, queue_name), None)
            if not groups:
                self._groups.pop(topic, None)
            return True

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
