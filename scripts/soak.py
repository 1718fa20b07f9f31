#!/usr/bin/env python3
"""Soak test with a ledger (issue 9): every message publish() accepted is accounted for.

One hub at an ipc:// address in a private 0700 directory, and worker processes (spawned):

- ``pub-N`` publishers: ``Tick`` (broadcast) and ``Job`` (two queue groups), payloads of 10 B to
  16 MiB (rarely big, at most one big one per publisher every few seconds), some unpicklable (a
  field holding a lock) and some over the hub's ``max_message_size``, all through ``publish()``;
  ``flush()`` every few seconds;
- ``sub-N`` broadcast subscribers of ``Tick`` and ``Derived``; ``sub-0``'s handlers raise
  ``Exception`` now and then, the others' also ``SystemExit`` and a ``BaseException`` subclass;
- ``stage``: its ``Tick`` handler publishes a ``Derived`` for every other tick;
- ``cons-ga-N`` / ``cons-gb-N`` queue consumers of ``Job`` in groups ``ga`` (handlers raise
  ``Exception``, a ``BaseException`` subclass, and ``SystemExit`` from plain functions or
  ``asyncio.CancelledError`` from coroutines) and ``gb`` (``Exception`` only), with a small
  ``max_attempts`` and ``retry_backoff``; ``cons-*`` of ``ga`` run plain functions and of ``gb``
  coroutines, the victims the other kind; some jobs are poison (they fail on every attempt, so
  they end as dead letters);
- ``dlq``: a ``DeadLetter`` subscriber;
- victims ``vsub-N`` / ``vcons-ga-N`` / ``vcons-gb-N``: the only processes SIGKILLed (each then
  replaced); their ledgers are not checked for exactness, their queue work is.

Meanwhile the parent injects faults at seeded random times: SIGKILL of a victim, SIGSTOP/SIGCONT of
any worker (shorter and longer than ``stall_timeout``), SIGKILL of the hub and a new hub at the
same address, with the same queue journal (so queue jobs survive it; broadcast messages the
killed hub took are reported by their publishers, ``HubBroker.in_doubt``, and by subscribers in
``gaps``, and count as reported lost). It samples every process's RSS, fds and threads from
/proc. Timeouts and pipes are small (``SoakConfig``) so that faults bite within a short run.
``--skip`` leaves fault kinds out, to find which one breaks what; the checks stay the same.

Ledgers: each worker writes a JSON ledger to the private directory every ``LEDGER_INTERVAL`` s and
when it ends. Queue consumers also append one line per handler call to a journal *before* the
handler returns (so before the ack): a consumer SIGKILLed after acking cannot lose the record of
work the hub considers done. Exactness is checked only for workers that are never SIGKILLed.

At the end the parent stops the faults, lets everything drain (every wait has a deadline), and
checks: broadcast, every accepted message received exactly once by each checked subscriber or
covered by its loss counters; queue, every accepted job processed at least once or dead-lettered;
every unpicklable message publish() accepted reported (by flush(), by an error, or a counter);
resources bounded. It prints the ledger totals, the faults injected, and one final line
``SOAK-SUMMARY {json}``; it exits 1 when anything is unaccounted, hung or unbounded.

    python scripts/soak.py --minutes 10 [--seed S] [--workers pub=2,sub=2,cons=1,vsub=1,vcons=1]
                           [--skip sigkill_hub,...] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ipcbus import (
    AsyncMessageContext,
    DeadLetter,
    Hub,
    HubBroker,
    Message,
    MessageSerializationError,
    PubSubError,
)
from ipcbus.client.admin import request_statistics

MIB = 1024 * 1024
SUMMARY_PREFIX = "SOAK-SUMMARY "
LEDGER_INTERVAL = 0.5
# Counters a broker may expose for what it knows it lost (read with getattr: the soak runs
# before and after the branches that add them land). Subscribers sum them as "reported lost".
LOSS_COUNTERS = ("gaps", "undecodable", "rejected")
# Counters a publishing broker may expose for messages it could not send.
PUBLISH_ERROR_COUNTERS = ("rejected",)
# Sensible bounds for a process: growth is last sample minus first (taken once it is ready).
RSS_GROWTH_MIB = 256
RSS_MAX_MIB = 1024
FD_GROWTH = 32
FD_MAX = 512
THREAD_GROWTH = 16
PARENT_KINDS = ("sigkill_worker", "sigstop_short", "sigstop_long", "sigkill_hub")
# What --skip may leave out, to find which fault breaks what (the checks stay the same).
SKIPPABLE = (*PARENT_KINDS, "base_exceptions", "big", "oversized", "unpicklable")
WORKER_KINDS = (
    "handler_Exception",
    "handler_SystemExit",
    "handler_SoakBaseError",
    "handler_CancelledError",
    "handler_publish",
    "payload_big",
    "oversized",
    "unpicklable",
)


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick(Message):
    pub: str
    seq: int
    crc: int
    payload: bytes
    extra: Any = None  # a threading.Lock makes it unpicklable


@dataclass(frozen=True)
class Job(Message):
    pub: str
    seq: int
    crc: int
    payload: bytes
    poison: bool = False  # its handler fails on every attempt: it ends as a dead letter
    extra: Any = None


@dataclass(frozen=True)
class Derived(Message):
    pub: str  # the stage
    seq: int
    origin: str  # "pub-0:123": the Tick whose handler published it
    crc: int
    payload: bytes


class SoakError(Exception):
    """An injected handler failure."""


class SoakBaseError(BaseException):
    """An injected handler failure that is not an Exception."""


def make_fault(kind: str) -> BaseException:
    if kind == "SystemExit":
        return SystemExit("soak: injected SystemExit")
    if kind == "SoakBaseError":
        return SoakBaseError("soak: injected BaseException")
    if kind == "CancelledError":
        return asyncio.CancelledError("soak: injected CancelledError")
    return SoakError("soak: injected Exception")


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    directory: str
    address: str
    seconds: float  # how long publishers publish and faults are injected
    seed: int
    publishers: int = 2
    subscribers: int = 2
    consumers: int = 1  # per group
    victim_subscribers: int = 1
    victim_consumers: int = 1  # per group
    tick_rate: float = 300.0  # per publisher, per second
    job_rate: float = 20.0
    fault_interval: float = 6.0  # mean seconds between parent faults after the first round
    drain_seconds: float = 120.0
    max_message_size: int = 8 * MIB
    # Small pipes, so that a SIGSTOP of a few seconds fills a subscriber's queues and the hub
    # stalls (at ~150 batches/s the default 1,000-batch pipes take ~13 s to fill), and so that
    # a handler that publishes meets backpressure (issue 9, case 3).
    hwm: int = 50
    client_hwm: int = 50
    dispatch_queue: int = 16
    stage_max_pending: int = 500
    heartbeat_interval: float = 0.3
    heartbeat_timeout: float = 1.5
    stall_timeout: float = 2.0
    max_attempts: int = 3
    retry_backoff: float = 0.02
    prefetch: int = 8
    publish_timeout: float = 15.0
    flush_interval: float = 2.0
    flush_timeout: float = 10.0
    linger: float = 5.0
    big_interval: float = 4.0  # at most one payload >= 1 MiB per publisher this often
    p_big: float = 0.015
    p_unpicklable: float = 0.0005
    p_poison: float = 0.03
    p_job_fail: float = 0.05
    p_handler_exception: float = 0.003
    p_handler_base: float = 0.0002
    derive_every: int = 2
    keep_logs: bool = False
    skip: tuple[str, ...] = ()  # fault kinds not injected (see SKIPPABLE)

    def injects(self, kind: str) -> bool:
        return kind not in self.skip

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def hub_options(self) -> dict[str, Any]:
        return {
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
            "stall_timeout": self.stall_timeout,
            "max_message_size": self.max_message_size,
            "hwm": self.hwm,
            "drain_timeout": 2.0,
            # Queue jobs survive the hub's SIGKILL: every incarnation uses the same journal.
            "journal": self.path("journal"),
        }


# -- ledger helpers ------------------------------------------------------------------------------


class SeqSet:
    """A set of sequence numbers as a bitmap: a million of them take 128 KB, not 40 MB."""

    __slots__ = ("bits",)

    def __init__(self, data: bytes = b"") -> None:
        self.bits = bytearray(data)

    def add(self, seq: int) -> bool:
        """Add ``seq``; False when it was there already (a duplicate)."""
        index, bit = divmod(seq, 8)
        if index >= len(self.bits):
            self.bits.extend(bytes(index - len(self.bits) + 4096))
        mask = 1 << bit
        if self.bits[index] & mask:
            return False
        self.bits[index] |= mask
        return True

    def encode(self) -> str:
        return base64.b64encode(zlib.compress(bytes(self.bits))).decode()

    @staticmethod
    def decode_int(text: str) -> int:
        return int.from_bytes(zlib.decompress(base64.b64decode(text)), "little")


def runs_of(bits: int, limit: int = 1_000_000) -> Iterator[tuple[int, int]]:
    """The runs ``(first, last)`` of set bits in ``bits``, in order."""
    data = bits.to_bytes((bits.bit_length() + 7) // 8 or 1, "little")
    start = -1
    emitted = 0
    for index, byte in enumerate(data):
        if byte in (0, 255) and (byte == 255) == (start >= 0):
            continue
        for bit in range(8):
            seq = index * 8 + bit
            if byte >> bit & 1:
                if start < 0:
                    start = seq
            elif start >= 0:
                yield start, seq - 1
                start = -1
                emitted += 1
                if emitted >= limit:
                    return
    if start >= 0:
        yield start, len(data) * 8 - 1


def write_json(path: str, data: Any) -> None:
    """Atomically: a reader (or a SIGKILL) never sees half a ledger."""
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "w") as file:
        json.dump(data, file)
    os.replace(temporary, path)


def read_json(path: str) -> Any:
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


class LogCounter(logging.Handler):
    """Counts log records by level and logger, and keeps a few distinct messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()
        self.samples: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname}:{record.name}"] += 1
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        key = f"{record.levelname}:{record.name}: {text[:110]}"
        if key in self.samples or len(self.samples) < 40:
            self.samples[key] = self.samples.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        self.acquire()  # emit() runs under the handler's lock, in whichever thread logs
        try:
            return {"logs": dict(self.counts), "log_samples": dict(self.samples)}
        finally:
            self.release()


