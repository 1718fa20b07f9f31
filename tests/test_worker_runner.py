"""``ipcbus worker``: real runners in subprocesses, real worker processes, a real hub. Jobs are
counted: every job published comes back as a JobDone from some worker, whatever the runner went
through (SIGTERM mid-jobs, a worker killed with SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcbus import Hub, HubBroker
from ipcbus.client.admin import request_statistics
from ipcbus.config import ENV_ADDRESS

from .conftest import wait_until
from .hubtools import REPO, run_cli
from .ops_jobs import QUEUE, Job, JobDone

pytestmark = [pytest.mark.hub, pytest.mark.forks, pytest.mark.usefixtures("no_leftovers")]

DEADLINE = 60.0


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as running:
        yield running


class Runner:
    """``python -m ipcbus worker ...`` in a subprocess; its stdout read line by line."""

    def __init__(self, address: str, *args: str) -> None:
        environment = {k: v for k, v in os.environ.items() if k != ENV_ADDRESS}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ipcbus", "worker", "--address", address, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=environment,
            start_new_session=True,  # a process group of its own, to signal as systemd does
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def ready(self, count: int) -> dict[int, int]:
        """Wait for ``count`` "worker N ready: pid P" lines; worker index -> pid."""
        pids: dict[int, int] = {}
        deadline = time.monotonic() + DEADLINE
        while len(pids) < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{count} workers not ready: {self.finish(5)}") from None
            words = line.split()
            assert words[0] == "worker", line
            assert words[2] == "ready:", line
            pids[int(words[1])] = int(words[-1])
        return pids

    def finish(self, timeout: float = DEADLINE) -> int | str:
        """Wait for the runner to exit (kill it past ``timeout``); its exit code."""
        try:
            _, self.stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            _, self.stderr = self.process.communicate(timeout=10)
            return f"killed after {timeout} s; stderr: {self.stderr}"
        self._reader.join(10)
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self._kill()
        self.finish(10)

    def _kill(self) -> None:
        """The runner and its workers: its process group (it has one of its own)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    started: list[Runner] = []
    yield started
    for runner in started:
        runner.stop()


class Ledger:
    """Subscribes to JobDone: which jobs came back, from which pid, how often."""

    def __init__(self, broker: HubBroker) -> None:
        self.done: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        broker.subscribe(JobDone, self._on_done)

    def _on_done(self, message: JobDone) -> None:
        with self._lock:
            self.done.setdefault(message.job_id, []).append(message.pid)

    def count(self) -> int:
        with self._lock:
            return len(self.done)


def test_sigterm_while_jobs_are_in_flight_loses_none(hub: Hub, runners: list[Runner]) -> None:
    jobs = 300
    with HubBroker(hub.address) as broker:
        ledger = Ledger(broker)
        broker.declare_queue(Job, QUEUE)
        runner = Runner(hub.address, "tests.ops_jobs", "--processes", "2")
        runners.append(runner)
        runner.ready(2)
        for job_id in range(jobs):
            broker.publish(Job(job_id, seconds=0.02))
        broker.flush(DEADLINE)
        wait_until(lambda: ledger.count() >= 20, DEADLINE)
        runner.process.send_signal(signal.SIGTERM)
        assert runner.finish() == 0, runner.stderr
        assert runner.stderr == "", "an orderly stop logged something"
        statistics = request_statistics(hub.address).queues[f"tests.ops_jobs.Job/{QUEUE}"]
        assert statistics["in_flight"] == 0  # every delivery was acked or handed back
        finished_by_first = ledger.count()
        # What the first runner did not finish, the hub still holds: a second runner finishes it.
        second = Runner(hub.address, "tests.ops_jobs", "--processes", "1")
        runners.append(second)
        second.ready(1)
        wait_until(lambda: ledger.count() == jobs, DEADLINE)
        second.process.send_signal(signal.SIGINT)  # Ctrl-C stops it as cleanly
        assert second.finish() == 0, second.stderr
    assert sorted(ledger.done) == list(range(jobs))
    assert finished_by_first >= 20


