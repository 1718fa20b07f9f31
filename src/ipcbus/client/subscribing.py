"""``HubBroker``'s subscriptions: broadcast topics and queue consumers, confirmed by the hub
before ``subscribe()`` returns, cancelled, and the queue groups it declares and deletes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..core.contract import Subscription
from ..exceptions import HubUnavailableError
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from .control import DeleteAnswer
from .publishing import Publishing

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .dispatch import Dispatcher

__all__ = ["Subscribing"]


class Subscribing(Publishing):
    """The subscription bookkeeping of :class:`~ipcbus.client.broker.HubBroker`."""

    _subs_lock: threading.Lock
    _live: dict[str, threading.Event]  # broadcast topics the hub has, by topic
    _queue_subscriptions: dict[bytes, Subscription]  # queue consumers, by subscription id
    _queue_ids: Iterator[int]
    _request_ids: Iterator[int]
    _dispatcher: Dispatcher

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
        if self._foreign():
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
