"""What other threads ask of a client's I/O thread (worker process): subscribe, consume, acks,
queue administration, stop. Each is a command appended to a deque, then a write to the waker's
eventfd; the I/O thread (``io.py``) runs the commands at the top of its next turn, in order."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from ..wire import protocol as wire
from .acks import coalesce
from .control import ControlChannel, DeleteAnswer
from .describe import describe
from .session import Session
from .subscriptions import Subscriptions
from .waker import Waker

__all__ = ["IOCalls"]


class IOCalls:
    """The calls of :class:`~ipcbus.client.io.IOThread` that other threads make."""

    session: Session
    _subscriptions: Subscriptions
    _control: ControlChannel
    _commands: deque[Callable[[], None]]
    _acks: list[wire.Ack]
    _acks_lock: threading.Lock
    _waker: Waker
    _running: bool

    def wake(self) -> None:
        self._waker.wake()

    def call(self, command: Callable[[], None], describe: bool = False) -> None:
        """Run ``command`` on the I/O thread; with ``describe``, then tell the hub what this
        client subscribes to now (INFO, for ``ipcbus clients``)."""
        self._commands.append(command)
        if describe:
            self._commands.append(self._describe_to_hub)
        self.wake()

    # -- what this client says about itself (a description, never used for routing) ----------

    def _description(self) -> bytes:
        return describe(self._subscriptions.live_topics, self._control.queues())

    def _describe_to_hub(self) -> None:
        if self._control.socket is not None and self.session.hub_alive:
            self._control.send([wire.header(wire.INFO), self._description()])

    def subscribe(self, topic: bytes, live: threading.Event) -> None:
        self.call(lambda: self._subscriptions.subscribe(topic, live), describe=True)

    def unsubscribe(self, topic: bytes) -> None:
        self.call(lambda: self._subscriptions.unsubscribe(topic), describe=True)

    def consume(self, request: wire.Consume, live: threading.Event) -> None:
        self.call(lambda: self._control.consume(request, live), describe=True)

    def cancel_consume(self, subscription_id: bytes) -> None:
        self.call(lambda: self._control.cancel(subscription_id), describe=True)

    def delete_queue(self, request: wire.DeleteQueue, answer: DeleteAnswer) -> None:
        self.call(lambda: self._control.delete(request, answer))

    def forget_delete(self, request_id: bytes) -> None:
        self.call(lambda: self._control.forget_delete(request_id))

    def declare_queue(self, request: wire.DeclareQueue, done: threading.Event) -> None:
        self.call(lambda: self._control.declare(request, done))

    def forget_declare(self, request_id: bytes) -> None:
        self.call(lambda: self._control.forget_declare(request_id))

    def ack(self, answers: list[wire.Ack]) -> None:
        """Send ``answers`` (any thread). What several threads hand over before the I/O thread
        gets to it leaves in one request, neighbouring ranges merged."""
        with self._acks_lock:
            first = not self._acks
            self._acks += answers
        if first:
            self.call(self._send_acks)

    def _send_acks(self) -> None:
        with self._acks_lock:
            answers, self._acks = self._acks, []
        for request in wire.acks(coalesce(answers)):
            self._control.send(request)

    def request_stop(self) -> None:
        """Say goodbye to the hub (it hands our queue deliveries to others) and end the thread,
        without waiting for it."""

        def stop() -> None:
            self._running = False

        self.call(stop)
