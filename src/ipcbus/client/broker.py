"""HubBroker: this process's broker connected to a hub, and ``connect()`` (client side)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import util as mp_util
from typing import TYPE_CHECKING, Any

from ..config import ClientOptions, address_from_env, export_address
from ..core.contract import Broker, Subscription
from ..exceptions import (
    BrokerClosedError,
    BrokerFailedError,
    HubUnavailableError,
    MessageSerializationError,
    PublishTimeoutError,
    RequestTimeoutError,
)
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import read_bus_secret
from .control import DeleteAnswer
from .dispatch import Dispatcher
from .gate import PublishGate
from .io import IOThread
from .notify import StateNotifier
from .outbox import FlushMarker, Kind
from .queue_admin import QueueAdminMixin
from .rejections import Rejections
from .replies import HubReply, ReplyRoute
from .runner import QueueRunner
from .threads import runs_handlers

if TYPE_CHECKING:
    from ..nats.broker import NatsBroker

__all__ = ["HubBroker", "connect"]

logger = logging.getLogger(__name__)

# This process's pid, kept current across fork: os.getpid() is a system call, too slow for the
# publish() hot path where it guards against a forked child using its parent's broker.
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_update_pid)


class HubBroker(QueueAdminMixin, Broker):
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
        self._dispatcher.take_reply = self._replies.take
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
        mp_util.Finalize(self, _close_at_exit, args=(weakref.ref(self),), exitpriority=10)

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
    def hub_available(self) -> bool:
        """False once the hub has been unreachable for ``hub_lost_timeout``; True again when a
        hub welcomes this client (a short outage, within the timeout, leaves it true)."""
        return self._session.available

    def _for_child(self) -> HubBroker:
        return HubBroker(self.address, options=self.options)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<HubBroker {self.address} pid={self._owner} {state}>"

    # -- publish -----------------------------------------------------------------------------

    def publish(self, message: Message, timeout: float | None = None) -> None:
        """See :class:`HubBroker`; ``timeout`` overrides ``publish_timeout`` for this call."""
        self._check_message(message)
        self._publish(message, timeout)

    def _publish(self, message: Message, timeout: float | None = None) -> None:
        self._check_usable()
        if self._io.full_topics and not runs_handlers():
            # Not in a handler either, for the same reason as below: the group may be full
            # because this very process's handlers hold its deliveries.
            timeout = self._wait_while_full(type(message), timeout)
        cls = type(message)
        if self._last_type() is not cls:
            kind = self._kinds.get(cls)
            if kind is None:
                # The first message of its type: MessageSerializationError or
                # MessageTooLargeError here, in the caller. A type is learnt only from a message
                # that can go.
                kind = self._io.outbox.check(message)
            elif kind.big:
                self._io.outbox.check_fields(message)
            self._last_type = weakref.ref(cls)
            self._last_kind = kind
        elif self._last_kind.big:
            # Big payloads (issue 12): a field over the limit raises here too, not only in the
            # first message of the type.
            self._io.outbox.check_fields(message)
        if len(self._io.outbox) >= self.options.max_pending and not runs_handlers():
            # Never in a handler: the hub may be waiting for this very thread to take its
            # messages while it stops reading ours; waiting here closed that circle (a pipeline
            # stage deadlocked the bus every time with hwm=20, max_pending=200).
            self._wait_for_space(self.options.publish_timeout if timeout is None else timeout)
        self._io.publish(message)

    def _wait_while_full(self, cls: type[Message], timeout: float | None) -> float | None:
        """Wait while a full queue group holds ``cls``'s topic back; returns what is left of
        ``timeout`` (``None``: ``publish_timeout``)."""
        topic = wire.topic_for(get_unique_name_for_message(cls))
        if topic not in self._io.full_topics:
            return timeout
        limit = self.options.publish_timeout if timeout is None else timeout
        opened, left = self._gate.wait_while_full(topic, limit)
        self._check_usable()
        if not opened:
            raise PublishTimeoutError(
                f"a queue group of {wire.unique_name_of(topic)} holds the hub's max_held "
                f"messages (its consumers are slow or gone): publish() waited {limit} s"
            )
        return timeout if left is None else left

    def _wait_for_space(self, timeout: float | None) -> None:
        if not self._gate.wait_for_space(self.options.max_pending, timeout):
            self._check_usable()  # closed meanwhile, or the connection failed: say that
            waiting = len(self._io.outbox)
            if not self._io.hub_alive:
                raise HubUnavailableError(
                    f"the hub at {self.address} is unreachable and {waiting} messages wait "
                    f"for it: publish() gave up after {timeout} s"
                )
            raise PublishTimeoutError(
                f"{waiting} messages still wait for the hub after {timeout} s (backpressure)"
            )
        self._check_usable()

    def _stopped(self) -> bool:
        return self._closed or self._failed is not None or not self._io.alive

    def _space_freed(self) -> None:  # I/O thread
        gate = getattr(self, "_gate", None)  # None while the I/O thread is being made
        if gate is not None:
            gate.notify()

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
            f"{self!r} failed: its {name} thread died ({type(exc).__name__}: {exc}); it can no "
            "longer deliver: close it and connect a new broker"
        )
        self._requests.close(BrokerFailedError(self._failed))  # waiting requesters learn it
        io = getattr(self, "_io", None)
        if io is not None and name != "ipcbus-io":
            io.request_stop()  # goodbye: the hub hands our queue deliveries to other consumers
        gate = getattr(self, "_gate", None)
        if gate is not None:
            gate.wake_all()

    def _check_usable(self) -> None:
        if _pid != self._owner:
            raise BrokerClosedError(
                f"this HubBroker belongs to process {self._owner}; in a forked child use "
                "get_message_broker(), which connects the child's own"
            )
        if not (self._finishing and runs_handlers()):
            self._check_open()
        if self._failed is not None:
            raise BrokerFailedError(self._failed) from self._failure_cause
        error, self._deferred_error = self._deferred_error, None
        if isinstance(error, MessageSerializationError):
            raise error
        if error is not None or not self._io.alive:
            raise HubUnavailableError(f"the connection to {self.address} failed") from error
        if not self._session.available:
            raise self._session.unavailable(len(self._io.outbox))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the hub has accepted everything published before this call.

        Raises ``MessageSerializationError`` naming the messages rejected since the last
        ``flush()`` (their type and position), ``HubUnavailableError`` once the hub has been
        unreachable for ``hub_lost_timeout`` (at once, whatever ``timeout``), and
        ``PublishTimeoutError`` past ``timeout``.
        """
        self._check_usable()
        self._flush(timeout)

    def _flush(self, timeout: float | None, while_hub_alive: bool = False) -> None:
        marker = FlushMarker(b"%d" % next(self._flush_ids))
        self._io.publish(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            if self._failed is not None:
                raise BrokerFailedError(self._failed) from self._failure_cause
            if while_hub_alive and not self._io.hub_alive:
                break
            if not self._session.available or not self._io.alive:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if not marker.done.is_set():
            if not self._session.available:
                raise self._session.unavailable(len(self._io.outbox))
            if not self._io.hub_alive or not self._io.alive:
                raise HubUnavailableError(f"the hub at {self.address} is unreachable")
            raise PublishTimeoutError(f"the hub did not confirm a flush within {timeout} s")
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error
        rejections = self._rejections.take()
        if rejections is not None:
            raise rejections

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

    # -- subscribe ---------------------------------------------------------------------------

    def _subscribe(self, subscription: Subscription) -> None:
        self._check_usable()
        if subscription.queue_name is not None:
            self._subscribe_queue(subscription)
            return
        topic = subscription.topic
        with self._subs_lock:
            self._dispatcher.add(subscription)
            live = self._live.get(topic)
            if live is None:
                live = self._live[topic] = threading.Event()
                self._io.subscribe(wire.topic_for(topic), live)
        self._await_hub(live, subscription, f"the subscription to {topic}")

    def _subscribe_queue(self, subscription: Subscription) -> None:
        assert subscription.queue_name is not None
        request = wire.Consume(
            b"%d" % next(self._queue_ids),
            wire.topic_for(subscription.topic),
            subscription.queue_name,
            subscription.policy.prefetch,
        )
        self._queue_subscriptions[request.subscription_id] = subscription
        live = threading.Event()
        self._io.consume(request, live)
        self._await_hub(live, subscription, f"the queue consumer {subscription.queue_name!r}")

    def _await_hub(self, live: threading.Event, subscription: Subscription, what: str) -> None:
        """Wait until the hub confirmed ``subscription``; undo it and raise if it does not."""
        timeout = self.options.subscribe_timeout
        if not live.wait(timeout):
            subscription.cancel()
            raise HubUnavailableError(
                f"the hub at {self.address} did not confirm {what} within {timeout} s"
            )

    def _cancel(self, subscription: Subscription) -> None:
        if _pid != self._owner:
            return
        if subscription.queue_name is not None:
            for subscription_id, known in list(self._queue_subscriptions.items()):
                if known is subscription:
                    # Kept in the map: deliveries already on their way are answered "rejected".
                    self._io.cancel_consume(subscription_id)
            return
        topic = subscription.topic
        with self._subs_lock:
            if self._dispatcher.remove(subscription) and topic in self._live:
                del self._live[topic]
                if not self._closed:
                    self._io.unsubscribe(wire.topic_for(topic))

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        """Ask the hub; returns once it has the group and every client knows the topic is
        grouped (waits at most ``subscribe_timeout``)."""
        self._check_usable()
        request = wire.DeclareQueue(
            b"%d" % next(self._request_ids),
            wire.topic_for(get_unique_name_for_message(message_type)),
            queue_name,
        )
        done = threading.Event()
        self._io.declare_queue(request, done)
        timeout = self.options.subscribe_timeout
        if not done.wait(timeout):
            self._io.forget_declare(request.request_id)
            raise HubUnavailableError(
                f"the hub at {self.address} did not confirm the queue group {queue_name!r} "
                f"within {timeout} s"
            )

    def _before_admin(self) -> None:  # queues(), dead_letters(), requeue(), purge()
        self._check_open()

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        """Ask the hub; waits for its answer at most ``subscribe_timeout``."""
        self._check_usable()
        request = wire.DeleteQueue(
            b"%d" % next(self._request_ids),
            wire.topic_for(get_unique_name_for_message(message_type)),
            queue_name,
        )
        answer = DeleteAnswer()
        self._io.delete_queue(request, answer)
        timeout = self.options.subscribe_timeout
        if not answer.done.wait(timeout):
            self._io.forget_delete(request.request_id)
            raise HubUnavailableError(
                f"the hub at {self.address} did not answer the deletion of the queue group "
                f"{queue_name!r} within {timeout} s"
            )
        if answer.dropped is None:
            raise self._refuse_deletion(message_type, queue_name)
        return answer.dropped

    def _ack(self, acks: list[wire.Ack]) -> None:  # queue threads
        self._io.ack(acks)

    # -- close -------------------------------------------------------------------------------

    def _close(self) -> None:
        linger = self.options.linger
        if _pid != self._owner:
            return  # the sockets and threads belong to the parent: drop nothing, touch nothing
        if threading.current_thread() is self._dispatcher.thread:
            # close() in a broadcast handler: no handler runs after it, and what arrives
            # meanwhile is dropped, not held (held, it would stall the hub, and the flush below).
            self._dispatcher.abandon()
        if self._failed is None and self._io.alive and self._io.hub_alive:
            self._finishing = True
            flushed = self._close_flush()
            # Take no new queue deliveries; finish (and ack) those in hand, within the linger.
            # What is still unfinished then goes back to the hub with our goodbye.
            for subscription_id in list(self._queue_subscriptions):
                self._io.cancel_consume(subscription_id)
            if not self._runner.wait_idle(linger):
                logger.warning("closing %r with queue deliveries unfinished", self)
            self._finishing = False  # a handler still running now publishes nothing more
            self._runner.flush_acks()
            if flushed and self._io.outbox.unconfirmed() and self._io.hub_alive:
                self._close_flush()  # what the handlers published meanwhile
        self._io.stop(linger)
        self._runner.stop(linger)
        self._dispatcher.stop(linger)
        self._notifier.stop(linger)
        self._gate.wake_all()
        self._report_at_close()

    def _close_flush(self) -> bool:
        """Flush within the linger; False when the hub did not confirm everything."""
        try:
            self._flush(self.options.linger, while_hub_alive=True)
        except (PublishTimeoutError, HubUnavailableError, BrokerFailedError) as exc:
            logger.warning("closing %r without a complete flush: %s", self, exc)
            return False
        except MessageSerializationError as exc:
            logger.error("closing %r: %s", self, exc)
        return True

    def _report_at_close(self) -> None:
        rejections = self._rejections.take()
        if rejections is not None:
            logger.error("closing %r: %s", self, rejections)
        self.undelivered = self._io.outbox.unconfirmed()
        if self.undelivered:
            logger.error(
                "closing %r: %d messages publish() had accepted were not delivered: no hub "
                "confirmed them (%d never left this process); they are lost",
                self,
                self.undelivered,
                self._io.outbox.never_sent(),
            )


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


def _close_at_exit(ref: weakref.ref[HubBroker]) -> None:
    broker = ref()
    if broker is not None:
        broker.close()


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
