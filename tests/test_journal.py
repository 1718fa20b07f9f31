"""The queue journal across real hub processes (docs/guarantees.md, "Journal"): the hub is
killed with SIGKILL and restarted with the same journal; nothing published and confirmed by
flush() is lost, what was acked or dead-lettered is not delivered again, and what comes again
carries ``attempt + 1``.

Consumers are spawned worker processes that log ``seq attempt`` per handler call (one
``O_APPEND`` write per line, before the handler returns, so before its ack).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipcbus import AsyncMessageContext, Hub, HubAddressError, HubBroker, connect, decode_dead_letter
from ipcbus.client.admin import request_statistics

from .conftest import wait_until
from .hubtools import REPO, Workers, run_cli
from .messages import Tick

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

HEARTBEAT: dict[str, float] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
QUEUE = "tests.messages.Tick/jobs"


def _consumer(
    address: str,
    log_path: str,
    poison_below: int,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """Queue consumer of Tick in group "jobs": logs ``seq attempt``; a seq below
    ``poison_below`` fails every time (one attempt: dead-lettered at once)."""
    _consume(address, log_path, poison_below, ready, stop)


def _slow_consumer(
    address: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
) -> None:
    """As ``_consumer``, each job taking 0.5 ms: a kill "mid-load" comes while jobs remain (two
    consumers acking at full speed finished 10,000 jobs between two looks of the test)."""
    _consume(address, log_path, -1, ready, stop, pause=0.0005)


def _consume(
    address: str,
    log_path: str,
    poison_below: int,
    ready: multiprocessing.connection.Connection,
    stop: multiprocessing.connection.Connection,
    pause: float = 0.0,
) -> None:
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def handle(message: Tick) -> None:
        attempt = AsyncMessageContext.current().attempt
        os.write(log, b"%d %d\n" % (message.seq, attempt))
        if pause:
            time.sleep(pause)
        if message.seq < poison_below:
            raise ValueError("poison")

    broker = connect(address)
    broker.subscribe_async(Tick, handle, "jobs", max_attempts=1, prefetch=200)
    ready.send("ready")
    stop.poll(300)
    broker.close()
    os.close(log)


def _calls(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [
        (int(seq), int(attempt))
        for seq, attempt in map(bytes.split, path.read_bytes().split(b"\n")[:-1])
    ]


def _disk_use(directory: Path) -> int:
    """Bytes in the journal's files now (a checkpoint may delete one while we look)."""
    total = 0
    for path in directory.iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def _kill(hub: Hub) -> None:
    assert hub.pid is not None
    os.kill(hub.pid, signal.SIGKILL)
    assert hub.stop(timeout=10) == -signal.SIGKILL


def _hub(address: str, journal: Path, **options: Any) -> Hub:
    return Hub(address, journal=str(journal), **HEARTBEAT, **options).start()


def _publish(address: str, seqs: range) -> None:
    with HubBroker(address) as producer:
        producer.declare_queue(Tick, "jobs")
        for seq in seqs:
            producer.publish(Tick(seq))
        producer.flush(30)  # confirmed: journaled (and synced) before it returns


def test_jobs_flushed_with_no_consumer_survive_a_kill(tmp_path: Path, workers: Workers) -> None:
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        _publish(address, range(5000))
        _kill(hub)  # at once: flush() returning was the promise
        hub = _hub(address, journal)
        stats = hub.statistics()
        assert stats.journal["restored"] == 5000
        assert stats.queues[QUEUE]["held"] == 5000
        workers.start(_consumer, address, str(log), -1)
        wait_until(lambda: len(_calls(log)) >= 5000, 60)
        calls = _calls(log)
        assert sorted(seq for seq, _ in calls) == list(range(5000))
        assert {attempt for _, attempt in calls} == {1}  # never delivered before the kill
    finally:
        hub.stop()


