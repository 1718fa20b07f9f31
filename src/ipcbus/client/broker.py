"""HubBroker: this process's broker connected to a hub, and ``connect()`` (client side)."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any

from ..config import ClientOptions, address_from_env, export_address
from ..core.contract import Subscription, close_at_exit
from ..core.failures import describe
from ..exceptions import (
    BrokerFailedError,
    HubUnavailableError,
    RequestTimeoutError,
)
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import read_bus_secret
from .closing import Closing
from .dispatch import Dispatcher
from .gate import PublishGate
from .io import IOThread
from .notify import StateNotifier
from .outbox import Kind
from .queue_admin import QueueAdminMixin
from .rejections import Rejections
from .replies import HubReply, ReplyRoute
from .runner import QueueRunner
from .spool import SpoolStatistics
from .threads import runs_handlers

if TYPE_CHECKING:
    from ..nats.broker import NatsBroker

__all__ = ["HubBroker", "connect"]


class HubBroker(QueueAdminMixin, Closing):
    """A proxy to the hub at ``address``: publish and subscribe across processes.

    - ``publish()`` is thread-safe and returns once the message is queued in this process; one I/O
      thread batches and sends it. The first message of each type is serialised in the caller, so
      an unserialisable type raises ``MessageSerializationError`` there, and one that alone is
      over the hub's ``max_message_size`` raises ``MessageTooLargeError``. When ``max_pending``
      messages wait (the hub or a subscriber is slow), ``publish()`` blocks; past ``timeout`` (per
      call, else ``publish_timeout``) it raises ``PublishTimeoutError``. The same wait, before
      the message is queued, for a type whose queue group the hub reports full (see
      ``HubOptions.max_held``): only that type waits, and a publisher's order is kept. Except in
      a handler: ``publish()`` from a thread that runs handlers never blocks on ``max_pending``
      (see ``ClientOptions``).
    - ``delete_queue()`` deletes an abandoned queue group at the hub, and what it holds;
      ``queues()``, ``dead_letters()``, ``requeue()`` and ``purge()`` look after the hub's groups
      (``QueueAdminMixin``: one round trip each, on a connection of their own).
    - A later message that cannot go (unserialisable, or over the limit) is rejected alone on the
      I/O thread (batches are serialised in one go): logged at ERROR with its type and position
      (how many messages ``publish()`` had accepted before it), counted in ``rejected``, and
      named by the next ``flush()``'s ``MessageSerializationError``. No ``publish()`` raises for
      it; every other message is sent.
    - ``subscribe()`` returns once the hub has the subscription live: every message published
      afterwards, by any process, reaches it. Handlers run on one dispatcher thread, in order.
      Whatever a handler raises, ``BaseException`` included, is logged (queue groups: retried,
      then dead-lettered); it never ends an ipcbus thread.
    - A message this process cannot decode (it holds an instance of a class this process cannot
      import) is dropped alone, counted in ``undecodable`` and logged with its type.
    - ``flush(timeout)`` waits until the hub has accepted everything published before it.
    - A hub that restarts is waited for: publishes are held (up to ``max_pending``), then
      delivered. Past ``hub_lost_timeout`` of absence, ``hub_available`` is false, and
      ``publish()``, ``flush()`` and ``subscribe()`` raise ``HubUnavailableError`` at once until
      a hub is back; ``on_hub_state`` is told both.
    - ``close()`` flushes for at most ``linger`` seconds, then closes; interpreter exit (also of a
      ``multiprocessing`` child) closes open brokers. What it could not deliver (no hub confirmed
      it) is logged at ERROR and counted in ``undelivered``. ``close()`` works from inside a
      handler too: it returns without waiting for that handler, whose queue delivery then goes
      back to the hub (another consumer gets it: at least once), and broadcast messages that
      arrive after it are not handled.
    - If an ipcbus thread dies anyway (a bug), the broker fails loudly: CRITICAL log, its queue
      deliveries go back to the hub, and ``publish()`` / ``flush()`` raise ``BrokerFailedError``
      naming the thread.
    - A broker belongs to the process that created it. In a forked child it refuses use
      (``BrokerClosedError``) and never touches the parent's sockets;
      ``get_message_broker()`` there connects a new one to the same hub.
    """

    def __init__(
        self,
        address: str,
        *,
        options: ClientOptions | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        unknown = set(overrides) - set(ClientOptions.names())
        if unknown:
            raise TypeError(f"HubBroker() got unexpected keyword arguments: {sorted(unknown)}")
        self.options = options = (options or ClientOptions()).with_(**overrides)
        try:
            parsed = Address.parse(address)
        except ValueError as exc:
            raise HubUnavailableError(f"cannot connect to {address}: {exc}") from exc
        self.address = address
        self._owner = os.getpid()
        self._deferred_error: BaseException | None = None  # the I/O thread failed
        self._rejections = Rejections(f"HubBroker {address} pid={self._owner}")
        self.undelivered = 0  # set by close(): accepted messages no hub confirmed
        self._subs_lock = threading.Lock()
        self._live: dict[str, threading.Event] = {}
        self._flush_ids = iter(range(1, 2**62))
        self._queue_ids = iter(range(1, 2**62))
        self._request_ids = iter(range(1, 2**62))
        self._queue_subscriptions: dict[bytes, Subscription] = {}
        self._failed: str | None = None  # what died, once a thread of ours did
        # True while close() lets the deliveries in hand finish: their handlers may still publish
        # (a job's result), and close() flushes what they did.
        self._finishing = False
        self._failure_cause: BaseException | None = None
        self._runner = QueueRunner(
            self._queue_subscriptions.get,
            self._ack,
            self.publish,
            self._thread_died,
            reply_to=self._reply_to,
        )
        secret = _wait_for_secret(parsed, options.connect_timeout)
        self._notifier = StateNotifier(options.on_hub_state, self._hub_state_changed)
        self._dispatcher = Dispatcher(options.dispatch_queue, self._thread_died, self._reply_to)
        client_id = os.urandom(8).hex().encode()
        self._replies = ReplyRoute(client_id, self._requests)
        self._io = IOThread(
            parsed,
            self._replies.deliver(self._dispatcher.put),
            client_id=client_id,
            secret=secret,
            hwm=options.hwm,
            max_batch=options.max_batch,
            max_unconfirmed=options.max_pending,
            on_space=self._space_freed,
            on_error=self._record_error,
            on_delivery=self._runner.submit,
            on_reject=self._rejections.add,
            on_hub_state=self._notifier.notify,
            hub_lost_timeout=options.hub_lost_timeout,
            on_death=self._thread_died,
        )
        self._dispatcher.read_from(self._io.fanout)  # an idle dispatcher reads the SUB socket
        self._session = self._io.session
        self._replies.attach(self._io)
        self._replies.on_subscribe = self._dispatcher.expect_replies(self._replies.take)
        self._gate = PublishGate(self._io, self._stopped)
        self._kinds = self._io.outbox.kinds  # the types publish() checked (weak)
        # The type of the last message published, weakly: the hot path's check (31 ns, as the
        # set it replaces; a WeakKeyDictionary lookup costs 147 ns, measured).
        self._last_type: Callable[[], type | None] = _no_type
        self._last_kind = Kind(b"", 1)  # what the outbox knows of it
        try:
            self._io.start(options.connect_timeout)
        except BaseException:
            self._dispatcher.stop(options.linger)
            self._notifier.stop(options.linger)
            raise
        export_address(address)
        # Runs at interpreter exit and at the exit of multiprocessing children (which skip
        # atexit); ignored in any other process than this one.
        mp_util.Finalize(self, close_at_exit, args=(weakref.ref(self),), exitpriority=10)

    @property
    def gaps(self) -> int:
        """Messages the hub dropped for this process, exactly, since it connected (see
        ``HubOptions.stall_timeout``): what it did not receive of what was published after its
        subscribe() returned. Counted when a later message of the topic arrives, or shortly
        after the hub stops sending without waiting (it tells every client to check)."""
        return self._dispatcher.gaps

    @property
    def rejected(self) -> int:
        """Messages ``publish()`` accepted and this broker rejected later (see the class)."""
        return self._rejections.count

    @property
    def undecodable(self) -> int:
        """Messages received that this process could not decode and dropped (each logged with
        its type): broadcast ones, and queue deliveries (which the hub dead-letters)."""
        return self._dispatcher.undecodable + self._runner.undecodable

    @property
    def in_doubt(self) -> int:
        """Broadcast messages this process sent to a hub that died (SIGKILL, a crash) before
        it confirmed relaying them: they may or may not have reached their subscribers. Each
        replacement of the hub is logged at WARNING. Messages of types with queue groups are
        sent again to the new hub instead (docs/guarantees.md, "Hub kill -9")."""
        return self._io.outbox.confirm.in_doubt_total

    @property
    def in_doubt_by_type(self) -> dict[str, int]:
        """``in_doubt`` per message type (unique name)."""
        return dict(self._io.outbox.confirm.in_doubt)

    @property
    def spool(self) -> SpoolStatistics:
        """Big payloads through the hub's spool directory in this process (docs/guarantees.md,
        "Big payloads"): written, read back, sent inline for want of room, and missing (read
        too late: those batches were dropped, and counted in ``undecodable`` too)."""
        outbox = self._io.outbox
        return outbox.spool_counts.statistics(outbox.spool.path if outbox.spool else "")

    @property
    def hub_available(self) -> bool:
        """False once the hub has been unreachable for ``hub_lost_timeout``; True again when a
        hub welcomes this client (a short outage, within the timeout, leaves it true)."""
        return self._session.available

    def _for_child(self) -> HubBroker:
        return HubBroker(self.address, options=self.options)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<HubBroker {self.address} pid={self._owner} {state}>"

    def _hub_state_changed(self) -> None:  # I/O thread
        self._space_freed()
        session = getattr(self, "_session", None)
        if session is not None and not session.available:
            # As flush() does: a request waiting for its reply learns that the hub is gone
            # for good, instead of waiting for ever (timeout=None) or its whole timeout.
            self._requests.fail_waiting(
                HubUnavailableError(
                    f"the hub at {self.address} has been unreachable for more than "
                    f"{session.lost_timeout} s (hub_lost_timeout): the request or its reply "
                    "may be lost with it"
                )
            )

    def _record_error(self, exc: BaseException) -> None:  # I/O thread
        self._deferred_error = exc
        self._space_freed()

    def _thread_died(self, name: str, exc: BaseException) -> None:  # the dead thread
        """One of our threads died (threads.guarded logged it CRITICAL): fail loudly."""
        self._failure_cause = exc
        self._failed = (
            f"{self!r} failed: its {name} thread died ({describe(exc)}); it can no "
            "longer deliver: close it and connect a new broker"
        )
        self._requests.close(BrokerFailedError(self._failed))  # waiting requesters learn it
        io = getattr(self, "_io", None)
        if io is not None and name != "ipcbus-io":
            io.request_stop()  # goodbye: the hub hands our queue deliveries to other consumers
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.wake_all()

    # -- request -----------------------------------------------------------------------------

    def _request(self, message: Message, timeout: float | None) -> Message:
        """See ``Broker.request``; the reply route is :mod:`ipcbus.client.replies`. A request
        waits for room in the outbox as ``publish()`` does (never in a handler)."""
        self._check_usable()
        if len(self._io.outbox) >= self.options.max_pending and not runs_handlers():
            self._wait_for_space(self.options.publish_timeout)
        try:
            return self._replies.request(message, timeout, self.options.subscribe_timeout)
        except RequestTimeoutError as exc:
            if threading.current_thread() is self._dispatcher.thread and (
                self._dispatcher.subscriptions.get(get_unique_name_for_message(message))
            ):
                exc.add_note(
                    "request() was called in a subscribe() handler: this process's own "
                    "subscribe() handlers of the type run on the same thread, after it returns; "
                    "answer with a queue group (subscribe_async) or request from another thread"
                )
            raise

    def _reply_to(self, route: wire.Route) -> HubReply:  # handler threads
        return HubReply(self._io, route)

    def _before_admin(self) -> None:  # queues(), dead_letters(), requeue(), purge()
        self._check_open()


def _no_type() -> None:
    return None


def _wait_for_secret(address: Address, timeout: float | None) -> bytes:
    """The bus secret from the key file beside the hub's socket, waiting (up to ``timeout``)
    for a hub that is still starting to write it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return read_bus_secret(address)
        except HubUnavailableError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise HubUnavailableError(f"no hub answered at {address}: {exc}") from exc
        time.sleep(0.02)


def connect(address: str | None = None, **options: Any) -> HubBroker | NatsBroker:
    """Connect a :class:`HubBroker` to the hub at ``address`` (default: ``IPCBUS_ADDRESS``);
    a ``nats://`` or ``tls://`` address connects a :class:`~ipcbus.nats.NatsBroker` to that
    NATS server instead (the extra ``ipcbus[nats]``), ``options`` going to it.

    Raises ``HubUnavailableError`` when no address is known or no hub answers within
    ``connect_timeout`` seconds. Sets ``IPCBUS_ADDRESS`` in this process when it is unset, so
    children started afterwards find the same hub.
    """
    if address is None:
        address = address_from_env()
        if address is None:
            raise HubUnavailableError(
                "no hub address: pass one to connect() or set IPCBUS_ADDRESS "
                "(the hub prints it when it starts)"
            )
    if address.startswith(("nats://", "tls://")):
        from ..nats.broker import NatsBroker

        export_address(address)
        return NatsBroker(address, **options)
    return HubBroker(address, **options)
