"""The queue subcommands of the ipcbus command line (registered by ``ipcbus.cli``):

    ipcbus queues [--json]                               each queue group: counts and rates
    ipcbus dead-letters QUEUE [--json] [--limit N]       the dead letters a group keeps
    ipcbus requeue QUEUE [--id ID ...] [--json]          dead letters back into their group
    ipcbus purge QUEUE [--json]                          drop what a group holds
    ipcbus delete-queue QUEUE [--json]                   delete a group without consumers

QUEUE is ``module.Type/queue_name``, as ``ipcbus queues`` prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from .client.queue_admin import (
    DeadLetterRecord,
    decode_dead_letter,
    parse_queue,
    request_dead_letters,
    request_delete,
    request_purge,
    request_queues,
    request_requeue,
)
from .core.failures import describe
from .exceptions import QueueInUseError, UnknownQueueError

__all__ = ["COMMANDS", "QueueExitCode", "add_parsers", "run"]


class QueueExitCode(IntEnum):
    """The codes of ``ipcbus.cli.ExitCode`` (same numbers), and two of the queue commands."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 4
    UNKNOWN_QUEUE = 5  # no such queue group (or, for requeue, no such dead letter)
    IN_USE = 6  # delete-queue: the group still has consumers


COMMANDS = frozenset({"queues", "dead-letters", "requeue", "purge", "delete-queue"})
_EXTRA_CODES = ", 5 unknown queue, 6 in use"


def add_parsers(
    commands: Any,
    common: argparse.ArgumentParser,
    epilog: str,
    hub_address: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add the queue subcommands to ``commands`` (the subparsers of ``ipcbus``)."""
    epilog += _EXTRA_CODES

    def add(name: str, summary: str, queue: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=summary, description=summary, epilog=epilog
        )
        hub_address(parser)
        if queue:
            parser.add_argument(
                "queue", metavar="QUEUE", help="module.Type/queue_name, as ipcbus queues shows it"
            )
        parser.add_argument("--json", action="store_true", help="print JSON")
        return parser

    add(
        "queues",
        "each queue group: consumers, held, in flight, acked, redelivered, dead letters, rates",
        queue=False,
    )
    dead = add(
        "dead-letters",
        "the dead letters a queue group keeps (bounded: the latest max_dead_letters, within "
        "max_dead_letter_bytes), decoded when their class is importable here",
    )
    dead.add_argument("--limit", type=int, default=0, help="the latest N only (default: all)")
    dead.add_argument(
        "--no-decode", action="store_true", help="never unpickle: show type and size only"
    )
    requeue = add(
        "requeue",
        "put dead letters back into their queue group, attempts counted from 1 again",
    )
    requeue.add_argument(
        "--id",
        dest="ids",
        nargs="+",
        action="extend",
        metavar="ID",
        help="only these message ids (default: every dead letter of the group)",
    )
    add("purge", "drop every message a queue group holds (not those consumers hold)")
    add("delete-queue", "delete a queue group that has no consumers, and what it holds")


def run(args: argparse.Namespace, address: str) -> int:
    """Run one queue subcommand; ``HubUnavailableError`` is the caller's (exit code 4)."""
    command = args.command
    try:
        if command == "queues":
            return _queues(address, args.json, args.timeout)
        type_name, queue_name = parse_queue(args.queue)
        if command == "dead-letters":
            if args.limit < 0:
                raise ValueError("--limit must be >= 0")
            return _dead_letters(address, args, type_name, queue_name)
        if command == "requeue":
            return _requeue(address, args, type_name, queue_name)
        if command == "purge":
            purged = request_purge(address, type_name, queue_name, timeout=args.timeout)
            _say(args.json, {"queue": args.queue, "purged": purged}, f"purged {purged} messages")
            return QueueExitCode.OK
        dropped = request_delete(address, type_name, queue_name, timeout=args.timeout)
        _say(
            args.json,
            {"queue": args.queue, "dropped": dropped},
            f"deleted {args.queue}: {dropped} held messages dropped",
        )
        return QueueExitCode.OK
    except ValueError as exc:
        print(f"ipcbus {command}: {exc}", file=sys.stderr)
        return QueueExitCode.USAGE
    except UnknownQueueError as exc:
        print(f"ipcbus {command}: {exc}", file=sys.stderr)
        return QueueExitCode.UNKNOWN_QUEUE
    except QueueInUseError as exc:
        print(f"ipcbus {command}: {exc}", file=sys.stderr)
        return QueueExitCode.IN_USE


def _say(as_json: bool, body: dict[str, Any], text: str) -> None:
    print(json.dumps(body, sort_keys=True) if as_json else text, flush=True)


def _queues(address: str, as_json: bool, timeout: float) -> int:
    queues = request_queues(address, timeout)
    if as_json:
        print(json.dumps([dataclasses.asdict(q) for q in queues], indent=2, sort_keys=True))
        return QueueExitCode.OK
    print(
        f"{'queue':40} {'consumers':>9} {'held':>8} {'in flight':>9} {'acked':>10} "
        f"{'redelivered':>11} {'dead':>6} {'in/s':>8} {'acked/s':>8}"
    )
    for q in queues:
        dead = f"{q.dead_letters}" + (
            f"+{q.dead_letters_evicted}" if q.dead_letters_evicted else ""
        )
        print(
            f"{q.queue:40} {q.consumers:>9} {q.held:>8} {q.in_flight:>9} {q.acked:>10} "
            f"{q.redelivered:>11} {dead:>6} {q.publish_rate:>8.0f} {q.ack_rate:>8.0f}"
        )
    if any(q.dead_letters_evicted for q in queues):
        print("dead: kept+evicted (past the bounds max_dead_letters, max_dead_letter_bytes)")
    return QueueExitCode.OK


def _dead_letters(address: str, args: argparse.Namespace, type_name: str, queue_name: str) -> int:
    records = request_dead_letters(
        address, type_name, queue_name, limit=args.limit, timeout=args.timeout
    )
    queues = request_queues(address, args.timeout)
    stats = next((q for q in queues if q.queue == f"{type_name}/{queue_name}"), None)
    shown = [_describe(record, type_name, args.no_decode) for record in records]
    summary = {
        "queue": args.queue,
        "kept": stats.dead_letters if stats else len(records),
        "evicted": stats.dead_letters_evicted if stats else 0,
        "max_dead_letters": stats.max_dead_letters if stats else None,
        "max_dead_letter_bytes": stats.max_dead_letter_bytes if stats else None,
    }
    if args.json:
        print(
            json.dumps({**summary, "dead_letters": shown}, indent=2, default=repr, allow_nan=False)
        )
        return QueueExitCode.OK
    for row in shown:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["when"]))
        message = row["repr"] if row["decoded"] else f"<{row['type']}, {row['size']} bytes>"
        print(f"{row['message_id']}  {row['attempts']} attempts  {when}  {row['error']}")
        print(f"    {message}")
    print(
        f"{summary['kept']} dead letters kept, {summary['evicted']} evicted past the bounds "
        f"({summary['max_dead_letters']} letters, {summary['max_dead_letter_bytes']} bytes)"
    )
    return QueueExitCode.OK