@pytest.mark.timeout(300)  # its waits add up to more than the default 120 s on a loaded machine
def test_a_kill_mid_load_loses_no_job_and_flags_every_duplicate(
    tmp_path: Path, workers: Workers
) -> None:
    """10,000 jobs, two consumers acking, the hub killed while they work: after a restart,
    every job was processed, and a job processed twice came again with a higher attempt. (The
    jobs are all confirmed before the kill; for what is sent again, see
    ``test_jobs_on_their_way_when_the_hub_dies_are_sent_again``.)"""
    address, journal = f"ipc://{tmp_path}/hub", tmp_path / "journal"
    logs = [tmp_path / "calls-0", tmp_path / "calls-1"]
    hub = _hub(address, journal)
    try:
        for log in logs:
            workers.start(_slow_consumer, address, str(log))
        _publish(address, range(10_000))
        wait_until(lambda: sum(len(_calls(log)) for log in logs) >= 3000, 60)
        _kill(hub)
        hub = _hub(address, journal)
        restored = hub.statistics().journal["restored"]
        assert restored > 0

        def processed() -> set[int]:
            return {seq for log in logs for seq, _ in _calls(log)}

        wait_until(lambda: len(processed()) == 10_000, 120)
        wait_until(lambda: request_statistics(address).queues[QUEUE]["in_flight"] == 0, 30)
        calls = [call for log in logs for call in _calls(log)]
        assert processed() == set(range(10_000))
        by_seq: dict[int, list[int]] = {}
        for seq, attempt in calls:
            by_seq.setdefault(seq, []).append(attempt)
        duplicated = {seq: attempts for seq, attempts in by_seq.items() if len(attempts) > 1}
        for seq, attempts in duplicated.items():
            assert max(attempts) > min(attempts), (seq, attempts)  # flagged by attempt
        assert len(duplicated) <= restored
    finally:
        hub.stop()


def test_acked_and_dead_lettered_jobs_are_not_delivered_again(
    tmp_path: Path, workers: Workers
) -> None:
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        consumer = workers.start(_consumer, address, str(log), 10)  # 0-9 are dead letters
        _publish(address, range(500))
        wait_until(lambda: hub.statistics().queues[QUEUE]["acked"] == 490, 60)
        wait_until(lambda: hub.statistics().queues[QUEUE]["dead_lettered"] == 10, 60)
        workers.stop(consumer)
        _kill(hub)
        hub = _hub(address, journal)
        assert hub.statistics().journal["restored"] == 0
        before = len(_calls(log))
        workers.start(_consumer, address, str(log), -1)
        _publish(address, range(1000, 1010))
        wait_until(lambda: len(_calls(log)) >= before + 10, 60)
        assert sorted(seq for seq, _ in _calls(log)[before:]) == list(range(1000, 1010))
    finally:
        hub.stop()


def test_a_torn_tail_is_cut_and_counted_and_the_rest_restored(
    tmp_path: Path, workers: Workers
) -> None:
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        _publish(address, range(100))
        _kill(hub)
        (segment,) = journal.glob("*.journal")
        with segment.open("ab") as file:  # what a kill in the middle of a write leaves
            file.write(b"\x01\xff\xff\x00\x00garbage")
        hub = _hub(address, journal)
        stats = hub.statistics()
        assert stats.journal["torn_bytes"] == 12
        assert stats.journal["restored"] == 100
        workers.start(_consumer, address, str(log), -1)
        wait_until(lambda: len(_calls(log)) >= 100, 60)
        assert sorted(seq for seq, _ in _calls(log)) == list(range(100))
    finally:
        hub.stop()


def test_compaction_bounds_the_journal_over_a_long_run(tmp_path: Path, workers: Workers) -> None:
    """60,000 jobs of 1 KB (about 65 MB through the journal), the producer at most ~2,000 jobs
    ahead of the consumer (2 MB live at most): the directory never holds more than twice the
    4 MiB limit, and every job is processed. (Without compaction it would hold all 65 MB; the
    limit itself is soft, as max_held: what is already in the pipes still comes.)"""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    limit = 4 * 1024 * 1024
    hub = _hub(address, journal, journal_max_bytes=limit)
    sizes: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.002):
            sizes.append(_disk_use(journal))

    watcher = threading.Thread(target=watch)
    try:
        workers.start(_consumer, address, str(log), -1)
        watcher.start()
        with HubBroker(address, max_pending=2000) as producer:
            producer.declare_queue(Tick, "jobs")
            padding = "x" * 1000
            for seq in range(60_000):
                producer.publish(Tick(seq, padding))
                if seq % 1000 == 999:
                    producer.flush(60)
                    wait_until(lambda seq=seq: len(_calls(log)) >= seq - 1000, 60)
            producer.flush(60)
        wait_until(lambda: len(_calls(log)) >= 60_000, 120)
        done.set()
        watcher.join(10)
        stats = hub.statistics().journal
        print(f"journal: largest {max(sizes)} bytes of {len(sizes)} samples; {stats}")
        assert stats["checkpoints"] > 5, stats
        assert max(sizes) <= 2 * limit, max(sizes)
        assert len({seq for seq, _ in _calls(log)}) == 60_000
    finally:
        done.set()
        if watcher.is_alive():
            watcher.join(10)
        hub.stop()


