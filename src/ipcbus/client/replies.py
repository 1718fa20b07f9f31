"""Request/reply across processes (in each worker): the reply route of a ``HubBroker``.

A requesting broker has one private reply topic (``wire.reply_topic(client_id)``), subscribed
once, on its first ``request()``, and kept until it closes: a route per request would cost a
subscription round trip to the hub per request, and a table at the hub that could leak. A request
is a batch of one message whose meta carries its correlation id (the requester's own numbering,
``PendingRequests``) and the reply topic; a responder publishes its answer on that topic with the
same id. The answer never reaches a handler: whichever thread reads the SUB socket (an idle
dispatcher, or the I/O thread while the dispatcher runs handlers: ``Subscriptions.reading``)
recognises the reply topic and hands the frames to the waiting requester, which decodes them in
its own thread. So a reply needs no free handler thread (a handler that requests waits on no
other handler), and a requester that gave up leaves nothing behind: the entry is gone, and an
answer that comes later is counted in ``late_replies``.

Who may answer: any client that holds the bus secret (CURVE authenticates every connection to
the hub); it can also answer requests it never received (docs/security.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from ..core import codec
from ..core.requests import Failure, PendingRequests, result_of
from ..exceptions import (
    HubUnavailableError,
    MessageSerializationError,
    MessageTooLargeError,
    RequestTimeoutError,
)
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from .io import IOThread
from .outbox import Prepared

__all__ = ["HubReply", "ReplyRoute"]

logger = logging.getLogger(__name__)

Deliver = Callable[[list[zmq.Frame]], bool]


class ReplyRoute:
    """A broker's reply topic, its requests and the replies that come back."""

    def __init__(self, client_id: bytes, table: PendingRequests) -> None:
        self.topic = wire.reply_topic(client_id)
        self._table = table
        self._io: IOThread | None = None
        self._lock = threading.Lock()
        self._live: threading.Event | None = None  # set once the hub has the reply topic live
        self.malformed = 0  # answers on the reply topic that were not one (logged)
        # Called once, before the reply topic is subscribed: the dispatcher looks for replies
        # from then on (no batch of the topic can reach it before).
        self.on_subscribe: Callable[[], None] | None = None

    def attach(self, io: IOThread) -> None:
        self._io = io

    def deliver(self, dispatch: Deliver) -> Deliver:
        """What the I/O thread calls with each fan-out batch: replies are taken here, the rest
        goes on to ``dispatch`` (the dispatcher's inbox)."""
        topic = self.topic

        def deliver(frames: list[zmq.Frame]) -> bool:
            if frames[0].bytes.startswith(topic):
                self._take(frames)
                return True
            return dispatch(frames)

        return deliver

    def take(self, frames: list[zmq.Frame]) -> bool:
        """The dispatcher, with a batch it read from the SUB socket itself: ``True`` when it
        was a reply, taken here."""
        if frames[0].bytes.startswith(self.topic):
            self._take(frames)
            return True
        return False

    def _take(self, frames: list[zmq.Frame]) -> None:  # I/O thread or idle dispatcher
        try:
            route = wire.route_of(wire.parse_fanout_head(frames[0].bytes)[3])
            if route is None or route.kind == wire.ROUTE_REQUEST:
                raise ValueError("a batch on the reply topic that is no answer")
        except (ValueError, IndexError) as exc:
            self.malformed += 1
            logger.error("ignored a malformed reply: %s", exc)
            return
        # Decoded by the requester, in its own thread: unpickling runs the classes' code.
        self._table.resolve(route.correlation, (route.kind, frames))

    # -- the requester's side ------------------------------------------------------------------

    def request(
        self, message: Message, timeout: float | None, subscribe_timeout: float | None
    ) -> Message:
        io = self._io
        assert io is not None
        # One deadline for the whole request: the first one's wait for its reply topic too.
        deadline = None if timeout is None else time.monotonic() + timeout
        self._ensure_live(io, message, timeout, subscribe_timeout)
        cls = type(message)
        topic = wire.topic_for(get_unique_name_for_message(cls))
        # Encoded here, in the caller: MessageSerializationError and MessageTooLargeError are
        # the caller's, for every request (a publish() checks only the first of its type).
        encode = codec.encode_split if topic in io.outbox.grouped else codec.encode_batch
        codec_id, frames = encode(cls, [message])
        _check_size(io, cls, frames)
        pending = self._table.open()
        meta = wire.pack_request_meta(codec_id, time.time(), pending.request_id, self.topic)
        io.fanout.await_reply(True)
        try:
            try:
                io.publish(Prepared(wire.publish(topic, meta, frames)))
            except BaseException:
                self._table.forget(pending.request_id)  # never sent: nothing waits for it
                raise
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got, outcome = self._table.wait(pending, left)
        finally:
            io.fanout.await_reply(False)
        if got:
            outcome = _decode(outcome)
        return result_of(message, got, outcome, timeout)

    def _ensure_live(
        self,
        io: IOThread,
        message: Message,
        timeout: float | None,
        subscribe_timeout: float | None,
    ) -> None:
        """Subscribe to the reply topic once, and wait until the hub has it live (a reply sent
        before would reach nobody), within the request's ``timeout`` if it is the shorter."""
        with self._lock:
            live = self._live
            if live is None:
                live = self._live = threading.Event()
                if self.on_subscribe is not None:
                    self.on_subscribe()
                io.subscribe(self.topic, live)
        if timeout is not None and (subscribe_timeout is None or timeout <= subscribe_timeout):
            if not live.wait(timeout):
                raise RequestTimeoutError(
                    f"no reply to the {get_unique_name_for_message(message)} request within "
                    f"{timeout} s: the hub at {io.endpoint} did not confirm this broker's reply "
                    "topic in that time; nothing was sent"
                )
            return
        if not live.wait(subscribe_timeout):
            raise HubUnavailableError(
                f"the hub at {io.endpoint} did not confirm this broker's reply topic within "
                f"{subscribe_timeout} s"
            )

    @property
    def subscribed(self) -> bool:
        return self._live is not None


