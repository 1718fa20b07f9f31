"""HubBroker: this process's broker connected to a hub, and ``connect()`` (client side)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from multiprocessing import util as mp_util
from typing import Any

from ..config import ClientOptions, address_from_env, export_address
from ..core import codec
from ..core.contract import Broker, Subscription
from ..exceptions import (
    BrokerClosedError,
    HubUnavailableError,
    MessageSerializationError,
    PublishTimeoutError,
)
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from ..wire.address import Address
from ..wire.keys import read_secret
from .control import DeleteAnswer
from .dispatch import Dispatcher
from .io import IOThread
from .outbox import FlushMarker
from .runner import QueueRunner

__all__ = ["HubBroker", "connect"]

logger = logging.getLogger(__name__)

# This process's pid, kept current across fork: os.getpid() is a system call, too slow for the
# publish() hot path where it guards against a forked child using its parent's broker.
_pid = os.getpid()


def _update_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_update_pid)


class HubBroker(Broker):
    """A proxy to the hub at ``address``: publish and subscribe across processes.

    - ``publish()`` is thread-safe and returns once the message is queued in this process; one I/O
      thread batches and sends it. The first message of each type is serialised in the caller, so
      an unserialisable type raises ``MessageSerializationError`` there. When ``max_pending``
      messages wait (the hub or a subscriber is slow), ``publish()`` blocks; past ``timeout`` (per
      call, else ``publish_timeout``) it raises ``PublishTimeoutError``. The same wait, before
      the message is queued, for a type whose queue group the hub reports full (see
      ``HubOptions.max_held``): only that type waits, and a publisher's order is kept.
    - ``delete_queue()`` deletes an abandoned queue group at the hub, and what it holds.
    - ``subscribe()`` returns once the hub has the subscription live: every message published
      afterwards, by any process, reaches it. Handlers run on one dispatcher thread, in order.
    - ``flush(timeout)`` waits until the hub has accepted everything published before it.
    - ``close()`` flushes for at most ``linger`` seconds, then closes; interpreter exit (also of a
      ``multiprocessing`` child) closes open brokers.
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
        self._checked_types: set[type] = set()
        self._deferred_error: BaseException | None = None
        self._space = threading.Condition()
        self._waiting = 0
        self._subs_lock = threading.Lock()
        self._live: dict[str, threading.Event] = {}
        self._flush_ids = iter(range(1, 2**62))
        self._queue_ids = iter(range(1, 2**62))
        self._request_ids = iter(range(1, 2**62))
        self._queue_subscriptions: dict[bytes, Subscription] = {}
        self._runner = QueueRunner(self._queue_subscriptions.get, self._ack, self.publish)
        secret = _wait_for_secret(parsed, options.connect_timeout)
        self._dispatcher = Dispatcher(options.dispatch_queue)
        self._io = IOThread(
            parsed,
            self._dispatcher.put,
            client_id=os.urandom(8).hex().encode(),
            secret=secret,
            hwm=options.hwm,
            max_batch=options.max_batch,
            on_space=self._space_freed,
            on_error=self._record_error,
            on_delivery=self._runner.submit,
        )
        try:
            self._io.start(options.connect_timeout)
        except BaseException:
            self._dispatcher.stop(options.linger)
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
        if self._io.full_topics:
            timeout = self._wait_while_full(type(message), timeout)
        cls = type(message)
        if cls not in self._checked_types:
            codec.encode_batch(cls, [message])  # MessageSerializationError, in the caller
            self._checked_types.add(cls)
        if len(self._io.outbox) >= self.options.max_pending:
            self._wait_for_space(self.options.publish_timeout if timeout is None else timeout)
        self._io.publish(message)

    def _wait_while_full(self, cls: type[Message], timeout: float | None) -> float | None:
        """Wait while a full queue group holds ``cls``'s topic back (the hub said FULL), before
        the message enters the outbox: its publisher's later messages of other types cannot
        overtake it. Returns what is left of ``timeout`` (``None``: ``publish_timeout``)."""
        topic = wire.topic_for(get_unique_name_for_message(cls))
        if topic not in self._io.full_topics:
            return timeout
        limit = self.options.publish_timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        with self._space:
            self._waiting += 1
            try:
                opened = self._space.wait_for(
                    lambda: topic not in self._io.full_topics or self._closed or not self._io.alive,
                    limit,
                )
            finally:
                self._waiting -= 1
        self._check_usable()
        if not opened:
            raise PublishTimeoutError(
                f"a queue group of {wire.unique_name_of(topic)} holds the hub's max_held "
                f"messages (its consumers are slow or gone): publish() waited {limit} s"
            )
        return timeout if deadline is None else max(0.0, deadline - time.monotonic())

    def _wait_for_space(self, timeout: float | None) -> None:
        outbox, limit = self._io.outbox, self.options.max_pending
        with self._space:
            self._waiting += 1
            try:
                ok = self._space.wait_for(
                    lambda: len(outbox) < limit or self._closed or not self._io.alive, timeout
                )
                ok = ok and len(outbox) < limit
            finally:
                self._waiting -= 1
        if not ok:
            self._check_usable()  # closed meanwhile, or the connection failed: say that
            if not self._io.hub_alive:
                raise HubUnavailableError(
                    f"the hub at {self.address} is unreachable and {len(outbox)} messages wait "
                    f"for it: publish() gave up after {timeout} s"
                )
            raise PublishTimeoutError(
                f"{len(outbox)} messages still wait for the hub after {timeout} s (backpressure)"
            )
        self._check_usable()

    def _space_freed(self) -> None:  # I/O thread
        if self._waiting:
            with self._space:
                self._space.notify_all()

    def _record_error(self, exc: BaseException) -> None:  # I/O thread
        self._deferred_error = exc
        self._space_freed()

    def _check_usable(self) -> None:
        if _pid != self._owner:
            raise BrokerClosedError(
                f"this HubBroker belongs to process {self._owner}; in a forked child use "
                "get_message_broker(), which connects the child's own"
            )
        self._check_open()
        error, self._deferred_error = self._deferred_error, None
        if isinstance(error, MessageSerializationError):
            raise error
        if error is not None or not self._io.alive:
            raise HubUnavailableError(f"the connection to {self.address} failed") from error

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the hub has accepted everything published before this call."""
        self._check_usable()
        self._flush(timeout)

    def _flush(self, timeout: float | None, while_hub_alive: bool = False) -> None:
        marker = FlushMarker(b"%d" % next(self._flush_ids))
        self._io.publish(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            if while_hub_alive and not self._io.hub_alive:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if not marker.done.is_set():
            if not self._io.hub_alive:
                raise HubUnavailableError(f"the hub at {self.address} is unreachable")
            raise PublishTimeoutError(f"the hub did not confirm a flush within {timeout} s")
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error

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
        if self._io.alive and not self._io.hub_alive:
            logger.warning(
                "closing %r while its hub is unreachable: %d unsent messages dropped",
                self,
                len(self._io.outbox),
            )
        elif self._io.alive:
            try:
                self._flush(self.options.linger, while_hub_alive=True)
            except (PublishTimeoutError, HubUnavailableError, MessageSerializationError) as exc:
                logger.warning("closing %r without a complete flush: %s", self, exc)
            # Take no new queue deliveries; finish (and ack) those in hand, within the linger.
            # What is still unfinished then goes back to the hub with our goodbye.
            for subscription_id in list(self._queue_subscriptions):
                self._io.cancel_consume(subscription_id)
            if not self._runner.wait_idle(linger):
                logger.warning("closing %r with queue deliveries unfinished", self)
            self._runner.flush_acks()
        self._io.stop(linger)
        self._runner.stop(linger)
        self._dispatcher.stop(linger)
        with self._space:
            self._space.notify_all()


def _wait_for_secret(address: Address, timeout: float | None) -> bytes:
    """The bus secret from the key file beside the hub's socket, waiting (up to ``timeout``)
    for a hub that is still starting to write it."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return read_secret(address.key_file)
        except HubUnavailableError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise HubUnavailableError(f"no hub answered at {address}: {exc}") from exc
        time.sleep(0.02)


def _close_at_exit(ref: weakref.ref[HubBroker]) -> None:
    broker = ref()
    if broker is not None:
        broker.close()


def connect(address: str | None = None, **options: Any) -> HubBroker:
    """Connect a :class:`HubBroker` to the hub at ``address`` (default: ``IPCBUS_ADDRESS``).

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
    return HubBroker(address, **options)