# -- workers -------------------------------------------------------------------------------------


class Worker:
    """What every worker process shares: flags, its ledger, a seeded random source, logs."""

    role = "worker"

    def __init__(self, cfg: SoakConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.rng = random.Random(f"{cfg.seed}:{name}")
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.finished = False
        self.phase = "starting"
        self.broker: HubBroker | None = None
        self.logs = LogCounter()
        self.thread_deaths: list[tuple[float, str, str]] = []  # (when, thread, exception)
        self.threads_at_stop: list[str] | None = None
        self._saving = threading.Event()
        self._save_lock = threading.Lock()
        previous_hook = threading.excepthook

        def on_thread_death(args: threading.ExceptHookArgs) -> None:
            thread = args.thread.name if args.thread is not None else "?"
            death = (round(time.monotonic(), 3), thread, args.exc_type.__name__)
            self.thread_deaths.append(death)
            previous_hook(args)

        threading.excepthook = on_thread_death
        root = logging.getLogger()
        root.setLevel(logging.WARNING)
        root.addHandler(self.logs)
        if cfg.keep_logs:
            root.addHandler(logging.FileHandler(cfg.path(f"{name}.log")))

    def flag(self, flag: str) -> bool:
        return os.path.exists(self.cfg.path(flag))

    def wait_flag(self, flag: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.flag(flag):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def connect(self, **options: Any) -> HubBroker:
        cfg = self.cfg
        self.broker = HubBroker(
            cfg.address,
            connect_timeout=60.0,
            publish_timeout=cfg.publish_timeout,
            linger=cfg.linger,
            hwm=cfg.client_hwm,
            dispatch_queue=cfg.dispatch_queue,
            **options,
        )
        return self.broker

    def snapshot(self) -> dict[str, Any]:
        broker = self.broker
        counters = {}
        for counter in (*LOSS_COUNTERS, *PUBLISH_ERROR_COUNTERS):
            value = getattr(broker, counter, None) if broker is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                counters[counter] = value
        return {
            "name": self.name,
            "role": self.role,
            "pid": os.getpid(),
            "phase": self.phase,
            "finished": self.finished,
            "uptime": time.monotonic() - self.started,
            # Before close() stops them: which threads were alive when the run ended.
            "threads": self.threads_at_stop or sorted(t.name for t in threading.enumerate()),
            "thread_deaths": list(self.thread_deaths),
            "counters": counters,
            # Broadcast messages a killed hub took before confirming them (HubBroker.in_doubt),
            # per type: the publisher's report of what its subscribers may have lost.
            "in_doubt": dict(getattr(broker, "in_doubt_by_type", None) or {}),
            **self.logs.snapshot(),
        }

    def save(self) -> None:
        with self._save_lock:  # the saver thread and the main thread: one at a time, in order
            with self.lock:
                data = self.snapshot()
            write_json(self.cfg.path(f"{self.name}.json"), data)

    def _save_periodically(self) -> None:
        while not self._saving.wait(LEDGER_INTERVAL):
            try:
                self.save()
            except Exception:
                logging.getLogger("soak").exception("could not save the ledger")

    def main(self) -> None:
        saver = threading.Thread(target=self._save_periodically, name="soak-ledger", daemon=True)
        try:
            self.save()
            saver.start()
            self.run()
            self.threads_at_stop = sorted(t.name for t in threading.enumerate())
            self.phase = "closing"
            self.save()
            if self.broker is not None:
                began = time.monotonic()
                self.broker.close()
                self.phase = f"closed in {time.monotonic() - began:.1f} s"
        finally:
            self._saving.set()
            self.finished = True
            self.save()

    def ready(self) -> None:
        self.phase = "ready"
        self.save()
        with open(self.cfg.path(f"{self.name}.ready"), "w"):
            pass

    def run(self) -> None:
        raise NotImplementedError

    def wait_for_stop(self) -> None:
        self.phase = "waiting for stop"
        self.wait_flag("stop", self.cfg.seconds + self.cfg.drain_seconds + 600)


class Received:
    """What a subscriber received: per publisher the sequence numbers, duplicates, corruption."""

    def __init__(self) -> None:
        self.seen: dict[str, SeqSet] = {}
        self.duplicates: Counter[str] = Counter()
        self.count = 0
        self.corrupt = 0
        self.by_type: Counter[str] = Counter()

    def record(self, message: Tick | Derived) -> None:
        seen = self.seen.get(message.pub)
        if seen is None:
            seen = self.seen[message.pub] = SeqSet()
        if not seen.add(message.seq):
            self.duplicates[message.pub] += 1
        self.count += 1
        self.by_type[type(message).__name__] += 1
        if zlib.crc32(message.payload) != message.crc or not message.payload.startswith(
            f"{message.pub}:{message.seq}:".encode()
        ):
            self.corrupt += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "received": {pub: seen.encode() for pub, seen in self.seen.items()},
            "received_count": self.count,
            "received_by_type": dict(self.by_type),
            "duplicates": dict(self.duplicates),
            "corrupt": self.corrupt,
        }


class Subscriber(Worker):
    """A broadcast subscriber of Tick and Derived whose handler sometimes raises."""

    role = "subscriber"

    def __init__(self, cfg: SoakConfig, name: str, base_exceptions: bool) -> None:
        super().__init__(cfg, name)
        self.got = Received()
        self.base_exceptions = base_exceptions and cfg.injects("base_exceptions")
        self.raised: Counter[str] = Counter()
        self.first_base_raise: float | None = None
        self.types = ["Tick", "Derived"]

    def on_message(self, message: Tick | Derived) -> None:
        with self.lock:
            self.got.record(message)
        self.maybe_raise()

    def maybe_raise(self) -> None:
        draw = self.rng.random()
        cfg = self.cfg
        kind = None
        if draw < cfg.p_handler_exception:
            kind = "Exception"
        elif self.base_exceptions and draw < cfg.p_handler_exception + cfg.p_handler_base:
            kind = "SystemExit"
        elif self.base_exceptions and draw < cfg.p_handler_exception + 2 * cfg.p_handler_base:
            kind = "SoakBaseError"
        if kind is not None:
            with self.lock:
                self.raised[kind] += 1
                if kind != "Exception" and self.first_base_raise is None:
                    self.first_base_raise = time.monotonic()
            raise make_fault(kind)

    def subscribe(self, broker: HubBroker) -> None:
        broker.subscribe(Tick, self.on_message)
        broker.subscribe(Derived, self.on_message)

    def snapshot(self) -> dict[str, Any]:
        return {
            **super().snapshot(),
            **self.got.snapshot(),
            "types": self.types,
            "raised": dict(self.raised),
            "first_base_raise": self.first_base_raise,
        }

    def run(self) -> None:
        self.subscribe(self.connect())
        self.ready()
        self.wait_for_stop()


class PublishLedger:
    """What publish() and flush() did for one publishing process."""

    def __init__(self) -> None:
        self.seq = 0
        self.accepted: dict[str, SeqSet] = {}
        self.rejected: Counter[str] = Counter()  # "intent/type/Exception"
        self.flushes: Counter[str] = Counter()
        self.checkpoints: list[tuple[float, int]] = []
        self.events: list[tuple[float, int, str, str]] = []  # (t, seq, kind, outcome)
        self.attempted: Counter[str] = Counter()
        self.bad_accepted = 0
        self.bad_pending: list[int] = []
        self.bad_reported_by_flush = 0
        self.bad_reported_by_publish = 0
        self.bad_unreported = 0
        self.collateral: Counter[str] = Counter()  # good messages rejected for a bad one
        self.final_flush = "not run"

    def next_seq(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        return seq

    def checkpoint(self) -> None:
        self.checkpoints.append((round(time.monotonic(), 3), self.seq))

    def snapshot(self) -> dict[str, Any]:
        return {
            "seq_next": self.seq,
            "accepted": {kind: seen.encode() for kind, seen in self.accepted.items()},
            "rejected": dict(self.rejected),
            "flushes": dict(self.flushes),
            "checkpoints": self.checkpoints,
            "events": self.events[-5000:],
            "attempted": dict(self.attempted),
            "bad_accepted": self.bad_accepted,
            "bad_pending": len(self.bad_pending),
            "bad_reported_by_flush": self.bad_reported_by_flush,
            "bad_reported_by_publish": self.bad_reported_by_publish,
            "bad_unreported": self.bad_unreported,
            "collateral": dict(self.collateral),
            "final_flush": self.final_flush,
        }


class Publishing:
    """publish() and flush() with every outcome written to a PublishLedger."""

    def __init__(self, worker: Worker, ledger: PublishLedger) -> None:
        self.worker = worker
        self.ledger = ledger

    def publish(self, message: Message, seq: int, intent: str) -> bool:
        """``intent``: "good", "oversized" or "unpicklable"."""
        broker = self.worker.broker
        assert broker is not None
        kind = type(message).__name__
        ledger = self.ledger
        with self.worker.lock:
            ledger.attempted[f"{intent}/{kind}"] += 1
        try:
            broker.publish(message, timeout=self.worker.cfg.publish_timeout)
        except Exception as exc:
            error = type(exc).__name__ + ("" if isinstance(exc, PubSubError) else "!foreign")
            with self.worker.lock:
                ledger.rejected[f"{intent}/{kind}/{error}"] += 1
                if intent != "good":
                    ledger.events.append((time.monotonic(), seq, intent, error))
                elif isinstance(exc, MessageSerializationError):
                    # A good message refused for another's fault (the deferred error of an
                    # earlier bad one): the bad ones are reported, this one is collateral.
                    ledger.collateral[kind] += 1
                    ledger.bad_reported_by_publish += len(ledger.bad_pending)
                    ledger.bad_pending.clear()
            return False
        with self.worker.lock:
            if intent != "good":
                # Unpicklable or over the hub's limit, and not the first of its type: rejected
                # alone later, named by the next flush() (and counted in the broker's rejected).
                ledger.bad_accepted += 1
                ledger.bad_pending.append(seq)
            else:
                ledger.accepted.setdefault(kind, SeqSet()).add(seq)
            if intent != "good":
                ledger.events.append((time.monotonic(), seq, intent, "accepted"))
        return True

    def flush(self, timeout: float) -> str:
        broker = self.worker.broker
        assert broker is not None
        try:
            broker.flush(timeout)
        except Exception as exc:
            outcome = type(exc).__name__
        else:
            outcome = "ok"
        ledger = self.ledger
        with self.worker.lock:
            ledger.flushes[outcome] += 1
            if outcome == "MessageSerializationError":
                ledger.bad_reported_by_flush += len(ledger.bad_pending)
                ledger.bad_pending.clear()
            elif outcome == "ok":
                # Everything published before the flush is with the hub: a bad message that no
                # error named by now was accepted and dropped without a word (to the caller).
                ledger.bad_unreported += len(ledger.bad_pending)
                ledger.bad_pending.clear()
        return outcome

    def final_flush(self, budget: float) -> str:
        """Flush until it succeeds or ``budget`` seconds pass (the hub may be restarting)."""
        deadline = time.monotonic() + budget
        outcome = "not run"
        while time.monotonic() < deadline:
            outcome = self.flush(min(self.worker.cfg.flush_timeout, deadline - time.monotonic()))
            if outcome in ("ok", "MessageSerializationError"):
                if outcome == "MessageSerializationError":
                    continue  # the error was for an earlier message: flush again
                break
            time.sleep(0.2)
        with self.worker.lock:
            self.ledger.final_flush = outcome
            self.ledger.bad_unreported += len(self.ledger.bad_pending)
            self.ledger.bad_pending.clear()
        return outcome


def payload(pub: str, seq: int, size: int, rng: random.Random) -> tuple[bytes, int]:
    """Distinct bytes (the sender and number first), and their CRC."""
    head = f"{pub}:{seq}:".encode()
    body = head + rng.randbytes(max(0, size - len(head)))
    return body, zlib.crc32(body)


class Publisher(Worker):
    role = "publisher"

    def __init__(self, cfg: SoakConfig, name: str) -> None:
        super().__init__(cfg, name)
        self.ledger = PublishLedger()
        self.out = Publishing(self, self.ledger)
        self.next_big = 0.0
        self.published_types: set[str] = set()
        # Every kind of bad message at least once, early enough for a short run.
        rng = self.rng
        forced = {
            "big": cfg.seconds * rng.uniform(0.05, 0.3),
            "oversized": cfg.seconds * rng.uniform(0.1, 0.4),
            "unpicklable_tick": cfg.seconds * rng.uniform(0.1, 0.4),
            "unpicklable_job": cfg.seconds * rng.uniform(0.1, 0.5),
            "burst": cfg.seconds * rng.uniform(0.05, 0.5),
        }
        self.forced = {k: at for k, at in forced.items() if cfg.injects(k.split("_")[0])}
        self.p_big = cfg.p_big if cfg.injects("big") or cfg.injects("oversized") else 0.0
        self.largest = 16 * MIB if cfg.injects("oversized") else cfg.max_message_size - MIB
        self.p_unpicklable = cfg.p_unpicklable if cfg.injects("unpicklable") else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), **self.ledger.snapshot()}

    def size(self, now: float, allow_big: bool) -> int:
        rng = self.rng
        draw = rng.random()
        if allow_big and now >= self.next_big and draw < self.p_big:
            return self.big_size(now, self.largest)
        if draw < 0.85:
            return int(10 * 100 ** rng.random())  # 10 B .. 1 KB
        return int(1024 * 256 ** rng.random())  # 1 KB .. 256 KB

    def big_size(self, now: float, largest: int) -> int:
        self.next_big = now + self.cfg.big_interval
        size = int(MIB * (largest / MIB) ** self.rng.random())
        limit = self.cfg.max_message_size
        if limit - 64 * 1024 <= size <= limit:  # too close to call: the frame adds a header
            size = limit - 64 * 1024
        return size

    def intent_of(self, size: int) -> str:
        return "oversized" if size > self.cfg.max_message_size else "good"

    def tick(self, size: int, unpicklable: bool = False) -> None:
        seq = self.ledger.next_seq()
        body, crc = payload(self.name, seq, size, self.rng)
        if size >= MIB:
            big = "payload_big" if size <= self.cfg.max_message_size else "big"
            with self.lock:
                self.ledger.attempted[big] += 1
        if unpicklable and "Tick" in self.published_types:
            self.out.publish(Tick(self.name, seq, crc, body, threading.Lock()), seq, "unpicklable")
            return
        if self.out.publish(Tick(self.name, seq, crc, body), seq, self.intent_of(size)):
            self.published_types.add("Tick")

    def job(self, unpicklable: bool = False) -> None:
        seq = self.ledger.next_seq()
        body, crc = payload(self.name, seq, int(10 * 6400 ** self.rng.random()), self.rng)
        poison = self.rng.random() < self.cfg.p_poison
        if unpicklable and "Job" in self.published_types:
            message = Job(self.name, seq, crc, body, poison, threading.Lock())
            self.out.publish(message, seq, "unpicklable")
            return
        if self.out.publish(Job(self.name, seq, crc, body, poison), seq, "good"):
            self.published_types.add("Job")

    def forced_due(self, elapsed: float) -> list[str]:
        due = [kind for kind, at in self.forced.items() if elapsed >= at]
        for kind in due:
            del self.forced[kind]
        return due

    def round(self, now: float, elapsed: float, period: float) -> None:
        cfg, rng = self.cfg, self.rng
        for kind in self.forced_due(elapsed):
            if kind == "big":
                self.tick(self.big_size(now, cfg.max_message_size - 128 * 1024))
            elif kind == "oversized":
                self.next_big = now + cfg.big_interval
                self.tick(cfg.max_message_size + rng.randint(1, 8 * MIB))
            elif kind == "unpicklable_tick":
                self.tick(rng.randint(10, 1000), unpicklable=True)
            elif kind == "unpicklable_job":
                self.job(unpicklable=True)
            elif kind == "burst":
                for _ in range(rng.randint(500, 1000)):
                    self.tick(self.size(now, allow_big=False))
        count = round(rng.uniform(0, 2) * cfg.tick_rate * period)
        if rng.random() < 0.02:
            count += rng.randint(200, 1000)  # fills batches (max_batch is 1000)
        for _ in range(count):
            self.tick(self.size(now, allow_big=True), rng.random() < self.p_unpicklable)
        jobs = cfg.job_rate * period
        for _ in range(int(jobs) + (rng.random() < jobs % 1)):
            self.job(rng.random() < self.p_unpicklable)

    def run(self) -> None:
        cfg = self.cfg
        self.connect()
        self.ready()
        if not self.wait_flag("go", 600):
            return
        self.phase = "publishing"
        began = time.monotonic()
        next_flush = began + cfg.flush_interval
        period = 0.05
        while not self.flag("stop-publishing"):
            now = time.monotonic()
            self.round(now, now - began, period)
            with self.lock:
                self.ledger.checkpoint()
            if now >= next_flush:
                self.out.flush(cfg.flush_timeout)
                next_flush = time.monotonic() + cfg.flush_interval
            time.sleep(max(0.0, period - (time.monotonic() - now)))
        self.phase = "final flush"
        self.out.final_flush(cfg.drain_seconds / 2)
        with self.lock:
            self.ledger.checkpoint()
            self.phase = "published"
        self.save()
        self.wait_for_stop()


