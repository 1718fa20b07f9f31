"""Request/reply played against by a careless user and an attacker, across real processes:
absurd timeouts, a requester interrupted while it waits, requesters killed -9 while their
responder computes (docs/guarantees.md, "Request/reply")."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ipcbus import (
    BrokerClosedError,
    Hub,
    HubBroker,
    HubUnavailableError,
    MemoryBroker,
    RemoteError,
    RequestTimeoutError,
)
from ipcbus.client.admin import request_statistics

from .conftest import wait_until
from .messages import Blob, Ping, Pong

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture
def requester(fresh_hub: Any) -> Iterator[HubBroker]:
    with HubBroker(fresh_hub.address) as broker:
        yield broker


@pytest.fixture
def responder(fresh_hub: Any) -> Iterator[HubBroker]:
    """A broker of its own that answers Ping with Pong (through the hub, like another process)."""
    with HubBroker(fresh_hub.address) as broker:
        broker.subscribe(Ping, lambda message: Pong(message.token, os.getpid()))
        yield broker


def test_a_huge_finite_timeout_is_a_long_wait_not_an_overflow(
    responder: HubBroker, requester: HubBroker
) -> None:
    """``timeout=1e10`` is finite, so accepted: it must wait (here: get the reply), not raise
    OverflowError from the wait and leave its entry in the table."""
    for timeout in (1e10, 1e300):
        assert requester.request(Ping("far"), timeout=timeout) == Pong("far", os.getpid())
        assert requester.pending_requests == 0
    with MemoryBroker() as memory:
        memory.subscribe(Ping, lambda message: Pong(message.token, 0))
        assert memory.request(Ping("far"), timeout=1e300) == Pong("far", 0)


def test_a_huge_timeout_without_responder_ends_with_close(requester: HubBroker) -> None:
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            requester.request(Ping("nobody"), timeout=1e12)
        except BaseException as exc:
            raised.append(exc)

    waiting = threading.Thread(target=wait)
    waiting.start()
    wait_until(lambda: requester.pending_requests == 1 or raised, 30)
    requester.close()
    waiting.join(30)
    assert not waiting.is_alive()
    assert [type(exc) for exc in raised] == [BrokerClosedError]
    assert requester.pending_requests == 0


class Interrupted(Exception):
    pass


def test_a_requester_interrupted_while_it_waits_leaves_no_entry(requester: HubBroker) -> None:
    """A signal handler raises in the waiting (main) thread, as Ctrl-C does: the request is
    given up, nothing stays in ``pending_requests``."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            requester.request(Ping("nobody"), timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert requester.pending_requests == 0
    assert requester._requests._entries == {}


def _request_then_die(address: str, token: str) -> None:  # a forked child
    """Request, and die by SIGKILL while waiting, once the hub has the request (a flush from
    the signal handler, in the waiting thread, confirms what was published before)."""
    try:
        broker = HubBroker(address)

        def die(signum: int, frame: Any) -> None:
            broker.flush(10)
            os.kill(os.getpid(), signal.SIGKILL)

        signal.signal(signal.SIGALRM, die)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        broker.request(Ping(token), timeout=60)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.forks
def test_replies_to_requesters_killed_meanwhile_do_not_fill_the_unrouted_table(
    fresh_hub: Any,
) -> None:
    """Each requester has a reply topic of its own: a reply that outlives its requester must
    not take a row of the hub's per-type ``unrouted`` table (bounded at 1 000 rows, past which
    real types are lumped together)."""
    answered = threading.Semaphore(0)
    release = threading.Event()

    def slow(message: Ping) -> Pong:
        release.wait(30)
        answered.release()
        return Pong(message.token, os.getpid())

    with HubBroker(fresh_hub.address) as responder:
        responder.subscribe_async(Ping, slow, "slow", prefetch=10)
        for index in range(3):
            pid = os.fork()
            if pid == 0:
                _request_then_die(fresh_hub.address, str(index))
            os.waitpid(pid, 0)
        wait_until(lambda: responder.queues()[0].in_flight + responder.queues()[0].held == 3, 30)
        release.set()
        for _ in range(3):
            assert answered.acquire(timeout=30)
        responder.flush(30)
        wait_until(lambda: sum(request_statistics(fresh_hub.address).unrouted.values()) == 3, 30)
        unrouted = request_statistics(fresh_hub.address).unrouted
    assert not any(name.startswith("ipcbus:reply:") for name in unrouted), unrouted
    assert len(unrouted) == 1, unrouted


