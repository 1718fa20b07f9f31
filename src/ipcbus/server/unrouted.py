"""What the hub relayed to nobody (hub process): messages published with no subscriber and no
queue group. Not an error (broadcast to nobody), but counted per type for ``ipcbus stats``, and
bounded: past ``MAX_TYPES`` types the rest are counted together."""

from __future__ import annotations

from ..wire import protocol as wire

__all__ = ["Unrouted"]

# Types counted apart; past this many, the rest are counted together.
MAX_TYPES = 1000
_OTHER_TYPES = "(other types)"
# Replies whose requester is gone: each requester has a reply topic of its own, so one row per
# topic would fill the table with dead requesters (one per process that ever requested).
_GONE_REQUESTERS = "(replies to gone requesters)"


class Unrouted:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # type -> messages nobody was subscribed to

    def add(self, topic: bytes, count: int) -> None:
        if topic.startswith(wire.REPLY_PREFIX):
            name = _GONE_REQUESTERS
        else:
            name = wire.unique_name_of(topic)
        if name not in self.counts and len(self.counts) >= MAX_TYPES:
            name = _OTHER_TYPES
        self.counts[name] = self.counts.get(name, 0) + count