class Stage(Subscriber):
    """A Tick subscriber whose handler publishes a Derived for every ``derive_every``-th tick."""

    role = "stage"

    def __init__(self, cfg: SoakConfig, name: str) -> None:
        super().__init__(cfg, name, base_exceptions=False)
        self.types = ["Tick"]
        self.ledger = PublishLedger()
        self.out = Publishing(self, self.ledger)
        self.closing = False

    def on_message(self, message: Tick | Derived) -> None:
        with self.lock:
            self.got.record(message)
        if not self.closing and message.seq % self.cfg.derive_every == 0:
            seq = self.ledger.next_seq()
            body, crc = payload(self.name, seq, int(10 * 100 ** self.rng.random()), self.rng)
            origin = f"{message.pub}:{message.seq}"
            self.out.publish(Derived(self.name, seq, origin, crc, body), seq, "good")
        self.maybe_raise()

    def subscribe(self, broker: HubBroker) -> None:
        broker.subscribe(Tick, self.on_message)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), **self.ledger.snapshot()}

    def run(self) -> None:
        cfg = self.cfg
        self.subscribe(self.connect(max_pending=cfg.stage_max_pending))
        self.ready()
        next_flush = time.monotonic() + cfg.flush_interval
        while not self.flag("stop-stage"):
            if time.monotonic() >= next_flush:
                self.out.flush(cfg.flush_timeout)
                next_flush = time.monotonic() + cfg.flush_interval
            with self.lock:
                self.ledger.checkpoint()
            time.sleep(0.1)
        self.closing = True
        self.phase = "final flush"
        self.out.final_flush(cfg.drain_seconds / 2)
        self.phase = "published"
        self.save()
        self.wait_for_stop()


class Consumer(Worker):
    """A queue consumer of Job in one group; journals every handler call before it returns."""

    role = "consumer"

    def __init__(self, cfg: SoakConfig, name: str, group: str, coroutine: bool) -> None:
        super().__init__(cfg, name)
        self.group = group
        self.coroutine = coroutine
        if group == "ga" and cfg.injects("base_exceptions"):
            base = ["CancelledError"] if coroutine else ["SystemExit"]
            self.kinds = ["Exception", "Exception", *base, "SoakBaseError"]
        else:
            self.kinds = ["Exception"]
        self.outcomes: Counter[str] = Counter()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self.journal = os.open(cfg.path(f"{name}.jsonl"), flags, 0o600)

    def decide(self, job: Job, attempt: int) -> str | None:
        rng = random.Random(f"{self.cfg.seed}:{self.group}:{job.pub}:{job.seq}:{attempt}")
        if job.poison or rng.random() < self.cfg.p_job_fail:
            return rng.choice(self.kinds)
        return None

    def note(self, job: Job, outcome: str) -> None:
        context = AsyncMessageContext.current()
        entry = {
            "g": self.group,
            "p": job.pub,
            "s": job.seq,
            "a": context.attempt,
            "m": context.message_id,
            "o": outcome,
            "t": round(time.monotonic(), 3),
            "c": zlib.crc32(job.payload) == job.crc,
        }
        # One write(2) of a short line: atomic among threads, and kept by the kernel when this
        # process is SIGKILLed right after (before its ack leaves).
        os.write(self.journal, (json.dumps(entry) + "\n").encode())
        with self.lock:
            self.outcomes[outcome] += 1

    def handle(self, job: Job) -> None:
        kind = self.decide(job, AsyncMessageContext.current().attempt)
        time.sleep(self.rng.uniform(0, 0.004))
        self.note(job, kind or "ok")
        if kind is not None:
            raise make_fault(kind)

    async def handle_async(self, job: Job) -> None:
        kind = self.decide(job, AsyncMessageContext.current().attempt)
        await asyncio.sleep(self.rng.uniform(0, 0.004))
        self.note(job, kind or "ok")
        if kind is not None:
            raise make_fault(kind)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "group": self.group, "outcomes": dict(self.outcomes)}

    def run(self) -> None:
        broker = self.connect()
        handler: Callable[[Job], Any] = self.handle_async if self.coroutine else self.handle
        cfg = self.cfg
        broker.subscribe_async(
            Job,
            handler,
            self.group,
            max_attempts=cfg.max_attempts,
            retry_backoff=cfg.retry_backoff,
            prefetch=cfg.prefetch,
        )
        self.ready()
        self.wait_for_stop()


