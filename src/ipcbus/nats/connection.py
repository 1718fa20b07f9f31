"""The NATS connection of one NatsBroker: a private event loop thread runs the nats-py client.

Callers never touch the client: ``publish()`` appends to the outbox (a deque) and wakes the loop
once per burst; everything else is a coroutine run on the loop with a deadline (``call``). One
drain task at a time sends the outbox in order, so a process's messages leave in ``publish()``
order, whatever their types.

Each connection has one inbox subscription of its own, ``<inbox>.>``: JetStream's acks of stored
publishes arrive on ``<inbox>.a.<n>``, answers to ``request()`` on ``<inbox>.r.<n>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from ..core.loops import start_loop_thread
from ..exceptions import HubUnavailableError, PublishTimeoutError
from .connection_faults import ConnectionFaults
from .statistics import Counters

__all__ = ["Handover", "NatsConnection"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Handover(asyncio.Queue[Msg]):
    """A subscription's pending queue that hands each message to ``handle`` at once, on the
    client's loop as it reads (``handle`` must not block). Holds nothing, so nats-py's own
    checks of it (``empty()``, ``join()``) pass through."""

    def __init__(self, handle: Callable[[Msg], None]) -> None:
        super().__init__()
        self._handle = handle

    def put_nowait(self, item: Msg) -> None:
        self._handle(item)


class _FlushMarker:
    __slots__ = ("acks_before", "done", "error")

    def __init__(self, acks_before: int) -> None:
        self.acks_before = acks_before
        self.done = threading.Event()
        self.error: BaseException | None = None


class NatsConnection(ConnectionFaults):
    """A connected nats-py client on a loop thread of its own (``ipcbus-nats-io``)."""

    def __init__(
        self,
        servers: str | list[str],
        counters: Counters,
        *,
        connect_timeout: float,
        on_reply: Callable[[str, Msg], None],
        on_stored_gone: Callable[[str], None],
        options: dict[str, Any],
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self.servers = servers
        self._counters = counters
        self._on_reply = on_reply
        self._on_stored_gone = on_stored_gone
        self._on_closed = on_closed  # closed for good (reconnection gave up), not by close()
        self._outbox: deque[bytes | _FlushMarker] = deque()
        self._lock = threading.Lock()
        self._draining = False
        self._ack_ids = iter(range(1, 2**62))
        self._last_ack_id = 0
        self._unacked: dict[int, str] = {}  # ack id -> subject, of stored publishes
        self._acked = threading.Condition()
        self._store_errors: list[str] = []
        self._send_errors: list[str] = []
        self._closing = False
        self.inbox = ""
        self.loop, self.thread = start_loop_thread("ipcbus-nats-io")
        try:
            self.client: Client = self.call(self._connect(options), connect_timeout, "connect")
        except BaseException:
            self._stop_loop(5.0)
            raise

    # -- running coroutines on the loop ------------------------------------------------------

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coroutine`` on the loop and return its result; ``HubUnavailableError`` past
        ``timeout`` (the coroutine is cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise HubUnavailableError(
                f"the NATS server at {self.servers} did not answer ({what}) within {timeout} s"
            ) from None
        except nats.errors.ConnectionClosedError as exc:  # reconnection gave up
            raise HubUnavailableError(
                f"the connection to the NATS server at {self.servers} is closed ({what})"
            ) from exc

    def spawn(self, coroutine: Awaitable[Any]) -> None:
        """Run ``coroutine`` on the loop without waiting (from any thread); what it raises is
        logged."""

        async def logged() -> None:
            try:
                await coroutine
            except Exception:
                logger.exception("NATS operation failed")

        asyncio.run_coroutine_threadsafe(logged(), self.loop)

    async def _connect(self, options: dict[str, Any]) -> Client:
        client = await nats.connect(
            self.servers,
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            closed_cb=self._closed,
            **options,
        )
        self.inbox = client.new_inbox()
        # pending_bytes_limit 0: nats-py counts what it hands over and never takes it back here.
        inbox = await client.subscribe(self.inbox + ".>", pending_bytes_limit=0)
        # Handled as the client reads them, without a task and a queue per message: with a
        # callback, nats-py's queue hand-off cost more than the rest of a store ack (profiled).
        # Nothing is sent to the inbox before this connection has published: nothing is lost.
        inbox._pending_queue = Handover(self._inbox_message)
        return client

    # -- sending -----------------------------------------------------------------------------

    def send(self, subject: str, data: bytes, reply: str = "") -> None:
        """Queue one message for the drain task (thread-safe, never blocks).

        The ``PUB`` command is built here, in the caller's thread, and the drain task hands each
        burst to the client as one write: nats-py's ``publish()`` validates the subject and
        creates a future per message, and on the development machine (2 cores, shared) capped
        a publisher at about 3 000 messages a second.
        """
        command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(data), data)
        with self._lock:
            self._outbox.append(command)
            if self._draining:
                return
            self._draining = True
        try:
            self.loop.call_soon_threadsafe(self._start_drain)
        except RuntimeError:  # the loop is closed: the broker closed (a handler's late answer)
            with self._lock:
                unsent = sum(isinstance(item, bytes) for item in self._outbox)
                self._outbox = deque()
                self._draining = False
            count = self._counters.add("unsent", unsent)
            logger.warning(
                "could not send %d messages: the connection is closed (%d unsent so far)",
                unsent,
                count,
            )

    def send_stored(self, subject: str, data: bytes) -> None:
        """``send`` for a subject a stream stores: JetStream acks it on our inbox, and
        ``flush()`` waits for that ack."""
        with self._acked:
            ack_id = next(self._ack_ids)
            self._unacked[ack_id] = subject
            self._last_ack_id = ack_id
        self.send(subject, data, f"{self.inbox}.a.{ack_id}")

    def pending(self) -> int:
        return len(self._outbox)

    def _start_drain(self) -> None:
        self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        outbox = self._outbox
        while True:
            with self._lock:
                if not outbox:
                    self._draining = False
                    return
                burst: list[bytes] = []
                marker = None
                while outbox:
                    item = outbox.popleft()
                    if isinstance(item, _FlushMarker):
                        marker = item
                        break
                    burst.append(item)
            if burst:
                await self._write(burst)
            if marker is not None:
                await self._flush_marker(marker)

    async def _write(self, burst: list[bytes]) -> None:
        client = self.client
        data = b"".join(burst)
        failure = None
        if client.is_closed:
            failure = "the connection is closed"
        elif (
            not client.is_connected
            and client._pending_data_size + len(data) > client._max_pending_size
        ):
            failure = (
                f"the server is unreachable and {client._pending_data_size} bytes already wait "
                "for it (nats-py's pending_size)"
            )
        if failure is not None:
            count = self._counters.add("unsent", len(burst))
            logger.error(
                "could not send %d messages: %s (%d unsent so far)", len(burst), failure, count
            )
            self._send_errors.append(f"{len(burst)} messages: {failure}")
            return
        # nats-py's own path for a PUB, once per burst instead of once per message.
        await client._send_command(data)
        await client._flush_pending()

    async def _flush_marker(self, marker: _FlushMarker) -> None:
        try:
            await self.client.flush(timeout=60)
        except Exception as exc:
            marker.error = exc
        marker.done.set()

    def flush(self, timeout: float | None) -> list[str]:
        """Wait until the server has everything sent before, and JetStream acked every stored
        publish made before; return the store failures since the last flush."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._acked:
            acks_before = self._last_ack_id
        marker = _FlushMarker(acks_before)
        with self._lock:
            self._outbox.append(marker)
            start = not self._draining
            self._draining = True
        if start:
            self.loop.call_soon_threadsafe(self._start_drain)
        if not marker.done.wait(
            None if deadline is None else max(0.0, deadline - time.monotonic())
        ):
            raise PublishTimeoutError(
                f"the NATS server at {self.servers} did not confirm a flush within {timeout} s"
            )
        if marker.error is not None:
            raise HubUnavailableError(
                f"the NATS server at {self.servers} did not confirm a flush: {marker.error}"
            ) from marker.error
        with self._acked:
            while any(ack_id <= acks_before for ack_id in self._unacked):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PublishTimeoutError(
                        f"JetStream did not confirm storing {len(self._unacked)} messages "
                        f"within {timeout} s"
                    )
                self._acked.wait(left)
            errors, self._store_errors = self._store_errors, []
        sent_errors, self._send_errors = self._send_errors, []
        return sent_errors + errors

    # -- receiving on the inbox --------------------------------------------------------------

    def _inbox_message(self, msg: Msg) -> None:  # the client's loop, as it reads
        kind, _, token = msg.subject[len(self.inbox) + 1 :].partition(".")
        if kind == "r":
            self._on_reply(token, msg)
        elif kind == "a":
            self._stored(int(token), msg)

    def _stored(self, ack_id: int, msg: Msg) -> None:
        with self._acked:
            subject = self._unacked.pop(ack_id, None)
            self._acked.notify_all()
        if subject is None:
            return
        status = (msg.headers or {}).get("Status")
        if status == "503":
            # No stream listens on the subject any more (its last queue group was deleted):
            # the broadcast subscribers got the message; nothing was to be stored.
            self._on_stored_gone(subject)
            return
        try:
            answer = json.loads(msg.data) if msg.data else {}
        except ValueError:
            answer = {"error": {"description": repr(msg.data[:100])}}
        error = answer.get("error") if isinstance(answer, dict) else None
        if error:
            count = self._counters.add("store_failures")
            logger.error(
                "JetStream refused to store a message of %s: %s (%d refused so far)",
                subject,
                error,
                count,
            )
            with self._acked:
                self._store_errors.append(f"{subject}: {error}")

    # -- closing -----------------------------------------------------------------------------

    def close(self, linger: float) -> None:
        """Close the client (within ``linger``) and stop the loop thread."""
        self._closing = True
        if self.loop.is_running():
            try:
                self.call(self.client.close(), linger, "close")
            except Exception as exc:
                logger.warning("closing the NATS connection to %s: %s", self.servers, exc)
        self._stop_loop(linger)
        with self._acked:
            self._acked.notify_all()

    def _stop_loop(self, timeout: float) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
