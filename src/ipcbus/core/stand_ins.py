"""Stand-ins for classes this process cannot import: a batch that names one is unpickled again
with a stand-in in its place, so the messages that do not reach it are delivered and the ones
that do are counted as undecodable (issue 9, "one undecodable value drops its whole batch")."""

from __future__ import annotations

import gc
import io
import pickle
import types
from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = ["StandIn", "loads_with_stand_ins", "stand_ins_in"]


class StandIn:
    """Base of the classes that stand in, while a batch is unpickled again, for classes this
    process cannot import. Accepts whatever pickle does to an instance, and keeps nothing."""

    missing: ClassVar[str] = ""  # "module.qualname" of the class it stands in for

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    # What pickle calls on instances of list and dict subclasses.
    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            # A fresh class per name and batch: nothing accumulates across batches.
            return type(name, (StandIn,), {"missing": f"{module}.{name}"})


def loads_with_stand_ins(payload: Any, buffers: Sequence[Any]) -> Any:
    return _StandInUnpickler(io.BytesIO(payload), buffers=buffers).load()


# Never searched for stand-ins: they reach whole modules (a function's globals), not message data.
_OPAQUE = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def stand_ins_in(root: Any) -> str:
    """The classes ``root`` reaches stand-ins for ("" when none): any depth, any container
    (``gc.get_referents``: also C containers and ``__slots__``)."""
    missing: set[str] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, type):
            if issubclass(item, StandIn):
                missing.add(item.missing)
            continue  # a class is not message data: do not walk into its namespace
        if isinstance(item, StandIn):
            missing.add(type(item).missing)
            continue
        if isinstance(item, _OPAQUE) or id(item) in seen:
            continue
        seen.add(id(item))
        stack.extend(gc.get_referents(item))
    return ", ".join(sorted(missing))
