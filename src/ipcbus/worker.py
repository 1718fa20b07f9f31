"""The worker runner (``ipcbus worker``): N processes that import modules declaring
``Consumer``s, each connected to the hub, restarted when they crash, stopped cleanly on a signal.

The runner itself never connects; it starts the workers, watches them and forwards signals, as
``dramatiq`` and ``celery worker`` do:

- A worker imports its modules, connects, installs its broker (every module-level ``Consumer``
  binds to it), then tells the runner it is ready.
- A worker that dies while the runner runs is started again, after a backoff that doubles with
  each crash in a row; past ``max_crashes`` in a row the runner gives up, loudly (CRITICAL), and
  exits 1. A worker that cannot start at all the first time (a module that does not import, no
  hub) is not retried: the runner exits 2 or 4 at once.
- SIGTERM or SIGINT to the runner: it sends SIGTERM to every worker, which closes its broker:
  no new deliveries, those in hand finish and are acked within the broker's ``linger``, the rest
  go back to the hub. The runner exits 0 once they have all left. A second signal is the hard
  stop (dramatiq's two stages): the workers leave at once and the hub redelivers what they held.
  A worker still there after ``shutdown_timeout`` is killed.
- Workers ignore SIGINT (a Ctrl-C in a terminal reaches the whole process group: the runner
  alone decides) and take SIGTERM once (a SIGTERM to the group reaches them twice: directly and
  from the runner); the second stage reaches them as SIGUSR1. They stop on their own when the
  runner is gone (their end of its pipe closes).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import operator
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import RunnerOptions
from .core.failures import describe
from .exit_codes import ExitCode

__all__ = ["WorkerRunner", "load_target"]

logger = logging.getLogger("ipcbus.worker")

# The runner's second stage to its workers: leave at once (SIGTERM asks them to close).
_LEAVE_NOW = signal.SIGUSR1
# A worker's exit code when the second stage made it leave without closing its broker.
_KILLED = 3
# How often an idle worker looks at the runner's pipe (its end closes when the runner dies).
_PARENT_POLL = 0.2
# A worker not ready this long after its start is said to be (a module that blocks at import, a
# setup that waits): without it the runner waited in silence.
_SLOW_START_S = 10.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def load_target(target: str) -> Callable[[Any], object] | None:
    """Import ``MODULE[:OBJ]``. ``OBJ`` (a dotted attribute path) is a ``Consumer`` (declared
    at import, nothing more to do: ``None``) or a callable that each worker calls with its broker
    once it is installed. ``ImportError``, ``AttributeError`` or ``TypeError`` otherwise."""
    from .consumer import Consumer

    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    if not attribute:
        return None
    value = operator.attrgetter(attribute)(module)
    if isinstance(value, Consumer):
        return None
    if not callable(value):
        raise TypeError(f"{target} is neither a Consumer nor a callable: {value!r}")
    return value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Spec:
    """What a worker process needs (pickled to spawn and forkserver children)."""

    index: int
    targets: tuple[str, ...]
    address: str
    log_level: str
    connect_timeout: float


def _serve_worker(
    spec: _Spec, conn: multiprocessing.connection.Connection, inherited: tuple[int, ...]
) -> None:
    """A worker process: import, connect, bind, serve until SIGTERM or the runner is gone."""
    signal.set_wakeup_fd(-1)  # a forked child must not wake the runner's loop with its signals
    for fd in inherited:  # forked: the runner's ends of the pipes (its own and its siblings')
        with contextlib.suppress(OSError):
            os.close(fd)
    stop = threading.Event()

    def on_term(signum: int, frame: types.FrameType | None) -> None:
        # Once, however many come: a SIGTERM to the whole process group (systemd's stop,
        # `kill -TERM -PGID`, `timeout`) reaches this process and the runner, which passes it
        # on; taken for the runner's second stage, it cut every job short.
        stop.set()

    def on_leave(signum: int, frame: types.FrameType | None) -> None:
        # The runner's second stage: leave now. The hub sees the connection close and hands
        # what this process held to other consumers.
        os._exit(_KILLED)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(_LEAVE_NOW, on_leave)
    logging.basicConfig(level=spec.log_level, stream=sys.stderr, format=LOG_FORMAT)
    from .client.broker import connect
    from .core.registry import set_message_broker
    from .exceptions import HubUnavailableError

    try:
        setups = [load_target(target) for target in spec.targets]
    except BaseException as exc:  # SystemExit at import too: it did not import, retrying is vain
        if isinstance(exc, KeyboardInterrupt):
            raise
        conn.send(("usage", f"cannot load {' '.join(spec.targets)}: {describe(exc)}"))
        sys.exit(ExitCode.USAGE)
    try:
        broker = connect(spec.address, connect_timeout=spec.connect_timeout)
    except HubUnavailableError as exc:
        conn.send(("unavailable", str(exc)))
        sys.exit(ExitCode.UNAVAILABLE)
    try:
        set_message_broker(broker)  # module-level Consumers bind here
        for setup in setups:
            if setup is not None:
                setup(broker)
        conn.send(("ready", os.getpid()))
        while not stop.is_set():
            if conn.poll(_PARENT_POLL):  # the runner never writes: this is its end closing
                logger.warning("worker %d: the runner is gone: stopping", spec.index)
                break
    except Exception as exc:
        logger.exception("worker %d failed", spec.index)
        with contextlib.suppress(OSError):
            conn.send(("failed", describe(exc)))
        raise SystemExit(ExitCode.FAILED) from exc
    finally:
        broker.close()  # in hand: finished and acked within the linger; the rest: to the hub


class _Slot:
    """One worker's place: the process now in it, and its crashes in a row."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Any = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.started_at = 0.0
        self.ever_ready = False
        self.said: tuple[str, Any] | None = None  # why it could not start, if it said
        self.crashes = 0
        self.restart_at: float | None = None
        self.slow_at: float | None = None  # when to say that it is not ready yet


