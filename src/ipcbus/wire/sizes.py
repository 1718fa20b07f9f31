"""Split batches (queue groups): every message pickled alone, ``payloads`` holding them end to end
and ``sizes`` their sizes, so that the hub hands out parts of a batch without unpickling
(``wire.protocol``, PUBLISH and DELIVER). Imported by the hub and by clients; imports neither, nor
zmq."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import Any

__all__ = ["SIZE_BYTES", "check_split", "pack_sizes", "split_payloads", "unpack_sizes"]

# One uint32 per message, little-endian whatever the host (a tcp:// bus may mix them).
SIZE_BYTES = 4
if array("I").itemsize != SIZE_BYTES:  # pragma: no cover - no such CPython platform known
    raise ImportError("ipcbus needs array('I') of 4 bytes")
_SWAP = sys.byteorder != "little"


def pack_sizes(sizes: Iterable[int]) -> bytes:
    packed = array("I", sizes)
    if _SWAP:  # pragma: no cover - big-endian hosts
        packed.byteswap()
    return packed.tobytes()


def unpack_sizes(frame: Any) -> array[int]:
    """The sizes a sizes frame (bytes-like) holds; ``ValueError`` when it holds no whole number
    of them."""
    if len(frame) % SIZE_BYTES:
        raise ValueError(f"a sizes frame of {len(frame)} bytes")
    sizes = array("I")
    sizes.frombytes(frame)
    if _SWAP:  # pragma: no cover - big-endian hosts
        sizes.byteswap()
    return sizes


def check_split(count: int, sizes: Any, payloads: Any) -> None:
    """``ValueError`` unless ``sizes`` holds ``count`` sizes that add up to ``payloads``."""
    if len(sizes) != SIZE_BYTES * count:
        raise ValueError(f"{len(sizes)} bytes of sizes for {count} messages")
    if sum(unpack_sizes(sizes)) != len(payloads):
        raise ValueError(f"sizes that do not add up to the {len(payloads)} bytes of payloads")


def split_payloads(sizes: Any, payloads: Any) -> list[memoryview]:
    """Each message's payload (a view, not a copy) of a split batch."""
    view = memoryview(payloads)
    parts = []
    start = 0
    for size in unpack_sizes(sizes):
        end = start + size
        parts.append(view[start:end])
        start = end
    if start != len(view):
        raise ValueError(f"sizes that do not add up to the {len(view)} bytes of payloads")
    return parts
