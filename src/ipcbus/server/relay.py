"""The hub's serving loop (hub process): binds its sockets, authenticates every peer, reads
requests and hands them to the fan-out and the control plane. Never unpickles.

Publishes arrive on a ROUTER socket (one DEALER per client keeps each publisher's order and pushes
back instead of dropping); fan-out is an XPUB socket (see ``fanout``). Python runs per *batch*
here, never per subscriber per message.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import zmq
from zmq.backend import zmq_poll as _zmq_poll

from ..config import HubOptions
from ..exceptions import HubAddressError, HubUnavailableError, InsecurePathError
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import load_or_create_secret
from ..wire.sockets import readable, recv_frames
from .binding import (
    answer_zap,
    bind_sockets,
    read_monitor,
    restrict_ipc_files,
    serve_metrics,
    watch_handshakes,
    with_picked_port,
)
from .claim import AddressClaim
from .control import ControlPlane
from .data_path import DataPath
from .fanout import Fanout
from .journal import Journal
from .metrics import HubMetrics
from .preauth import PendingHandshakes, raise_fd_limit
from .quiet_sockets import QuietSockets
from .relay_statistics import RelayStatistics
from .sending import send_reply
from .spool import HubSpool

__all__ = ["Relay"]

logger = logging.getLogger(__name__)

# How many inputs one loop turn handles before it polls again (keeps subscriptions responsive).
_BURST = 256
_IDLE_POLL_MS = 100
# XPUB_NODROP gives no POLLOUT event for a full pipe: a stalled send is retried on this period.
_STALLED_POLL_MS = 1
# A failure of the loop's own file-system work is logged at most this often.
_FS_ERROR_LOG_PERIOD = 10.0

Socket = zmq.Socket[bytes]


class Relay(RelayStatistics):
    """Binds the hub's sockets and relays until ``should_stop()`` or the watched fd closes."""

    def __init__(
        self,
        address: str | Address,
        options: HubOptions | None = None,
        *,
        max_frames: int = wire.MAX_FRAMES,
    ) -> None:
        self.address = Address.parse(address)
        self.endpoint = str(self.address)
        self.options = options = options or HubOptions()
        self.in_endpoint, self.pub_endpoint = self.address.data_endpoints(
            options.tcp_publish_port, options.tcp_fanout_port
        )
        self._max_frames = max_frames
        self._hub_id = os.urandom(8).hex().encode()
        self._started = time.monotonic()
        self.control_plane = ControlPlane(
            self._hub_id,
            heartbeat_interval=options.heartbeat_interval,
            heartbeat_timeout=options.heartbeat_timeout,
            max_held=options.max_held,
            max_held_bytes=options.max_held_bytes,
            max_message_size=options.max_message_size,
            max_dead_letters=options.max_dead_letters,
            max_dead_letter_bytes=options.max_dead_letter_bytes,
        )
        self._malformed = self._auth_rejected = 0
        self._fs_errors = self._fs_errors_logged = 0
        self._fs_error_logged_at = -_FS_ERROR_LOG_PERIOD
        self._accept_after = 0.0
        self._pending: dict[Socket, PendingHandshakes] = {}
        self._data_path = DataPath(self.control_plane.book)
        self._control_monitor: Socket | None = None
        self.metrics: HubMetrics | None = None
        self.journal: Journal | None = None
        self.spool: HubSpool | None = None

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics is not None else None

    @property
    def endpoints(self) -> tuple[str, str, str]:
        return self.endpoint, self.in_endpoint, self.pub_endpoint

    def serve(
        self,
        should_stop: Callable[[], bool],
        ready: Callable[[], None] | None = None,
        watch_fd: int | None = None,
    ) -> None:
        """Relay until ``should_stop()`` is true or ``watch_fd`` (the parent's pipe) hangs up."""
        options = self.options
        if self.address.picks_port:
            self._pick_port()
        claim = AddressClaim(self.address)
        claim.acquire()  # HubAddressError: another hub serves here, or the directory is unsafe
        context = zmq.Context()
        sockets: list[Socket] = []
        try:
            restarted = os.path.exists(self.address.key_file)
            try:
                secret = load_or_create_secret(self.address)
            except (InsecurePathError, HubUnavailableError) as exc:
                raise HubAddressError(f"cannot serve at {self.address}: {exc}") from exc
            self.control_plane.restore_groups(self.address.hub_file(".groups"))
            if options.journal is not None:  # JournalError: unsafe or in use
                self.journal = Journal.open_for(options, self.control_plane.book)
            if options.spool is not None and self.address.is_ipc:  # same machine: files do
                self.spool = HubSpool.create(
                    options.spool, self._hub_id.decode(), options.spool_linger
                )
                if self.spool is not None:
                    self.control_plane.spool_dir = self.spool.path
            if restarted:
                # A previous hub served here: give its clients restart_grace s to reconnect
                # their SUB sockets before the backlog their publishers held is relayed.
                self._accept_after = time.monotonic() + options.restart_grace
            zap, control, data, xpub = bind_sockets(
                context,
                sockets,
                options,
                secret,
                (self.endpoint, self.in_endpoint, self.pub_endpoint),
            )
            self.in_endpoint = data.getsockopt_string(zmq.LAST_ENDPOINT)
            self.pub_endpoint = xpub.getsockopt_string(zmq.LAST_ENDPOINT)
            claim.bound()
            restrict_ipc_files(*self.endpoints)
            self._data_path.fanout = Fanout(xpub, options.stall_timeout)
            self._data_path.journal = self.journal
            if self.journal is not None:  # broadcast counts go on across a crash
                self.journal.count_for(self._data_path.fanout)
            monitors = watch_handshakes(
                (control, data, xpub), self.address.is_tcp, options, self._pending
            )
            sockets += monitors
            self._control_monitor = monitors[0]
            if self.address.is_tcp:
                before, after = raise_fd_limit()
                logger.info("open files: soft limit raised from %d to %d", before, after)
            if options.metrics_port is not None:
                self.metrics = serve_metrics(options.metrics_host, options.metrics_port)
            if ready is not None:
                ready()
            self._loop(zap, secret, monitors, control, data, xpub, should_stop, watch_fd)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.journal is not None:
                self.journal.close()
            if self.spool is not None:
                self.spool.close()
            for server_socket in sockets:
                server_socket.close(linger=0)
            context.term()
            claim.release()

    def _pick_port(self) -> None:
        self.address = with_picked_port(self.address)
        self.endpoint = str(self.address)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(
        self,
        zap: Socket,
        secret: bytes,
        monitors: list[Socket],
        control: Socket,
        data: Socket,
        xpub: Socket,
        should_stop: Callable[[], bool],
        watch_fd: int | None,
    ) -> None:
        fanout = self._fanout
        assert fanout is not None
        full = zmq.Poller()
        stalled = zmq.Poller()
        quiet = QuietSockets((zap, *monitors))
        for poller in (full, stalled):
            quiet.register(poller)
            poller.register(control, zmq.POLLIN)
            poller.register(xpub, zmq.POLLIN)
            if watch_fd is not None:
                poller.register(watch_fd, zmq.POLLIN)
        full.register(data, zmq.POLLIN)
        book = self.control_plane.book
        drain_until: float | None = None
        metrics = self.metrics
        # When the control plane next has timed work (heartbeats, retries, probes): a turn that
        # only relayed broadcast batches changed nothing of its state, and skips it until then
        # (~10 us of the hub's ~125 per relayed batch, measured).
        tick_due = 0.0
        data_path = self._data_path
        on_data = functools.partial(data_path.handle, data)
        on_control = functools.partial(self._handle_control, control)
        while True:
            if metrics is not None and metrics.wanted:
                metrics.offer(self.statistics())
            if drain_until is None and should_stop():
                # Graceful stop: take no new publishes or deliveries; give consumers up to
                # drain_timeout to finish (ack) what they hold; then tell every client.
                drain_until = time.monotonic() + self.options.drain_timeout
                self.control_plane.draining = True
                tick_due = 0.0
                logger.info("stopping: draining %d queue deliveries", book.in_flight)
            if drain_until is not None and (book.in_flight == 0 or time.monotonic() >= drain_until):
                self.control_plane.announce_stop(control)
                return
            # Not accepting publishes while a send is stalled (a full subscriber pipe), the hub
            # drains or waits out its restart grace: publishers feel backpressure, nothing is
            # dropped. Only a stalled send needs the fast retry (XPUB_NODROP gives no POLLOUT);
            # the others wake on control traffic or a deadline. A full queue group is not among
            # them: its topic alone is held back, by its publishers (QueueBook.update_full).
            now = time.monotonic()
            in_grace = now < self._accept_after
            retrying = fanout.retrying
            accepting = drain_until is None and not in_grace
            poller = full if accepting and not retrying else stalled
            if retrying:
                timeout = _STALLED_POLL_MS
            else:
                timeout = max(0, min(_IDLE_POLL_MS, int((tick_due - now) * 1000) + 1))
                if in_grace:
                    timeout = min(timeout, int((self._accept_after - now) * 1000) + 1)
            if quiet.pending:
                timeout = 0
            events = dict(_zmq_poll(poller.sockets, timeout))  # Poller.poll, without its wrapper
            if watch_fd is not None and watch_fd in events:
                logger.info("the process that started the hub is gone: stopping")
                return
            for sock in quiet.ready(events):
                if sock is zap:
                    self._authenticate(zap, secret)
                else:
                    self._count_failed_handshakes(sock)
                quiet.read(sock)
            if xpub in events:
                fanout.read_subscriptions()
            if control in events:
                self._read(control, on_control)
            lossy_ended = fanout.lossy_ended()
            if lossy_ended:
                self.control_plane.announce_lossy()
            data_path.grouped = False
            if fanout.retry() and accepting and (data in events or poller is stalled):
                self._read(data, on_data, True, data in events)
            # Anything but a relayed broadcast batch may have given the control plane work: a
            # queue group's batch, an ack, a client come or gone, a notice to send.
            if (
                data_path.grouped
                or lossy_ended
                or len(events) > (data in events)
                or quiet.pending
                or time.monotonic() >= tick_due
            ):
                self.control_plane.tick(control)
                tick_due = time.monotonic() + self.control_plane.timeout_ms(_IDLE_POLL_MS) / 1000
            # The turn's file-system work. An OSError there (out of descriptors: EMFILE, a
            # file system gone) is logged and tried again later: it must not end the hub.
            try:
                if self.journal is not None:
                    self.journal.end_of_turn(book)  # group commit, then the flushes held back
                if self.spool is not None:
                    self.spool.sweep()  # files older than spool_linger (once a period)
            except OSError as exc:
                self._file_system_failed(exc)

    def _file_system_failed(self, exc: OSError) -> None:
        self._fs_errors += 1
        now = time.monotonic()
        if now - self._fs_error_logged_at < _FS_ERROR_LOG_PERIOD:
            return
        logger.error(
            "the journal or spool work of a turn failed, the hub serves on: %s (%d failures "
            "since the last report)",
            exc,
            self._fs_errors - self._fs_errors_logged,
        )
        self._fs_error_logged_at = now
        self._fs_errors_logged = self._fs_errors

    def _authenticate(self, zap: Socket, secret: bytes) -> None:
        self._auth_rejected += answer_zap(zap, secret)

    def _count_failed_handshakes(self, monitor: Socket) -> None:
        on_disconnect = self.control_plane.probe_soon if monitor is self._control_monitor else None
        self._auth_rejected += read_monitor(monitor, self._pending.get(monitor), on_disconnect)

    def _read(
        self,
        router: Socket,
        handle: Callable[[list[zmq.Frame]], None],
        stop_when_stalled: bool = False,
        polled: bool = True,
    ) -> None:
        """Read and ``handle`` requests, up to a burst. ``polled``: the poll just said there is
        one (no other use of the socket since), so the first needs no look."""
        fanout = self._fanout
        assert fanout is not None
        for _ in range(_BURST):
            journal_done = self.journal is not None and self.journal.turn_done
            if stop_when_stalled and (fanout.stalled is not None or journal_done):
                return
            # Looking first costs a zmq_poll; a receive that finds nothing raises zmq.Again
            # (~3x that), which ended every read.
            if not polled and not readable(router):
                return
            polled = False
            frames = recv_frames(router)
            try:
                if not 2 <= len(frames) <= self._max_frames:
                    raise ValueError(f"{len(frames)} frames")
                handle(frames)
            except (ValueError, IndexError) as exc:
                # Malformed input is counted and dropped; the hub keeps serving
                # (docs/security.md).
                self._malformed += 1
                logger.debug("dropped malformed request: %s", exc)
            except Exception:
                # A bug of ours that one request triggers must not stop the hub for everyone.
                self._malformed += 1
                logger.exception("dropped a request the hub could not handle")

    def _handle_control(self, control: Socket, frames: list[zmq.Frame]) -> None:
        if wire.parse_kind(frames[1].bytes) == wire.STATS:
            statistics = self.statistics().to_json().encode()
            send_reply(control, [frames[0].bytes, wire.header(wire.STATS), statistics])
        else:
            self.control_plane.handle(control, frames, (self.in_endpoint, self.pub_endpoint))
