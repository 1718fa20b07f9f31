"""Testing code that uses ipcbus: the test broker, isolation between tests, and code run in a
real worker process. The pytest plugin (``ipcbus.pytest_plugin``) is built on these; they work
with any test runner.

- :class:`TestBroker`: a real broker, deterministic and single-threaded (``process_messages()``).
- :func:`isolated_registry`: no process broker inside the block; afterwards the previous one is
  back and ``Consumer`` declarations made inside are forgotten.
- :func:`run_in_worker`: ``function(*args)`` in a worker process (fork, spawn or forkserver)
  whose process broker is connected to a hub; returns its result or raises its exception, with
  the worker's traceback. The worker is reaped whatever happens.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import cloudpickle

from .brokers.testing import HandlerFailure, TestBroker
from .core.failures import describe
from .core.registry import isolated_registry, set_message_broker
from .exceptions import PubSubError

__all__ = [
    "HandlerFailure",
    "RemoteTraceback",
    "TestBroker",
    "WorkerError",
    "isolated_registry",
    "run_in_worker",
]

R = TypeVar("R")

# How long a worker that answered may take to exit before it is terminated, then killed.
_REAP_TIMEOUT = 5.0


class WorkerError(PubSubError):
    """A worker process failed without a result: it died, or its exception could not be sent."""


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised from a worker: the worker's traceback."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nin the worker process:\n{self.text}"


def run_in_worker(
    function: Callable[..., R],
    *args: Any,
    address: str | None = None,
    start_method: str = "spawn",
    timeout: float | None = 60.0,
) -> R:
    """Run ``function(*args)`` in a new process and return its result.

    With ``address``, the worker's process broker (``get_message_broker()``) is a ``HubBroker``
    connected to that hub, closed when the function returns. ``function`` and ``args`` travel
    with cloudpickle, so lambdas and local functions work with every start method. An exception
    in the worker is raised here with the worker's traceback as its ``__cause__``; a worker that
    does not answer within ``timeout`` seconds is killed (``TimeoutError``).
    """
    context: Any = multiprocessing.get_context(start_method)
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_worker_main,
        args=(cloudpickle.dumps((function, args)), address, sender),
        name="ipcbus-test-worker",
        daemon=True,
    )
    grace = 0.0  # a worker that did not answer is killed at once
    try:
        process.start()
        sender.close()
        if not receiver.poll(timeout):
            raise TimeoutError(f"worker running {function!r} did not finish within {timeout} s")
        try:
            status, payload = receiver.recv()
        except EOFError:
            process.join(_REAP_TIMEOUT)
            raise WorkerError(
                f"worker running {function!r} exited with code {process.exitcode} before answering"
            ) from None
        grace = _REAP_TIMEOUT  # it answered: let it close its broker and exit
    finally:
        sender.close()
        receiver.close()
        _reap(process, grace)
    if status == "ok":
        result: R = cloudpickle.loads(payload)
        return result
    pickled, description, remote = payload
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = cloudpickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        raise WorkerError(f"{description} (in the worker){RemoteTraceback(remote)}")
    raise exc from RemoteTraceback(remote)


def _worker_main(
    payload: bytes, address: str | None, sender: multiprocessing.connection.Connection
) -> None:
    broker = None
    try:
        function, args = cloudpickle.loads(payload)
        if address is not None:
            from .client.broker import connect

            broker = connect(address)
            set_message_broker(broker)
        result = function(*args)
        answer: tuple[str, Any] = ("ok", cloudpickle.dumps(result))
    except BaseException as exc:
        try:
            pickled: bytes | None = cloudpickle.dumps(exc)
        except Exception:
            pickled = None
        description = describe(exc)
        answer = ("error", (pickled, description, traceback.format_exc()))
    finally:
        if broker is not None:
            broker.close()
    sender.send(answer)
    sender.close()


def _reap(process: multiprocessing.process.BaseProcess, grace: float) -> None:
    if process.pid is None:  # never started
        return
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(_REAP_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join(_REAP_TIMEOUT)
    process.close()
