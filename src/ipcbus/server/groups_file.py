"""The hub's record of its declared queue groups, kept beside its socket so that a hub restarted
at the same address recreates them (groups outlive their consumers: docs/guarantees.md).

One JSON object per line: ``{"topic": "<unique name>", "queue": "<queue name>"}``: a new group
is appended; a deletion (``delete_queue``) rewrites the file whole, atomically (a temporary file
renamed over it), so a hub killed meanwhile leaves the old list or the new one, never half of
one. The file is opened without following symlinks and only if it is this user's private file; a
line that is not such an object is skipped, counted and logged, never fatal (docs/security.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable

from ..exceptions import InsecurePathError
from ..wire import protocol as wire
from ..wire.paths import open_private_file

__all__ = ["GroupsFile"]

logger = logging.getLogger(__name__)

# More than this is not a file a hub of ours wrote (each line is one declared group).
_MAX_BYTES = 16 * 1024 * 1024


class GroupsFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self.bad_entries = 0  # lines skipped when loading

    def load(self) -> list[tuple[bytes, str]]:
        """The (topic, queue name) pairs recorded, bad lines skipped and counted."""
        try:
            fd = open_private_file(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        except OSError as exc:  # InsecurePathError included
            logger.error("not restoring queue groups from %s: %s", self.path, exc)
            self.bad_entries += 1
            return []
        with os.fdopen(fd, "rb") as file:
            data = file.read(_MAX_BYTES + 1)
        if len(data) > _MAX_BYTES:
            logger.error("not restoring queue groups: %s is over %d bytes", self.path, _MAX_BYTES)
            self.bad_entries += 1
            return []
        groups: list[tuple[bytes, str]] = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                groups.append(_parse(line))
            except (ValueError, TypeError, KeyError, RecursionError) as exc:
                self.bad_entries += 1
                logger.error("skipped line %d of %s: %s", number, self.path, exc)
        return groups

    def append(self, topic: bytes, name: str) -> None:
        line = _line(topic, name)
        try:
            fd = open_private_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except (InsecurePathError, OSError) as exc:
            logger.error(
                "cannot record queue group %r of %r in %s: %s", name, topic, self.path, exc
            )
            return
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def rewrite(self, groups: Iterable[tuple[bytes, str]]) -> None:
        """Replace the list with ``groups``, atomically. The temporary file has an unpredictable
        name and is created exclusively (never through a link planted in advance)."""
        temporary = f"{self.path}.{os.urandom(8).hex()}.tmp"
        try:
            fd = os.open(
                temporary,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
            with os.fdopen(fd, "wb") as file:
                file.write(b"".join(_line(topic, name) for topic, name in groups))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)  # replaces a link itself, never what it points to
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def _line(topic: bytes, name: str) -> bytes:
    return json.dumps({"topic": wire.unique_name_of(topic), "queue": name}).encode() + b"\n"


def _parse(line: bytes) -> tuple[bytes, str]:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise TypeError(f"not an object: {line[:64]!r}")
    topic, name = entry["topic"], entry["queue"]
    if not isinstance(topic, str) or not isinstance(name, str) or not name:
        raise TypeError(f"topic and queue must be non-empty strings: {line[:64]!r}")
    return wire.check_topic(wire.topic_for(topic)), name
