"""The ipcbus command line: serve a hub, ask one for its numbers, check it is there, publish.

    ipcbus hub [--address ADDRESS] [hub options]     serve a hub until SIGINT/SIGTERM
    ipcbus stats [--json] [--watch SECONDS]          a running hub's statistics
    ipcbus clients [--json]                          who is connected, and to what
    ipcbus ping                                      exit 0 when the hub answers
    ipcbus publish TYPE --json '{...}'               publish one message (TYPE importable)
    ipcbus queues | dead-letters | requeue | purge | delete-queue   look after queue groups
    ipcbus worker MODULE[:OBJ]... [--processes N]    run the Consumers of modules in N processes
    ipcbus tail [TYPE...] [--json]                   watch messages pass

Exit codes are named (dramatiq's habit) so that scripts can tell failures apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import cli_ops, cli_queues
from .cli_ops import address_error, seconds
from .client.admin import request_clients, request_statistics
from .config import (
    ENV_ADDRESS,
    HubOptions,
    address_from_env,
    hub_options_from_env,
    parse_hub_option,
)
from .core.failures import describe
from .exceptions import HubAddressError, HubUnavailableError, PubSubError
from .exit_codes import EPILOG, ExitCode
from .hub import Hub
from .wire.statistics import HubStatistics

__all__ = ["ExitCode", "main"]

logger = logging.getLogger("ipcbus.cli")


_EPILOG = EPILOG


def _version() -> str:
    try:
        return metadata.version("ipcbus")
    except metadata.PackageNotFoundError:  # a checkout that was not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    logs = common.add_mutually_exclusive_group()
    # SUPPRESS: given before or after the subcommand, neither default overwrites the other.
    logs.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
    )
    logs.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default=argparse.SUPPRESS,
        help="the lowest level logged (default: INFO for hub, WARNING for the others)",
    )
    parser = argparse.ArgumentParser(
        prog="ipcbus",
        description=_plain(__doc__ or ""),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"ipcbus {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    hub = commands.add_parser(
        "hub",
        parents=[common],
        help="serve a hub in the foreground until SIGINT/SIGTERM",
        description="Serve a hub. Its first line of output is its address. Every option can "
        "also be set in the environment as IPCBUS_HUB_<OPTION> (e.g. IPCBUS_HUB_HWM=500).",
        epilog=_EPILOG,
    )
    hub.add_argument("--address", help="ipc://PATH or tcp://HOST:PORT (default: a private one)")
    for field in dataclasses.fields(HubOptions):
        hub.add_argument(
            "--" + field.name.replace("_", "-"),
            type=functools.partial(_hub_option, field.name),
            default=None,
            metavar=field.name.upper(),
            help=f"default {field.default}",
        )

    stats = commands.add_parser(
        "stats", parents=[common], help="print a running hub's statistics", epilog=_EPILOG
    )
    _hub_address(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument(
        "--watch", type=seconds, metavar="SECONDS", help="print again every SECONDS, with rates"
    )

    clients = commands.add_parser(
        "clients",
        parents=[common],
        help="list the connected clients: pid, host, program, subscriptions, queues",
        epilog=_EPILOG,
    )
    _hub_address(clients)
    clients.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ping = commands.add_parser(
        "ping", parents=[common], help="exit 0 when the hub answers (health checks)", epilog=_EPILOG
    )
    _hub_address(ping)

    publish = commands.add_parser(
        "publish",
        parents=[common],
        help="publish one message",
        description="Publish one message of TYPE (module.Class, importable here) built from "
        "the JSON object's fields.",
        epilog=_EPILOG,
    )
    _hub_address(publish)
    publish.add_argument("type", metavar="TYPE", help="the message type, as module.Class")
    publish.add_argument("--json", required=True, help="the message's fields, as a JSON object")
    cli_queues.add_parsers(commands, common, _EPILOG, _hub_address)
    cli_ops.add_commands(commands, common, _EPILOG)
    return parser


def _hub_option(name: str, text: str) -> Any:
    try:
        return parse_hub_option(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hub_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help=f"the hub's address (default: ${ENV_ADDRESS})")
    parser.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for it")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = "DEBUG" if getattr(args, "verbose", False) else getattr(args, "log_level", None)
    if level is None:
        level = "INFO" if args.command == "hub" else "WARNING"
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "hub":
        return _serve(args)
    if args.command in cli_ops.COMMANDS:
        return cli_ops.run(args, level)
    address = args.address or address_from_env()
    if address is None:
        print(
            f"ipcbus {args.command}: no address: pass --address or set {ENV_ADDRESS}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    problem = address_error(address, nats=args.command == "publish")
    if problem is not None:
        print(f"ipcbus {args.command}: {problem}", file=sys.stderr)
        return ExitCode.ADDRESS
    try:
        if args.command == "stats":
            return _stats(address, args.json, args.timeout, args.watch)
        if args.command == "clients":
            return _clients(address, args.json, args.timeout)
        if args.command in cli_queues.COMMANDS:
            return cli_queues.run(args, address)
        if args.command == "ping":
            request_statistics(address, args.timeout)
            print(f"{address}: ok")
            return ExitCode.OK
        return _publish(address, args.type, args.json, args.timeout)
    except HubUnavailableError as exc:
        print(f"ipcbus {args.command}: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    except KeyboardInterrupt:
        return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    try:
        options = hub_options_from_env()
        flags = {
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(HubOptions)
            if getattr(args, field.name) is not None
        }
        hub = Hub(args.address, options=options.with_(**flags))
    except (ValueError, TypeError, ImportError) as exc:  # ImportError: an extra is missing
        print(f"ipcbus hub: {exc}", file=sys.stderr)
        return ExitCode.USAGE

    def announce() -> None:
        # Printed once the hub accepts connections (its key file exists). First line: the
        # address alone, for scripts (`read -r ADDRESS < <(ipcbus hub)`).
        print(hub.address, flush=True)
        print(f"export {ENV_ADDRESS}={hub.address}", flush=True)
        if hub.metrics_url is not None:
            print(f"metrics at {hub.metrics_url}", flush=True)

    try:
        hub.run(ready=announce)
    except HubAddressError as exc:
        logger.error("%s", exc)
        return ExitCode.ADDRESS
    logger.info("hub at %s stopped", hub.address)
    return ExitCode.OK


def _stats(address: str, as_json: bool, timeout: float, watch: float | None) -> int:
    previous: HubStatistics | None = None
    while True:
        statistics = request_statistics(address, timeout)
        if as_json:
            print(statistics.to_json(), flush=True)
        else:
            _print_statistics(statistics, previous)
        if watch is None:
            return ExitCode.OK
        previous = statistics
        time.sleep(watch)


def _print_statistics(statistics: HubStatistics, previous: HubStatistics | None) -> None:
    elapsed = statistics.uptime - previous.uptime if previous is not None else 0.0
    for name, value in vars(statistics).items():
        if isinstance(value, dict | list):
            continue
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        if previous is not None and elapsed > 0 and isinstance(value, int) and name != "pid":
            rate = (value - getattr(previous, name)) / elapsed
            if rate:
                shown += f"   ({rate:,.0f}/s)"
        print(f"{name:22} {shown}")
    for queue, counts in statistics.queues.items():
        print(f"\nqueue {queue}")
        for name, count in counts.items():
            print(f"  {name:20} {count}")
        for record in statistics.dead_letters.get(queue, []):
            print(
                f"  dead letter {record['message_id']}: {record['attempts']} attempts, "
                f"{record['error']}"
            )
    if statistics.journal:
        print("\njournal")
        for name, count in sorted(statistics.journal.items()):
            print(f"  {name:20} {count}")
    if statistics.spool:
        print("\nspool (big payloads in files)")
        for name, value in sorted(statistics.spool.items()):
            print(f"  {name:20} {value}")
    if statistics.unrouted:
        print("\npublished with no subscriber and no queue group")
        for name, count in sorted(statistics.unrouted.items()):
            print(f"  {name:40} {count}")
    print(flush=True)


def _clients(address: str, as_json: bool, timeout: float) -> int:
    clients = request_clients(address, timeout)
    if as_json:
        print(json.dumps(clients, indent=2, sort_keys=True))
        return ExitCode.OK
    print(f"{'pid':>7}  {'host':16} {'program':24} {'started':20} {'since':19}  subscribes to")
    for client in sorted(clients, key=lambda c: c.get("since", 0)):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(client.get("since", 0)))
        topics = [*client.get("subscriptions", []), *client.get("queue_consumers", [])]
        print(
            f"{client.get('pid', '?')!s:>7}  {client.get('host', '?')!s:16.16} "
            f"{client.get('program', '?')!s:24.24} {client.get('start_method', '?')!s:20.20} "
            f"{since:19}  {', '.join(topics) or '-'}"
        )
    return ExitCode.OK


def _publish(address: str, type_name: str, fields: str, timeout: float) -> int:
    from .client.broker import connect
    from .message import Message

    module_name, _, class_name = type_name.rpartition(".")
    try:
        message_type = getattr(importlib.import_module(module_name), class_name)
        values: Any = json.loads(fields)
    except (ImportError, AttributeError, ValueError, RecursionError) as exc:
        print(f"ipcbus publish: {describe(exc)}", file=sys.stderr)
        return ExitCode.USAGE
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        print(f"ipcbus publish: {type_name} is not a Message type", file=sys.stderr)
        return ExitCode.USAGE
    if not isinstance(values, dict):
        print("ipcbus publish: --json must be a JSON object", file=sys.stderr)
        return ExitCode.USAGE
    try:
        message = message_type(**values)
    except Exception as exc:  # the class's own checks (__post_init__) too: the fields' fault
        print(f"ipcbus publish: {type_name}: {describe(exc)}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        with connect(address, connect_timeout=timeout) as broker:
            broker.publish(message)
            broker.flush(timeout)
    except HubUnavailableError:
        raise
    except PubSubError as exc:
        print(f"ipcbus publish: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"published {message!r}")
    return ExitCode.OK


def _plain(text: str) -> str:
    """Help text without reST markup."""
    return text.replace("``", "")


if __name__ == "__main__":
    sys.exit(main())