def test_two_hubs_cannot_share_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    hub = _hub(f"ipc://{tmp_path}/one", journal)
    try:
        with pytest.raises(HubAddressError, match="another hub uses the journal"):
            _hub(f"ipc://{tmp_path}/two", journal)
    finally:
        hub.stop()


def test_jobs_on_their_way_when_the_hub_dies_are_sent_again(
    tmp_path: Path, workers: Workers
) -> None:
    """The producer publishes without flushing while the hub is killed: what the dead hub had
    not confirmed goes again to the new hub: 0 lost. The copies the dead hub had journaled
    (restored by the new one) are dropped, and every job handled twice came the second time
    with attempt 2: no job is handled twice as a first delivery (attempt 1)."""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        workers.start(_consumer, address, str(log), -1)
        with HubBroker(address) as producer:
            producer.declare_queue(Tick, "jobs")
            for seq in range(20_000):
                producer.publish(Tick(seq))
                if seq == 8000:
                    wait_until(lambda: len(_calls(log)) > 2000, 60)
                    _kill(hub)
                    hub = _hub(address, journal)
            producer.flush(60)
        wait_until(lambda: len({seq for seq, _ in _calls(log)}) == 20_000, 120)
        firsts: dict[int, int] = {}
        for seq, attempt in _calls(log):
            firsts[seq] = firsts.get(seq, 0) + (attempt == 1)
        assert [seq for seq, count in firsts.items() if count > 1] == []
    finally:
        hub.stop()


def test_a_kill_without_a_journal_hands_the_new_hub_no_job_twice(
    tmp_path: Path, workers: Workers
) -> None:
    """ZeroMQ hands what was still in the producer's pipe when the hub died to the new hub, and
    the producer sends what the dead hub did not confirm again: the new hub drops the copies of
    what it has (before: the whole burst came twice). A copy of what the dead hub read comes with
    attempt 2 (it may have been delivered); what it held is lost with it, without a journal."""
    address, log = f"ipc://{tmp_path}/hub", tmp_path / "calls"
    hub = Hub(address, **HEARTBEAT).start()
    try:
        with HubBroker(address) as producer:
            producer.declare_queue(Tick, "jobs")  # held by the hub: no consumer yet
            producer.flush(30)
            for seq in range(2000):
                producer.publish(Tick(seq))
            _kill(hub)  # at once: most of the burst is still on its way
            hub = Hub(address, **HEARTBEAT).start()
            producer.flush(60)  # confirmed by the new hub: what was sent again came first
        duplicates = request_statistics(address).duplicates_dropped
        workers.start(_consumer, address, str(log), -1)
        wait_until(lambda: request_statistics(address).queues[QUEUE]["held"] == 0, 60)
        calls = sorted(_calls(log))
        assert calls
        assert len({seq for seq, _ in calls}) == len(calls)  # each once
        # In publish order: what the dead hub read and did not confirm (sent again: attempt
        # 2), then what it never read (out of the pipe, or still in the outbox: attempt 1).
        attempts = [attempt for _, attempt in calls]
        assert attempts == sorted(attempts, reverse=True)
        assert set(attempts) <= {1, 2}
        assert duplicates <= 2000 - attempts.count(2)
    finally:
        hub.stop()


