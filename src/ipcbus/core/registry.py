"""The process-local broker and the Consumer declarations that bind to it (in-process core).

One broker per *process*: the installed broker is recorded with the pid that installed it. In a
forked child, the first ``get_message_broker()`` finds a foreign pid and installs
``broker._for_child()`` instead (a fresh in-process broker, or a hub proxy that reconnects), so a
child never uses, closes or flushes its parent's broker. ``Consumer`` declarations bind, once each,
to every broker that becomes this process's broker.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from ..exceptions import BrokerClosedError, BrokerNotInitializedError
from .contract import Broker, Subscription

__all__ = [
    "Declaration",
    "get_message_broker",
    "isolated_consumers",
    "isolated_registry",
    "override_message_broker",
    "register_consumer",
    "set_message_broker",
]


B = TypeVar("B", bound=Broker)


class Declaration(Protocol):
    """What the registry needs of a ``Consumer``: a way to bind it to a broker. (The registry
    does not import ``ipcbus.consumer``, which imports the registry.)"""

    def _bind(self, broker: Broker) -> Subscription: ...


_lock = threading.RLock()
_current: tuple[Broker, int] | None = None  # (broker, pid of the process that installed it)
_consumers: list[Declaration] = []
# Keyed by the declaration object itself, not its id(): an id is reused once its object is gone.
_bindings: weakref.WeakKeyDictionary[Broker, dict[Declaration, Subscription]] = (
    weakref.WeakKeyDictionary()
)
# Brokers inherited from the parent by a forked child: kept referenced so that garbage collection
# in the child never finalises them (their sockets and threads belong to the parent).
_inherited: list[Broker] = []


def _reinit_after_fork() -> None:
    global _lock
    # The lock may have been held by another thread of the parent at fork time.
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reinit_after_fork)


def set_message_broker(broker: Broker | None) -> None:
    """Install ``broker`` as this process's broker (``None`` uninstalls).

    Every ``Consumer`` declared so far binds to it (once per broker), before it is installed: a
    closed broker (``BrokerClosedError``), or one a declaration fails to bind to, is refused and
    the broker installed before stays.
    """
    global _current
    if broker is not None and not isinstance(broker, Broker):
        raise TypeError(f"set_message_broker() takes a Broker, not {type(broker).__name__}")
    with _lock:
        if broker is not None:
            _check_installable(broker)
            _bind_all(broker)
        _current = None if broker is None else (broker, os.getpid())


def get_message_broker() -> Broker:
    """This process's broker; ``BrokerNotInitializedError`` if none was installed.

    In a forked child of a process that installed one, this is a broker of the child's own (see
    the module docstring), created on first use.
    """
    global _current
    with _lock:
        if _current is None:
            raise BrokerNotInitializedError(
                "no message broker installed in this process: call set_message_broker() "
                "(for example with ipcbus.connect() or MemoryBroker()) first"
            )
        broker, pid = _current
        if pid != os.getpid():
            broker = _child_broker(broker)
            _current = (broker, os.getpid())
        return broker


@contextmanager
def override_message_broker(broker: B) -> Iterator[B]:
    """Make ``broker`` this process's broker inside the ``with`` block, and yield it.

    The previous broker (or none) is restored afterwards, also when the block raises. Neither
    broker is closed.
    """
    global _current
    if not isinstance(broker, Broker):
        raise TypeError(f"override_message_broker() takes a Broker, not {type(broker).__name__}")
    with _lock:
        _check_installable(broker)
        _bind_all(broker)
        previous = _current
        _current = (broker, os.getpid())
    try:
        yield broker
    finally:
        with _lock:
            # Restoring a broker recorded by the parent is safe: get_message_broker() replaces it
            # in a forked child.
            _current = previous


def register_consumer(consumer: Declaration) -> None:
    """Record a consumer's declaration and bind it to the current broker, if any."""
    with _lock:
        _consumers.append(consumer)
        if _current is not None:
            broker = get_message_broker()
            _bind(broker, consumer)


def _check_installable(broker: Broker) -> None:
    if broker.closed:
        # Installed, it would refuse every Consumer declaration from then on.
        raise BrokerClosedError(f"cannot install a closed {type(broker).__name__}")


def _child_broker(parent_broker: Broker) -> Broker:
    _inherited.append(parent_broker)
    child = parent_broker._for_child()
    _bind_all(child)
    return child


def _bind_all(broker: Broker) -> None:
    for consumer in _consumers:
        _bind(broker, consumer)


def _bind(broker: Broker, consumer: Declaration) -> None:
    bound = _bindings.setdefault(broker, {})
    if consumer in bound:
        return
    bound[consumer] = consumer._bind(broker)


@contextmanager
def isolated_consumers() -> Iterator[None]:
    """Forget consumers declared inside the block afterwards (for test suites)."""
    with _lock:
        saved = list(_consumers)
    try:
        yield
    finally:
        with _lock:
            _consumers[:] = saved


@contextmanager
def isolated_registry() -> Iterator[None]:
    """Run the block with no process broker installed, and afterwards restore the broker that
    was installed and forget the ``Consumer`` declarations made inside (for test suites: each
    test starts clean, and module-level declarations of test modules do not leak)."""
    global _current
    with _lock:
        saved = _current
        _current = None
    try:
        with isolated_consumers():
            yield
    finally:
        with _lock:
            _current = saved
