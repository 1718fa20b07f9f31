"""Configuration: the option records of the hub and of a client, and the one place that reads
(and writes) the environment.

Every default is defined here once; ``Hub``, the hub's serving loop, ``HubBroker`` and the CLI
take theirs from these records. Imports nothing of ipcbus, so every process may use it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Self

__all__ = [
    "ENV_ADDRESS",
    "ClientOptions",
    "HubOptions",
    "RUNNER_PERIODS",
    "RunnerOptions",
    "address_from_env",
    "export_address",
    "hub_options_from_env",
    "parse_hub_option",
    "hub_started",
    "hub_stopped",
]

ENV_ADDRESS = "IPCBUS_ADDRESS"


def address_from_env() -> str | None:
    """The hub address children and hand-started scripts find the hub by, if any."""
    return os.environ.get(ENV_ADDRESS) or None


def export_address(address: str) -> None:
    """Set ``IPCBUS_ADDRESS`` in this process when it is unset, so later children inherit it."""
    os.environ.setdefault(ENV_ADDRESS, address)


# Hubs this process started and that still run, latest last, each with the IPCBUS_ADDRESS it
# replaced. The rule (docs/architecture.md, "Addresses"): a process that started a hub connects
# to it, whatever the environment said before: a stale `export IPCBUS_ADDRESS=...` must not
# redirect `with Hub(): connect()` to another hub.
_started: list[tuple[str, str | None]] = []


def hub_started(address: str) -> None:
    """A hub this process started serves at ``address``: ``IPCBUS_ADDRESS`` names it (for this
    process's ``connect()`` and the children it starts) until it stops."""
    _started.append((address, os.environ.get(ENV_ADDRESS)))
    os.environ[ENV_ADDRESS] = address


def hub_stopped(address: str) -> None:
    """Undo ``hub_started``: the variable gets back what it was, unless it changed since."""
    for index in range(len(_started) - 1, -1, -1):
        started, previous = _started[index]
        if started != address:
            continue
        del _started[index]
        if os.environ.get(ENV_ADDRESS) == address:
            if previous is None or previous == address:
                os.environ.pop(ENV_ADDRESS, None)
            else:
                os.environ[ENV_ADDRESS] = previous
        return


ENV_HUB_PREFIX = "IPCBUS_HUB_"

# Where hubs make their spool by default: a memory file system (Linux), else none.
_DEFAULT_SPOOL = "/dev/shm" if os.path.isdir("/dev/shm") else None


def hub_options_from_env() -> HubOptions:
    """``HubOptions`` with the fields set in the environment as ``IPCBUS_HUB_<FIELD>`` (for
    ``ipcbus hub``; a flag given on its command line wins). ``ValueError`` for a bad value."""
    values: dict[str, Any] = {}
    for field in fields(HubOptions):
        text = os.environ.get(ENV_HUB_PREFIX + field.name.upper())
        if text is None:
            continue
        try:
            values[field.name] = parse_hub_option(field.name, text)
        except ValueError as exc:
            raise ValueError(f"{ENV_HUB_PREFIX}{field.name.upper()}={text!r}: {exc}") from None
    return HubOptions(**values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_hub_option(name: str, text: str) -> Any:
    """The value of the ``HubOptions`` field ``name`` written as ``text`` (environment, CLI)."""
    kind = {field.name: str(field.type) for field in fields(HubOptions)}[name]
    if kind == "bool":
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError(f"not a yes/no value: {text!r}")
    if kind.startswith("str"):
        return text or None
    try:
        return float(text) if kind == "float" else int(text)
    except ValueError:
        raise ValueError(f"not a{'' if kind == 'float' else 'n'} {kind}: {text!r}") from None


class _Options:
    """Shared by the records: checked construction and ``with_(**changes)``."""

    def with_(self, **changes: Any) -> Self:
        return replace(self, **changes)  # type: ignore[type-var]

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))  # type: ignore[arg-type]

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")