class WorkerRunner:
    """Runs ``options.processes`` workers that load ``targets``, connected to ``address``."""

    def __init__(
        self,
        targets: Sequence[str],
        address: str,
        options: RunnerOptions | None = None,
        *,
        log_level: str = "WARNING",
        out: Any = None,
    ) -> None:
        self.targets = tuple(targets)
        self.address = address
        self.options = options or RunnerOptions()
        self._log_level = log_level
        self._out = out if out is not None else sys.stdout
        self._context: Any = multiprocessing.get_context(self.options.start_method)
        self._slots = [_Slot(index) for index in range(self.options.processes)]
        self._signals = 0

    def run(self) -> int:
        """Run until a signal (then exit 0 once every worker left) or a fatal failure."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        self._wake_fds = (wake_read, wake_write)
        try:
            code = self._supervise(wake_read)
            return self._shutdown(code)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_read)
            os.close(wake_write)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:  # the second stage: workers leave at once
            self._terminate_all(_LEAVE_NOW)

    # -- running ----------------------------------------------------------------------------

    def _supervise(self, wake_read: int) -> int | None:
        """Returns a fatal exit code, or ``None`` when asked to stop."""
        for slot in self._slots:
            self._start(slot)
        while not self._signals:
            waits: list[Any] = [wake_read]
            for slot in self._slots:
                if slot.process is not None:
                    waits += [slot.process.sentinel, slot.conn]
            now = time.monotonic()
            due = [
                at
                for slot in self._slots
                for at in (slot.restart_at, slot.slow_at)
                if at is not None
            ]
            timeout = max(0.0, min(due) - now) if due else None
            ready = multiprocessing.connection.wait(waits, timeout)
            if wake_read in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 512)
            for slot in self._slots:
                code = self._check(slot)
                if code is not None:
                    return code
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at and not self._signals:
                    self._start(slot)
                if slot.slow_at is not None and now >= slot.slow_at:
                    self._slow(slot)
        logger.info("stopping %d workers", sum(s.process is not None for s in self._slots))
        return None

    def _start(self, slot: _Slot) -> None:
        parent_end, child_end = self._context.Pipe()
        inherited: tuple[int, ...] = ()
        if self.options.start_method == "fork":
            ends = [s.conn.fileno() for s in self._slots if s.conn is not None]
            inherited = (*ends, parent_end.fileno(), *self._wake_fds)
        spec = _Spec(
            slot.index, self.targets, self.address, self._log_level, self.options.connect_timeout
        )
        process = self._context.Process(
            target=_serve_worker,
            args=(spec, child_end, inherited),
            name=f"ipcbus-worker-{slot.index}",
        )
        process.start()
        child_end.close()
        slot.process, slot.conn = process, parent_end
        slot.started_at, slot.restart_at = time.monotonic(), None
        slot.slow_at = slot.started_at + _SLOW_START_S

    def _slow(self, slot: _Slot) -> None:
        slot.slow_at = None
        logger.warning(
            "worker %d (pid %s) is not ready %g s after its start: importing %s or its setup "
            "still runs (a module that blocks at import keeps it there)",
            slot.index,
            slot.process.pid if slot.process is not None else "?",
            _SLOW_START_S,
            " ".join(self.targets),
        )

    def _check(self, slot: _Slot) -> int | None:
        """Read what the worker said; handle its exit. A fatal exit code, or ``None``."""
        if slot.process is None or slot.conn is None:
            return None
        with contextlib.suppress(EOFError, OSError):
            while slot.conn.poll():
                said = slot.conn.recv()
                if said[0] == "ready":
                    slot.ever_ready, slot.slow_at = True, None
                    print(f"worker {slot.index} ready: pid {said[1]}", file=self._out, flush=True)
                else:
                    slot.said = said
        if slot.process.is_alive():
            return None
        slot.process.join()
        exitcode, pid = slot.process.exitcode, slot.process.pid
        slot.process.close()
        slot.conn.close()
        slot.process = slot.conn = None
        slot.slow_at = None
        said, slot.said = slot.said, None
        if said is not None and not slot.ever_ready:
            # It never started: a module that does not import, no hub. Retrying would not help.
            kind, detail = said
            logger.critical("worker %d could not start: %s", slot.index, detail)
            print(f"ipcbus worker: {detail}", file=sys.stderr, flush=True)
            return ExitCode.UNAVAILABLE if kind == "unavailable" else ExitCode.USAGE
        return self._crashed(slot, pid, exitcode)

    def _crashed(self, slot: _Slot, pid: int, exitcode: int | None) -> int | None:
        if self._signals:
            return None
        uptime = time.monotonic() - slot.started_at
        if uptime >= self.options.stable_after:
            slot.crashes = 0
        slot.crashes += 1
        how = _how_it_ended(exitcode)
        if slot.crashes > self.options.max_crashes:
            logger.critical(
                "worker %d (pid %d) %s: %d crashes in a row, each within %.0f s of its start: "
                "giving up",
                slot.index,
                pid,
                how,
                slot.crashes,
                self.options.stable_after,
            )
            return ExitCode.FAILED
        delay = min(
            self.options.restart_backoff * 2 ** (slot.crashes - 1), self.options.max_backoff
        )
        logger.warning(
            "worker %d (pid %d) %s after %.1f s: starting it again in %.1f s "
            "(the hub redelivers what it held)",
            slot.index,
            pid,
            how,
            uptime,
            delay,
        )
        slot.restart_at = time.monotonic() + delay
        return None

    # -- stopping ---------------------------------------------------------------------------

    def _terminate_all(self, signum: int = signal.SIGTERM) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)

    def _shutdown(self, code: int | None) -> int:
        """SIGTERM every worker; wait up to ``shutdown_timeout`` each; kill the rest."""
        self._terminate_all()
        deadline = time.monotonic() + self.options.shutdown_timeout
        failed = False
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error(
                    "worker %d (pid %d) still running %.0f s after SIGTERM: killing it",
                    slot.index,
                    process.pid,
                    self.options.shutdown_timeout,
                )
                process.kill()
                process.join(10)
            if process.exitcode != 0:
                failed = True
                logger.warning(
                    "worker %d (pid %d) %s while stopping",
                    slot.index,
                    process.pid,
                    _how_it_ended(process.exitcode),
                )
            process.close()
            if slot.conn is not None:
                slot.conn.close()
            slot.process = slot.conn = None
        if code is not None:
            return code
        return ExitCode.FAILED if failed else ExitCode.OK


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
