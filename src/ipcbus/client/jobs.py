"""A queue delivery as the runner works on it (worker process): messages of one delivered run
for one subscription, with what is the same for all of them worked out once (``runner.py``)."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass

from ..core import codec
from ..core.contract import Subscription
from ..message import Message
from ..wire import protocol as wire

__all__ = ["Job", "ok"]


@dataclass(eq=False, slots=True)
class Job:
    """Messages ``start`` to ``end - 1`` of a run, for one subscription; what is the same for
    all of them is worked out once."""

    subscription: Subscription
    run: wire.Deliver
    sizes: array[int]
    offset: int  # where message ``start`` begins in the run's payloads
    start: int
    end: int
    decode: Callable[[bytes], Message]
    published_at: float
    id_prefix: str  # a message id is this and the message's number
    route: wire.Route | None = None  # a request's (a run of one message): where answers go

    @classmethod
    def of(cls, subscription: Subscription, run: wire.Deliver) -> Job:
        route = None
        try:
            codec_id, _count, published_at = wire.unpack_meta(run.meta)
            if len(run.meta) != wire.META_LEN:
                route = wire.route_of(run.meta)
        except ValueError as exc:
            # Each message is then undecodable: dead-lettered, one by one (_prepare).
            codec_id, published_at = repr(exc).encode(), 0.0
        return cls(
            subscription,
            run,
            wire.unpack_sizes(run.sizes),
            0,
            0,
            run.count,
            codec.split_decoder(codec_id, subscription.message_type),
            published_at,
            f"{run.id_prefix.decode(errors='replace')}-",
            route if route is not None and route.kind == wire.ROUTE_REQUEST else None,
        )

    def part(self, start: int) -> Job:
        """Its messages from ``start`` on, as a job of their own (this one ends there)."""
        offset = self.offset + sum(self.sizes[self.start : start])
        rest = Job(
            self.subscription,
            self.run,
            self.sizes,
            offset,
            start,
            self.end,
            self.decode,
            self.published_at,
            self.id_prefix,
            self.route,
        )
        self.end = start
        return rest

    def payloads(self) -> list[bytes]:
        """Each of its messages' payload (a slice of bytes: cheaper than a view, measured)."""
        payloads, offset, found = self.run.payloads, self.offset, []
        for size in self.sizes[self.start : self.end]:
            found.append(payloads[offset : offset + size])
            offset += size
        return found


def ok(stream: bytes, first: int, last: int) -> wire.Ack:
    """The ack of deliveries ``first`` to ``last`` of a stream that ran without fault."""
    return wire.Ack(stream, first, last, wire.OUTCOME_OK)
