"""``ipcbus`` command line: ``ipcbus hub`` serves a hub, ``ipcbus stats`` asks one for its numbers.

Exit codes are named (dramatiq's habit) so scripts can tell failures apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from enum import IntEnum

from .client.admin import request_statistics
from .config import ENV_ADDRESS, HubOptions, address_from_env
from .exceptions import HubAddressError, HubUnavailableError
from .hub import Hub

__all__ = ["ExitCode", "main"]


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2  # argparse's own code for bad arguments
    ADDRESS = 3  # the address is malformed, too long or already served
    UNAVAILABLE = 4  # no hub answered


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipcbus", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    hub = commands.add_parser("hub", help="serve a hub in the foreground until SIGINT/SIGTERM")
    hub.add_argument("--address", help="ipc://PATH to serve at (default: a private directory)")
    hub.add_argument("--hwm", type=int, default=HubOptions.hwm, help="high-water mark, in batches")
    stats = commands.add_parser("stats", help="print a running hub's statistics")
    stats.add_argument("--address", help=f"the hub's address (default: ${ENV_ADDRESS})")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "hub":
        return _serve(args.address, args.hwm)
    return _stats(args.address or address_from_env(), args.json, args.timeout)


def _serve(address: str | None, hwm: int) -> int:
    hub = Hub(address, hwm=hwm)

    def announce() -> None:
        # Printed once the hub accepts connections (its key file exists). First line: the
        # address alone, for scripts (`read -r ADDRESS < <(ipcbus hub)`).
        print(hub.address, flush=True)
        print(f"export {ENV_ADDRESS}={hub.address}", flush=True)

    try:
        hub.run(ready=announce)
    except HubAddressError as exc:
        logging.getLogger("ipcbus").error("%s", exc)
        return ExitCode.ADDRESS
    logging.getLogger("ipcbus").info("hub at %s stopped", hub.address)
    return ExitCode.OK


def _stats(address: str | None, as_json: bool, timeout: float) -> int:
    if address is None:
        print(f"ipcbus stats: no address: pass --address or set {ENV_ADDRESS}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        statistics = request_statistics(address, timeout)
    except HubUnavailableError as exc:
        print(f"ipcbus stats: {exc}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    if as_json:
        print(statistics.to_json())
        return ExitCode.OK
    for name, value in vars(statistics).items():
        if isinstance(value, dict):
            continue
        shown = f"{value:.1f}" if isinstance(value, float) else value
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
    if statistics.unrouted:
        print("\npublished with no subscriber and no queue group")
        for name, count in sorted(statistics.unrouted.items()):
            print(f"  {name:40} {count}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
