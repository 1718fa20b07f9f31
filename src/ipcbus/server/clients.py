"""Who is connected to the hub (hub process): what each client said about itself in HELLO and
INFO (pid, host, program, start method, subscriptions), for the logs and ``ipcbus clients``.

What a client says is only a description: it is bounded, never trusted for routing, and a client
that says nothing is listed with what the hub knows (its id and since when).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["ClientDirectory"]

logger = logging.getLogger("ipcbus.hub")

# A description longer than this is cut: an authenticated client could otherwise make the hub
# hold (and log) anything.
_MAX_INFO = 16 * 1024
_FIELDS = ("pid", "host", "program", "start_method", "subscriptions", "queues")


class ClientDirectory:
    def __init__(self) -> None:
        self._clients: dict[bytes, dict[str, Any]] = {}

    def joined(self, identity: bytes, info: bytes | None) -> None:
        known = identity in self._clients
        entry = self._clients.setdefault(identity, {"id": identity.hex(), "since": time.time()})
        self._update(entry, info)
        if not known:
            logger.info("client joined: %s", _label(entry))

    def described(self, identity: bytes, info: bytes) -> None:
        entry = self._clients.get(identity)
        if entry is not None:
            self._update(entry, info)

    def left(self, identity: bytes, why: str) -> None:
        entry = self._clients.pop(identity, None)
        label = _label(entry) if entry is not None else identity.hex()
        logger.info("client left (%s): %s; its queue deliveries go to others", why, label)

    def describe(self, queues_by_client: dict[bytes, list[str]]) -> bytes:
        """The CLIENTS reply: every client's description, as JSON."""
        listed = []
        for identity, entry in self._clients.items():
            listed.append({**entry, "queue_consumers": queues_by_client.get(identity, [])})
        return json.dumps(listed, sort_keys=True).encode()

    @staticmethod
    def _update(entry: dict[str, Any], info: bytes | None) -> None:
        if not info:
            return
        try:
            described = json.loads(info[:_MAX_INFO])
        except ValueError:
            return  # a description only: a bad one is ignored
        if isinstance(described, dict):
            entry.update({key: described[key] for key in _FIELDS if key in described})


def _label(entry: dict[str, Any]) -> str:
    program = entry.get("program", "?")
    return f"pid {entry.get('pid', '?')} {program} on {entry.get('host', '?')} ({entry['id']})"
