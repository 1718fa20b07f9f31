"""The hub: the process that relays messages between the proxies of a program's processes."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import types
from collections.abc import Callable
from multiprocessing import util as mp_util
from typing import Any, Self

import zmq

from . import _wire
from ._config import export_address
from ._keys import key_path_for, prove, read_secret
from ._relay import HubStatistics, Relay
from .exceptions import HubUnavailableError, PubSubError

__all__ = ["Hub", "HubAddressError", "HubStatistics"]

logger = logging.getLogger(__name__)


class HubAddressError(PubSubError, ValueError):
    """The hub cannot serve at this address: malformed, too long, or already served."""


class Hub:
    """A hub process.

    ``Hub()`` serves at a private ``ipc://`` socket in a fresh 0700 directory (removed on stop);
    ``Hub("ipc:///path/to/socket")`` at a given one. ``run()`` serves in the foreground until
    SIGINT/SIGTERM; ``start()`` serves in a child process (explicit ``start_method``, default
    ``"spawn"``: the hub needs nothing of its parent) and returns once it is ready; ``stop()``
    ends it. As a context manager it starts and stops. Sockets are created inside the serving
    process; the hub never unpickles what it relays.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        start_method: str = "spawn",
        hwm: int = 1000,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        max_held: int = 100_000,
        max_message_size: int = 256 * 1024 * 1024,
        handshake_timeout: float = 5.0,
        drain_timeout: float = 5.0,
        stall_timeout: float = 30.0,
        restart_grace: float = 1.0,
    ) -> None:
        self._requested = address
        self._address: str | None = address
        self._private_dir: str | None = None
        self._start_method = start_method
        # Relay options: `hwm` bounds each socket pipe (in batches); a client silent for
        # `heartbeat_timeout` s is declared gone (its queue deliveries go to others); a queue
        # group holds at most `max_held` messages before publishers feel backpressure; a peer
        # sending a message part over `max_message_size` bytes, or not finishing its handshake
        # within `handshake_timeout` s, is disconnected; on SIGTERM consumers get
        # `drain_timeout` s to ack what they hold; a subscriber that accepts nothing for
        # `stall_timeout` s stops holding the bus (the hub drops for it; it learns of the gap);
        # a hub restarted at an address (its key file exists) relays nothing for
        # `restart_grace` s, so the previous hub's subscribers are back first.
        self._options: dict[str, Any] = {
            "hwm": hwm,
            "heartbeat_interval": heartbeat_interval,
            "heartbeat_timeout": heartbeat_timeout,
            "max_held": max_held,
            "max_message_size": max_message_size,
            "handshake_timeout": handshake_timeout,
            "drain_timeout": drain_timeout,
            "stall_timeout": stall_timeout,
            "restart_grace": restart_grace,
        }
        self._process: multiprocessing.process.BaseProcess | None = None
        self._parent_end: multiprocessing.connection.Connection | None = None
        self._owner = os.getpid()

    @property
    def address(self) -> str:
        """The address proxies connect to (``IPCBUS_ADDRESS``)."""
        if self._address is None:
            self._private_dir = tempfile.mkdtemp(prefix="ipcbus-")  # mode 0700
            self._address = "ipc://" + os.path.join(self._private_dir, "hub")
        return self._address

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve in this process until SIGINT or SIGTERM (then return normally).

        ``ready`` is called once the hub accepts connections."""
        address = self.address
        _check_address(address)
        stop = threading.Event()

        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        relay = Relay(address, **self._options)
        try:
            relay.serve(stop.is_set, ready=ready)
        finally:
            _remove_ipc_files(*relay.endpoints)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._remove_private_dir()

    def start(self, timeout: float | None = 30.0) -> Self:
        """Serve in a child process; return once it accepts connections."""
        if self._process is not None:
            raise RuntimeError("hub already started")
        address = self.address
        _check_address(address)
        context: Any = multiprocessing.get_context(self._start_method)
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_serve_in_child,
            args=(address, self._options, child_end),
            name="ipcbus-hub",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._process, self._parent_end = process, parent_end
        try:
            if not parent_end.poll(timeout):
                raise HubUnavailableError(f"hub at {address} not ready within {timeout} s")
            status, detail = parent_end.recv()
        except (EOFError, OSError):
            status, detail = "error", f"hub process exited with code {process.exitcode}"
        if status != "ready":
            self.stop()
            raise HubUnavailableError(f"hub at {address} failed to start: {detail}")
        export_address(address)
        mp_util.Finalize(self, Hub._stop_at_exit, args=(_WeakHub(self),), exitpriority=5)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the hub process, then SIGKILL past ``timeout``; returns its exit code."""
        process, self._process = self._process, None
        exitcode = None
        if process is not None and os.getpid() == self._owner:
            process.terminate()
            process.join(timeout)
            if process.is_alive():
                logger.warning("hub %s ignored SIGTERM for %s s: killing it", process.pid, timeout)
                process.kill()
                process.join(timeout)
            exitcode = process.exitcode
            process.close()
            if exitcode != 0 and self._address is not None:
                # It died without cleaning up (killed): its socket files are stale. (The key
                # and groups files stay: a hub restarted here reuses them.) A socket that
                # answers belongs to a hub started here since, and is left alone.
                stale = [self._address, *_wire.data_endpoints_for(self._address)]
                _remove_ipc_files(*(e for e in stale if not _ipc_endpoint_answers(e)))
        if self._parent_end is not None:
            self._parent_end.close()
            self._parent_end = None
        self._remove_private_dir()
        return exitcode

    def statistics(self, timeout: float = 5.0) -> HubStatistics:
        """Ask the running hub for its statistics."""
        return request_statistics(self.address, timeout)

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Hub {self._address} pid={self.pid}>"

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None and os.getpid() == self._owner:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    @staticmethod
    def _stop_at_exit(ref: _WeakHub) -> None:
        hub = ref.get()
        if hub is not None:
            hub.stop()


