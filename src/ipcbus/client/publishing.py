"""``HubBroker``'s publish path: ``publish()`` and ``flush()``, waiting for room in the outbox
or for a full queue group to reopen, and the check that the broker can still be used."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..config import ClientOptions
from ..core import process_id
from ..core.contract import Broker
from ..exceptions import (
    BrokerClosedError,
    BrokerFailedError,
    HubUnavailableError,
    MessageSerializationError,
    PublishTimeoutError,
)
from ..message import Message, get_unique_name_for_message
from ..wire import protocol as wire
from .gate import PublishGate
from .outbox import FlushMarker, Kind
from .threads import runs_handlers

if TYPE_CHECKING:
    from .io import IOThread
    from .rejections import Rejections
    from .session import Session

__all__ = ["Publishing"]


class Publishing(Broker):
    """The publish path of :class:`~ipcbus.client.broker.HubBroker` (its docstring says what
    ``publish()`` and ``flush()`` promise); ``HubBroker.__init__`` sets the state below."""

    options: ClientOptions
    address: str
    _owner: int
    _io: IOThread
    _session: Session
    _gate: PublishGate
    _kinds: weakref.WeakKeyDictionary[type, Kind]  # the types publish() checked
    _last_type: Callable[[], type | None]
    _last_kind: Kind
    _rejections: Rejections
    _deferred_error: BaseException | None
    _failed: str | None
    _failure_cause: BaseException | None
    _finishing: bool
    _flush_ids: Iterator[int]

    def publish(self, message: Message, timeout: float | None = None) -> None:
        """See :class:`HubBroker`; ``timeout`` overrides ``publish_timeout`` for this call."""
        self._check_message(message)
        self._publish(message, timeout)

    def _publish(self, message: Message, timeout: float | None = None) -> None:
        self._check_usable()
        if self._io.full_topics and not runs_handlers():
            # Not in a handler either, for the same reason as below: the group may be full
            # because this very process's handlers hold its deliveries.
            timeout = self._wait_while_full(type(message), timeout)
        cls = type(message)
        if self._last_type() is not cls:
            kind = self._kinds.get(cls)
            if kind is None:
                # The first message of its type: MessageSerializationError or
                # MessageTooLargeError here, in the caller. A type is learnt only from a message
                # that can go.
                kind = self._io.outbox.check(message)
            elif kind.big:
                self._io.outbox.check_fields(message)
            self._last_type = weakref.ref(cls)
            self._last_kind = kind
        elif self._last_kind.big:
            # Big payloads (issue 12): a field over the limit raises here too, not only in the
            # first message of the type.
            self._io.outbox.check_fields(message)
        if len(self._io.outbox.items) >= self.options.max_pending and not runs_handlers():
            # Never in a handler: the hub may be waiting for this very thread to take its
            # messages while it stops reading ours; waiting here closed that circle (a pipeline
            # stage deadlocked the bus every time with hwm=20, max_pending=200).
            self._wait_for_space(self.options.publish_timeout if timeout is None else timeout)
        self._io.publish(message)

    def _wait_while_full(self, cls: type[Message], timeout: float | None) -> float | None:
        """Wait while a full queue group holds ``cls``'s topic back; returns what is left of
        ``timeout`` (``None``: ``publish_timeout``)."""
        topic = wire.topic_for(get_unique_name_for_message(cls))
        if topic not in self._io.full_topics:
            return timeout
        limit = self.options.publish_timeout if timeout is None else timeout
        opened, left = self._gate.wait_while_full(topic, limit)
        self._check_usable()
        if not opened:
            raise PublishTimeoutError(
                f"a queue group of {wire.unique_name_of(topic)} holds the hub's max_held "
                f"messages (its consumers are slow or gone): publish() waited {limit} s"
            )
        return timeout if left is None else left

    def _wait_for_space(self, timeout: float | None) -> None:
        if not self._gate.wait_for_space(self.options.max_pending, timeout):
            self._check_usable()  # closed meanwhile, or the connection failed: say that
            waiting = len(self._io.outbox)
            if not self._io.hub_alive:
                raise HubUnavailableError(
                    f"the hub at {self.address} is unreachable and {waiting} messages wait "
                    f"for it: publish() gave up after {timeout} s"
                )
            raise PublishTimeoutError(
                f"{waiting} messages still wait for the hub after {timeout} s (backpressure)"
            )
        self._check_usable()

    def _stopped(self) -> bool:
        return self._closed or self._failed is not None or not self._io.alive

    def _space_freed(self) -> None:  # I/O thread
        gate = getattr(self, "_gate", None)  # None while the I/O thread is being made
        if gate is not None:
            gate.notify()

    def _check_usable(self) -> None:
        if (
            process_id.pid == self._owner
            and not self._closed
            and self._failed is None
            and self._deferred_error is None
            and self._session.available
            and self._io.alive
        ):
            return  # the usual case, in one test (every publish() asks)
        if process_id.pid != self._owner:
            raise BrokerClosedError(
                f"this HubBroker belongs to process {self._owner}; in a forked child use "
                "get_message_broker(), which connects the child's own"
            )
        if not (self._finishing and runs_handlers()):
            self._check_open()
        if self._failed is not None:
            raise BrokerFailedError(self._failed) from self._failure_cause
        error, self._deferred_error = self._deferred_error, None
        if isinstance(error, MessageSerializationError):
            raise error
        if error is not None or not self._io.alive:
            raise HubUnavailableError(f"the connection to {self.address} failed") from error
        if not self._session.available:
            raise self._session.unavailable(len(self._io.outbox))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the hub has accepted everything published before this call.

        Raises ``MessageSerializationError`` naming the messages rejected since the last
        ``flush()`` (their type and position), ``HubUnavailableError`` once the hub has been
        unreachable for ``hub_lost_timeout`` (at once, whatever ``timeout``), and
        ``PublishTimeoutError`` past ``timeout``.
        """
        self._check_usable()
        self._flush(timeout)

    def _flush(self, timeout: float | None, while_hub_alive: bool = False) -> None:
        marker = FlushMarker(b"%d" % next(self._flush_ids))
        self._io.publish(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            if self._failed is not None:
                raise BrokerFailedError(self._failed) from self._failure_cause
            if while_hub_alive and not self._io.hub_alive:
                break
            if not self._session.available or not self._io.alive:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if not marker.done.is_set():
            if not self._session.available:
                raise self._session.unavailable(len(self._io.outbox))
            if not self._io.hub_alive or not self._io.alive:
                raise HubUnavailableError(f"the hub at {self.address} is unreachable")
            raise PublishTimeoutError(f"the hub did not confirm a flush within {timeout} s")
        error, self._deferred_error = self._deferred_error, None
        if error is not None:
            raise error
        rejections = self._rejections.take()
        if rejections is not None:
            raise rejections

    def _foreign(self) -> bool:
        """True in a forked child: the broker, its sockets and threads belong to the parent."""
        return process_id.pid != self._owner
