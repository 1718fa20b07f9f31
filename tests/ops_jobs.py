"""A module of Consumers for ``ipcbus worker`` in the tests (tests/test_worker_runner.py):
importable, so the runner's worker processes import it as a user's module."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from ipcbus import Consumer, Message, get_message_broker

QUEUE = "ops-jobs"


@dataclass(frozen=True)
class Job(Message):
    job_id: int
    seconds: float = 0.0


@dataclass(frozen=True)
class JobDone(Message):
    job_id: int
    pid: int


jobs = Consumer(Job)


@jobs.on_message(queue_name=QUEUE)
def run_job(job: Job) -> None:
    time.sleep(job.seconds)
    get_message_broker().publish(JobDone(job.job_id, os.getpid()))


def crash_soon(broker: Any) -> None:
    """``tests.ops_jobs:crash_soon``: a worker that dies shortly after it started (a crash loop)."""
    threading.Timer(0.2, os._exit, (9,)).start()


not_callable = 42
