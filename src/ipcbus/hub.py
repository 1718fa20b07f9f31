"""The hub: the process that relays messages between the brokers of a program's processes.

This module runs in the process that starts the hub; the hub itself runs ``ipcbus.server``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import types
import weakref
from collections.abc import Callable
from multiprocessing import util as mp_util
from typing import Any, Self

from .client.admin import request_statistics
from .client.queue_admin import MessageType, QueueAdminMixin, request_delete
from .config import HubOptions, hub_started, hub_stopped
from .exceptions import HubAddressError, HubUnavailableError
from .server.metrics import require_prometheus
from .server.process import check_address, remove_stale_socket_files, serve_in_child
from .server.relay import Relay
from .wire.address import Address
from .wire.statistics import HubStatistics

__all__ = ["Hub", "HubAddressError", "HubStatistics"]

logger = logging.getLogger(__name__)


# Hubs this process started and has not stopped: a child made with os.fork() must not treat
# them as its own (_forget_hubs_in_child).
_running: weakref.WeakSet[Hub] = weakref.WeakSet()


def _forget_hubs_in_child() -> None:
    """In a child made with ``os.fork()``: its copy of ``multiprocessing``'s list of children
    names the parent's hub processes, and at its exit ``multiprocessing`` terminates the daemonic
    ones it lists, the parent's hub included (found by an adversarial review: a forked child
    that returned normally stopped the bus). They are the parent's: forgotten here, and the
    child's copy of the hub's pipe end closed (the hub stops when its starter is gone, not when
    the starter's last forked child is)."""
    children = getattr(multiprocessing.process, "_children", None)
    for hub in list(_running):
        if children is not None and hub._process is not None:
            children.discard(hub._process)
        if hub._parent_end is not None:
            hub._parent_end.close()
            hub._parent_end = None
    _running.clear()


os.register_at_fork(after_in_child=_forget_hubs_in_child)


class Hub(QueueAdminMixin):
    """A hub process.

    ``Hub()`` serves at a private ``ipc://`` socket in a fresh 0700 directory (removed on stop);
    ``Hub("ipc:///path/to/socket")`` at a given one; ``Hub("tcp://host:0")`` at a port the
    system picks (``address`` then says which, once started). ``run()`` serves in the
    foreground until SIGINT/SIGTERM; ``start()`` serves in a child process (explicit
    ``start_method``, default ``"spawn"``: the hub needs nothing of its parent) and returns once
    it is ready; ``stop()`` ends it. As a context manager it starts and stops. Sockets are
    created inside the serving process; the hub never unpickles what it relays. The other
    keyword arguments are the fields of :class:`~ipcbus.config.HubOptions`, which documents
    them.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        start_method: str = "spawn",
        options: HubOptions | None = None,
        **overrides: Any,
    ) -> None:
        unknown = set(overrides) - set(HubOptions.names())
        if unknown:
            raise TypeError(f"Hub() got unexpected keyword arguments: {sorted(unknown)}")
        self.options = (options or HubOptions()).with_(**overrides)
        if self.options.metrics_port is not None:
            require_prometheus()  # MissingDependencyError here, not in the hub process
        self._address: str | None = address
        self._metrics_url: str | None = None
        self._private_dir: str | None = None
        self._start_method = start_method
        self._process: multiprocessing.process.BaseProcess | None = None
        self._parent_end: multiprocessing.connection.Connection | None = None
        self._owner = os.getpid()
        self._exported = False

    @property
    def address(self) -> str:
        """The address clients connect to (``IPCBUS_ADDRESS``)."""
        if self._address is None:
            self._private_dir = tempfile.mkdtemp(prefix="ipcbus-")  # mode 0700
            self._address = "ipc://" + os.path.join(self._private_dir, "hub")
        return self._address

    @property
    def metrics_url(self) -> str | None:
        """Where the running hub serves its Prometheus metrics (``metrics_port``), if it does."""
        return self._metrics_url

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve in this process until SIGINT or SIGTERM (then return normally).

        ``ready`` is called once the hub accepts connections."""
        address = check_address(self.address)
        stop = threading.Event()

        def on_signal(signum: int, frame: types.FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        relay = Relay(address, self.options)

        def serving() -> None:
            self._address = relay.endpoint  # tcp://host:0: the port the system picked
            self._metrics_url = relay.metrics_url
            if ready is not None:
                ready()

        try:
            relay.serve(stop.is_set, ready=serving)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._remove_private_dir()

    def start(self, timeout: float | None = 30.0) -> Self:
        """Serve in a child process; return once it accepts connections."""
        if self._process is not None:
            raise RuntimeError("hub already started")
        address = self.address
        check_address(address)
        context: Any = multiprocessing.get_context(self._start_method)
        parent_end, child_end = context.Pipe()
        # A forked hub inherits the parent's end of the pipe: it closes it, or it would never
        # see its parent die (spawn and forkserver children inherit nothing).
        inherited = (parent_end.fileno(),) if self._start_method == "fork" else ()
        process = context.Process(
            target=serve_in_child,
            args=(address, self.options, child_end, inherited),
            name="ipcbus-hub",
            daemon=True,
        )
        # Known as running before it runs: a fork in another thread meanwhile forgets it too.
        self._process, self._parent_end = process, parent_end
        _running.add(self)
        try:
            process.start()
        except BaseException:  # e.g. spawn from a module being imported by a spawned child
            self._process, self._parent_end = None, None
            _running.discard(self)
            parent_end.close()
            self._remove_private_dir()  # made for this hub: nothing else will remove it
            raise
        finally:
            child_end.close()
        try:
            if not parent_end.poll(timeout):
                raise HubUnavailableError(f"hub at {address} not ready within {timeout} s")
            status, detail = parent_end.recv()
        except (EOFError, OSError):
            status, detail = "error", f"hub process exited with code {process.exitcode}"
        if status != "ready":
            self.stop()
            if status == "address":
                raise HubAddressError(detail)
            raise HubUnavailableError(f"hub at {address} failed to start: {detail}")
        # tcp://host:0: the port the system picked.
        address, self._metrics_url = detail
        self._address = address
        hub_started(address)
        self._exported = True
        mp_util.Finalize(self, Hub._stop_at_exit, args=(weakref.ref(self),), exitpriority=5)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the hub process, then SIGKILL past ``timeout``; returns its exit code."""
        process, self._process = self._process, None
        _running.discard(self)
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
                # It died without cleaning up (killed): its socket files are stale.
                remove_stale_socket_files(Address.parse(self._address))
        if self._parent_end is not None:
            self._parent_end.close()
            self._parent_end = None
        if self._exported and os.getpid() == self._owner:
            self._exported = False
            hub_stopped(self.address)
        self._remove_private_dir()
        return exitcode

    def statistics(self, timeout: float = 5.0) -> HubStatistics:
        """Ask the running hub for its statistics."""
        return request_statistics(self.address, timeout)

    def delete_queue(
        self, message_type: MessageType, queue_name: str, *, timeout: float | None = 5.0
    ) -> int:
        """Delete a queue group without consumers and what it holds (how many messages), as
        ``HubBroker.delete_queue()`` does; ``QueueInUseError`` while it has consumers,
        ``UnknownQueueError`` for no such group."""
        return request_delete(self.address, message_type, queue_name, timeout=timeout)

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
    def _stop_at_exit(ref: weakref.ref[Hub]) -> None:
        hub = ref()
        if hub is not None:
            hub.stop()
