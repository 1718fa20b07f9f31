"""``ipcbus tail`` (CLI): print the messages that pass through a hub, one line each (or one JSON
object each): when published, type, size, publisher and, when the class can be imported here,
a short repr.

The batches come from ``client.tail.Tail``, which takes them off the bus without ever holding it
back; this module decodes and prints at the terminal's pace, and says how many messages did not
fit in between.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import reprlib
import signal
import sys
import time
import types
from collections.abc import Sequence
from typing import Any, TextIO

from .client.admin import request_clients
from .client.tail import Batch, Tail, as_json, describe_publishers
from .exceptions import HubUnavailableError
from .exit_codes import ExitCode
from .wire import protocol as wire
from .wire.address import Address

__all__ = ["run_tail"]

# Publishers not named yet are looked up (CLIENTS) at most this often.
_LOOKUP_INTERVAL = 1.0
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 80
_REPR_WIDTH = 120


def run_tail(
    address: str,
    type_names: Sequence[str],
    *,
    as_json_lines: bool = False,
    show_repr: bool = True,
    count: int | None = None,
    buffer: int = 10_000,
    timeout: float = 10.0,
    out: TextIO | None = None,
) -> int:
    """Print what passes until SIGINT/SIGTERM, ``count`` messages, or the hub stops."""
    out = out or sys.stdout
    try:
        Address.parse(address)  # a malformed one is said as ping and stats say it, not a traceback
        tail = Tail(address, type_names, buffer=buffer, timeout=timeout)
    except (HubUnavailableError, ValueError) as exc:
        print(f"ipcbus tail: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    stopping = False

    def on_term(signum: int, frame: types.FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, on_term)
    view = _View(address, as_json_lines, show_repr, out)
    watched = ", ".join(type_names) or "every type"
    print(f"ipcbus tail: watching {watched} at {address}", file=sys.stderr, flush=True)
    try:
        while not stopping and (count is None or view.shown < count):
            batch = tail.take(0.2)
            view.report_drops(tail.dropped)
            if batch is not None:
                view.show(batch, None if count is None else count - view.shown)
            elif tail.done:
                break
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `ipcbus tail | head`: the reader left
        # As the Python docs advise: no second error when the interpreter flushes at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    finally:
        signal.signal(signal.SIGTERM, previous)
        tail.close()
    view.report_drops(tail.dropped)
    if tail.stopped_by_hub:
        print("ipcbus tail: the hub stopped", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    return ExitCode.OK


class _View:
    def __init__(self, address: str, as_json_lines: bool, show_repr: bool, out: TextIO) -> None:
        self._address = address
        self._json = as_json_lines
        self._show_repr = show_repr
        self._out = out
        self._classes: dict[str, type | None] = {}
        self._publishers: dict[bytes, str] = {}
        self._looked_up = 0.0
        self._dropped_reported = 0
        self.shown = 0

    def show(self, batch: Batch, limit: int | None) -> None:
        sizes = _sizes(batch)
        reprs = self._reprs(batch)
        publisher = self._publisher(batch.publisher)
        stamp = time.strftime("%H:%M:%S", time.localtime(batch.published_at))
        stamp += f".{int(batch.published_at % 1 * 1000):03d}"
        for index in range(batch.count if limit is None else min(batch.count, limit)):
            text = reprs[index] if reprs is not None else None
            if self._json:
                record: dict[str, Any] = {
                    "published_at": batch.published_at,
                    "type": batch.topic,
                    "size": sizes[index],
                    "publisher": publisher,
                    "publisher_id": batch.publisher.hex(),
                }
                if text is not None:
                    record["repr"] = text
                print(as_json(record), file=self._out)
            else:
                line = f"{stamp}  {batch.topic}  {sizes[index]} B  {publisher}"
                print(line + (f"  {text}" if text is not None else ""), file=self._out)
            self.shown += 1
        self._out.flush()

    def report_drops(self, dropped: int) -> None:
        if dropped == self._dropped_reported:
            return
        new, self._dropped_reported = dropped - self._dropped_reported, dropped
        print(
            f"ipcbus tail: {new} messages not shown: the output is slower than the bus "
            f"({dropped} in all; the bus itself lost nothing)",
            file=sys.stderr,
            flush=True,
        )
        if self._json:
            print(as_json({"dropped": new, "dropped_total": dropped}), file=self._out, flush=True)

    def _reprs(self, batch: Batch) -> list[str] | None:
        if not self._show_repr:
            return None
        cls = self._class(batch.topic)
        if cls is None:
            return None
        from .core import codec

        try:
            messages = codec.decode_batch(batch.codec, batch.payload, cls, [])
        except Exception:
            return None
        if len(messages) != batch.count:  # some could not be decoded here: no guessing which
            return None
        return [_REPR.repr(message)[:_REPR_WIDTH] for message in messages]

    def _class(self, name: str) -> type | None:
        """The class of a unique name, if it imports here (cached, failures too)."""
        if name in self._classes:
            return self._classes[name]
        from .message import Message

        found: type | None = None
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                value: Any = importlib.import_module(".".join(parts[:split]))
                for attribute in parts[split:]:
                    value = getattr(value, attribute)
            except Exception:
                continue
            if isinstance(value, type) and issubclass(value, Message):
                found = value
            break
        self._classes[name] = found
        return found

    def _publisher(self, client_id: bytes) -> str:
        if not client_id:
            return "?"
        name = self._publishers.get(client_id)
        if name is None and time.monotonic() - self._looked_up >= _LOOKUP_INTERVAL:
            self._looked_up = time.monotonic()
            with contextlib.suppress(HubUnavailableError):
                self._publishers.update(describe_publishers(request_clients(self._address)))
            name = self._publishers.get(client_id)
        # Gone before it could be named: its id, as the hub's logs and `ipcbus clients` show it.
        return name or f"client {client_id.hex()}"


def _sizes(batch: Batch) -> list[int]:
    """Each message's size: exact for split batches (topics with queue groups), else its share
    of the batch's payload."""
    if batch.codec in wire.SPLIT_CODECS and len(batch.payload) == 2:
        with contextlib.suppress(ValueError):
            sizes = list(wire.unpack_sizes(batch.payload[0].buffer))
            if len(sizes) == batch.count:
                return sizes
    share = batch.size // max(batch.count, 1)
    return [share] * batch.count
