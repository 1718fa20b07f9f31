"""Message types shared by the test-suite (importable, so they pickle by reference)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from ipcbus import Message


@dataclass(frozen=True)
class OrderPlaced(Message):
    order_id: int
    amount: float = 0.0


@dataclass(frozen=True)
class PriorityOrderPlaced(OrderPlaced):
    """A subclass: routing is by exact type, so OrderPlaced subscribers never see it."""


@dataclass(frozen=True)
class OrderShipped(Message):
    order_id: int


@dataclass(frozen=True)
class Tick(Message):
    seq: int
    source: str = ""


@dataclass(frozen=True)
class Unpicklable(Message):
    """Carries a lock: neither pickle nor cloudpickle can serialise it."""

    lock: object = field(default_factory=threading.Lock)


class RaisesWhenPickled:
    """A field whose pickling raises ``exc`` (any ``BaseException``): user code that misbehaves
    inside pickle, on whatever thread ipcbus serialises."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[object, ...]:
        raise self.exc


class BadStr(Exception):
    """An exception whose own ``__str__`` raises."""

    def __str__(self) -> str:
        raise ValueError("broken __str__")


def unsendable_fields() -> dict[str, object]:
    """What makes a message impossible to serialise, by kind: an object pickle refuses, and
    fields whose pickling raises a ``BaseException`` or an exception that cannot be shown."""
    return {
        "lock": threading.Lock(),
        "system-exit": RaisesWhenPickled(SystemExit(2)),
        "keyboard-interrupt": RaisesWhenPickled(KeyboardInterrupt()),
        "bad-str": RaisesWhenPickled(BadStr()),
    }


UNSENDABLE = ["lock", "system-exit", "keyboard-interrupt", "bad-str"]


@dataclass(frozen=True)
class Checked(Message):
    """Refuses a negative ``x`` in its own ``__post_init__``."""

    x: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError(f"x must be >= 0, not {self.x}")


@dataclass(frozen=True)
class Barrier(Message):
    """Published after a test's messages: once a subscriber sees it, it has seen them too."""

    token: str


@dataclass(frozen=True)
class Blob(Message):
    seq: int
    data: bytes = b""


@dataclass(frozen=True)
class Ping(Message):
    token: str


@dataclass(frozen=True)
class Pong(Message):
    token: str
    pid: int


class OutOfStock(Exception):
    """Raised by responders in the request/reply tests: its name travels back."""


class Boom(BaseException):
    """A BaseException subclass of the user's own (raised by handlers in the fault tests)."""


# What the fault tests' handlers raise, by name (the name travels in their messages).
RAISED: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "Boom": Boom,
    "CancelledError": asyncio.CancelledError,
}
