"""The operator's subcommands of the command line: ``ipcbus worker`` (run Consumers in N
processes) and ``ipcbus tail`` (watch messages pass). ``cli`` registers them with two calls;
their code lives here and in ``worker`` and ``client.tail``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from .config import ENV_ADDRESS, RUNNER_PERIODS, RunnerOptions, address_from_env
from .exit_codes import ExitCode

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = ("worker", "tail")


def add_commands(commands: Any, common: argparse.ArgumentParser, epilog: str) -> None:
    """Add ``worker`` and ``tail`` to the subparsers ``commands``."""
    defaults = RunnerOptions()
    worker = commands.add_parser(
        "worker",
        parents=[common],
        help="run the Consumers of some modules in N processes",
        description="Import MODULE (or MODULE:OBJ) in each of N worker processes, each "
        "connected to the hub: the Consumers the modules declare handle messages there. OBJ "
        "may name a Consumer, or a callable each worker calls with its broker. A worker that "
        "crashes is started again (with backoff); SIGTERM or SIGINT stops them cleanly "
        "(deliveries in hand finish or go back to the hub), a second one at once. The current "
        "directory is on the import path.",
        epilog=epilog,
    )
    worker.add_argument("targets", nargs="+", metavar="MODULE[:OBJ]")
    _address(worker)
    worker.add_argument(
        "-p", "--processes", type=int, default=defaults.processes, help="default %(default)s"
    )
    worker.add_argument(
        "--start-method",
        choices=["spawn", "fork", "forkserver"],
        default=defaults.start_method,
        help="default %(default)s",
    )
    for name in RUNNER_PERIODS:
        worker.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=getattr(defaults, name),
            metavar="SECONDS",
            help="default %(default)s (see RunnerOptions)",
        )
    worker.add_argument(
        "--max-crashes",
        type=int,
        default=defaults.max_crashes,
        help="crashes in a row before giving up; default %(default)s",
    )

    tail = commands.add_parser(
        "tail",
        parents=[common],
        help="print the messages that pass, as they pass",
        description="Print each message the hub relays: when it was published, its type, its "
        "size, its publisher and, when its class can be imported here, a short repr. TYPE "
        "(module.Class) limits it to those types. Tail is a client of the bus (it proves the "
        "secret); it never holds the bus back: what the output cannot keep up with is left "
        "out, and counted on stderr.",
        epilog=epilog,
    )
    tail.add_argument("types", nargs="*", metavar="TYPE", help="only these (default: all)")
    _address(tail)
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument(
        "--no-repr", action="store_true", help="do not import message classes to show a repr"
    )
    tail.add_argument("--count", type=int, help="stop after this many messages")
    tail.add_argument(
        "--buffer",
        type=int,
        default=10_000,
        help="messages held for a slow output before some are left out (default %(default)s)",
    )
    tail.add_argument("--timeout", type=seconds, default=10.0, help="seconds to wait for the hub")


def seconds(text: str) -> float:
    """A ``--timeout`` or a period: finite and > 0 (a negative one polled for ever: ZeroMQ's
    -1; NaN ended in a traceback; 0 asked a live hub and said that none answered)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0 seconds, not {text}")
    return value


def address_error(address: str, nats: bool) -> str | None:
    """What is wrong with ``address`` (``None``: nothing), before anything connects: a
    malformed address is the caller's mistake (exit 3), not a hub that did not answer (4).
    ``nats``: the subcommand also runs on a NATS server (``nats://``, ``tls://``)."""
    from .wire.address import Address

    if nats and address.startswith(("nats://", "tls://")):
        return None
    try:
        Address.parse(address)
    except ValueError as exc:
        return str(exc)
    return None


def _address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"the hub's address (default: ${ENV_ADDRESS})")


def run(args: argparse.Namespace, log_level: str) -> int:
    """Run the subcommand ``args.command`` (one of ``COMMANDS``); returns the exit code."""
    address = args.address or address_from_env()
    if address is None:
        print(
            f"ipcbus {args.command}: no address: pass --address or set {ENV_ADDRESS}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    problem = address_error(address, nats=args.command == "worker")
    if problem is not None:
        print(f"ipcbus {args.command}: {problem}", file=sys.stderr)
        return ExitCode.ADDRESS
    if args.command == "worker":
        return _worker(args, address, log_level)
    if args.command == "tail":
        from .tail_view import run_tail

        if os.getcwd() not in sys.path:  # message classes of the current directory import
            sys.path.insert(0, os.getcwd())
        return run_tail(
            address,
            args.types,
            as_json_lines=args.json,
            show_repr=not args.no_repr,
            count=args.count,
            buffer=args.buffer,
            timeout=args.timeout,
        )
    raise AssertionError(f"not an operations command: {args.command}")


def _worker(args: argparse.Namespace, address: str, log_level: str) -> int:
    from .worker import WorkerRunner

    try:
        options = RunnerOptions(
            processes=args.processes,
            start_method=args.start_method,
            restart_backoff=args.restart_backoff,
            max_backoff=args.max_backoff,
            stable_after=args.stable_after,
            max_crashes=args.max_crashes,
            shutdown_timeout=args.shutdown_timeout,
            connect_timeout=args.connect_timeout,
        )
    except ValueError as exc:
        print(f"ipcbus worker: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    # As dramatiq and celery do: modules of the current directory import (a console script's
    # path does not hold it); spawned workers inherit the path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return WorkerRunner(args.targets, address, options, log_level=log_level).run()
