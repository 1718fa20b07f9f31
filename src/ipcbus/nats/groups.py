"""Queue groups on JetStream: one stream per grouped type, one durable pull consumer per group.

Which stream holds what, and why:

- a type gets a stream (``<NAMESPACE>_<hash>``, subject: the type's subject only, retention
  *interest*, file storage) when its first queue group is declared or joined, and loses it when
  its last group is deleted. Types that only broadcast have no stream: their messages are never
  stored, and cost what core NATS costs;
- each group is a durable consumer of that stream (``g_<group>``: explicit acks, ``ack_wait``,
  ``max_deliver`` = the members' ``max_attempts`` + 1, starting with the messages published
  after its creation); the one delivery in reserve is for a message whose last attempt died
  with its process: it comes back once more and is dead-lettered unhandled, never gone unseen;
  interest retention keeps a message until every group acknowledged it, and a group holds
  what is published while it has no member;
- in each process, the members of one group share one pull loop on the connection's loop
  thread (one pull request at a time, its deliveries taken as the client reads them) and take
  its deliveries round-robin, by predicate, as in-process
  brokers do; a message no member here accepts is given back (``nak``) for another process, and
  dropped, logged, at its last delivery.

A delivery runs its handler on the handler loop (``ipcbus-nats-queue-loop``: coroutines there,
plain functions in its thread pool), with ``in_progress`` sent every third of ``ack_wait`` while
it runs. Success acks; a failure naks with the retry backoff of :mod:`ipcbus.core.retry`, and the
last one publishes the same :class:`~ipcbus.message.DeadLetter` as every broker, then acks. A
process killed mid-handler acks nothing: JetStream delivers the message again after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..core.contract import AsyncMessageContext, Subscription
from ..core.handlers import is_cancellation
from ..core.retry import after_failure, publish_dead_letter
from ..core.routing import RouteTable
from ..exceptions import ConsumerDiedError as ConsumerDiedError
from ..message import Message
from .connection import Handover
from .envelope import Envelope, Signer, open_envelope
from .statistics import Counters
from .subjects import consumer_name, stream_name

__all__ = ["GroupConsumer", "running_queue_handler"]

logger = logging.getLogger(__name__)

# An idle fetch waits this long at the server; closing waits for the current one to end, so
# that no message is handed to a subscription that is gone (it would wait ack_wait).
FETCH_WAIT = 0.5
MAX_FETCH = 256

Answer = Callable[[Envelope, Any, BaseException | None], None]

# What a consumer publishes on a delivery's ack subject (JetStream's ack protocol).
_ACK = b"+ACK"
_NAK = b"-NAK"
_IN_PROGRESS = b"+WPI"
_TERM = b"+TERM"

_local = threading.local()


def running_queue_handler() -> bool:
    """True in a thread that runs a plain-function queue handler now (``close()`` there must
    not wait for that very handler)."""
    return getattr(_local, "active", False)


def _call_marked(
    handler: Callable[[Message], Any], message: Message
) -> tuple[Any, BaseException | None]:
    """Call a plain handler in a worker thread: what it returned, or what it raised (any
    ``BaseException``: a failure of the call, never an exception of the pool or the loop)."""
    _local.active = True
    try:
        return handler(message), None
    except BaseException as exc:
        return None, exc
    finally:
        _local.active = False


class GroupConsumer:
    """This process's members of one queue group, fed by one pull loop.

    Threads: the pull loop runs on the client's loop; each fetched burst crosses to the handler
    loop in one hop; acks, naks and progress reports are plain publishes on the message's ack
    subject, sent through the connection's outbox (``send``) from the handler loop: no
    coroutine of the client per message.
    """

    def __init__(
        self,
        client: Client,
        namespace: str,
        topic: str,
        queue_name: str,
        *,
        message_type: type[Message],
        max_attempts: int,
        signer: Signer,
        routes: RouteTable,
        counters: Counters,
        handler_loop: Callable[[], asyncio.AbstractEventLoop],
        publish: Callable[[Message], None],
        send: Callable[[str, bytes], None],
        answer: Answer,
        ack_wait: float,
    ) -> None:
        self.topic = topic
        self.queue_name = queue_name
        self.message_type = message_type
        self.max_attempts = max_attempts
        self.stream = stream_name(namespace, topic)
        self.durable = consumer_name(queue_name)
        self._client = client
        self._signer = signer
        self._routes = routes
        self._counters = counters
        self._handler_loop = handler_loop
        self._publish = publish
        self._send = send
        self._answer = answer
        self._ack_wait = ack_wait
        self._prefetch = 1
        self._lock = threading.Lock()
        self._in_hand = 0
        self._waiting = False  # the pull loop waits for room
        self._room = asyncio.Event()  # touched on the client's loop only
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._deliver = ""
        self._sub: NatsSubscription | None = None
        self._outstanding = 0
        self._refused = False
        self._request_done = asyncio.Event()
        self._burst: list[tuple[Any, ...]] = []
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def in_hand(self) -> int:
        return self._in_hand

    def set_prefetch(self, prefetch: int) -> None:  # any thread
        with self._lock:
            self._prefetch = max(self._prefetch, prefetch)
        self._wake()

    def _wake(self) -> None:  # any thread
        loop = self._client_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._room.set)

    async def start(self) -> None:  # the client's loop
        self._client_loop = asyncio.get_running_loop()
        client = self._client
        self._deliver = client.new_inbox()
        # Deliveries are taken as the client reads them (no queue and task per message, as
        # nats-py's fetch() has); pending_bytes_limit 0: nats-py never sees them taken.
        self._sub = await client.subscribe(self._deliver, pending_bytes_limit=0)
        self._sub._pending_queue = Handover(self._delivered)
        self._task = self._client_loop.create_task(self._pull())

    async def stop(self) -> None:
        """Ask for no more; the request under way ends within ``FETCH_WAIT`` (what it still
        brings is given back at once); deliveries in hand finish on their own."""
        self._stopping = True
        self._room.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=FETCH_WAIT + 2.0)
            self._task.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribing the deliveries of %s: %s", self.durable, exc)

    async def _pull(self) -> None:
        """One pull request at a time: up to the room left (at most ``MAX_FETCH``), waiting at
        the server at most ``FETCH_WAIT``; the next when it is done."""
        client = self._client
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        expires = int(FETCH_WAIT * 1e9)
        while not self._stopping:
            self._room.clear()
            with self._lock:
                free = self._prefetch - self._in_hand
                self._waiting = free <= 0
            if free <= 0:
                await self._room.wait()
                continue
            self._outstanding = min(free, MAX_FETCH)
            self._request_done = asyncio.Event()
            try:
                await client.publish(
                    subject,
                    b'{"batch": %d, "expires": %d}' % (self._outstanding, expires),
                    reply=self._deliver,
                )
                await asyncio.wait_for(self._request_done.wait(), FETCH_WAIT + 5.0)
                if self._refused:
                    self._refused = False
                    await asyncio.sleep(FETCH_WAIT)
            except Exception as exc:
                if self._stopping:
                    return
                logger.warning("pulling for queue group %r failed: %s", self.queue_name, exc)
                await asyncio.sleep(FETCH_WAIT)

    def _delivered(self, msg: Msg) -> None:  # the client's loop, as it reads
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None:
            if status != "100":  # 404, 408: the request ended; others: it was refused
                if status not in ("404", "408"):
                    # The consumer is gone or busy (409), or JetStream is not there (503):
                    # the next request waits, so that this is no busy loop.
                    self._refused = True
                    logger.warning(
                        "queue group %r: JetStream refused a pull request (%s %s)",
                        self.queue_name,
                        status,
                        msg.headers.get("Description", "") if msg.headers else "",
                    )
                self._request_done.set()
            return
        self._outstanding -= 1
        if self._outstanding <= 0:
            self._request_done.set()
        if self._stopping:
            self._send(msg.reply, _NAK)
            return
        work = self._take(msg)
        if work is None:
            return
        if not self._burst:
            # Handed over once the client has read what arrived with it: one hop a burst.
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._burst.append(work)

    def _hand_over(self) -> None:  # the client's loop
        burst, self._burst = self._burst, []
        with self._lock:
            self._in_hand += len(burst)
        asyncio.run_coroutine_threadsafe(self._run(burst), self._handler_loop())

    def _take(self, msg: Msg) -> tuple[Any, ...] | None:
        """Check and decode one delivery: the work for the handler loop, or ``None`` when it
        was settled here (rejected, undecodable, accepted by no member here)."""
        envelope = open_envelope(self._signer, msg.subject, msg.data)
        if envelope is None:
            count, log = self._counters.add_logged("rejected")
            if log:
                logger.error(
                    "queue group %r: dropped a stored message on %s without a valid signature "
                    "(forged, altered, or from another bus secret): not unpickled (%d "
                    "rejected so far)",
                    self.queue_name,
                    msg.subject,
                    count,
                )
            self._send(msg.reply, _TERM)
            return None
        try:
            message = envelope.decode(self.message_type)
        except Exception as exc:
            count, log = self._counters.add_logged("undecodable")
            if log:
                logger.error(
                    "queue group %r: dropped a message of %s this process cannot decode (%s: "
                    "%s; %d so far)",
                    self.queue_name,
                    self.topic,
                    type(exc).__name__,
                    exc,
                    count,
                )
            self._send(msg.reply, _TERM)
            return None
        attempt = msg.metadata.num_delivered
        if attempt > self.max_attempts:
            return (None, message, envelope, msg, attempt)
        member = self._routes.pick(self.topic, self.queue_name, message)
        if member is None:
            if attempt >= self.max_attempts:
                logger.warning(
                    "queue group %r: no member accepted %r by its last delivery: dropped",
                    self.queue_name,
                    message,
                )
                self._send(msg.reply, _TERM)
            else:
                self._send(msg.reply, _NAK)  # for a member in another process
            return None
        return (member, message, envelope, msg, attempt)

    async def _run(self, burst: list[tuple[Any, ...]]) -> None:  # the handler loop
        for member, message, envelope, msg, attempt in burst:
            if member is None:
                self._last_attempt_lost(message, msg, attempt - 1)
            else:
                # Kept referenced while they run: the loop holds tasks only weakly.
                task = asyncio.ensure_future(self._handle(member, message, envelope, msg, attempt))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(
        self,
        member: Subscription,
        message: Message,
        envelope: Envelope,
        msg: Msg,
        attempt: int,
    ) -> None:  # the handler loop
        # One id per message and group, the same on every attempt.
        context = AsyncMessageContext._of(
            self.queue_name, f"{envelope.message_id}/{self.durable}", attempt, envelope.published_at
        )
        AsyncMessageContext._current.set(context)
        task = asyncio.ensure_future(_run_returning(member, message))
        try:
            while not (await asyncio.wait({task}, timeout=self._ack_wait / 3))[0]:
                self._send(msg.reply, _IN_PROGRESS)
        except asyncio.CancelledError:
            # The broker closes: the delivery goes back to the group at once.
            task.cancel()
            self._send(msg.reply, _NAK)
            self._done()
            raise
        result, failure = task.result()
        if failure is None:
            self._send(msg.reply, _ACK)
            if envelope.reply:
                self._answer(envelope, result, None)
        else:
            verdict = after_failure(
                member.policy, self.queue_name, member.handler, message, attempt, failure
            )
            if verdict.retry:
                nak = _NAK if not verdict.delay else b'-NAK {"delay": %d}' % (verdict.delay * 1e9)
                self._send(msg.reply, nak)
            else:
                publish_dead_letter(self._publish, self.queue_name, message, attempt, failure)
                self._send(msg.reply, _ACK)
                if envelope.reply:
                    self._answer(envelope, None, failure)
        self._done()

    def _last_attempt_lost(self, message: Message, msg: Msg, attempts: int) -> None:
        """The handler loop (publishing from the client's loop could wait for that loop)."""
        lost = ConsumerDiedError(
            "the process that ran its last attempt died before acknowledging it"
        )
        publish_dead_letter(self._publish, self.queue_name, message, attempts, lost)
        self._send(msg.reply, _ACK)
        self._done()

    def _done(self) -> None:  # the handler loop
        with self._lock:
            self._in_hand -= 1
            wake, self._waiting = self._waiting, False
        if wake:
            self._wake()


async def _run_returning(
    subscription: Subscription, message: Message
) -> tuple[Any, BaseException | None]:
    """:func:`ipcbus.core.handlers.run_queue_handler`: what the handler returned, or what it
    raised. Whatever it raises, ``BaseException`` included, is a failure of that call
    (:mod:`ipcbus.core.failures`): let out of this task, ``SystemExit`` or ``KeyboardInterrupt``
    would end the handler loop's ``run_forever`` and, with it, every queue delivery of the
    broker. Only the task's own cancellation (the broker closing) goes through."""
    handler = subscription.handler
    try:
        if inspect.iscoroutinefunction(handler):
            return await handler(message), None
        result, failure = await asyncio.to_thread(_call_marked, handler, message)
        if failure is None and inspect.isawaitable(result):
            result = await result
        return result, failure
    except BaseException as exc:
        if is_cancellation(exc):
            raise
        return None, exc
