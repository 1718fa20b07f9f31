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
import socket
import threading

import zmq

from ..config import HubOptions
from ..exceptions import HubAddressError
from ..wire.address import Address
from .relay import Relay

__all__ = ["check_address", "remove_socket_files", "remove_stale_socket_files", "serve_in_child"]

logger = logging.getLogger("ipcbus.hub")


def serve_in_child(
    address: str, options: HubOptions, conn: multiprocessing.connection.Connection
) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    relay = Relay(address, options)
    try:
        # The parent's end of the pipe closes when the parent dies: the hub then stops instead of
        # outliving the program (no leftover processes).
        relay.serve(
            stop.is_set,
            ready=lambda: conn.send(("ready", relay.pub_endpoint)),
            watch_fd=conn.fileno(),
        )
    except Exception as exc:
        logger.exception("hub at %s failed", address)
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
    finally:
        remove_socket_files(relay.address)


def check_address(text: str) -> Address:
    """Parse and check, before binding, an address the hub cannot or must not take."""
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
        if os.path.exists(address.path):
            if _answers(address.path):
                raise HubAddressError(f"another hub already serves {address}")
            os.unlink(address.path)  # a stale socket left by a hub that was killed
    return address


def remove_socket_files(address: Address) -> None:
    for path in address.socket_files():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_stale_socket_files(address: Address) -> None:
    """After a hub was killed: remove its socket files, but not one that answers (it belongs
    to a hub started here since). The key and groups files stay: a hub restarted here reuses
    them."""
    for path in address.socket_files():
        if not _answers(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
