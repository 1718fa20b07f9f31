"""The queue groups a hub declared, in a file beside its socket (hub process): a group outlives
the absence of its consumers, a hub restart included (docs/guarantees.md), until it is deleted.

One JSON object per line, ``{"topic": unique name, "queue": queue name}``: a new group is
appended; a deletion rewrites the file whole, atomically (a temporary file renamed over it), so a
hub killed meanwhile leaves the old list or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable

from ..wire import protocol as wire

__all__ = ["GroupsFile"]

logger = logging.getLogger(__name__)


class GroupsFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> list[tuple[bytes, str]]:
        """The groups declared so far (none if the file is missing or unreadable: logged)."""
        try:
            with open(self.path, encoding="utf-8") as lines:
                declared = [json.loads(line) for line in lines if line.strip()]
            return [(wire.topic_for(entry["topic"]), entry["queue"]) for entry in declared]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error(
                "cannot read the queue groups of the previous hub (%s): %s", self.path, exc
            )
            return []

    def add(self, topic: bytes, name: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, _line(topic, name))
        finally:
            os.close(fd)

    def rewrite(self, groups: Iterable[tuple[bytes, str]]) -> None:
        """Replace the list with ``groups``, atomically."""
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(b"".join(_line(topic, name) for topic, name in groups))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def _line(topic: bytes, name: str) -> bytes:
    return json.dumps({"topic": wire.unique_name_of(topic), "queue": name}).encode() + b"\n"
