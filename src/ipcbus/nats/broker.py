"""NatsBroker: the Broker API on a NATS server, for programs that outgrow one machine."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from itertools import count
from multiprocessing import util as mp_util
from typing import Any

from nats.aio.subscription import Subscription as NatsSubscription

from ..core import process_id
from ..core.contract import Subscription, close_at_exit
from ..core.failures import describe
from ..core.routing import RouteTable
from ..exceptions import (
    BrokerClosedError,
    BrokerFailedError,
    MessageTooLargeError,
    PubSubError,
)
from ..message import Message, get_unique_name_for_message
from .calls import running_queue_handler
from .connection import NatsConnection
from .dispatch import Dispatcher, Inbox
from .envelope import Signer, encode_message, seal
from .groups import FETCH_WAIT, GroupConsumer
from .queue_side import NatsQueueGroups, stop_all
from .rejections import Seen
from .request_side import NatsRequesting
from .requests import PendingRequests
from .signing import check_secret, default_key_file, load_or_create_secret
from .statistics import Counters, NatsStatistics
from .streams import Streams
from .subjects import check_namespace, subject_for

__all__ = ["NatsBroker"]

logger = logging.getLogger(__name__)

DEFAULT_SERVERS = "nats://127.0.0.1:4222"
# Room for our envelope (meta, reply inbox, signature) within the server's max_payload.
_HEADER_ROOM = 512
# What a thread that runs handlers gets at close once the linger is spent: enough to end if it
# is merely finishing, not another linger if it is stuck.
_GRACE = 0.1


class NatsBroker(NatsRequesting, NatsQueueGroups):
    """A broker on a NATS server (``nats-server -js``): ``servers`` is a URL or a list of them.

    Everything of :class:`~ipcbus.core.contract.Broker` holds; where it differs from
    ``HubBroker``:

    - broadcast is core NATS, one subject per message type (:mod:`ipcbus.nats.subjects`);
      ``subscribe()`` returns once the server has the subscription. Handlers run on one
      dispatcher thread, in publish order. A process whose handlers fall behind by
      ``pending_msgs_limit`` messages or ``pending_bytes_limit`` bytes drops what comes next
      (counted in ``statistics().dropped``, logged): core NATS has no backpressure;
    - queue groups are JetStream durable consumers (:mod:`ipcbus.nats.groups`); a delivery not
      acknowledged within ``ack_wait`` seconds (its process died) is delivered again;
    - every payload is signed with the bus secret (``secret``, else the key file ``key_file``,
      else a per-user default: :mod:`ipcbus.nats.signing`); unsigned ones are never unpickled;
    - ``request(message, timeout)`` returns the first answer of a handler that returned a
      ``Message``;
    - ``namespace`` prefixes every subject and stream, so programs can share a server;
    - other keyword arguments go to ``nats.connect()`` as they are: credentials
      (``user_credentials``, ``nkeys_seed``, ``user``/``password``, ``token``) and TLS
      (``tls`` an ``ssl.SSLContext``, ``tls_hostname``), reconnection settings, ``name``.

    A broker belongs to the process that created it: in a forked child it refuses use
    (``BrokerClosedError``) and ``get_message_broker()`` there connects the child's own.
    """

    def __init__(
        self,
        servers: str | list[str] = DEFAULT_SERVERS,
        *,
        namespace: str = "ipcbus",
        secret: bytes | str | None = None,
        key_file: str | None = None,
        connect_timeout: float = 5.0,
        operation_timeout: float = 10.0,
        linger: float = 5.0,
        ack_wait: float = 30.0,
        pending_msgs_limit: int = 65536,
        pending_bytes_limit: int = 64 * 1024 * 1024,
        **nats_options: Any,
    ) -> None:
        super().__init__()
        self.servers = servers
        self.namespace = check_namespace(namespace)
        if secret is not None:
            raw_secret = check_secret(secret)
        else:
            raw_secret = load_or_create_secret(key_file or default_key_file())
        self._signer = Signer(raw_secret)
        self._settings: dict[str, Any] = dict(
            namespace=namespace,
            secret=raw_secret,
            connect_timeout=connect_timeout,
            operation_timeout=operation_timeout,
            linger=linger,
            ack_wait=ack_wait,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
            **nats_options,
        )
        self._timeout = operation_timeout
        self._linger = linger
        self._ack_wait = ack_wait
        self._pending_msgs_limit = pending_msgs_limit
        self._owner = os.getpid()
        self._failed: str | None = None
        self._counters = Counters()
        self._routes = RouteTable()
        self._answers_to_me = PendingRequests(self._signer, self._counters)
        self._lock = threading.RLock()
        self._subjects: dict[str, str] = {}  # topic -> subject
        # class -> (topic, subject), weakly: programs that make classes at run time get them back
        self._by_class: weakref.WeakKeyDictionary[type, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._live: dict[str, NatsSubscription] = {}
        self._groups: dict[tuple[str, str], GroupConsumer] = {}
        self._presence: dict[tuple[str, str], NatsSubscription] = {}
        self._rejections: dict[tuple[str, str], Seen] = {}
        self._handler_loop: asyncio.AbstractEventLoop | None = None
        self._handler_thread: threading.Thread | None = None
        self._ids = count(1)
        self._id_prefix = os.urandom(6).hex() + "-"
        self._dispatcher = Dispatcher(
            self._signer,
            self._routes,
            self._counters,
            max_msgs=pending_msgs_limit,
            max_bytes=pending_bytes_limit,
            answer=self._answer,
            on_death=self._thread_died,
        )
        try:
            self._conn = NatsConnection(
                servers,
                self._counters,
                connect_timeout=connect_timeout,
                on_reply=self._answers_to_me.answer,
                on_stored_gone=self._stored_gone,
                options=nats_options,
                on_closed=self._answers_to_me.connection_lost,
            )
        except BaseException:
            self._dispatcher.stop(linger)
            raise
        js = self._conn.client.jetstream(timeout=operation_timeout)
        self._streams = Streams(
            self._conn.client, js, self.namespace, self._id_prefix, self._signer
        )
        self._max_payload = self._conn.client.max_payload
        self._conn.call(self._streams.listen(), operation_timeout, "subscribe")
        mp_util.Finalize(self, close_at_exit, args=(weakref.ref(self),), exitpriority=10)

    def _for_child(self) -> NatsBroker:
        return NatsBroker(self.servers, **self._settings)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NatsBroker {self.servers} {self.namespace} pid={self._owner} {state}>"

    def statistics(self) -> NatsStatistics:
        """What this broker counted (:class:`~ipcbus.nats.statistics.NatsStatistics`), and the
        queue groups it declared or joined as JetStream reports them."""
        self._check_usable()
        queues = self._conn.call(self._streams.statistics(), self._timeout, "statistics")
        in_hand = sum(group.in_hand for group in list(self._groups.values()))
        return self._counters.snapshot(queues=queues, in_hand=in_hand)

    # -- publish -----------------------------------------------------------------------------

    def _publish(self, message: Message, reply: str = "") -> None:
        self._check_usable()
        cls = type(message)
        known = self._by_class.get(cls)
        if known is None:
            topic = get_unique_name_for_message(cls)
            known = self._by_class[cls] = (topic, subject_for(self.namespace, topic))
            self._subjects[topic] = known[1]
        topic, subject = known
        codec, payload = encode_message(message)
        if len(payload) > self._max_payload - _HEADER_ROOM:
            raise MessageTooLargeError(
                f"a {type(message).__qualname__} encodes to {len(payload)} bytes; the NATS "
                f"server accepts at most {self._max_payload} (its max_payload)"
            )
        message_id = f"{self._id_prefix}{next(self._ids)}"
        data = seal(self._signer, subject, message_id, codec, time.time(), payload, reply)
        stored = self._streams.stored.get(topic)
        if stored is None:
            stored = self._lookup_stored(topic)
        if stored:
            self._conn.send_stored(subject, data)
        else:
            self._conn.send(subject, data)

    def _lookup_stored(self, topic: str) -> bool:
        """Does a stream store ``topic`` (asked once per type; announcements keep it current)."""

        stored = self._conn.call(self._streams.is_stored(topic), self._timeout, "stream lookup")
        return self._streams.stored.setdefault(topic, stored)

    def _stored_gone(self, subject: str) -> None:
        for topic, known in list(self._subjects.items()):
            if known == subject:
                self._streams.stored[topic] = False

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the server has everything published before, and JetStream has stored
        what goes to queue groups. ``PublishTimeoutError`` past ``timeout``; ``PubSubError``
        naming the messages JetStream refused since the last flush."""
        self._check_usable()
        errors = self._conn.flush(timeout)
        if errors:
            raise PubSubError(
                f"messages since the last flush were not sent, or not stored by JetStream "
                f"(see statistics(): unsent, store_failures): {'; '.join(errors[:5])}"
            )

    # -- subscribe ---------------------------------------------------------------------------

    def _subscribe(self, subscription: Subscription) -> None:
        self._check_usable()
        if subscription.queue_name is not None:
            self._subscribe_queue(subscription)
            return
        topic = subscription.topic
        with self._lock:
            self._routes.add(subscription)
            if topic in self._live:
                return
            try:
                self._live[topic] = self._conn.call(
                    self._subscribe_broadcast(topic), self._timeout, f"subscribe to {topic}"
                )
            except BaseException:
                self._routes.remove(subscription)
                raise

    async def _subscribe_broadcast(self, topic: str) -> NatsSubscription:
        client = self._conn.client
        sub = await client.subscribe(
            subject_for(self.namespace, topic),
            pending_msgs_limit=self._pending_msgs_limit,
            pending_bytes_limit=0,  # the dispatcher applies the limits (dispatch.Inbox)
        )
        # No await from here on: nothing arrives between the swap and the hand-over.
        original = sub._pending_queue
        inbox = Inbox(topic, self._dispatcher, sub)
        sub._pending_queue = inbox
        while not original.empty():
            inbox.put_nowait(original.get_nowait())
        await client.flush()
        return sub

    def _cancel(self, subscription: Subscription) -> None:
        if process_id.pid != self._owner:
            return
        topic = subscription.topic
        with self._lock:
            self._routes.remove(subscription)
            if subscription.queue_name is None:
                if self._routes.broadcast(topic) or topic not in self._live:
                    return
                nats_sub = self._live.pop(topic)
                if not self._closed:
                    self._conn.spawn(nats_sub.unsubscribe())
                return
            key = (topic, subscription.queue_name)
            if self._routes.has_members(*key) or key not in self._groups:
                return
            group = self._groups.pop(key)
            presence = self._presence.pop(key, None)
        if self._closed:
            return
        if presence is not None:
            self._conn.call(presence.unsubscribe(), self._timeout, "leave a queue group")
        self._conn.spawn(group.stop())

    # -- state and close ---------------------------------------------------------------------

    def _thread_died(self, name: str, exc: BaseException) -> None:
        self._failed = f"{self!r} failed: its {name} thread died ({describe(exc)})"

    def _check_usable(self) -> None:
        if process_id.pid != self._owner:
            raise BrokerClosedError(
                f"this NatsBroker belongs to process {self._owner}; in a forked child use "
                "get_message_broker(), which connects the child's own"
            )
        self._check_open()
        if self._failed is not None:
            raise BrokerFailedError(self._failed)

    def _close(self) -> None:
        if process_id.pid != self._owner:
            return  # the connection and threads belong to the parent
        self._answers_to_me.close_all()
        if threading.current_thread() is self._dispatcher.thread:
            self._dispatcher.abandon()
        try:
            self._conn.flush(self._linger)
        except PubSubError as exc:
            logger.warning("closing %r without a complete flush: %s", self, exc)
        with self._lock:
            groups = list(self._groups.values())
            self._groups.clear()
        if groups and self._conn.loop.is_running():
            try:
                self._conn.call(stop_all(groups), FETCH_WAIT + 3.0, "stop queue groups")
            except PubSubError as exc:
                logger.warning("closing %r: %s", self, exc)
        in_handler = running_queue_handler() or (threading.current_thread() is self._handler_thread)
        deadline = time.monotonic() + self._linger
        while not in_handler and any(g.in_hand for g in groups) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._handler_loop is not None:
            self._handler_loop.call_soon_threadsafe(self._handler_loop.stop)
            if self._handler_thread is not None and not in_handler:
                self._handler_thread.join(max(_GRACE, deadline - time.monotonic()))
        try:  # the acks and naks the stopped handlers sent
            self._conn.flush(self._linger)
        except PubSubError as exc:
            logger.warning("closing %r: %s", self, exc)
        self._conn.close(self._linger)
        # Handler threads share the one linger (with n stuck handlers it took n lingers).
        self._dispatcher.stop(max(_GRACE, deadline - time.monotonic()))