def _cli_hub(address: str, *flags: str, **env: str) -> subprocess.Popen[str]:
    """``ipcbus hub`` in the foreground of a subprocess; returns once it printed its address."""
    environment = {k: v for k, v in os.environ.items() if k != "IPCBUS_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ipcbus", "hub", "--address", address, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**environment, **env},
    )
    assert process.stdout is not None
    ready = select.select([process.stdout], [], [], 30)[0]
    assert ready, "ipcbus hub printed nothing within 30 s"
    assert process.stdout.readline().strip() == address
    return process


def _end(process: subprocess.Popen[str], signum: int) -> None:
    if process.poll() is None:
        process.send_signal(signum)
    process.wait(30)
    assert process.stdout is not None
    process.stdout.close()


def test_the_command_line_hub_journals_by_flag_and_by_environment(tmp_path: Path) -> None:
    address, journal = f"ipc://{tmp_path}/hub", str(tmp_path / "journal")
    process = _cli_hub(address, "--journal", journal, "--journal-fsync", "yes")
    try:
        _publish(address, range(10))
        _end(process, signal.SIGKILL)
        process = _cli_hub(address, IPCBUS_HUB_JOURNAL=journal)
        shown = run_cli("stats", "--address", address)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^  restored +10$", shown.stdout, re.MULTILINE), shown.stdout
    finally:
        _end(process, signal.SIGTERM)
    refused = run_cli("hub", "--address", address, "--journal-fsync", "maybe")
    assert refused.returncode == 2
    assert "yes/no" in refused.stderr


def test_jobs_a_stopped_hub_never_read_go_to_the_next_one_from_an_idle_producer(
    tmp_path: Path, workers: Workers
) -> None:
    """The hub is stopped (SIGSTOP) when 13 jobs are published, then killed: they never reached
    it. The producer, idle from then on, sends them to the next hub, before anything else."""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        workers.start(_consumer, address, str(log), -1)
        with HubBroker(address) as producer:
            producer.declare_queue(Tick, "jobs")
            assert hub.pid is not None
            os.kill(hub.pid, signal.SIGSTOP)
            for seq in range(13):
                producer.publish(Tick(seq))
            _kill(hub)  # at once: no confirmation asked yet (that takes 50 ms)
            hub = _hub(address, journal)
            wait_until(lambda: len({seq for seq, _ in _calls(log)}) == 13, 30)
    finally:
        hub.stop()


def test_dead_letters_requeue_and_purge_survive_a_kill(tmp_path: Path, workers: Workers) -> None:
    """Dead letters come back with their payloads (``ipcbus requeue`` works on them after a
    crash); what was requeued is held again after a crash, what was purged is not."""
    address, journal, log = f"ipc://{tmp_path}/hub", tmp_path / "journal", tmp_path / "calls"
    hub = _hub(address, journal)
    try:
        consumer = workers.start(_consumer, address, str(log), 10)  # 0-9 are dead letters
        _publish(address, range(20))
        wait_until(lambda: hub.statistics().queues[QUEUE]["dead_lettered"] == 10, 60)
        wait_until(lambda: hub.statistics().queues[QUEUE]["acked"] == 10, 60)
        workers.stop(consumer)
        _kill(hub)

        hub = _hub(address, journal)
        letters = hub.dead_letters(Tick, "jobs")
        assert sorted(decode_dead_letter(letter, Tick).seq for letter in letters) == list(range(10))
        purged_seq = decode_dead_letter(letters[0], Tick).seq
        assert hub.requeue(Tick, "jobs", ids=[letters[0].message_id]).requeued == 1
        _publish(address, range(100, 130))  # held: no consumer
        assert hub.purge(Tick, "jobs") == 31  # the 30 new ones and the requeued one
        assert hub.requeue(Tick, "jobs").requeued == 9  # the other nine
        wait_until(lambda: hub.statistics().queues[QUEUE]["held"] == 9, 30)
        _kill(hub)

        hub = _hub(address, journal)
        assert hub.statistics().journal["restored"] == 9  # requeued: held; purged: gone
        assert hub.dead_letters(Tick, "jobs") == []
        before = len(_calls(log))
        workers.start(_consumer, address, str(log), -1)
        wait_until(lambda: len(_calls(log)) >= before + 9, 60)
        assert sorted(seq for seq, _ in _calls(log)[before:]) == sorted(
            set(range(10)) - {purged_seq}
        )
    finally:
        hub.stop()
