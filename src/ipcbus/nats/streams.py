"""What a NatsBroker asks JetStream, on the connection's loop: which types are stored, the
groups' streams and consumers, their members, their statistics, their deletion.

Which types are stored: a publisher asks once per type (``is_stored``) and then listens on
``<namespace>.streams``, where every broker that creates a group announces its type, so it
publishes those types with a reply inbox JetStream acks. Which processes have members of a
group: each process with members subscribes to ``<namespace>.members.<stream>.<consumer>`` and
answers there; ``delete()`` asks, and NATS's "no responders" says no one is left.
"""

from __future__ import annotations

from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js import api as js_api

from .envelope import Signer, sign_note
from .statistics import GroupStatistics
from .subjects import consumer_name, stream_name, subject_for

__all__ = ["Streams"]


class Streams:
    """One broker's view of JetStream; its coroutines run on the connection's loop."""

    def __init__(
        self, client: Client, js: JetStreamContext, namespace: str, token: str, signer: Signer
    ) -> None:
        self._client = client
        self._token = token  # this broker's answer on presence subjects, signed
        self._signer = signer
        self._js = js
        self._namespace = namespace
        self.stored: dict[str, bool] = {}  # topic -> a stream stores it
        self.known_groups: set[tuple[str, str]] = set()  # declared or joined by this broker

    async def listen(self) -> None:
        async def announced(msg: Any) -> None:
            self.stored[msg.data.decode()] = True

        await self._client.subscribe(f"{self._namespace}.streams", cb=announced)
        await self._client.flush()

    async def is_stored(self, topic: str) -> bool:
        try:
            await self._js.stream_info(stream_name(self._namespace, topic))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def ensure(self, topic: str, queue_name: str, max_attempts: int, ack_wait: float) -> None:
        """Create the group (and its type's stream) if need be, and announce the type."""
        await ensure_group(self._js, self._namespace, topic, queue_name, max_attempts, ack_wait)
        self.known_groups.add((topic, queue_name))
        self.stored[topic] = True
        await self._client.publish(f"{self._namespace}.streams", topic.encode())

    def _presence_subject(self, topic: str, queue_name: str) -> str:
        stream = stream_name(self._namespace, topic)
        return f"{self._namespace}.members.{stream}.{consumer_name(queue_name)}"

    async def join(self, topic: str, queue_name: str) -> NatsSubscription:
        """Say, until the returned subscription ends, that this process has members."""
        client = self._client
        subject = self._presence_subject(topic, queue_name)
        answer = sign_note(self._signer, subject, self._token)

        async def present(msg: Any) -> None:
            await client.publish(msg.reply, answer)

        subscription = await client.subscribe(subject, cb=present)
        await client.flush()
        return subscription

    async def delete(self, topic: str, queue_name: str) -> int | None:
        """Delete the group unless a process has members (``None``); what it held."""
        try:
            await self._client.request(self._presence_subject(topic, queue_name), b"", timeout=1.0)
            return None  # a member answered: in use
        except nats.errors.NoRespondersError:
            pass
        except nats.errors.TimeoutError:
            return None  # a member is there, slow to answer: in use all the same
        stream = stream_name(self._namespace, topic)
        durable = consumer_name(queue_name)
        try:
            info = await self._js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return 0
        held = (info.num_pending or 0) + (info.num_ack_pending or 0)
        await self._js.delete_consumer(stream, durable)
        self.known_groups.discard((topic, queue_name))
        if (await self._js.stream_info(stream)).state.consumer_count == 0:
            await self._js.delete_stream(stream)  # broadcast only again: nothing stored
            self.stored[topic] = False
        return held

    async def statistics(self) -> dict[str, GroupStatistics]:
        result = {}
        for topic, queue_name in sorted(self.known_groups):
            stream = stream_name(self._namespace, topic)
            try:
                info = await self._js.consumer_info(stream, consumer_name(queue_name))
            except nats.js.errors.NotFoundError:
                continue
            result[f"{topic}:{queue_name}"] = GroupStatistics(
                held=info.num_pending or 0, in_flight=info.num_ack_pending or 0
            )
        return result


async def ensure_group(
    js: JetStreamContext,
    namespace: str,
    topic: str,
    queue_name: str,
    max_attempts: int,
    ack_wait: float,
) -> None:
    """Create the type's stream and the group's durable consumer, if they do not exist."""
    stream = stream_name(namespace, topic)
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            js_api.StreamConfig(
                name=stream,
                description=topic,
                subjects=[subject_for(namespace, topic)],
                retention=js_api.RetentionPolicy.INTEREST,
                storage=js_api.StorageType.FILE,
            )
        )
    durable = consumer_name(queue_name)
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        info = None
    if info is not None and info.config.max_deliver in (-1, 0, None):
        return
    # No max_deliver: JetStream counts a delivery that members rejected as one that failed, so
    # its bound would drop messages other members accept. The members count attempts
    # (rejections.py) and dead-letter; a message whose last attempt died with its process
    # comes back once more, and is dead-lettered then instead of vanishing. A group made
    # with a bound (before) loses it here: the same config, updated.
    config = js_api.ConsumerConfig(
        name=durable,
        durable_name=durable,
        description=queue_name,
        deliver_policy=js_api.DeliverPolicy.NEW,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait if info is None else info.config.ack_wait,
        max_deliver=-1,
    )
    await js.add_consumer(stream, config)