def test_a_reply_too_large_for_the_hub_is_logged_without_its_repr(
    tmp_path: Any, errors_logged: pytest.LogCaptureFixture
) -> None:
    """The responder's log says which reply could not be sent, not what it holds: the repr of
    a 300 MB reply (a 1.2 GB string) stalled the responder's process for 15 s, long enough for
    its I/O thread to miss the hub's heartbeats."""
    with (
        Hub(f"ipc://{tmp_path}/hub", start_method="fork", max_message_size=64 * 1024) as hub,
        HubBroker(hub.address) as responder,
        HubBroker(hub.address) as requester,
    ):
        responder.subscribe(Ping, lambda message: Blob(1, b"x" * 1024 * 1024))
        with pytest.raises(RemoteError, match="MessageTooLargeError") as raised:
            requester.request(Ping("big"), timeout=30)
        assert "65536" in raised.value.remote_message
    (record,) = [r for r in errors_logged.records if "cannot be sent" in r.getMessage()]
    assert len(record.getMessage()) < 1000
    assert "tests.messages.Blob" in record.getMessage()


@pytest.mark.parametrize("timeout", [None, 600.0])
def test_a_request_waiting_when_the_hub_is_lost_for_good_raises_hub_unavailable(
    tmp_path: Any, timeout: float | None
) -> None:
    """Killed hub, none back within ``hub_lost_timeout``: publish() and flush() raise
    HubUnavailableError at once from then on; a request waiting for its reply must learn it
    too, not wait for ever (``timeout=None``) or for its whole timeout."""
    hub = Hub(
        f"ipc://{tmp_path}/hub", start_method="fork", heartbeat_interval=0.2, heartbeat_timeout=1.0
    ).start()
    raised: list[BaseException] = []
    try:
        with HubBroker(hub.address, hub_lost_timeout=1.0) as requester:

            def wait() -> None:
                try:
                    requester.request(Ping("nobody"), timeout=timeout)
                except BaseException as exc:
                    raised.append(exc)

            waiting = threading.Thread(target=wait)
            waiting.start()
            wait_until(lambda: requester.pending_requests == 1, 30)
            assert hub.pid is not None
            os.kill(hub.pid, signal.SIGKILL)
            hub.stop(timeout=10)
            waiting.join(60)
            assert not waiting.is_alive()
            assert [type(exc) for exc in raised] == [HubUnavailableError]
            assert "hub_lost_timeout" in str(raised[0])
            assert requester.pending_requests == 0
    finally:
        hub.stop(timeout=10)


def test_a_first_request_to_a_hub_that_does_not_answer_ends_at_its_timeout(
    fresh_hub: Any,
) -> None:
    """The first request subscribes the broker's reply topic and waits for the hub to confirm
    it: that wait is part of ``timeout``, not ``subscribe_timeout`` (60 s here) on top."""
    with HubBroker(fresh_hub.address, subscribe_timeout=60.0) as requester:
        raised: list[BaseException] = []

        def ask() -> None:
            try:
                requester.request(Ping("stopped hub"), timeout=1.0)
            except BaseException as exc:
                raised.append(exc)

        os.kill(fresh_hub.pid, signal.SIGSTOP)
        try:
            asking = threading.Thread(target=ask)
            asking.start()
            asking.join(30)  # well before subscribe_timeout
            alive = asking.is_alive()
        finally:
            os.kill(fresh_hub.pid, signal.SIGCONT)
        asking.join(90)
        assert not alive, "request(timeout=1.0) waited for subscribe_timeout"
        assert [type(exc) for exc in raised] == [RequestTimeoutError]
        assert "reply topic" in str(raised[0])
        assert requester.pending_requests == 0
        # Once the hub answers again, the reply topic goes live and requests are answered.
        with HubBroker(fresh_hub.address) as responder:
            responder.subscribe(Ping, lambda message: Pong(message.token, 0))
            assert requester.request(Ping("back"), timeout=30) == Pong("back", 0)