def _describe(record: DeadLetterRecord, type_name: str, no_decode: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "message_id": record.message_id,
        "attempts": record.attempts,
        "error": record.error,
        "when": record.when,
        "type": type_name,
        "size": record.size,
        "decoded": False,
        "message": None,
    }
    if no_decode:
        return row
    try:
        message = decode_dead_letter(record, type_name)
        shown = repr(message)
    except Exception as exc:  # not importable here, or not what it claims: type and size only
        row["decode_error"] = describe(exc)
        return row
    row["decoded"] = True
    row["repr"] = shown
    if dataclasses.is_dataclass(message):
        fields = dataclasses.fields(message)
        row["message"] = {field.name: _jsonable(getattr(message, field.name)) for field in fields}
    return row


def _jsonable(value: Any) -> Any:
    """``value`` if ``--json`` can print it as it is (default=repr covers sets, bytes, ...),
    else its repr: a dict with tuple keys, or a NaN (``NaN`` is no JSON: jq refuses it)."""
    try:
        json.dumps(value, default=repr, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _requeue(address: str, args: argparse.Namespace, type_name: str, queue_name: str) -> int:
    done = request_requeue(address, type_name, queue_name, args.ids, timeout=args.timeout)
    _say(
        args.json,
        {"queue": args.queue, "requeued": done.requeued, "missing": list(done.missing)},
        f"requeued {done.requeued} dead letters",
    )
    if done.missing:
        print(f"ipcbus requeue: no dead letter {', '.join(done.missing)}", file=sys.stderr)
        return QueueExitCode.UNKNOWN_QUEUE
    return QueueExitCode.OK
