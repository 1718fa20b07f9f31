"""The control side of a client's I/O thread: requests waiting to leave on the control socket,
and what the hub must be told again after a reconnect (queue consumers, unanswered deletions).

Runs on the I/O thread only. Nothing is ever dropped: an ack lost would be a delivery stuck in
flight, so a request waits in the backlog while the pipe to the hub is full.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import zmq

from ..wire import protocol as wire

__all__ = ["ControlChannel", "DeleteAnswer"]


class DeleteAnswer:
    """The hub's answer to a DELETE: ``dropped`` held messages, ``None`` if it refused."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.dropped: int | None = None


class ControlChannel:
    def __init__(self) -> None:
        self.socket: zmq.Socket[Any] | None = None  # set once connected
        self._backlog: deque[list[bytes]] = deque()
        self._consumes: dict[bytes, wire.Consume] = {}  # restored after a reconnect
        self._consuming: dict[bytes, threading.Event] = {}
        self._deletes: dict[bytes, tuple[wire.DeleteQueue, DeleteAnswer]] = {}
        self._declares: dict[bytes, tuple[wire.DeclareQueue, threading.Event]] = {}

    @property
    def waiting(self) -> bool:
        """True while requests wait for room in the pipe to the hub."""
        return bool(self._backlog)

    def send(self, frames: list[bytes]) -> None:
        """Send now, or after what waits already."""
        self._backlog.append(frames)
        self.drain()

    def drain(self) -> None:
        assert self.socket is not None
        while self._backlog:
            try:
                self.socket.send_multipart(self._backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # the pipe to the hub is full: the loop polls POLLOUT and comes back
            self._backlog.popleft()

    def consume(self, request: wire.Consume, live: threading.Event) -> None:
        self._consumes[request.subscription_id] = request
        self._consuming[request.subscription_id] = live
        self.send(request.frames())

    def cancel(self, subscription_id: bytes) -> None:
        if self._consumes.pop(subscription_id, None) is not None:
            self.send(wire.cancel(subscription_id))

    def queues(self) -> list[str]:
        """The queue groups this client consumes from, as ``type/queue``."""
        return sorted(
            f"{wire.unique_name_of(request.topic)}/{request.queue_name}"
            for request in self._consumes.values()
        )

    def consuming(self, subscription_id: bytes) -> None:
        """The hub confirmed a consumer: its ``subscribe_async()`` may return."""
        live = self._consuming.pop(subscription_id, None)
        if live is not None:
            live.set()

    def delete(self, request: wire.DeleteQueue, answer: DeleteAnswer) -> None:
        self._deletes[request.request_id] = (request, answer)
        self.send(request.frames())

    def forget_delete(self, request_id: bytes) -> None:
        """Its caller gave up waiting."""
        self._deletes.pop(request_id, None)

    def deleted(self, request_id: bytes, dropped: int | None) -> None:
        _request, answer = self._deletes.pop(request_id, (None, None))
        if answer is not None:
            answer.dropped = dropped
            answer.done.set()

    def declare(self, request: wire.DeclareQueue, done: threading.Event) -> None:
        self._declares[request.request_id] = (request, done)
        self.send(request.frames())

    def forget_declare(self, request_id: bytes) -> None:
        """Its caller gave up waiting."""
        self._declares.pop(request_id, None)

    def declared(self, request_id: bytes) -> None:
        _request, done = self._declares.pop(request_id, (None, None))
        if done is not None:
            done.set()

    def restore_consumers(self) -> None:
        for request in self._consumes.values():
            self.send(request.frames())
        # A deletion or declaration the previous hub never answered (both are idempotent).
        for deletion, _answer in self._deletes.values():
            self.send(deletion.frames())
        for declaration, _done in self._declares.values():
            self.send(declaration.frames())
