"""What a client counts of the spool (worker process): ``HubBroker.spool``, kept across hubs
(each names a spool directory of its own; ``spool.py`` uses them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpoolCounts", "SpoolStatistics"]


@dataclass(frozen=True)
class SpoolStatistics:
    """What went through the spool in one process (``HubBroker.spool``)."""

    directory: str  # the hub's spool directory; empty: none (big payloads go inline)
    stored: int  # buffers this process wrote to spool files
    read: int  # buffers it read back from them
    inline: int  # big buffers it sent inline: nobody registered, no room, a failed write
    missing: int  # buffers it could not read back (expired, not the file written): dropped


@dataclass
class SpoolCounts:
    """What a client counted of the spool, kept across hubs (each names a spool of its own)."""

    stored: int = 0
    read: int = 0
    inline: int = 0
    missing: int = 0

    def statistics(self, directory: str) -> SpoolStatistics:
        return SpoolStatistics(directory, self.stored, self.read, self.inline, self.missing)