class HubReply:
    """A responder's way back: the answer is published on the requester's reply topic."""

    __slots__ = ("_io", "_route")

    def __init__(self, io: IOThread, route: wire.Route) -> None:
        self._io = io
        self._route = route

    def reply(self, message: Message) -> None:
        cls = type(message)
        try:
            codec_id, frames = codec.encode_objects(cls, [message])
            _check_size(self._io, cls, frames)
        except MessageSerializationError as exc:
            # Its type (in exc), not its repr: the repr of a 300 MB reply took 15 s to build.
            logger.error("a reply cannot be sent: %s", exc)
            self.fail(Failure.of(exc))
            return
        meta = wire.pack_reply_meta(codec_id, time.time(), self._route.correlation, False)
        self._io.publish(Prepared(wire.publish(self._route.reply_topic, meta, frames)))

    def fail(self, failure: Failure) -> None:
        payload = wire.pack_failure(failure.remote_type, failure.remote_message)
        meta = wire.pack_reply_meta(codec.OBJECTS, time.time(), self._route.correlation, True)
        self._io.publish(Prepared(wire.publish(self._route.reply_topic, meta, [payload])))


def _check_size(io: IOThread, cls: type, frames: list[Any]) -> None:
    biggest = max(len(frame) for frame in frames)
    if biggest > io.outbox.frame_budget:
        raise MessageTooLargeError(
            f"{get_unique_name_for_message(cls)}: it encodes to a frame of {biggest} bytes, over "
            f"the {io.outbox.max_message_size} bytes the hub accepts; nothing was sent"
        )


def _decode(outcome: object) -> Message | Failure:
    """An answer's frames, as the requester's thread decodes them."""
    kind, frames = cast(tuple[bytes, list[zmq.Frame]], outcome)
    try:
        batch = wire.Fanout.parse(frames)
        if kind == wire.ROUTE_FAILURE:
            return Failure(*wire.parse_failure(bytes(batch.payload[0].bytes)))
        (reply,) = codec.decode_batch(batch.meta[0], batch.payload, None)
    except Exception as exc:
        # The responder's reply does not decode here (its class is not importable in this
        # process, say): the request's answer is that failure.
        return Failure.of(exc)
    if not isinstance(reply, Message):
        return Failure("TypeError", f"a reply that is not a Message: {type(reply).__name__}")
    return reply