class _WeakHub:
    """A weak reference that the exit finalizer can hold without keeping the Hub alive."""

    def __init__(self, hub: Hub) -> None:
        import weakref

        self.get = weakref.ref(hub)


def _serve_in_child(
    address: str, options: dict[str, Any], conn: multiprocessing.connection.Connection
) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    relay = Relay(address, **options)
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
        _remove_ipc_files(*relay.endpoints)


def _check_address(address: str) -> None:
    """Fail clearly, before binding, on an address the hub cannot or must not take."""
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        longest = max(_wire.data_endpoints_for(address), key=len)[len("ipc://") :]
        if len(longest) > zmq.IPC_PATH_MAX_LEN:
            raise HubAddressError(
                f"ipc path {longest!r} is {len(longest)} bytes; this system allows "
                f"{zmq.IPC_PATH_MAX_LEN} (zmq.IPC_PATH_MAX_LEN): use a shorter directory"
            )
        if os.path.exists(path):
            if _ipc_path_answers(path):
                raise HubAddressError(f"another hub already serves {address}")
            os.unlink(path)  # a stale socket left by a hub that was killed
    elif address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit():
            raise HubAddressError(f"a tcp address needs a host and a port: {address!r}")
    else:
        raise HubAddressError(f"unsupported address {address!r}: use ipc:// or tcp://")


def _ipc_endpoint_answers(endpoint: str) -> bool:
    return endpoint.startswith("ipc://") and _ipc_path_answers(endpoint[len("ipc://") :])


def _ipc_path_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _remove_ipc_files(*endpoints: str) -> None:
    for endpoint in endpoints:
        if endpoint.startswith("ipc://"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint[len("ipc://") :])


def request_statistics(address: str, timeout: float = 5.0) -> HubStatistics:
    """One STATS round trip to the hub at ``address``."""
    try:
        secret = read_secret(key_path_for(address))
    except HubUnavailableError as exc:
        raise HubUnavailableError(f"no hub answered at {address}: {exc}") from exc
    context = zmq.Context()
    dealer: zmq.Socket[Any] = context.socket(zmq.DEALER)
    try:
        dealer.linger = 0
        prove(dealer, address, secret)
        dealer.connect(address)
        dealer.send_multipart([_wire.header(_wire.STATS)])
        if not dealer.poll(int(timeout * 1000)):
            raise HubUnavailableError(f"no hub answered at {address} within {timeout} s")
        head, body = dealer.recv_multipart()
        if head != _wire.header(_wire.STATS):
            raise HubUnavailableError(f"unexpected answer from {address}: {head!r}")
        return HubStatistics.from_json(body)
    finally:
        dealer.close(linger=0)
        context.term()
