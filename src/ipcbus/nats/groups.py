"""Queue groups on JetStream: one stream per grouped type, one durable pull consumer per group.

Which stream holds what, and why:

- a type gets a stream (``<NAMESPACE>_<hash>``, subject: the type's subject only, retention
  *interest*, file storage) when its first queue group is declared or joined, and loses it when
  its last group is deleted. Types that only broadcast have no stream: their messages are never
  stored, and cost what core NATS costs;
- each group is a durable consumer of that stream (``g_<group>``: explicit acks, ``ack_wait``,
  no ``max_deliver``, starting with the messages published after its creation): JetStream
  counts a rejected delivery as one that failed, so the members count attempts themselves
  (``num_delivered`` minus the rejections heard of: :mod:`ipcbus.nats.rejections`); a message
  whose last attempt died with its process comes back once more and is dead-lettered
  unhandled, never gone unseen; interest retention keeps a message until every group
  acknowledged it, and a group holds what is published while it has no member;
- in each process, the members of one group share one pull loop on the connection's loop
  thread (one pull request at a time, its deliveries taken as the client reads them) and take
  its deliveries round-robin, by predicate, as in-process brokers do; a message no member here
  accepts is given back (``nak`` with a delay, no attempt) for another process, and dropped,
  logged, once every process with members rejected it. While its pulls bring only rejected
  messages, a process pulls one at a time after a pause, so that the others are served. A
  member cancelled with deliveries it has not begun hands them to another member here, or
  back to the group (no attempt).

A delivery runs its handler on the handler loop (``ipcbus-nats-queue-loop``: coroutines there,
plain functions in its thread pool), with ``in_progress`` sent every third of ``ack_wait`` while
it runs. Success acks; a failure naks with the retry backoff of :mod:`ipcbus.core.retry`, and the
last one publishes the same :class:`~ipcbus.message.DeadLetter` as every broker, then acks. A
process killed mid-handler acks nothing: JetStream delivers the message again after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from ..core.routing import RouteTable
from ..message import Message
from .connection import Handover
from .envelope import Signer, open_envelope
from .group_runs import TERM, Answer, GroupRuns
from .rejections import Rejections, Seen
from .statistics import Counters
from .subjects import consumer_name, stream_name

__all__ = ["GroupConsumer"]

logger = logging.getLogger(__name__)

# An idle fetch waits this long at the server; closing waits for the current one to end, so
# that no message is handed to a subscription that is gone (it would wait ack_wait).
FETCH_WAIT = 0.5
MAX_FETCH = 256
# While its pulls bring only what its members reject, a process waits this long (doubling up
# to STEP_BACK_MAX) before its next pull request (of one message).
STEP_BACK = 0.02
STEP_BACK_MAX = 0.5


class GroupConsumer(GroupRuns):
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
        token: str,
        seen: Seen,
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
        self._rejected_now = 0  # rejections of the pull request under way
        self._taken_now = 0  # and deliveries taken by a member here
        self._step_back = 0.0  # the pause before the next request, while this process rejects
        self._request_done = asyncio.Event()
        self._burst: list[tuple[Any, ...]] = []
        self._tasks: set[asyncio.Future[None]] = set()
        where = f"{self.stream}.{self.durable}"
        self._rejections = Rejections(client, namespace, where, token, send, seen, signer)

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
        await self._rejections.start()  # before the first delivery: its notes come first
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
        try:
            await self._rejections.stop()
        except Exception as exc:
            logger.debug("unsubscribing the rejections of %s: %s", self.durable, exc)

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
            if self._step_back:
                # What this process last pulled it rejected: a short pause and a batch of one,
                # so that the pull requests of members elsewhere are served first.
                await asyncio.sleep(self._step_back)
                free = 1
            self._rejected_now = self._taken_now = 0
            self._outstanding = min(free, MAX_FETCH)
            self._request_done = asyncio.Event()
            try:
                await client.publish(
                    subject,
                    b'{"batch": %d, "expires": %d}' % (self._outstanding, expires),
                    reply=self._deliver,
                )
                await asyncio.wait_for(self._request_done.wait(), FETCH_WAIT + 5.0)
                if self._rejected_now and not self._taken_now:
                    self._step_back = min(STEP_BACK_MAX, max(STEP_BACK, self._step_back * 2))
                else:
                    self._step_back = 0.0
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
            self._give_back(msg)
            return
        work = self._take(msg)
        if work is None:
            return
        self._taken_now += 1
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
            self._send(msg.reply, TERM)
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
            self._send(msg.reply, TERM)
            return None
        seq = msg.metadata.sequence.stream
        # Rejections are no attempts (rejections.py).
        attempt = max(1, msg.metadata.num_delivered - self._rejections.count(seq))
        if attempt > self.max_attempts:
            return (None, message, envelope, msg, attempt)
        member = self._routes.pick(self.topic, self.queue_name, message)
        if member is None:
            self._rejected(msg, message, seq)
            return None
        return (member, message, envelope, msg, attempt)

    def _rejected(self, msg: Msg, message: Message, seq: int) -> None:  # the client's loop
        """No member here accepts ``message``: given back for a member elsewhere, or dropped
        once every process with members rejected it (rejections.py)."""
        self._rejected_now += 1
        self._rejections.rejected(msg.reply, message, seq, self.queue_name)

    def _give_back(self, msg: Msg) -> None:  # the client's loop
        """A delivery that no member here takes (cancelled before it began, or the group is
        stopping here): back to the group at once, a rejection, not an attempt."""
        self._rejections.give_back(msg.reply, msg.metadata.sequence.stream)
