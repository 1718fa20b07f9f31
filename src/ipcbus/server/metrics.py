"""Prometheus metrics of the hub (hub process), served over HTTP when ``metrics_port`` is set.

The values are the hub's own ``HubStatistics`` record, the one ``ipcbus stats`` shows. The HTTP
server runs on a thread of ``prometheus_client``'s; it never touches the hub's sockets or state.
A scrape asks the serving loop for a fresh record (the loop looks at each turn, at least every
100 ms when idle) and waits for it up to ``_FRESH_TIMEOUT``; past that (a hub busy for that long
in one turn) it serves the previous one. ``prometheus_client`` comes with the ``ipcbus[metrics]``
extra; it is imported only when metrics are asked for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, cast

from ..exceptions import MissingDependencyError
from ..wire.statistics import HubStatistics

__all__ = ["HubMetrics", "require_prometheus"]

logger = logging.getLogger("ipcbus.hub")

_FRESH_TIMEOUT = 1.0
_PREFIX = "ipcbus_hub_"

# Counters of the statistics record: name in the record -> (metric name, help).
_COUNTERS = {
    "batches_relayed": ("batches_relayed", "Batches relayed from publishers"),
    "messages_relayed": ("messages_relayed", "Messages relayed from publishers"),
    "bytes_relayed": ("bytes_relayed", "Bytes of topics, metas and payloads relayed"),
    "backpressure_stalls": (
        "backpressure_stalls",
        "Fan-out sends refused by a full subscriber pipe (each then waited)",
    ),
    "auth_rejected": ("auth_rejected", "Connections refused: no proof of the bus secret"),
    "clients_lost": ("clients_lost", "Clients declared gone (died, or silent too long)"),
    "loss_notices": ("loss_notices", "Times the clients were told to check what they missed"),
    "handshakes_shed": ("handshakes_shed", "tcp connections shut before authenticating"),
    "late_acks": ("late_acks", "Acks of deliveries already handed to others"),
    "stale_acks": ("stale_acks", "Acks of another (previous) hub's deliveries"),
}
# Drops, by reason: name in the record -> the reason label.
_DROPS = {
    "malformed_dropped": "malformed",
    "stall_drops": "stalled_subscriber",
    "unsplittable_dropped": "unsplittable",
    "deleted_queue_dropped": "deleted_queue",
}
# Counts of a queue group that only grow; the others (held, in_flight, consumers, ...) go up
# and down.
_QUEUE_COUNTERS = frozenset(
    {"published", "acked", "dead_lettered", "retried", "redelivered", "rejected_dropped"}
)


def require_prometheus() -> None:
    """``MissingDependencyError`` unless ``prometheus_client`` can be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"hub metrics need prometheus_client ({exc}): pip install 'ipcbus[metrics]'"
        ) from None


class HubMetrics:
    """The exporter: an HTTP server at ``host:port`` (port 0: the system picks; ``port`` then
    says which) serving the latest statistics the serving loop offered."""

    def __init__(self, host: str, port: int) -> None:
        require_prometheus()
        from prometheus_client import CollectorRegistry, start_http_server

        self._condition = threading.Condition()
        self._wanted = threading.Event()
        self._latest: HubStatistics | None = None
        self._generation = 0
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port
        self.url = f"http://{_bracketed(host)}:{self.port}/metrics"
        logger.info("metrics at %s", self.url)

    @property
    def wanted(self) -> bool:
        """A scrape waits for a fresh record (the serving loop asks each turn)."""
        return self._wanted.is_set()

    def offer(self, statistics: HubStatistics) -> None:
        """The serving loop's fresh record (called on the loop's thread)."""
        with self._condition:
            self._latest = statistics
            self._generation += 1
            self._wanted.clear()
            self._condition.notify_all()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- prometheus_client's collector protocol (on its HTTP thread) -------------------------

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        with self._condition:
            generation = self._generation
            self._wanted.set()
            self._condition.wait_for(lambda: self._generation != generation, _FRESH_TIMEOUT)
            statistics = self._latest
        if statistics is not None:
            yield from _families(statistics)


def _families(statistics: HubStatistics) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    yield GaugeMetricFamily(_PREFIX + "clients", "Connected clients", value=statistics.clients)
    yield GaugeMetricFamily(
        _PREFIX + "topics", "Topics some subscriber holds", value=statistics.topics
    )
    yield GaugeMetricFamily(
        _PREFIX + "uptime_seconds", "Seconds since the hub started", value=statistics.uptime
    )
    yield GaugeMetricFamily(
        _PREFIX + "full_topics",
        "Topics publishers hold back: a queue group of each holds max_held messages or "
        "max_held_bytes",
        value=len(statistics.full_topics),
    )
    for field, (name, text) in _COUNTERS.items():
        yield CounterMetricFamily(_PREFIX + name, text, value=getattr(statistics, field))
    drops = CounterMetricFamily(
        _PREFIX + "dropped_messages", "Messages the hub dropped, by reason", labels=["reason"]
    )
    for field, reason in _DROPS.items():
        drops.add_metric([reason], getattr(statistics, field))
    yield drops
    unrouted = CounterMetricFamily(
        _PREFIX + "unrouted_messages",
        "Messages published while no process subscribed and no queue group existed",
        labels=["type"],
    )
    for name, count in sorted(statistics.unrouted.items()):
        unrouted.add_metric([name], count)
    yield unrouted
    spool = statistics.spool
    if spool:
        yield GaugeMetricFamily(
            _PREFIX + "spool_bytes",
            "Bytes of big payloads waiting in the spool for their readers",
            value=float(cast(int, spool["bytes"])),
        )
        yield CounterMetricFamily(
            _PREFIX + "spool_expired",
            "Spool shares removed unread: their reader lagged more than spool_linger",
            value=float(cast(int, spool["expired"])),
        )
    yield from _queue_families(statistics.queues)


def _queue_families(queues: dict[str, dict[str, int]]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: dict[str, Any] = {}
    for queue, counts in sorted(queues.items()):
        for name, value in counts.items():
            family = families.get(name)
            if family is None:
                kind = CounterMetricFamily if name in _QUEUE_COUNTERS else GaugeMetricFamily
                text = f"Queue group messages: {name.replace('_', ' ')}"
                family = families[name] = kind(f"{_PREFIX}queue_{name}", text, labels=["queue"])
            family.add_metric([queue], value)
    yield from families.values()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
