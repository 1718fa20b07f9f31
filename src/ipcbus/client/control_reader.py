"""What a client's I/O thread does with what the hub says on the control socket (worker
process): deliveries, group and FULL notices, answers, RESET and STOPPING, and WELCOME, from a
first hub, the same one after an outage, or a new one at the address (restarted, perhaps on
other data ports, with another spool). The I/O thread itself is ``io.py``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import zmq

from ..wire import protocol as wire
from .control import ControlChannel
from .data import DataChannel
from .outbox import Outbox
from .session import Session
from .spool import Spool
from .subscriptions import Subscriptions

__all__ = ["ControlReader"]

logger = logging.getLogger("ipcbus.client.io")

Socket = zmq.Socket[bytes]

_BURST = 256  # control messages read before the I/O thread polls again


class ControlReader:
    """The control-message handling of :class:`~ipcbus.client.io.IOThread`."""

    endpoint: str
    outbox: Outbox
    session: Session
    full_topics: frozenset[bytes]
    _client_id: bytes
    _control: ControlChannel
    _data: DataChannel
    _subscriptions: Subscriptions
    _dealer: Socket | None
    _sub: Socket | None
    _endpoints: tuple[str, str]
    _same_hub: bool
    _full_version: int
    _on_hub_state: Callable[[bool], None]
    _on_space: Callable[[], None]
    _on_delivery: Callable[[list[bytes]], None]

    def wake(self) -> None:
        raise NotImplementedError

    def _hub_lost(self, why: str) -> None:
        raise NotImplementedError

    def _read_control(self, control: Socket) -> None:
        for _ in range(_BURST):
            try:
                head, *body = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.session.heard()
            try:
                self._handle_control(wire.parse_kind(head), body)
            except (ValueError, IndexError) as exc:
                logger.error("ignored a malformed %r from the hub: %s", head[:8], exc)

    def _handle_control(self, kind: bytes, body: list[bytes]) -> None:
        if kind == wire.DELIVER:
            self._on_delivery(body)
        elif kind == wire.GROUPS:
            version, grouped = wire.parse_groups(body)
            self.outbox.grouped = grouped
            self._control.send(wire.groups_ack(version))
        elif kind == wire.FULL:
            version, topics = wire.parse_full(body)
            if version > self._full_version:
                self._full_version, self.full_topics = version, topics
                self._on_space()  # publishers waiting for a topic to open again
        elif kind == wire.DELETED:
            self._control.deleted(*wire.parse_deleted(body))
        elif kind == wire.DECLARED:
            self._control.declared(wire.parse_declared(body))
        elif kind == wire.CONSUMING:
            self._control.consuming(body[0])
        elif kind == wire.RESET:
            # The hub does not know us (it declared us gone, or it restarted): introduce
            # ourselves again (at most once per backoff), then our queue consumers.
            self._hub_lost("it does not know this client")
        elif kind == wire.STOPPING:
            self._hub_lost("it is stopping")
        elif kind == wire.LOSSY:
            self._subscriptions.check()  # count what the hub's sends without waiting cost us
        elif kind == wire.WELCOME:
            self._welcomed(wire.Welcome.parse(body))

    def _welcomed(self, welcome: wire.Welcome) -> None:
        self._follow(welcome)
        reconnected = self._welcome(welcome)
        if reconnected and self._subscriptions.live_topics:
            self._subscriptions.resync(self.session.resynced, self._same_hub)
        self._control.restore_consumers()
        with self._data.lock:
            self.outbox.resend_flushes()
        self.wake()

    def _follow(self, welcome: wire.Welcome) -> None:
        """A hub restarted on tcp binds its data and fan-out sockets on new ports: leave the
        old ones (ZeroMQ would retry them forever) and connect to the new. A SUB socket's
        subscriptions go to its new connection by themselves."""
        endpoints = (welcome.publish_endpoint, welcome.fanout_endpoint)
        if endpoints == self._endpoints:
            return
        # Publishers use the DEALER too, the dispatcher the SUB socket: each under its lock.
        locks = (self._data.lock, self._subscriptions.lock)
        for sock, lock, old, new in zip(
            (self._dealer, self._sub), locks, self._endpoints, endpoints, strict=True
        ):
            assert sock is not None
            if old != new:
                with lock:
                    with contextlib.suppress(zmq.ZMQError):
                        sock.disconnect(old)
                    sock.connect(new)
        self._subscriptions.wake_reader()  # the socket was used: let the dispatcher look
        logger.info("the hub at %s moved its data sockets to %s", self.endpoint, endpoints)
        self._endpoints = endpoints

    def _use_spool(self, welcome: wire.Welcome) -> None:
        """A hub with another spool directory (or none): leave the old one, register every
        live topic in the new one (server.spool, client.spool)."""
        old = self.outbox.spool
        if old is not None:
            old.close()
        spool = Spool.open(
            welcome.spool_dir,
            welcome.max_message_size,
            self._client_id.decode(),
            self.outbox.spool_counts,  # kept across hubs
        )
        with self._subscriptions.lock:
            if spool is not None:
                for topic in self._subscriptions.live_topics:
                    spool.register(topic)
            self.outbox.spool = self._subscriptions.spool = spool

    def _welcome(self, welcome: wire.Welcome) -> bool:
        resync = bool(self._subscriptions.live_topics)
        was_available = self.session.available
        same_hub = welcome.hub_id == self.session.hub_id  # the one before this WELCOME
        with self._data.lock:  # a publisher sending at once sees the hub back and resyncing
            reconnected = self.session.welcome(welcome, resync)
            if reconnected and not same_hub:
                # The dead hub's unconfirmed: again, or in doubt. In the same hold of the lock:
                # released in between, a quiet publisher could send to the new hub, and its
                # message was taken for one the dead hub took (in doubt, or sent twice).
                self.outbox.confirm.replaced()
        self.outbox.set_limit(welcome.max_message_size)
        if welcome.spool_dir != (self.outbox.spool.path if self.outbox.spool else ""):
            self._use_spool(welcome)
        if not was_available:
            self._on_hub_state(True)
        self._same_hub = same_hub
        # Whatever an earlier hub held back, this one says again in a FULL of its own.
        if self.full_topics:
            self.full_topics = frozenset()
            self._on_space()
        self._full_version = 0
        # Kept across hubs: after a restart, consumers re-register one by one, and a publisher
        # that forgot a topic is grouped would send it unsplit meanwhile (unusable for groups).
        self.outbox.grouped = self.outbox.grouped | frozenset(welcome.grouped_topics)
        return reconnected
