"""A web app and its workers: jobs submitted over HTTP run on worker processes (a queue group),
and their results come back to the web app (broadcast).

    python examples/job_queue.py            # serve on http://127.0.0.1:8000 until Ctrl-C
    python examples/job_queue.py --demo 20  # start, submit 20 jobs over HTTP, check, stop

POST /jobs with a number in the body starts a job (it computes the number's divisors);
GET /jobs/<id> answers its status and result as JSON. Each job runs exactly once on one of the
workers; a worker that dies mid-job has its job redelivered to another.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import threading
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ipcbus import (
    AsyncMessageContext,
    Hub,
    Message,
    connect,
    get_message_broker,
    set_message_broker,
)

WORKERS = 2


@dataclass(frozen=True)
class JobSubmitted(Message):
    job_id: int
    number: int


@dataclass(frozen=True)
class JobDone(Message):
    job_id: int
    divisors: tuple[int, ...]
    worker_pid: int
    attempt: int


# -- the workers ---------------------------------------------------------------------------


def divisors(number: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, number + 1) if number % d == 0)


def run_job(job: JobSubmitted) -> None:
    """A queue handler: runs on one worker per job, acknowledged when it returns."""
    import os

    context = AsyncMessageContext.current()
    result = JobDone(job.job_id, divisors(job.number), os.getpid(), context.attempt)
    get_message_broker().publish(result)


def worker(ready: Any, stop: Any) -> None:
    """A worker's whole life: connect, declare what it handles, say it is ready, serve until
    asked to stop (the event, or SIGTERM), then close: what it holds is finished or handed
    back to the hub within the broker's linger."""
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    broker = connect()  # the hub's address comes from IPCBUS_ADDRESS, set by Hub.start()
    set_message_broker(broker)
    broker.subscribe_async(JobSubmitted, run_job, queue_name="jobs")
    ready.release()
    stop.wait()
    broker.close()


# -- the web app ---------------------------------------------------------------------------


class JobStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_id = 0
        self.jobs: dict[int, dict[str, Any]] = {}
        self.done = threading.Condition(self._lock)

    def submit(self, number: int) -> int:
        with self._lock:
            self._next_id += 1
            self.jobs[self._next_id] = {"number": number, "status": "queued"}
            job_id = self._next_id
        get_message_broker().publish(JobSubmitted(job_id, number))
        return job_id

    def finished(self, result: JobDone) -> None:
        with self._lock:
            self.jobs[result.job_id].update(
                status="done", divisors=list(result.divisors), worker=result.worker_pid
            )
            self.done.notify_all()


def make_handler(store: JobStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/jobs":
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length", "0"))
            try:
                number = int(self.rfile.read(length))
            except ValueError:
                self.send_error(400, "send a number")
                return
            self._json(202, {"job_id": store.submit(number)})

        def do_GET(self) -> None:
            prefix, _, job_id = self.path.rpartition("/")
            job = store.jobs.get(int(job_id)) if prefix == "/jobs" and job_id.isdigit() else None
            if job is None:
                self.send_error(404)
                return
            self._json(200, job)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def demo(server: ThreadingHTTPServer, store: JobStore, count: int) -> bool:
    """Submit ``count`` jobs over HTTP, wait for them, check every result."""
    url = f"http://127.0.0.1:{server.server_address[1]}/jobs"
    numbers = [1000 + n for n in range(count)]
    ids = []
    for number in numbers:
        with urllib.request.urlopen(url, data=str(number).encode(), timeout=10) as answer:
            ids.append(json.load(answer)["job_id"])
    with store.done:
        finished = store.done.wait_for(
            lambda: all(store.jobs[i]["status"] == "done" for i in ids), timeout=60
        )
    if not finished:
        print("not every job finished within 60 s")
        return False
    workers = set()
    for job_id, number in zip(ids, numbers, strict=True):
        with urllib.request.urlopen(f"{url}/{job_id}", timeout=10) as answer:
            job = json.load(answer)
        assert job["divisors"] == list(divisors(number)), job
        workers.add(job["worker"])
    print(f"{count} jobs done over HTTP by {len(workers)} workers")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--demo", type=int, metavar="JOBS", help="submit JOBS jobs, then stop")
    args = parser.parse_args(argv)
    spawn = multiprocessing.get_context("spawn")
    with Hub():
        broker = connect()
        set_message_broker(broker)
        store = JobStore()
        broker.subscribe(JobDone, store.finished)
        stop, ready = spawn.Event(), spawn.Semaphore(0)
        workers = [spawn.Process(target=worker, args=(ready, stop)) for _ in range(WORKERS)]
        for process in workers:
            process.start()
        for _ in workers:  # each worker says when it is subscribed
            if not ready.acquire(timeout=60):
                raise SystemExit("a worker did not start within 60 s")
        port = 0 if args.demo else args.port
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(store))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            if args.demo:
                ok = demo(server, store, args.demo)
            else:
                print(f"serving on http://127.0.0.1:{server.server_address[1]} (Ctrl-C stops)")
                threading.Event().wait()
                ok = True
        except KeyboardInterrupt:
            ok = True
        finally:
            server.shutdown()
            server.server_close()
            stop.set()
            for process in workers:
                process.join(30)
            broker.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