class DeadLetters(Worker):
    role = "deadletters"

    def __init__(self, cfg: SoakConfig, name: str) -> None:
        super().__init__(cfg, name)
        self.letters: list[tuple[str, str, int, int, str]] = []

    def on_letter(self, letter: DeadLetter) -> None:
        job = letter.message
        if isinstance(job, Job):
            with self.lock:
                entry = (letter.queue_name, job.pub, job.seq, letter.attempts, letter.error[:60])
                self.letters.append(entry)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "dead_letters": self.letters}

    def run(self) -> None:
        self.connect().subscribe(DeadLetter, self.on_letter)
        self.ready()
        self.wait_for_stop()


def worker_main(cfg: SoakConfig, role: str, name: str, option: Any) -> None:
    """The target of every worker process. Its stderr (tracebacks of dying threads, ipcbus's
    log lines) goes to a file of the private directory, not to the soak's output."""
    stderr = os.open(cfg.path(f"{name}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(stderr, 2)
    os.close(stderr)
    parent = os.getppid()

    def watch_parent() -> None:
        # A soak that is killed itself (a test's timeout) must leave no worker behind.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch_parent, name="soak-watchdog", daemon=True).start()
    worker: Worker
    if role == "publisher":
        worker = Publisher(cfg, name)
    elif role == "subscriber":
        worker = Subscriber(cfg, name, base_exceptions=bool(option))
    elif role == "stage":
        worker = Stage(cfg, name)
    elif role == "consumer":
        group, coroutine = option
        worker = Consumer(cfg, name, group, coroutine)
    else:
        worker = DeadLetters(cfg, name)
    worker.main()


# -- the parent: processes, hub, faults, samples --------------------------------------------------


@dataclass
class Proc:
    name: str
    role: str
    option: Any
    victim: bool
    process: Any
    base: str  # the name without its generation: "vsub-0" for "vsub-0.3"
    generation: int = 1
    stopped: bool = False
    killed: bool = False
    ended_unexpectedly: bool = False


class Fleet:
    """The worker processes: start, replace, signal, reap."""

    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.context: Any = multiprocessing.get_context("spawn")
        self.procs: dict[str, Proc] = {}
        self.notes: list[str] = []

    def start(
        self, role: str, base: str, option: Any = None, victim: bool = False, generation: int = 1
    ) -> Proc:
        name = base if generation == 1 else f"{base}.{generation}"
        process = self.context.Process(
            target=worker_main, args=(self.cfg, role, name, option), name=name, daemon=True
        )
        process.start()
        proc = Proc(name, role, option, victim, process, base, generation)
        self.procs[name] = proc
        return proc

    def start_all(self) -> None:
        cfg = self.cfg
        self.start("deadletters", "dlq")
        for index in range(cfg.subscribers):
            self.start("subscriber", f"sub-{index}", option=index > 0)
        self.start("stage", "stage")
        for index in range(cfg.consumers):
            self.start("consumer", f"cons-ga-{index}", option=("ga", False))
            self.start("consumer", f"cons-gb-{index}", option=("gb", True))
        for index in range(cfg.victim_subscribers):
            self.start("subscriber", f"vsub-{index}", option=True, victim=True)
        for index in range(cfg.victim_consumers):
            self.start("consumer", f"vcons-ga-{index}", option=("ga", True), victim=True)
            self.start("consumer", f"vcons-gb-{index}", option=("gb", False), victim=True)
        for index in range(cfg.publishers):
            self.start("publisher", f"pub-{index}")

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if not p.killed and p.process.exitcode is None]

    def is_ready(self, proc: Proc) -> bool:
        return os.path.exists(self.cfg.path(f"{proc.name}.ready"))

    def wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            waiting = [p.name for p in self.live() if not self.is_ready(p)]
            dead = [p.name for p in self.procs.values() if p.process.exitcode is not None]
            if not waiting or dead or time.monotonic() > deadline:
                return waiting + [f"{name} (exited)" for name in dead]
            time.sleep(0.1)

    def signal(self, proc: Proc, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.process.pid, signum)

    def kill_and_replace(self, proc: Proc) -> Proc:
        proc.killed = True
        self.signal(proc, signal.SIGKILL)
        proc.process.join(10)
        return self.start(proc.role, proc.base, proc.option, True, proc.generation + 1)

    def check_deaths(self, after_stop: bool) -> None:
        """Workers that ended without being told: noted; victims are replaced."""
        for proc in list(self.procs.values()):
            if proc.killed or proc.ended_unexpectedly or proc.process.exitcode is None:
                continue
            if after_stop:
                continue
            proc.ended_unexpectedly = True
            self.notes.append(f"{proc.name} ended by itself, exit code {proc.process.exitcode}")
            if proc.victim:
                self.start(proc.role, proc.base, proc.option, True, proc.generation + 1)

    def continue_all(self) -> None:
        for proc in self.live():
            if proc.stopped:
                self.signal(proc, signal.SIGCONT)
                proc.stopped = False

    def reap(self, timeout: float) -> list[str]:
        """Join every worker within ``timeout``; SIGKILL those left. Returns their names."""
        deadline = time.monotonic() + timeout
        hung = []
        for proc in self.procs.values():
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.exitcode is None:
                hung.append(proc.name)
                self.signal(proc, signal.SIGCONT)
                self.signal(proc, signal.SIGKILL)
                proc.process.join(10)
        return hung


class HubKeeper:
    """The hub: started, SIGKILLed, restarted at the same address; its statistics collected."""

    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.hub: Hub | None = None
        self.incarnations = 0
        self.stats: dict[int, dict[str, Any]] = {}  # hub pid -> its latest statistics
        self.dead_records: set[tuple[str, str]] = set()  # (queue key, message id)
        self.poll_failures = 0
        self.last: dict[str, Any] = {}
        self.at_drain_end: dict[str, Any] = {}  # before the workers close

    def start(self) -> None:
        hub = Hub(self.cfg.address, start_method="spawn", **self.cfg.hub_options())
        hub.start(timeout=30)
        self.hub = hub
        self.incarnations += 1

    @property
    def pid(self) -> int | None:
        return self.hub.pid if self.hub is not None else None

    def kill(self) -> None:
        hub, self.hub = self.hub, None
        if hub is not None and hub.pid is not None:
            self.poll()
            os.kill(hub.pid, signal.SIGKILL)
            hub.stop(timeout=10)  # reaps it and removes its stale socket files; keeps the key

    def poll(self, timeout: float = 2.0) -> dict[str, Any] | None:
        if self.hub is None:
            return None
        try:
            stats = asdict(request_statistics(self.cfg.address, timeout))
        except Exception:
            self.poll_failures += 1
            return None
        self.stats[stats["pid"]] = self.last = stats
        for key, records in stats.get("dead_letters", {}).items():
            for record in records:
                self.dead_records.add((key, str(record.get("message_id"))))
        return stats

    def stop(self) -> int | None:
        hub, self.hub = self.hub, None
        return hub.stop(timeout=15) if hub is not None else None

    def totals(self) -> dict[str, int]:
        """Every integer counter, summed over the hub's incarnations."""
        totals: Counter[str] = Counter()
        for stats in self.stats.values():
            for key, value in stats.items():
                if isinstance(value, int) and key not in ("pid", "clients", "topics"):
                    totals[key] += value
            for queue in stats.get("queues", {}).values():
                for key, value in queue.items():
                    if key not in ("consumers", "held", "in_flight", "dead_letters_kept"):
                        totals[f"queue_{key}"] += value
        return dict(totals)


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float


class FaultInjector:
    """Parent-side faults at seeded random times; at most one outage of the hub at a time."""

    def __init__(self, cfg: SoakConfig, fleet: Fleet, hub: HubKeeper, began: float) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.hub = hub
        self.rng = random.Random(f"{cfg.seed}:faults")
        self.log: list[Fault] = []
        self.pending: list[tuple[float, Callable[[], None]]] = []
        self.hub_down = False
        self.failures: list[str] = []
        # The first round: every kind once, spread over the first minute (or the first 70 % of
        # a shorter run); then a random kind every fault_interval seconds on average.
        self.kinds = kinds = [kind for kind in PARENT_KINDS if cfg.injects(kind)]
        self.rng.shuffle(kinds)
        first = min(cfg.seconds, 60.0)
        self.plan = [(began + first * (0.1 + 0.18 * i), kind) for i, kind in enumerate(kinds)]
        self.next_random = began + first * 0.8

    def step(self, now: float) -> None:
        for item in [item for item in self.pending if item[0] <= now]:
            self.pending.remove(item)
            item[1]()
        if self.hub_down:
            return
        if self.plan and self.plan[0][0] <= now:
            self.inject(self.plan.pop(0)[1], now, first_round=True)
        elif not self.plan and self.kinds and now >= self.next_random:
            self.inject(self.rng.choice(self.kinds), now)
            self.next_random = now + self.rng.expovariate(1 / self.cfg.fault_interval)

    def inject(self, kind: str, now: float, first_round: bool = False) -> None:
        rng, fleet = self.rng, self.fleet
        running = [p for p in fleet.live() if not p.stopped and fleet.is_ready(p)]
        if first_round and kind == "sigstop_long":
            # Once for sure on a Tick subscriber: the stall_timeout path, even in a short run.
            running = [p for p in running if p.role in ("subscriber", "stage")] or running
        if kind == "sigkill_hub":
            self.hub.kill()
            self.hub_down = True
            fault = Fault(kind, "hub", now, now + rng.uniform(0.2, 2.5))
            self.pending.append((fault.end, self.restart_hub))
        elif kind == "sigkill_worker":
            victims = [p for p in running if p.victim]
            if not victims:
                return
            proc = rng.choice(victims)
            fleet.kill_and_replace(proc)
            fault = Fault(kind, proc.name, now, time.monotonic())
        else:
            if not running:
                return
            proc = rng.choice(running)
            stall = self.cfg.stall_timeout
            if kind == "sigstop_short":
                duration = rng.uniform(0.3, min(1.2, stall * 0.6))
            else:
                duration = rng.uniform(stall + 0.5, stall + 2.5)
            fleet.signal(proc, signal.SIGSTOP)
            proc.stopped = True
            fault = Fault(kind, proc.name, now, now + duration)
            self.pending.append((fault.end, lambda: self.resume(proc)))
        self.log.append(fault)

    def resume(self, proc: Proc) -> None:
        if proc.stopped:
            self.fleet.signal(proc, signal.SIGCONT)
            proc.stopped = False

    def restart_hub(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.hub.start()
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.failures.append(f"the hub could not be restarted: {exc!r}")
                    raise
                time.sleep(0.5)
        self.hub_down = False

    def finish(self) -> None:
        """Run what is pending now: every stopped worker continues, the hub is back."""
        for _, action in sorted(self.pending, key=lambda item: item[0]):
            action()
        self.pending.clear()
        self.fleet.continue_all()

    def counts(self) -> Counter[str]:
        return Counter(fault.kind for fault in self.log)


class Sampler:
    """RSS, open fds and threads of every live process, from /proc."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[int, int, int]]] = {}

    @staticmethod
    def read(pid: int) -> tuple[int, int, int] | None:
        try:
            with open(f"/proc/{pid}/status") as file:
                status = dict(line.split(":", 1) for line in file if ":" in line)
            rss_kib = int(status["VmRSS"].split()[0])
            threads = int(status["Threads"])
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, KeyError, ValueError):
            return None
        return rss_kib, fds, threads

    def sample(self, name: str, pid: int | None) -> None:
        if pid is None:
            return
        values = self.read(pid)
        if values is not None:
            self.samples.setdefault(name, []).append(values)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        first_hub = self.samples.get("hub#1", [None])[0]
        for name, samples in self.samples.items():
            first, last = samples[0], samples[-1]
            row: dict[str, Any] = {"name": name, "samples": len(samples)}
            for index, key in enumerate(("rss_kib", "fds", "threads")):
                row[key] = (first[index], max(s[index] for s in samples), last[index])
            if name.startswith("hub#") and first_hub is not None:
                # A restarted hub is first sampled before its clients are back (3 fds each):
                # its descriptors are bounded by the first hub's, sampled with every client.
                row["fds"] = (max(first[1], first_hub[1]), *row["fds"][1:])
            row["exceeded"] = self.exceeded(row)
            rows.append(row)
        return rows

    @staticmethod
    def exceeded(row: dict[str, Any]) -> list[str]:
        out = []
        rss_first, rss_max, rss_last = row["rss_kib"]
        if rss_last - rss_first > RSS_GROWTH_MIB * 1024:
            out.append(f"RSS grew {(rss_last - rss_first) // 1024} MiB")
        if rss_max > RSS_MAX_MIB * 1024:
            out.append(f"RSS reached {rss_max // 1024} MiB")
        fds_first, fds_max, fds_last = row["fds"]
        if fds_last - fds_first > FD_GROWTH or fds_max > FD_MAX:
            out.append(f"fds {fds_first} -> {fds_last} (max {fds_max})")
        threads_first, _, threads_last = row["threads"]
        if threads_last - threads_first > THREAD_GROWTH:
            out.append(f"threads {threads_first} -> {threads_last}")
        return out


# -- the analysis: ledgers against each other ----------------------------------------------------

# Heuristic attribution of a missing message to what happened near the time it was accepted,
# first match wins. The hints name the case of issue 9 that usually explains the tag.
HINTS = {
    "own dispatcher dead": "case 5: a BaseException in a broadcast handler ended the dispatcher",
    "oversized publish nearby": "case 1: a batch over max_message_size vanished",
    "unpicklable publish nearby": "case 10: a bad message took its batch or neighbours along",
    "hub SIGKILL": "hub-crash window: lost without a count (a Known gap, no numbered case)",
    "own SIGSTOP > stall_timeout": "case 9: loss after stall_timeout under-reported",
    "SIGSTOP > stall_timeout elsewhere": "case 9 (shared lossy window) or case 3",
    "stalled by a dead dispatcher elsewhere": "case 5 left a subscriber accepting nothing; "
    "the hub stalls on it, then drops in a window shared by all (case 9)",
    "its publisher SIGSTOPped": "a stopped publisher: nothing should be lost (no numbered case)",
    "short SIGSTOP": "a short stall: nothing should be lost",
    "worker SIGKILL": "a victim's death: nothing of others' should be lost",
    "no fault nearby": "nothing injected near it (case 3 deadlock, or unexplained)",
}


class Timeline:
    """When a publisher's sequence numbers were accepted (checkpoints), and what else happened."""

    def __init__(self, faults: list[Fault], ledgers: dict[str, Any], cfg: SoakConfig) -> None:
        self.faults = faults
        self.cfg = cfg
        self.checkpoints: dict[str, tuple[list[int], list[float]]] = {}
        self.bad: dict[str, list[tuple[int, str]]] = {}  # (seq, kind) accepted by publish()
        # Subscribers whose dispatcher died: they accept nothing until they are SIGKILLed, so
        # the hub stalls on them, then sends without waiting (for everyone: a shared window).
        self.dead_dispatchers: list[tuple[str, float, float]] = []
        for name, ledger in ledgers.items():
            for when, thread, _ in (ledger or {}).get("thread_deaths", []):
                if thread == "ipcbus-dispatch":
                    killed = [f.start for f in faults if f.target == name]
                    self.dead_dispatchers.append((name, when, min(killed, default=1e18)))
        for name, ledger in ledgers.items():
            if ledger and "checkpoints" in ledger:
                points = sorted(ledger["checkpoints"], key=lambda point: point[1])
                self.checkpoints[name] = ([p[1] for p in points], [p[0] for p in points])
                self.bad[name] = [(e[1], e[2]) for e in ledger["events"] if e[3] == "accepted"]

    def time_of(self, pub: str, seq: int) -> float | None:
        seqs, times = self.checkpoints.get(pub, ([], []))
        index = bisect.bisect_right(seqs, seq)
        return times[index] if index < len(times) else (times[-1] if times else None)

    def tag(self, pub: str, seq: int, receiver: dict[str, Any] | None) -> str:
        at = self.time_of(pub, seq)
        if at is None:
            return "no fault nearby"
        if receiver is not None:
            died = receiver.get("first_base_raise")
            if died is not None and died <= at + 1 and "ipcbus-dispatch" not in receiver["threads"]:
                return "own dispatcher dead"
        if self.near_event(pub, seq, "oversized"):
            return "oversized publish nearby"
        cfg = self.cfg
        tail = cfg.stall_timeout + cfg.heartbeat_timeout + 1.0
        own = receiver["name"] if receiver else None
        best = None
        order = [
            "hub SIGKILL",
            "own SIGSTOP > stall_timeout",
            "SIGSTOP > stall_timeout elsewhere",
            "its publisher SIGSTOPped",
            "short SIGSTOP",
            "worker SIGKILL",
        ]
        for fault in self.faults:
            if not fault.start - 2.0 <= at <= fault.end + tail:
                continue
            if fault.kind == "sigkill_hub":
                tag = "hub SIGKILL"
            elif fault.kind.startswith("sigstop") and fault.target == pub:
                tag = "its publisher SIGSTOPped"
            elif fault.kind == "sigstop_long":
                tag = (
                    "own SIGSTOP > stall_timeout"
                    if fault.target == own
                    else "SIGSTOP > stall_timeout elsewhere"
                )
            elif fault.kind == "sigstop_short":
                tag = "short SIGSTOP"
            else:
                tag = "worker SIGKILL"
            if best is None or order.index(tag) < order.index(best):
                best = tag
        if best in (None, "short SIGSTOP", "worker SIGKILL"):
            for name, died, ended in self.dead_dispatchers:
                if name != own and died <= at <= ended + tail:
                    return "stalled by a dead dispatcher elsewhere"
        if best is None and self.near_event(pub, seq, "unpicklable"):
            return "unpicklable publish nearby"
        return best or "no fault nearby"

    def near_event(self, pub: str, seq: int, kind: str) -> bool:
        """A bad message of ``kind`` accepted within one batch (1,000 messages) before ``seq``,
        or shortly after it."""
        return any(
            -50 <= seq - event_seq <= 1000
            for event_seq, event_kind in self.bad.get(pub, [])
            if event_kind == kind
        )


def fate(proc: Proc) -> str:
    if proc.killed:
        return "SIGKILLed"
    code = proc.process.exitcode
    if proc.ended_unexpectedly:
        return f"ended by itself ({code})"
    return "running" if code is None else f"exit {code}"


def bits_of(ledger: dict[str, Any] | None, key: str) -> dict[str, int]:
    if not ledger:
        return {}
    return {name: SeqSet.decode_int(text) for name, text in ledger.get(key, {}).items()}


def popcount(bits: int) -> int:
    return bits.bit_count()


class Analysis:
    """Reads every ledger and journal once the workers are gone, and checks them."""

    def __init__(self, cfg: SoakConfig, fleet: Fleet, hub: HubKeeper, faults: list[Fault]) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.hub = hub
        self.ledgers = {name: read_json(cfg.path(f"{name}.json")) for name in fleet.procs}
        self.timeline = Timeline(faults, self.ledgers, cfg)
        self.failures: list[str] = []
        # (publisher, type) -> accepted sequence numbers
        self.accepted: dict[tuple[str, str], int] = {}
        for name, ledger in self.ledgers.items():
            if ledger and ledger.get("role") in ("publisher", "stage"):
                for kind, bits in bits_of(ledger, "accepted").items():
                    self.accepted[(name, kind)] = bits

    def of_role(self, *roles: str) -> list[tuple[Proc, dict[str, Any]]]:
        """The workers of these roles with their ledgers. A victim SIGKILLed before its first
        save has none (its queue journal still counts); anyone else without one is a failure."""
        out = []
        for proc in self.fleet.procs.values():
            if proc.role not in roles:
                continue
            ledger = self.ledgers.get(proc.name)
            if ledger is None:
                missing = f"{proc.name} left no readable ledger"
                if not proc.killed and missing not in self.failures:
                    self.failures.append(missing)
                if proc.role != "consumer":
                    continue
                ledger = {"threads": [], "thread_deaths": []}
            out.append((proc, ledger))
        return out

    # -- publishers ------------------------------------------------------------------------------

    def publishers(self) -> list[dict[str, Any]]:
        rows = []
        for proc, ledger in self.of_role("publisher", "stage"):
            attempted = sum(v for k, v in ledger["attempted"].items() if "/" in k)
            accepted = sum(popcount(bits) for bits in bits_of(ledger, "accepted").values())
            counters = sum(ledger["counters"].get(c, 0) for c in PUBLISH_ERROR_COUNTERS)
            unreported = max(0, ledger["bad_unreported"] + ledger["bad_pending"] - counters)
            row = {
                "name": proc.name,
                "attempted": attempted,
                "accepted": accepted,
                "bad_accepted": ledger["bad_accepted"],
                "rejected": ledger["rejected"],
                "flushes": ledger["flushes"],
                "bad_reported": ledger["bad_reported_by_flush"] + ledger["bad_reported_by_publish"],
                "bad_reported_by_publish": ledger["bad_reported_by_publish"],
                "bad_unreported": unreported,
                "collateral": sum(ledger["collateral"].values()),
                "final_flush": ledger["final_flush"],
                "big": ledger["attempted"].get("payload_big", 0),
            }
            rows.append(row)
            if unreported:
                self.failures.append(
                    f"{proc.name}: {unreported} unpicklable messages accepted by publish() and "
                    "never reported (no error from flush() or publish(), no counter)"
                )
            if row["collateral"]:
                self.failures.append(
                    f"{proc.name}: {row['collateral']} good messages rejected with "
                    "MessageSerializationError for an earlier bad message"
                )
            foreign = {k: v for k, v in ledger["rejected"].items() if k.endswith("!foreign")}
            if foreign:
                self.failures.append(f"{proc.name}: publish() raised non-ipcbus errors {foreign}")
            if ledger["final_flush"] != "ok":
                self.failures.append(f"{proc.name}: final flush {ledger['final_flush']}")
        return rows

    # -- broadcast -------------------------------------------------------------------------------

    def broadcast(self) -> list[dict[str, Any]]:
        rows = []
        for proc, ledger in self.of_role("subscriber", "stage"):
            if proc.victim:
                continue
            received = bits_of(ledger, "received")
            expected_by_pub: dict[str, int] = {}
            for (pub, kind), bits in self.accepted.items():
                if kind in ledger["types"]:
                    expected_by_pub[pub] = expected_by_pub.get(pub, 0) | bits
            expected = missing = got = phantom = 0
            causes: Counter[str] = Counter()
            for pub, bits in expected_by_pub.items():
                have = received.get(pub, 0)
                lost = bits & ~have
                expected += popcount(bits)
                got += popcount(bits & have)
                missing += popcount(lost)
                for first, last in runs_of(lost, limit=20_000):  # bounded: one tag per run
                    causes[self.timeline.tag(pub, first, ledger)] += last - first + 1
            for pub, have in received.items():
                phantom += popcount(have & ~expected_by_pub.get(pub, 0))
            reported = sum(ledger["counters"].get(c, 0) for c in LOSS_COUNTERS)
            in_doubt = self.in_doubt(ledger["types"])
            reported += in_doubt
            row = {
                "name": proc.name,
                "expected": expected,
                "received": got,
                "duplicates": sum(ledger["duplicates"].values()),
                "reported_lost": reported,
                "in_doubt": in_doubt,
                "missing": missing,
                "unaccounted": missing - reported,
                "phantom": phantom,
                "corrupt": ledger["corrupt"],
                "dispatcher": "ipcbus-dispatch" in ledger["threads"],
                "thread_deaths": compact(
                    Counter(f"{thread}:{exc}" for _, thread, exc in ledger["thread_deaths"])
                ),
                "raised": ledger.get("raised", {}),
                "causes": dict(causes.most_common()),
            }
            rows.append(row)
            self.check_broadcast(row)
        return rows

    def in_doubt(self, types: list[str]) -> int:
        """What the publishers of these types reported in doubt: sent to a hub that was killed
        before it confirmed them (each subscriber may have lost them, or not)."""
        total = 0
        for ledger in self.ledgers.values():
            if ledger and ledger.get("role") in ("publisher", "stage"):
                for unique_name, count in ledger.get("in_doubt", {}).items():
                    if unique_name.rpartition(".")[2] in types:
                        total += count
        return total

    def check_broadcast(self, row: dict[str, Any]) -> None:
        name = row["name"]
        if row["unaccounted"] > 0:
            self.failures.append(
                f"{name}: {row['unaccounted']} accepted messages neither received nor reported "
                f"lost ({row['missing']} missing, {row['reported_lost']} reported)"
            )
        for key, what in (
            ("duplicates", "duplicates"),
            ("phantom", "messages received although publish() raised for them"),
            ("corrupt", "corrupt payloads"),
        ):
            if row[key]:
                self.failures.append(f"{name}: {row[key]} {what}")

    # -- queue groups ----------------------------------------------------------------------------

    def worker_faults(self, calls: Counter[str]) -> Counter[str]:
        faults: Counter[str] = Counter()
        for kind in ("Exception", "SystemExit", "SoakBaseError", "CancelledError"):
            faults[f"handler_{kind}"] += calls.get(kind, 0)
        for _, ledger in self.of_role("subscriber", "stage"):
            for kind, count in ledger.get("raised", {}).items():
                faults[f"handler_{kind}"] += count
        for proc, ledger in self.of_role("publisher", "stage"):
            attempted = ledger["attempted"]
            if proc.role == "stage":
                faults["handler_publish"] += attempted.get("good/Derived", 0)
                continue
            faults["payload_big"] += attempted.get("payload_big", 0)
            faults["oversized"] += attempted.get("oversized/Tick", 0)
            faults["unpicklable"] += sum(
                v for k, v in attempted.items() if k.startswith("unpicklable/")
            )
        return faults


BASE_KINDS = ("SystemExit", "SoakBaseError", "CancelledError")


class QueueCheck:
    """Queue groups: every accepted Job processed (a handler returned) at least once in each
    group, or dead-lettered there (a DeadLetter arrived, or the hub recorded one)."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.jobs = {pub: bits for (pub, kind), bits in analysis.accepted.items() if kind == "Job"}
        self.calls: Counter[str] = Counter()
        self.consumers: list[dict[str, Any]] = []
        entries: dict[str, list[dict[str, Any]]] = {"ga": [], "gb": []}
        # Per group, when a consumer of it was left without a thread to run its handlers.
        self.stuck_since: dict[str, float] = {}
        for proc, ledger in analysis.of_role("consumer"):
            group = proc.option[0]
            journal = self.journal(proc.name)
            entries[group].extend(journal)
            self.calls.update(entry["o"] for entry in journal)
            stuck = self.stuck(ledger["thread_deaths"])
            if stuck is not None:
                self.stuck_since[group] = min(stuck, self.stuck_since.get(group, stuck))
            threads = ledger["threads"]
            workers = sum(name == "ipcbus-queue-worker" for name in threads)
            deaths = Counter(f"{thread}:{exc}" for _, thread, exc in ledger["thread_deaths"])
            self.consumers.append(
                {
                    "name": proc.name,
                    "group": group,
                    "victim": proc.victim,
                    "calls": dict(Counter(entry["o"] for entry in journal)),
                    "queue_threads": f"{workers} workers"
                    + (", loop" if "ipcbus-queue-loop" in threads else ""),
                    "thread_deaths": compact(deaths),
                    "fate": fate(proc),
                }
            )
        self.letters = (analysis.ledgers.get("dlq") or {}).get("dead_letters", [])
        self.rows = [self.group(group, entries[group]) for group in ("ga", "gb")]
        for row in self.rows:
            for key, queue in analysis.hub.at_drain_end.get("queues", {}).items():
                if key.endswith(f"/{row['group']}"):
                    row["at_end"] = f"held {queue['held']}, in flight {queue['in_flight']}"

    @staticmethod
    def stuck(deaths: list[list[Any]]) -> float | None:
        """When the last of a consumer's 4 queue worker threads, or its loop, died."""
        workers = sorted(t for t, thread, _ in deaths if thread == "ipcbus-queue-worker")
        loop = [t for t, thread, _ in deaths if thread == "ipcbus-queue-loop"]
        times = ([workers[3]] if len(workers) >= 4 else []) + loop
        return min(times) if times else None

    def journal(self, name: str) -> list[dict[str, Any]]:
        entries = []
        path = self.analysis.cfg.path(f"{name}.jsonl")
        with contextlib.suppress(OSError), open(path) as file:
            for line in file:
                with contextlib.suppress(ValueError):
                    entries.append(json.loads(line))
        return entries

    def group(self, group: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        ok: Counter[tuple[str, int]] = Counter()
        last: dict[tuple[str, int], tuple[float, str]] = {}
        ids: dict[str, tuple[str, int]] = {}
        corrupt = 0
        for entry in entries:
            key = (entry["p"], entry["s"])
            ids[entry["m"]] = key
            corrupt += not entry.get("c", True)
            ok[key] += entry["o"] == "ok"
            if key not in last or last[key][0] <= entry["t"]:
                last[key] = (entry["t"], entry["o"])
        dead = {(pub, seq) for queue, pub, seq, *_ in self.letters if queue == group}
        letter_count = len(dead)
        for queue_key, message_id in self.analysis.hub.dead_records:
            if queue_key.endswith(f"/{group}") and message_id in ids:
                dead.add(ids[message_id])
        accepted = unaccounted = never = 0
        causes: Counter[str] = Counter()
        for pub, bits in self.jobs.items():
            accepted += popcount(bits)
            for first, final in runs_of(bits):
                for seq in range(first, final + 1):
                    key = (pub, seq)
                    if ok[key] or key in dead:
                        continue
                    unaccounted += 1
                    never += key not in last
                    causes[self.cause(group, pub, seq, last.get(key))] += 1
        row = {
            "group": group,
            "accepted": accepted,
            "processed": sum(1 for count in ok.values() if count),
            "duplicates": sum(count - 1 for count in ok.values() if count > 1),
            "dead_lettered": len(dead),
            "dead_letter_messages": letter_count,
            "unaccounted": unaccounted,
            "never_handled": never,
            "corrupt": corrupt,
            "causes": dict(causes.most_common()),
        }
        if unaccounted:
            self.analysis.failures.append(
                f"queue {group}: {unaccounted} accepted jobs neither processed nor dead-lettered "
                f"({never} never reached a handler)"
            )
        if corrupt:
            self.analysis.failures.append(f"queue {group}: {corrupt} corrupt payloads")
        return row

    def cause(self, group: str, pub: str, seq: int, last: tuple[float, str] | None) -> str:
        timeline = self.analysis.timeline
        if last is not None:
            outcome = last[1]
            if outcome in BASE_KINDS:
                return f"last call raised {outcome}: neither retried nor dead-lettered (case 5)"
            return f"last call raised {outcome}, not retried; {timeline.tag(pub, seq, None)}"
        at = timeline.time_of(pub, seq)
        stuck = self.stuck_since.get(group)
        if stuck is not None and at is not None and at >= stuck:
            return "never handled: a consumer of the group had no queue thread left (case 5)"
        return f"never handled; {timeline.tag(pub, seq, None)}"


# -- the run -------------------------------------------------------------------------------------


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.fleet = Fleet(cfg)
        self.hub = HubKeeper(cfg)
        self.sampler = Sampler()
        self.injector: FaultInjector | None = None
        self.hung: list[str] = []
        self.failures: list[str] = []
        self.phases: list[tuple[str, float]] = []
        self._next_sample = 0.0
        self._next_poll = 0.0

    def touch(self, flag: str) -> None:
        with open(self.cfg.path(flag), "w"):
            pass

    def ledger(self, name: str) -> dict[str, Any]:
        return read_json(self.cfg.path(f"{name}.json")) or {}

    def housekeeping(self, now: float, after_stop: bool = False) -> None:
        """Samples /proc, polls the hub, notices workers that died; once a second."""
        if now >= self._next_sample:
            self._next_sample = now + 1.0
            for proc in self.fleet.live():
                if self.fleet.is_ready(proc):
                    self.sampler.sample(proc.name, proc.process.pid)
            self.sampler.sample(f"hub#{self.hub.incarnations}", self.hub.pid)
            self.fleet.check_deaths(after_stop)
        if now >= self._next_poll and not (self.injector and self.injector.hub_down):
            self._next_poll = now + 1.0
            self.hub.poll(1.0)

    def wait(self, what: str, condition: Callable[[], bool], deadline: float) -> bool:
        """Wait for ``condition`` until ``deadline``; a miss is a hang, reported."""
        began = time.monotonic()
        while not condition():
            now = time.monotonic()
            if now > deadline:
                took = (
                    "the drain budget was spent before"
                    if now - began < 1
                    else f"{now - began:.0f} s"
                )
                self.hung.append(f"{what}: not done after {took}")
                return False
            self.housekeeping(now)
            time.sleep(0.1)
        self.phases.append((what, time.monotonic() - began))
        return True

    def settle(
        self, what: str, value: Callable[[], int], target: int | None, deadline: float
    ) -> None:
        """Wait until ``value()`` reaches ``target`` or stops changing for a while."""
        quiet = self.cfg.stall_timeout + self.cfg.heartbeat_timeout + 1.5
        last: list[Any] = [None, time.monotonic()]

        def settled() -> bool:
            current = value()
            now = time.monotonic()
            if current != last[0]:
                last[:] = [current, now]
            return (target is not None and current >= target) or now - last[1] >= quiet

        self.wait(what, settled, deadline)

    def run(self) -> None:
        cfg = self.cfg
        self.hub.start()
        self.fleet.start_all()
        waiting = self.fleet.wait_ready(60 + 5 * len(self.fleet.procs))
        if waiting:
            self.hung.append(f"workers not ready: {waiting}")
            return
        self.touch("go")
        began = time.monotonic()
        self.injector = injector = FaultInjector(cfg, self.fleet, self.hub, began)
        while (now := time.monotonic()) < began + cfg.seconds:
            injector.step(now)
            self.housekeeping(now)
            time.sleep(0.05)
        injector.finish()
        self.drain()

    def unique_received(self, name: str) -> int:
        return sum(popcount(bits) for bits in bits_of(self.ledger(name), "received").values())

    def accepted_count(self, names: list[str], kind: str) -> int:
        total = 0
        for name in names:
            total += popcount(bits_of(self.ledger(name), "accepted").get(kind, 0))
        return total

    def drain(self) -> None:
        cfg = self.cfg
        deadline = time.monotonic() + cfg.drain_seconds
        self.touch("stop-publishing")
        publishers = [p.name for p in self.fleet.procs.values() if p.role == "publisher"]
        subscribers = [
            p.name for p in self.fleet.procs.values() if p.role == "subscriber" and not p.victim
        ]
        done = ("published", "waiting for stop")
        self.wait(
            "publishers' final flush",
            lambda: all(self.ledger(name).get("phase") in done for name in publishers),
            deadline,
        )
        ticks = self.accepted_count(publishers, "Tick")
        self.settle(
            "stage receives every tick", lambda: self.unique_received("stage"), ticks, deadline
        )
        self.touch("stop-stage")
        self.wait(
            "stage's final flush", lambda: self.ledger("stage").get("phase") in done, deadline
        )
        derived = self.accepted_count(["stage"], "Derived")
        for name in subscribers:
            self.settle(
                f"{name} receives every message",
                lambda name=name: self.unique_received(name),  # type: ignore[misc]
                ticks + derived,
                deadline,
            )

        def queues_idle() -> bool:
            stats = self.hub.poll(1.0)
            return stats is not None and all(
                q["held"] == 0 and q["in_flight"] == 0 for q in stats["queues"].values()
            )

        self.wait("queue groups hold nothing and have nothing in flight", queues_idle, deadline)
        self.settle(
            "dead letters arrive",
            lambda: len(self.ledger("dlq").get("dead_letters", [])),
            None,
            deadline,
        )

    def stop(self) -> None:
        """Every worker closes and exits within its deadline; the hub stops last."""
        self.hub.poll(2.0)
        self.hub.at_drain_end = self.hub.last
        self.touch("stop")
        deadline = time.monotonic() + self.cfg.linger + 20
        while self.fleet.live() and time.monotonic() < deadline:
            self.housekeeping(time.monotonic(), after_stop=True)
            time.sleep(0.1)
        for name in self.fleet.reap(max(0.0, deadline - time.monotonic())):
            self.hung.append(f"{name}: did not exit within {self.cfg.linger + 20:.0f} s of stop")
        if self.hub.poll(5.0) is None and self.hub.hub is not None:
            self.failures.append("the hub did not answer for its final statistics")
        code = self.hub.stop()
        if code not in (0, None):
            self.failures.append(f"the hub exited with code {code} on SIGTERM")

    def cleanup(self) -> None:
        """Whatever happened: no process left."""
        self.fleet.continue_all()
        for proc in self.fleet.procs.values():
            if proc.process.exitcode is None:
                self.fleet.signal(proc, signal.SIGKILL)
                proc.process.join(10)
        with contextlib.suppress(Exception):
            self.hub.stop()


# -- the report ----------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for index, row in enumerate(cells):
        lines.append(
            "  "
            + "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            lines.append("  " + "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def tail(path: str, count: int) -> list[str]:
    with contextlib.suppress(OSError), open(path, errors="replace") as file:
        return [line.rstrip()[:200] for line in file.readlines()[-count:]]
    return []


def compact(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in counts.items()) or "-"


class Report:
    """The tables a run prints, and the summary it ends with."""

    def __init__(self, soak: Soak, elapsed: float) -> None:
        self.soak = soak
        self.elapsed = elapsed
        faults = soak.injector.log if soak.injector else []
        analysis = Analysis(soak.cfg, soak.fleet, soak.hub, faults)
        self.publishers = analysis.publishers()
        self.broadcast = analysis.broadcast()
        queues = QueueCheck(analysis)
        self.groups, self.consumers, calls = queues.rows, queues.consumers, queues.calls
        self.injected: Counter[str] = Counter(dict.fromkeys(PARENT_KINDS + WORKER_KINDS, 0))
        self.injected.update(fault.kind for fault in faults)
        self.injected.update(analysis.worker_faults(calls))
        self.resources = soak.sampler.rows()
        self.bounds = [
            f"{r['name']}: {', '.join(r['exceeded'])}" for r in self.resources if r["exceeded"]
        ]
        unexpected = [
            f"{p.name} (never SIGKILLed) ended by itself"
            for p in soak.fleet.procs.values()
            if p.ended_unexpectedly and not p.victim
        ]
        self.stderr_tails: dict[str, list[str]] = {}
        for proc in soak.fleet.procs.values():
            code = proc.process.exitcode
            if not proc.killed and code not in (0, None):
                unexpected.append(f"{proc.name} exited with code {code}")
                self.stderr_tails[proc.name] = tail(soak.cfg.path(f"{proc.name}.stderr"), 12)
        self.failures = [
            *soak.failures,
            *(soak.injector.failures if soak.injector else []),
            *analysis.failures,
            *unexpected,
            *(f"bound exceeded: {bound}" for bound in self.bounds),
            *(f"hung: {hang}" for hang in soak.hung),
        ]
        # For a post-mortem with --keep: the fault log and every /proc sample.
        write_json(soak.cfg.path("faults.json"), [asdict(fault) for fault in faults])
        write_json(soak.cfg.path("resources.json"), soak.sampler.samples)

    def tables(self) -> list[str]:
        return [
            table(
                "faults injected (parent: signals; workers: handlers, payloads)",
                ["kind", "count"],
                [[kind, count] for kind, count in self.injected.items()],
            ),
            table(
                "publishers (accepted: publish() returned; bad: unpicklable or oversized, "
                "accepted/reported/unreported; collateral: good messages refused for a bad one)",
                [
                    "name",
                    "attempted",
                    "accepted",
                    "big",
                    "bad",
                    "collateral",
                    "flushes",
                    "final",
                    "rejected (intent/type/error)",
                ],
                [
                    [
                        r["name"],
                        r["attempted"],
                        r["accepted"],
                        r["big"],
                        f"{r['bad_accepted']}/{r['bad_reported']}/{r['bad_unreported']}",
                        r["collateral"],
                        compact(r["flushes"]),
                        r["final_flush"],
                        compact(r["rejected"]),
                    ]
                    for r in self.publishers
                ],
            ),
            table(
                "broadcast, per subscriber never SIGKILLed "
                "(unaccounted = expected - received - reported lost; reported lost includes what "
                "publishers reported in doubt after a hub SIGKILL)",
                [
                    "name",
                    "expected",
                    "received",
                    "dups",
                    "reported lost",
                    "in doubt",
                    "missing",
                    "unaccounted",
                    "phantom",
                    "corrupt",
                    "dispatcher",
                    "handler raised",
                    "thread deaths",
                ],
                [
                    [
                        r["name"],
                        r["expected"],
                        r["received"],
                        r["duplicates"],
                        r["reported_lost"],
                        r["in_doubt"],
                        r["missing"],
                        r["unaccounted"],
                        r["phantom"],
                        r["corrupt"],
                        "alive" if r["dispatcher"] else "DEAD",
                        compact(r["raised"]),
                        r["thread_deaths"],
                    ]
                    for r in self.broadcast
                ],
            ),
            table(
                "queue groups (unaccounted = accepted - processed - dead-lettered)",
                [
                    "group",
                    "accepted",
                    "processed",
                    "dups",
                    "dead-lettered",
                    "DeadLetter msgs",
                    "unaccounted",
                    "never handled",
                    "hub at the end",
                ],
                [
                    [
                        r["group"],
                        r["accepted"],
                        r["processed"],
                        r["duplicates"],
                        r["dead_lettered"],
                        r["dead_letter_messages"],
                        r["unaccounted"],
                        r["never_handled"],
                        r.get("at_end", "?"),
                    ]
                    for r in self.groups
                ],
            ),
            table(
                "queue consumers (handler calls by outcome; ipcbus queue threads at the end)",
                ["name", "group", "victim", "calls", "queue threads", "thread deaths", "fate"],
                [
                    [
                        c["name"],
                        c["group"],
                        "yes" if c["victim"] else "",
                        compact(c["calls"]),
                        c["queue_threads"],
                        c["thread_deaths"],
                        c["fate"],
                    ]
                    for c in self.consumers
                ],
            ),
            table(
                "processes (RSS MiB, fds, threads: first / max / last sample)",
                ["name", "samples", "RSS", "fds", "threads", "bounds"],
                [
                    [
                        r["name"],
                        r["samples"],
                        "/".join(str(v // 1024) for v in r["rss_kib"]),
                        "/".join(map(str, r["fds"])),
                        "/".join(map(str, r["threads"])),
                        "; ".join(r["exceeded"]) or "ok",
                    ]
                    for r in self.resources
                ],
            ),
        ]

    def causes(self) -> list[str]:
        causes = [(f"broadcast {r['name']}", r["causes"]) for r in self.broadcast]
        causes += [(f"queue {r['group']}", r["causes"]) for r in self.groups]
        lines = []
        for who, counts in causes:
            for tag, count in counts.items():
                hint = HINTS.get(tag.split("; ")[-1])
                lines.append(f"  {who:<16} {count:>8}  {tag}" + (f"  [{hint}]" if hint else ""))
        if lines:
            lines.insert(0, "missing messages by what happened near their publish (heuristic)")
        return lines

    def render(self) -> str:
        soak, cfg = self.soak, self.soak.cfg
        out = [
            f"== ipcbus soak: {cfg.seconds:.0f} s of faults, {self.elapsed:.0f} s in all, "
            f"seed {cfg.seed}, {len(soak.fleet.procs)} worker processes, "
            f"{soak.hub.incarnations} hub processes =="
        ]
        if cfg.skip:
            out.append(f"not injected (--skip): {', '.join(cfg.skip)}")
        for block in self.tables():
            out += ["", block]
        causes = self.causes()
        if causes:
            out += ["", *causes]
        out += ["", "hub, summed over its processes: " + compact(soak.hub.totals())]
        if soak.phases:
            out.append("drain: " + "; ".join(f"{what} {took:.1f} s" for what, took in soak.phases))
        targets: dict[str, Counter[str]] = {}
        for fault in soak.injector.log if soak.injector else []:
            targets.setdefault(fault.kind, Counter())[fault.target] += 1
        for kind, counts in targets.items():
            out.append(f"{kind} targets: {compact(counts)}")
        out += [f"note: {note}" for note in soak.fleet.notes]
        for name, lines in self.stderr_tails.items():
            out.append(f"stderr of {name}, last lines:")
            out += [f"    {line}" for line in lines]
        out.append(f"note: hub statistics requests that failed: {soak.hub.poll_failures}")
        out += ["", f"RESULT: {'PASS' if not self.failures else 'FAIL'}"]
        out += [f"  - {failure}" for failure in self.failures]
        return "\n".join(out)

    def summary(self) -> dict[str, Any]:
        cfg = self.soak.cfg
        broadcast, groups, publishers = self.broadcast, self.groups, self.publishers
        return {
            "ok": not self.failures,
            "seconds": cfg.seconds,
            "elapsed": round(self.elapsed, 1),
            "seed": cfg.seed,
            "skipped": list(cfg.skip),
            "faults": dict(self.injected),
            "totals": {
                "published_attempted": sum(r["attempted"] for r in publishers),
                "published_accepted": sum(r["accepted"] for r in publishers),
                "broadcast_expected": sum(r["expected"] for r in broadcast),
                "broadcast_received": sum(r["received"] for r in broadcast),
                "broadcast_reported_lost": sum(r["reported_lost"] for r in broadcast),
                "broadcast_in_doubt": sum(r["in_doubt"] for r in broadcast),
                "jobs_accepted": sum(r["accepted"] for r in groups),
                "queue_processed": sum(r["processed"] for r in groups),
                "dead_lettered": sum(r["dead_lettered"] for r in groups),
                "hub_processes": self.soak.hub.incarnations,
            },
            "unaccounted": {
                "broadcast": {r["name"]: r["unaccounted"] for r in broadcast},
                "queue": {r["group"]: r["unaccounted"] for r in groups},
                "unpicklable": sum(r["bad_unreported"] for r in publishers),
            },
            "hung": self.soak.hung,
            "bounds_exceeded": self.bounds,
            "failures": self.failures,
        }


def parse_workers(text: str) -> dict[str, int]:
    names = {
        "pub": "publishers",
        "sub": "subscribers",
        "cons": "consumers",
        "vsub": "victim_subscribers",
        "vcons": "victim_consumers",
    }
    counts = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in names or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--workers: expected e.g. pub=2,sub=2, not {part!r}")
        counts[names[key.strip()]] = int(value)
    if counts.get("publishers", 1) < 1 or counts.get("subscribers", 1) < 1:
        raise argparse.ArgumentTypeError("--workers: at least one publisher and one subscriber")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, help="publish and inject faults this long")
    duration.add_argument("--seconds", type=float, help="the same, in seconds (default 600)")
    parser.add_argument("--seed", type=int, default=None, help="default: random, printed")
    parser.add_argument(
        "--workers",
        type=parse_workers,
        default={},
        help="process counts: pub=2,sub=2,cons=1,vsub=1,vcons=1 (cons and vcons per group)",
    )
    parser.add_argument("--rate", type=float, default=300.0, help="ticks per second per publisher")
    parser.add_argument("--drain-seconds", type=float, default=120.0, help="drain budget")
    parser.add_argument(
        "--skip",
        default="",
        help=f"fault kinds not to inject, comma-separated, to find which breaks what: "
        f"{','.join(SKIPPABLE)}",
    )
    parser.add_argument("--tmpdir", default=None, help="where the private directory is created")
    parser.add_argument(
        "--keep", action="store_true", help="keep the directory (ledgers, logs) for a post-mortem"
    )
    args = parser.parse_args(argv)
    skip = tuple(filter(None, args.skip.split(",")))
    if set(skip) - set(SKIPPABLE):
        parser.error(f"--skip: unknown kinds {sorted(set(skip) - set(SKIPPABLE))}")
    seconds = args.seconds if args.seconds is not None else (args.minutes or 10.0) * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    directory = tempfile.mkdtemp(prefix="ipcbus-soak-", dir=args.tmpdir)  # mode 0700
    cfg = SoakConfig(
        directory=directory,
        address=f"ipc://{directory}/hub",
        seconds=seconds,
        seed=seed,
        tick_rate=args.rate,
        drain_seconds=args.drain_seconds,
        keep_logs=args.keep,
        skip=skip,
        **args.workers,
    )
    skipped = f", not injecting {','.join(skip)}" if skip else ""
    print(f"soak: seed {seed}, {seconds:.0f} s{skipped}, directory {directory}", flush=True)
    logging.basicConfig(level=logging.WARNING, format="soak parent: %(levelname)s %(message)s")
    began = time.monotonic()
    soak = Soak(cfg)
    summary: dict[str, Any] = {"ok": False}
    try:
        try:
            soak.run()
        except Exception as exc:
            logging.exception("the soak itself failed")
            soak.failures.append(f"the soak failed: {exc!r}")
        soak.stop()
        result = Report(soak, time.monotonic() - began)
        print(result.render(), flush=True)
        summary = result.summary()
    finally:
        soak.cleanup()
        if args.keep:
            print(f"soak: kept {directory}", flush=True)
        else:
            shutil.rmtree(directory, ignore_errors=True)
        print(SUMMARY_PREFIX + json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