def test_a_killed_worker_is_restarted_and_its_jobs_are_redelivered(
    hub: Hub, runners: list[Runner]
) -> None:
    jobs = 120
    with HubBroker(hub.address) as broker:
        ledger = Ledger(broker)
        broker.declare_queue(Job, QUEUE)
        runner = Runner(
            hub.address, "tests.ops_jobs", "--processes", "2", "--restart-backoff", "0.1"
        )
        runners.append(runner)
        pids = runner.ready(2)
        for job_id in range(jobs):
            broker.publish(Job(job_id, seconds=0.05))
        broker.flush(DEADLINE)
        wait_until(lambda: ledger.count() >= 10, DEADLINE)
        victim = pids[0]
        held = request_statistics(hub.address).queues[f"tests.ops_jobs.Job/{QUEUE}"]
        os.kill(victim, signal.SIGKILL)
        restarted = runner.ready(1)
        assert list(restarted) == [0]
        assert restarted[0] != victim
        wait_until(lambda: ledger.count() == jobs, DEADLINE)
        runner.process.send_signal(signal.SIGTERM)
        assert runner.finish() == 0, runner.stderr
    assert sorted(ledger.done) == list(range(jobs))
    assert held["in_flight"] > 0, "nothing was in flight when the worker was killed"
    assert f"worker 0 (pid {victim}) was killed by SIGKILL" in runner.stderr
    redelivered = request_statistics(hub.address).queues[f"tests.ops_jobs.Job/{QUEUE}"]
    assert redelivered["redelivered"] > 0


def test_a_crash_loop_gives_up_loudly(hub: Hub) -> None:
    gave_up = run_cli(
        "worker",
        "tests.ops_jobs:crash_soon",
        "--processes",
        "1",
        "--restart-backoff",
        "0.05",
        "--max-crashes",
        "2",
        "--address",
        hub.address,
    )
    assert gave_up.returncode == 1, gave_up.stderr
    assert gave_up.stdout.count("worker 0 ready") == 3  # started, then twice again
    assert "3 crashes in a row" in gave_up.stderr
    assert "giving up" in gave_up.stderr


@pytest.mark.parametrize(
    "target",
    [
        "no_such_module",
        "tests.ops_jobs:no_such_name",
        "tests.ops_jobs:not_callable",
        "tests.exits_at_import",  # SystemExit at import: was retried as a crash, then exit 1
    ],
)
def test_a_module_that_does_not_load_is_a_usage_error(hub: Hub, target: str) -> None:
    refused = run_cli("worker", target, "--processes", "2", "--address", hub.address)
    assert refused.returncode == 2, refused.stderr
    assert "cannot load" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_worker_that_blocks_at_import_is_reported(hub: Hub) -> None:
    """Found by an adversarial review: the runner waited in silence for a worker whose module
    never finished importing. It says so (here after 0.5 s instead of 10), and SIGTERM still
    stops it (the worker is killed past the shutdown timeout)."""
    script = (
        "import sys; import ipcbus.worker as w; w._SLOW_START_S = 0.5; "
        "from ipcbus.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", script, "worker", "tests.blocks_at_import"]
    command += ["--processes", "1", "--shutdown-timeout", "1", "--address", hub.address]
    with subprocess.Popen(
        command, cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as runner:
        try:
            assert runner.stderr is not None
            line = runner.stderr.readline()  # blocks until the runner says something
            assert "worker 0 (pid " in line, line
            assert "is not ready 0.5 s after its start" in line, line
            assert "importing tests.blocks_at_import" in line, line
            runner.send_signal(signal.SIGTERM)
            _, rest = runner.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)
    assert "killing it" in rest, rest


def test_no_hub_is_unavailable(tmp_path: Path) -> None:
    refused = run_cli(
        "worker",
        "tests.ops_jobs",
        "--processes",
        "1",
        "--connect-timeout",
        "1",
        "--address",
        f"ipc://{tmp_path}/none",
    )
    assert refused.returncode == 4, refused.stderr
    assert "no hub answered" in refused.stderr


