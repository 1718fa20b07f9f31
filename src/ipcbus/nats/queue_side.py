"""``NatsBroker``'s queue groups: joining one (a JetStream durable consumer and the loop its
handlers run on), declaring and deleting them. The broker itself is in ``broker.py``."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..core.contract import Broker, Subscription
from ..core.loops import start_loop_thread
from ..message import Message, get_unique_name_for_message
from .groups import GroupConsumer

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription as NatsSubscription

    from ..core.routing import RouteTable
    from .connection import NatsConnection
    from .envelope import Signer
    from .rejections import Seen
    from .statistics import Counters
    from .streams import Streams

__all__ = ["NatsQueueGroups", "stop_all"]

logger = logging.getLogger(__name__)


class NatsQueueGroups(Broker):
    """The queue-group side of :class:`~ipcbus.nats.broker.NatsBroker`."""

    namespace: str
    _lock: threading.RLock
    _routes: RouteTable
    _groups: dict[tuple[str, str], GroupConsumer]
    _presence: dict[tuple[str, str], NatsSubscription]
    _handler_loop: asyncio.AbstractEventLoop | None
    _handler_thread: threading.Thread | None
    _conn: NatsConnection
    _streams: Streams
    _signer: Signer
    _counters: Counters
    _timeout: float
    _ack_wait: float
    _id_prefix: str  # this broker's token among the members of a group
    _rejections: dict[tuple[str, str], Seen]  # kept while members come and go

    def _check_usable(self) -> None:
        raise NotImplementedError

    def _answer(self, envelope: Any, result: Any, exc: BaseException | None) -> None:
        raise NotImplementedError

    def _subscribe_queue(self, subscription: Subscription) -> None:
        assert subscription.queue_name is not None
        topic, queue_name = subscription.topic, subscription.queue_name
        key = (topic, queue_name)
        with self._lock:
            self._routes.add(subscription)
            group = self._groups.get(key)
            if group is None:
                # Made here, never on the client's loop: that loop must never wait for our lock
                # (a first delivery there waited for a subscribe() that waited for the loop).
                self._start_handler_loop()
                try:
                    group = self._conn.call(
                        self._start_group(subscription), self._timeout, f"join {queue_name!r}"
                    )
                except BaseException:
                    self._routes.remove(subscription)
                    raise
                self._groups[key] = group
            group.set_prefetch(subscription.policy.prefetch)

    async def _start_group(self, subscription: Subscription) -> GroupConsumer:
        assert subscription.queue_name is not None
        topic, queue_name = subscription.topic, subscription.queue_name
        await self._streams.ensure(
            topic, queue_name, subscription.policy.max_attempts, self._ack_wait
        )
        group = GroupConsumer(
            self._conn.client,
            self.namespace,
            topic,
            queue_name,
            message_type=subscription.message_type,
            max_attempts=subscription.policy.max_attempts,
            signer=self._signer,
            routes=self._routes,
            counters=self._counters,
            handler_loop=self._handler_loop_now,
            publish=self.publish,
            send=self._conn.send,
            answer=self._answer,
            ack_wait=self._ack_wait,
            token=self._id_prefix,
            seen=self._rejections.setdefault((topic, queue_name), OrderedDict()),
        )
        await group.start()
        self._presence[(topic, queue_name)] = await self._streams.join(topic, queue_name)
        return group

    def _start_handler_loop(self) -> None:  # under self._lock
        if self._handler_loop is None:
            self._handler_loop, self._handler_thread = start_loop_thread("ipcbus-nats-queue-loop")

    def _handler_loop_now(self) -> asyncio.AbstractEventLoop:
        assert self._handler_loop is not None  # started before the first group
        return self._handler_loop

    def _declare_queue(self, message_type: type[Message], queue_name: str) -> None:
        self._check_usable()
        topic = get_unique_name_for_message(message_type)
        max_attempts = 3  # the default of QueuePolicy; members that join may raise it
        self._conn.call(
            self._streams.ensure(topic, queue_name, max_attempts, self._ack_wait),
            self._timeout,
            f"declare {queue_name!r}",
        )

    def _delete_queue(self, message_type: type[Message], queue_name: str) -> int:
        self._check_usable()
        topic = get_unique_name_for_message(message_type)
        if self._routes.has_members(topic, queue_name):
            raise self._refuse_deletion(message_type, queue_name)
        dropped = self._conn.call(
            self._streams.delete(topic, queue_name), self._timeout, f"delete {queue_name!r}"
        )
        if dropped is None:
            raise self._refuse_deletion(message_type, queue_name)
        if dropped:
            logger.warning(
                "deleted the queue group %r of %s and the %d messages it held",
                queue_name,
                topic,
                dropped,
            )
        return dropped


async def stop_all(groups: list[GroupConsumer]) -> None:
    await asyncio.gather(*(group.stop() for group in groups))
