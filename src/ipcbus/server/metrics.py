"""Prometheus metrics of the hub (hub process), served over HTTP when ``metrics_port`` is set.

The values are the hub's own ``HubStatistics`` record, the one ``ipcbus stats`` shows. The HTTP
server is ours (``http.server``, a thread per connection); ``prometheus_client`` renders the text
exposition. It never touches the hub's sockets or state. A scrape asks the serving loop for a
fresh record (the loop looks at each turn, at least every 100 ms when idle) and waits for it up
to ``_FRESH_TIMEOUT``; past that (a hub busy for that long in one turn) it serves the previous
one. ``prometheus_client`` comes with the ``ipcbus[metrics]`` extra; it is imported only when
metrics are asked for.

What a client of the endpoint can hold is bounded (docs/security.md, "Metrics"): the endpoint
proves nothing, so any local user can connect. ``prometheus_client``'s own server had no timeout:
each connection that never finished its request held a thread and a descriptor of the hub for
as long as its peer kept it open, until the hub ran out of descriptors and its serving loop
died. Now a connection has ``_REQUEST_TIMEOUT`` seconds to send its whole request head (at most
``_MAX_HEAD`` bytes), each write of the answer at most as long, and at most
``_MAX_CONNECTIONS`` are served at once: one more is closed as soon as it is accepted (and the
next accepted ``_REFUSAL_PAUSE`` later).
"""

from __future__ import annotations

import http.server
import io
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

from ..exceptions import MissingDependencyError
from ..wire.statistics import HubStatistics

__all__ = ["HubMetrics", "require_prometheus"]

logger = logging.getLogger("ipcbus.hub")

_FRESH_TIMEOUT = 1.0
# What one client of the endpoint may hold (see above).
_REQUEST_TIMEOUT = 3.0
_MAX_CONNECTIONS = 16
_MAX_HEAD = 8192
_REFUSAL_PAUSE = 0.005  # after closing a connection over the cap (at most 200 a second)
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
    "duplicates_dropped": "duplicate",
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

    def __init__(
        self,
        host: str,
        port: int,
        *,
        request_timeout: float = _REQUEST_TIMEOUT,
        max_connections: int = _MAX_CONNECTIONS,
    ) -> None:
        require_prometheus()
        from prometheus_client import CollectorRegistry

        self._condition = threading.Condition()
        self._wanted = threading.Event()
        self._latest: HubStatistics | None = None
        self._generation = 0
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server = _Server(host, port, registry, request_timeout, max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ipcbus-hub-metrics", daemon=True
        )
        self._thread.start()
        self.port: int = self._server.server_port
        self.url = f"http://{_bracketed(host)}:{self.port}/metrics"
        logger.info("metrics at %s", self.url)

    @property
    def wanted(self) -> bool:
        """A scrape waits for a fresh record (the serving loop asks each turn)."""
        return self._wanted.is_set()

    @property
    def refused(self) -> int:
        """Connections closed at once: ``max_connections`` were being served."""
        return self._server.refused

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

    # -- prometheus_client's collector protocol (on an HTTP thread) --------------------------

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


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A thread per connection, at most ``max_connections`` at once; each has
    ``request_timeout`` to send its request."""

    daemon_threads = True  # each ends within its timeouts; a stopping hub does not wait
    request_queue_size = 128  # waiting in the kernel costs the hub no descriptor

    def __init__(
        self,
        host: str,
        port: int,
        registry: Any,
        request_timeout: float,
        max_connections: int,
    ) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self.address_family = family
        self.registry = registry
        self.request_timeout = request_timeout
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((str(address[0]), port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would look the host's name up (getfqdn): a DNS query at every start.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            # A peer that reconnects as fast as it is closed would keep this thread, and the
            # interpreter lock the serving loop needs, busy: the next connections wait in the
            # kernel's queue meanwhile (and past it, are refused there), costing the hub nothing.
            time.sleep(_REFUSAL_PAUSE)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that left or timed out, a thread that could not start: its connection is
        # closed, and nothing else changes (socketserver would print a traceback to stderr).
        logger.debug("metrics: a connection from %s ended in error", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET (or HEAD) of any path: the metrics, as ``prometheus_client``'s server answered."""

    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # each write of the answer

    def handle(self) -> None:
        head = _read_head(self.connection, self.server.request_timeout)
        if head is None:
            return  # too slow, too long, or gone: closed without an answer
        self.rfile.close()
        self.rfile = io.BytesIO(head)
        self.handle_one_request()  # one request per connection (HTTP/1.0)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def _answer(self, with_body: bool) -> None:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        body = encoder(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _read_head(connection: socket.socket, timeout: float) -> bytes | None:
    """A request's head (request line and headers), read within ``timeout`` in all: ``None``
    if it took longer, exceeded ``_MAX_HEAD`` or the peer closed first."""
    deadline = time.monotonic() + timeout
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or len(head) > _MAX_HEAD:
            return None
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(_MAX_HEAD + 1 - len(head))
        except OSError:  # a timeout, a reset
            return None
        if not chunk:
            return None
        head += chunk
    connection.settimeout(timeout)
    return head


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