def test_close_lets_the_handlers_in_hand_publish_their_results(hub: Hub) -> None:
    """What the runner's SIGTERM relies on: a queue handler that is running when close() starts
    finishes, and what it publishes (the job's result) is delivered, not refused as closed."""
    started = threading.Semaphore(0)

    def slow_job(job: Job) -> None:
        started.release()
        time.sleep(0.3)
        worker.publish(JobDone(job.job_id, os.getpid()))

    with HubBroker(hub.address) as listener:
        ledger = Ledger(listener)
        worker = HubBroker(hub.address)
        worker.subscribe_async(Job, slow_job, QUEUE, prefetch=4)
        for job_id in range(4):
            listener.publish(Job(job_id))
        for _ in range(4):
            assert started.acquire(timeout=DEADLINE)
        worker.close()
        wait_until(lambda: ledger.count() == 4, DEADLINE)
    assert sorted(ledger.done) == [0, 1, 2, 3]


def _four_jobs_in_hand(
    hub: Hub, broker: HubBroker, runners: list[Runner], processes: int, seconds: float
) -> Runner:
    """A runner of ``processes`` workers holding four jobs of ``seconds`` each."""
    broker.declare_queue(Job, QUEUE)
    runner = Runner(hub.address, "tests.ops_jobs", "--processes", str(processes))
    runners.append(runner)
    runner.ready(processes)
    for job_id in range(4):
        broker.publish(Job(job_id, seconds=seconds))
    broker.flush(DEADLINE)
    queue = f"tests.ops_jobs.Job/{QUEUE}"
    wait_until(lambda: request_statistics(hub.address).queues[queue]["in_flight"] == 4, 30)
    return runner


def test_sigterm_to_the_whole_process_group_is_one_orderly_stop(
    hub: Hub, runners: list[Runner]
) -> None:
    """systemd's stop (KillMode=control-group), `kill -TERM -PGID` and `timeout` signal every
    process of the group: each worker got its own SIGTERM and the one the runner passed on, and
    took the second for the hard stop (jobs cut short, exit 1; found by an adversarial review)."""
    with HubBroker(hub.address) as broker:
        ledger = Ledger(broker)
        runner = _four_jobs_in_hand(hub, broker, runners, processes=2, seconds=2.0)
        os.killpg(runner.process.pid, signal.SIGTERM)
        assert runner.finish() == 0, runner.stderr
        assert runner.stderr == "", "an orderly stop logged something"
        wait_until(lambda: ledger.count() == 4, DEADLINE)  # the jobs in hand finished
    assert sorted(ledger.done) == [0, 1, 2, 3]


def test_a_second_signal_stops_at_once_and_the_hub_redelivers(
    hub: Hub, runners: list[Runner]
) -> None:
    """dramatiq's two stages: the first SIGTERM lets running jobs finish, the second stops the
    workers at once; what they held goes back to the hub, and another runner does it."""
    queue = f"tests.ops_jobs.Job/{QUEUE}"
    with HubBroker(hub.address) as broker:
        ledger = Ledger(broker)
        runner = _four_jobs_in_hand(hub, broker, runners, processes=1, seconds=20.0)
        runner.process.send_signal(signal.SIGTERM)
        # The worker's close() has begun once it cancelled its consumer (it waits for its jobs).
        wait_until(lambda: request_statistics(hub.address).queues[queue]["consumers"] == 0, 30)
        runner.process.send_signal(signal.SIGTERM)
        assert runner.finish() == 1  # the worker did not leave cleanly, and the runner says so
        assert ledger.count() == 0  # no 20 s job finished: the stop was at once
        assert "while stopping" in runner.stderr
        wait_until(lambda: request_statistics(hub.address).queues[queue]["held"] == 4, 30)
    assert request_statistics(hub.address).queues[queue]["in_flight"] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--processes", "0"], "processes must be > 0"),
        (["--restart-backoff", "nan"], "restart_backoff must be >= 0"),
        (["--max-crashes", "0"], "max_crashes must be > 0"),
        (["--connect-timeout", "0"], "connect_timeout must be > 0"),
    ],
)
def test_bad_runner_options_are_usage_errors(flags: list[str], message: str) -> None:
    refused = run_cli("worker", "tests.ops_jobs", *flags, "--address", "ipc:///nowhere/hub")
    assert refused.returncode == 2
    assert message in refused.stderr
