"""The hub process's entry point, and what is done to its address before and after it serves.

``serve_in_child`` is the target of the process ``Hub.start()`` creates: only this module (and
what it imports: the server side and the wire) is loaded there, not the client or cloudpickle.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import signal
import threading

import zmq

from ..config import HubOptions
from ..exceptions import HubAddressError, InsecurePathError
from ..wire.address import Address
from .claim import remove_stale_socket_files
from .relay import Relay

__all__ = ["check_address", "remove_stale_socket_files", "serve_in_child"]

logger = logging.getLogger("ipcbus.hub")


def serve_in_child(
    address: str,
    options: HubOptions,
    conn: multiprocessing.connection.Connection,
    inherited: tuple[int, ...] = (),
) -> None:
    """The hub process: serve until SIGTERM/SIGINT or until the parent's end of ``conn`` closes.

    ``inherited``: descriptors a forked child got from its parent and must close, first of all
    the parent's end of the pipe (holding it, the hub would never see the parent die)."""
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    relay = Relay(address, options)
    try:
        # The parent's end of the pipe closes when the parent dies: the hub then stops instead of
        # outliving the program (no leftover processes).
        relay.serve(
            stop.is_set,
            # The address it serves at (tcp://host:0 became a port the system picked) and where
            # its metrics are, if anywhere.
            ready=lambda: conn.send(("ready", (relay.endpoint, relay.metrics_url))),
            watch_fd=conn.fileno(),
        )
    except HubAddressError as exc:
        logger.error("%s", exc)
        with contextlib.suppress(OSError):
            conn.send(("address", str(exc)))
        raise SystemExit(1) from exc
    except Exception as exc:
        logger.exception("hub at %s failed", address)
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc


def check_address(text: str) -> Address:
    """Parse and check, before starting a hub process, an address the hub cannot or must not
    take (the serving process checks again, holding the address's lock)."""
    try:
        address = Address.parse(text)
    except ValueError as exc:
        raise HubAddressError(str(exc)) from None
    if address.is_ipc:
        longest = max(address.socket_files(), key=len)
        if len(longest) > zmq.IPC_PATH_MAX_LEN:
            raise HubAddressError(
                f"ipc path {longest!r} is {len(longest)} bytes; this system allows "
                f"{zmq.IPC_PATH_MAX_LEN} (zmq.IPC_PATH_MAX_LEN): use a shorter directory"
            )
    try:
        address.check_home()
    except InsecurePathError as exc:
        raise HubAddressError(f"cannot serve at {address}: {exc}") from exc
    return address
