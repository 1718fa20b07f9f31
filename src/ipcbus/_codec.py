"""Serialisation of messages: pickle by reference first, cloudpickle only when pickle cannot.

Measured on the target machines (DESIGN.md §4): ``pickle.dumps`` of a small frozen dataclass costs
2.5-5 µs and 78 B, ``cloudpickle.dumps`` of the same class defined in ``__main__`` 281 µs and
4 860 B. So cloudpickle is the fallback for what pickle cannot do (lambdas, local classes), never
the default.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from .exceptions import MessageSerializationError

__all__ = ["PROTOCOL", "dumps", "loads"]

PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` by reference, else by value; ``MessageSerializationError`` if neither can."""
    try:
        return pickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        # Local classes, lambdas and closures: pickle raises PicklingError, AttributeError or
        # TypeError depending on the object; all of them deserve the by-value attempt.
        pass
    try:
        data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:
        raise MessageSerializationError(
            f"cannot serialise {type(obj).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    return data


def loads(data: bytes) -> Any:
    """Unpickle trusted data (from this process or an authenticated peer, never the hub's input)."""
    return pickle.loads(data)