@dataclass(frozen=True)
class HubOptions(_Options):
    """How a hub serves.

    - ``hwm``: each socket pipe holds at most this many batches.
    - ``heartbeat_interval`` / ``heartbeat_timeout``: a client silent for ``heartbeat_timeout``
      seconds is declared gone (its queue deliveries go to other consumers); clients ping every
      ``heartbeat_interval`` seconds and declare a silent hub gone after the same timeout.
    - ``max_held`` / ``max_held_bytes``: when a queue group holds this many messages, or their
      payloads this many bytes (its consumers are slow or gone), the hub tells every client that
      its topic is full: ``publish()`` of that topic, and of no other, waits
      (``PublishTimeoutError`` past its timeout) until every group of the topic holds at most
      half of each again, or the group is deleted (``delete_queue``).
      Messages already on their way are still taken: a group may hold more, at most what its
      publishers had queued and sent unconfirmed when they learned (``max_pending`` of each,
      per publisher).
    - ``max_message_size``: a peer that sends a message part (frame) over this many bytes is
      disconnected by ZeroMQ. The hub announces it in WELCOME: clients split batches below it,
      and a message that alone encodes to more is refused (``MessageTooLargeError``).
    - ``handshake_timeout``: a peer that does not finish its handshake within it is disconnected.
    - ``drain_timeout``: on SIGTERM, consumers get this long to ack what they hold.
    - ``stall_timeout``: a subscriber that accepts nothing for this long stops holding the bus;
      the hub sends without waiting for it (``stall_drops`` counts those sends) until its sends
      stop stalling for as long again, then tells every client to check. What a subscriber
      missed is counted by it exactly, in messages (``HubBroker.gaps``), once it reads again.
    - ``restart_grace``: a hub restarted at an address relays nothing for this long, so the
      previous hub's subscribers are back first.
    - ``max_pending_handshakes``: on tcp, at most this many connections per socket may be
      waiting to authenticate; past it the oldest are shut down (docs/security.md).
    - ``max_dead_letters`` / ``max_dead_letter_bytes``: each queue group keeps at most this many
      dead letters, with their payloads, and at most this many payload bytes (``ipcbus
      dead-letters``, ``ipcbus requeue``); past either, the oldest are dropped, and a payload
      larger than the byte bound alone is not kept; both counted (``dead_letters_evicted``).
    - ``metrics_port``: serve Prometheus metrics over HTTP at this port (0: one the system
      picks; ``None``: no metrics). Needs the ``ipcbus[metrics]`` extra (``prometheus_client``).
    - ``metrics_host``: the address the metrics server binds; 127.0.0.1 by default, since the
      metrics name every message type and queue group and HTTP proves no secret
      (docs/security.md).
    - ``tcp_publish_port`` / ``tcp_fanout_port``: on tcp, the ports of the hub's publish and
      fan-out sockets (0: ones the system picks, told to clients in WELCOME); fix them to open
      a firewall for three known ports.
    - ``journal``: a directory (private to this user; created 0700) where the hub appends the
      messages of topics that have queue groups, and their acks: a hub restarted with the same
      journal (after a crash too) delivers again every message that was not acked or
      dead-lettered. ``None``: queue messages live in the hub's memory only.
    - ``journal_fsync``: the journal's records are written every loop turn and, when true,
      synced to disk once per turn before ``flush()`` is answered (group commit). False is
      faster and still survives a kill of the hub, but not a power loss or an OS crash.
    - ``journal_max_bytes``: past this size (after compaction) the journal is full: every topic
      with queue groups is held back as by a full group (FULL) until it shrinks to half.
    - ``spool``: a directory on a memory file system (``/dev/shm`` where it exists) under which
      an ``ipc://`` hub makes its spool, ``ipcbus-<uid>/<hub id>``: big out-of-band buffers
      (1 MiB and more) of broadcast batches travel as files there instead of through the
      encrypted sockets. ``None``: no spool, big payloads go inline. tcp hubs have none.
    - ``spool_linger``: a spool file is removed this many seconds after the hub first saw it
      (within 0.5 s of its writing; on the monotonic clock, so setting the wall clock moves
      nothing); a subscriber that reads it later drops its message, counted
      (docs/guarantees.md).
    """

    hwm: int = 1000
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    max_held: int = 100_000
    max_held_bytes: int = 1024 * 1024 * 1024
    max_message_size: int = 256 * 1024 * 1024
    handshake_timeout: float = 5.0
    drain_timeout: float = 5.0
    stall_timeout: float = 30.0
    restart_grace: float = 1.0
    max_pending_handshakes: int = 256
    max_dead_letters: int = 1000
    max_dead_letter_bytes: int = 64 * 1024 * 1024
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    tcp_publish_port: int = 0
    tcp_fanout_port: int = 0
    journal: str | None = None
    journal_fsync: bool = True
    journal_max_bytes: int = 1024 * 1024 * 1024
    spool: str | None = _DEFAULT_SPOOL
    spool_linger: float = 60.0

    def __post_init__(self) -> None:
        self._check_positive(
            "max_dead_letters",
            "max_dead_letter_bytes",
            "journal_max_bytes",
            "max_pending_handshakes",
            "hwm",
            "heartbeat_interval",
            "heartbeat_timeout",
            "max_held",
            "max_held_bytes",
            "max_message_size",
            "handshake_timeout",
            "stall_timeout",
            "spool_linger",
        )
        # "not >= 0" also refuses NaN, which would make a deadline that never comes.
        if not (self.drain_timeout >= 0 and self.restart_grace >= 0):
            raise ValueError("drain_timeout and restart_grace must be >= 0")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        for name in ("metrics_port", "tcp_publish_port", "tcp_fanout_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port < 65536:
                raise ValueError(f"{name} must be a port number (0 to 65535), not {port!r}")


@dataclass(frozen=True)
class ClientOptions(_Options):
    """How a ``HubBroker`` talks to its hub.

    - ``connect_timeout``: how long to wait for the hub's WELCOME (and its key file).
    - ``subscribe_timeout``: how long ``subscribe()`` waits for the hub to have it live.
    - ``publish_timeout``: how long ``publish()`` waits for room under backpressure (``None``:
      as long as it takes).
    - ``linger``: how long ``close()`` waits for the hub to confirm what was published.
    - ``max_pending``: messages queued in this process before ``publish()`` blocks; also the
      messages sent and not yet confirmed by the hub at most (past it the I/O thread asks the
      hub to confirm and sends on once it has). Not in a
      handler: ``publish()`` from a thread that runs handlers (dispatcher, queue workers, queue
      event loop) never blocks, because the hub may be waiting for that very thread to take its
      messages while it stops reading this process's (a circular wait: a pipeline stage
      deadlocked the bus). The outbox may then exceed ``max_pending`` by what handlers publish.
      That excess follows the hub's flow: handlers run only on messages the hub delivered, and
      the hub relays only as fast as it reads publishers, this process among them, fairly (a
      batch from each in turn). So the excess is the handlers' fan-out times the messages on
      their way to this process while its outbox is full, which the pipes bound: about
      (hub ``hwm`` + ``hwm`` + ``dispatch_queue``) batches of up to ``max_batch``. Measured with
      a stage publishing one message per message received, 300,000 received in bursts at
      ``hwm=20``, ``max_pending=200``: at most 52,000 over ``max_pending``.
    - ``max_batch``: messages in one batch frame at most.
    - ``hwm``: batches in each socket pipe at most.
    - ``dispatch_queue``: received batches waiting for the dispatcher thread at most.
    - ``hub_lost_timeout``: once the hub has been unreachable this long (counted from when this
      client noticed: a closed connection, or ``heartbeat_timeout`` of silence), the client
      counts it as gone for good: ``publish()``, ``flush()`` and ``subscribe()`` raise
      ``HubUnavailableError`` at once (what was accepted before stays queued), so does every
      ``request()`` waiting for its reply, and
      ``HubBroker.hub_available`` turns false. A hub back at the address ends that state. Within
      the timeout a hub that restarts is waited for: publishes are held, then delivered. The
      default, 30 s, outlasts a hub restarted by a supervisor; ``None`` waits forever.
    - ``on_hub_state``: called with ``False`` when ``hub_lost_timeout`` expires and with
      ``True`` when a hub is back after that, on a thread of its own (it may block or publish;
      an exception it raises is logged).
    """

    connect_timeout: float | None = 10.0
    subscribe_timeout: float | None = 30.0
    publish_timeout: float | None = None
    linger: float = 10.0
    max_pending: int = 10_000
    max_batch: int = 1000
    hwm: int = 1000
    dispatch_queue: int = 64
    hub_lost_timeout: float | None = 30.0
    on_hub_state: Callable[[bool], object] | None = None

    def __post_init__(self) -> None:
        self._check_positive("max_pending", "max_batch", "hwm", "dispatch_queue")
        self._check_positive("hub_lost_timeout")
        if self.on_hub_state is not None and not callable(self.on_hub_state):
            raise TypeError(f"on_hub_state must be callable, not {self.on_hub_state!r}")
        if not self.linger >= 0:  # also refuses NaN
            raise ValueError(f"linger must be >= 0, not {self.linger!r}")


RUNNER_PERIODS = (
    "restart_backoff",
    "max_backoff",
    "stable_after",
    "shutdown_timeout",
    "connect_timeout",
)


@dataclass(frozen=True)
class RunnerOptions(_Options):
    """How ``ipcbus worker`` runs its worker processes (``ipcbus.worker``).

    - ``processes``: worker processes, each with a broker of its own.
    - ``start_method``: how they start (``"spawn"``, ``"fork"`` or ``"forkserver"``). Spawn by
      default: a worker needs nothing of the runner, and forking a process that runs threads is
      deprecated from Python 3.12 on.
    - ``restart_backoff``: a worker that crashes is started again after this many seconds,
      doubled for each crash in a row, up to ``max_backoff``.
    - ``stable_after``: a worker that ran this long before it crashed starts a new row.
    - ``max_crashes``: that many crashes in a row (each within ``stable_after`` of its start)
      and the runner gives up: it stops every worker and exits 1, saying so.
    - ``shutdown_timeout``: after SIGTERM, a worker gets this long to close its broker (which
      finishes and acks what it holds within its ``linger``, 10 s by default, and hands the rest
      back to the hub); past it, it is killed, and the hub redelivers what it still held.
    - ``connect_timeout``: how long a worker waits for the hub (or NATS server) at its start;
      past it, the runner stops and exits 4 (no hub answered), as the worker's ``connect()``.
    """

    processes: int = 2
    start_method: str = "spawn"
    restart_backoff: float = 1.0
    max_backoff: float = 30.0
    stable_after: float = 30.0
    max_crashes: int = 5
    shutdown_timeout: float = 30.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        self._check_positive("processes", "max_backoff", "stable_after", "max_crashes")
        self._check_positive("shutdown_timeout", "connect_timeout")
        if not self.restart_backoff >= 0:  # also refuses NaN
            raise ValueError(f"restart_backoff must be >= 0, not {self.restart_backoff!r}")
        for name in RUNNER_PERIODS:
            if math.isinf(getattr(self, name)):  # waits end in process.join(): inf overflowed
                raise ValueError(f"{name} must be finite, not {getattr(self, name)!r}")
        if self.start_method not in ("spawn", "fork", "forkserver"):
            raise ValueError(
                f"start_method must be spawn, fork or forkserver, not {self.start_method!r}"
            )
