"""Request/reply across processes (docs/guarantees.md, "Request/reply"): responders in fork and
spawn workers, queue groups, several responders, failures, timeouts, close, fork, and nothing kept
per request. The contract itself runs on every broker in test_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ipcbus import (
    AsyncMessageContext,
    BrokerClosedError,
    HubBroker,
    RemoteError,
    RequestTimeoutError,
    connect,
    get_message_broker,
    set_message_broker,
)
from ipcbus.client.admin import request_statistics
from ipcbus.wire import protocol as wire

from .conftest import wait_until
from .hubtools import request_in_thread
from .messages import OrderPlaced, OutOfStock, Ping, Pong

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("no_leftovers")]


# -- responders in worker processes -----------------------------------------------------------


def _responder(address: str, mode: str, fail: bool, ready: Any, stop: Any) -> None:
    """A worker that answers Ping with Pong(token, pid), or raises OutOfStock."""
    broker = connect(address)

    def answer(message: Ping) -> Pong:
        if fail:
            attempt = AsyncMessageContext.current().attempt if mode == "queue" else 1
            raise OutOfStock(f"no {message.token} (attempt {attempt})")
        return Pong(message.token, os.getpid())

    async def answer_later(message: Ping) -> Pong:
        await asyncio.sleep(0)
        return answer(message)

    if mode == "broadcast":
        broker.subscribe(Ping, answer)
    elif mode == "queue":
        broker.subscribe_async(Ping, answer, "responders", retry_backoff=0.0)
    else:
        broker.subscribe_async(Ping, answer_later, "responders", retry_backoff=0.0)
    ready.send("ready")
    stop.poll(300)
    broker.close()


class Responders:
    """Responder processes of one test (fork or spawn), each stopped by closing its pipe."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.processes: list[tuple[Any, Any]] = []

    def start(
        self, mode: str = "broadcast", start_method: str = "spawn", fail: bool = False
    ) -> int:
        context: Any = multiprocessing.get_context(start_method)
        ready, child_ready = context.Pipe(duplex=False)
        child_stop, stop = context.Pipe(duplex=False)
        process = context.Process(
            target=_responder,
            args=(self.address, mode, fail, child_ready, child_stop),
            daemon=True,
        )
        process.start()
        child_ready.close()
        child_stop.close()
        self.processes.append((process, stop))
        try:
            assert ready.poll(60), "the responder did not start"
            assert ready.recv() == "ready"
        finally:
            ready.close()
        return int(process.pid)

    def close(self) -> None:
        # A fork child holds its own copy of every write end open before it: closing ours
        # would never reach it as EOF. A word on the pipe does.
        for _process, stop in self.processes:
            with contextlib.suppress(OSError):
                stop.send("stop")
            stop.close()
        for process, _ in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join(10)


@pytest.fixture
def responders(fresh_hub: Any) -> Iterator[Responders]:
    started = Responders(fresh_hub.address)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def requester(fresh_hub: Any) -> Iterator[HubBroker]:
    with HubBroker(fresh_hub.address) as broker:
        yield broker


@pytest.mark.forks
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("mode", ["broadcast", "queue", "coroutine"])
def test_a_responder_in_a_worker_answers(
    responders: Responders, requester: HubBroker, start_method: str, mode: str
) -> None:
    pid = responders.start(mode, start_method)
    for index in range(20):
        assert requester.request(Ping(str(index)), timeout=30) == Pong(str(index), pid)
    assert requester.pending_requests == 0
    assert requester.late_replies == 0


@pytest.mark.queue_groups
def test_one_member_of_a_responder_group_answers_each_request(
    responders: Responders, requester: HubBroker
) -> None:
    pids = {responders.start("queue"), responders.start("queue")}
    answered_by: Counter[int] = Counter()
    for index in range(40):
        reply = requester.request(Ping(str(index)), timeout=30)
        assert isinstance(reply, Pong)
        assert reply.token == str(index)
        answered_by[reply.pid] += 1
    assert set(answered_by) <= pids
    assert sum(answered_by.values()) == 40
    requester.flush(30)
    assert requester.late_replies == 0, "one member of the group answered each request"


def test_several_responders_the_first_reply_wins(
    responders: Responders, requester: HubBroker
) -> None:
    pids = {responders.start("broadcast"), responders.start("broadcast")}
    for index in range(20):
        reply = requester.request(Ping(str(index)), timeout=30)
        assert isinstance(reply, Pong)
        assert reply.pid in pids
    wait_until(lambda: requester.late_replies == 20, 30)  # the second reply of each, dropped
    assert requester.pending_requests == 0


@pytest.mark.parametrize("mode", ["broadcast", "queue"])
def test_a_remote_exception_travels_back_at_once(
    responders: Responders, requester: HubBroker, mode: str
) -> None:
    responders.start(mode, fail=True)
    started = time.monotonic()
    with pytest.raises(RemoteError) as caught:
        requester.request(Ping("widget"), timeout=60)
    assert time.monotonic() - started < 30, "the failure answered: no wait for the timeout"
    assert caught.value.remote_type == "tests.messages.OutOfStock"
    last_attempt = 3 if mode == "queue" else 1  # a queue responder answers after its retries
    assert caught.value.remote_message == f"no widget (attempt {last_attempt})"
    assert requester.pending_requests == 0


def test_without_a_responder_a_request_times_out(requester: HubBroker) -> None:
    with pytest.raises(RequestTimeoutError, match=r"tests\.messages\.Ping"):
        requester.request(Ping("nobody"), timeout=0.3)
    assert requester.pending_requests == 0


def test_close_wakes_a_waiting_requester(requester: HubBroker) -> None:
    thread, outcome = request_in_thread(requester, Ping("nobody"))
    wait_until(lambda: requester.pending_requests == 1, 30)
    requester.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], BrokerClosedError)
    assert requester.pending_requests == 0
    with pytest.raises(BrokerClosedError):
        requester.request(Ping("after"))


def test_a_handler_requests_from_another_process(
    responders: Responders, requester: HubBroker
) -> None:
    """A broadcast handler (on the dispatcher thread) waits for a reply: the reply comes on the
    I/O thread, so no other handler thread is needed."""
    pid = responders.start("broadcast")
    replies: list[object] = []
    done = threading.Event()

    def on_order(message: OrderPlaced) -> None:
        replies.append(requester.request(Ping(str(message.order_id)), timeout=30))
        done.set()

    requester.subscribe(OrderPlaced, on_order)
    requester.publish(OrderPlaced(3))
    assert done.wait(60)
    assert replies == [Pong("3", pid)]


def test_replies_are_read_while_the_dispatcher_runs_a_long_handler(
    fresh_hub: Any, requester: HubBroker
) -> None:
    """An idle dispatcher reads the replies itself; while it runs a handler the I/O thread
    reads them: a request that begins during a long handler, and one whose reply comes after
    a long handler began, both return while that handler still runs."""
    release, started = threading.Event(), threading.Event()
    finished: list[int] = []

    def long_handler(message: OrderPlaced) -> None:
        started.set()
        release.wait(60)
        finished.append(message.order_id)

    def slow_answer(message: Ping) -> Pong:
        time.sleep(1.0 if message.token == "after" else 0.0)
        return Pong(message.token, os.getpid())

    requester.subscribe(OrderPlaced, long_handler)
    with HubBroker(fresh_hub.address) as responder:
        responder.subscribe(Ping, slow_answer)
        try:
            requester.publish(OrderPlaced(1))
            assert started.wait(30)
            assert requester.request(Ping("during"), timeout=30) == Pong("during", os.getpid())
            release.set()
            wait_until(lambda: finished == [1], 30)
            started.clear()
            release.clear()
            outcome: list[object] = []
            asking = threading.Thread(
                target=lambda: outcome.append(requester.request(Ping("after"), timeout=30))
            )
            asking.start()  # the dispatcher is idle: the reply is its to read...
            wait_until(lambda: requester.pending_requests == 1, 30)
            requester.publish(OrderPlaced(2))  # ...until it runs this handler, for 60 s
            assert started.wait(30)
            asking.join(30)
            assert outcome == [Pong("after", os.getpid())]
            assert not release.is_set()
        finally:
            release.set()


def test_a_handler_cannot_wait_for_its_own_process_broadcast_responder(
    requester: HubBroker,
) -> None:
    """Its own subscribe() handlers run on the thread that waits: the request times out with a
    note that says why, and the answer that comes afterwards is late (counted), not lost."""
    requester.subscribe(Ping, lambda m: Pong(m.token, os.getpid()))
    errors: list[RequestTimeoutError] = []
    done = threading.Event()

    def on_order(message: OrderPlaced) -> None:
        try:
            requester.request(Ping("own"), timeout=0.5)
        except RequestTimeoutError as exc:
            errors.append(exc)
        done.set()

    requester.subscribe(OrderPlaced, on_order)
    requester.publish(OrderPlaced(1))
    assert done.wait(60)
    assert len(errors) == 1
    assert any("same thread" in note for note in errors[0].__notes__)
    wait_until(lambda: requester.late_replies == 1, 30)
    # From another thread the same responder answers.
    assert requester.request(Ping("other thread"), timeout=30) == Pong("other thread", os.getpid())


@pytest.mark.slow
def test_nothing_is_kept_per_request(responders: Responders, requester: HubBroker) -> None:
    """10 000 requests from four threads: the tables of the requester, its I/O thread and the
    hub end as they were after the first request."""
    responders.start("queue")
    responders.start("broadcast")
    assert isinstance(requester.request(Ping("first"), timeout=30), Pong)
    requester.flush(30)
    wait_until(lambda: requester.late_replies == 1, 30)
    subscriptions = requester._io._subscriptions
    before = (set(subscriptions.live_topics), request_statistics(requester.address).topics)
    failures: list[BaseException] = []

    def ask(worker: int) -> None:
        try:
            for index in range(2_500):
                token = f"{worker}-{index}"
                reply = requester.request(Ping(token), timeout=60)
                assert isinstance(reply, Pong)
                assert reply.token == token
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=ask, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    requester.flush(30)
    # Two responders: each request had one late reply (the queue member's or the broadcast's).
    wait_until(lambda: requester.late_replies == 10_001, 60)
    assert requester.pending_requests == 0
    assert len(requester._requests._entries) == 0
    assert (set(subscriptions.live_topics), request_statistics(requester.address).topics) == before
    assert subscriptions._syncs == {}
    assert len(requester._io.outbox) == 0
    assert requester._io.outbox.flushes == {}


# -- fork ---------------------------------------------------------------------------------------


def _wait_for_child(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child {pid} hung")
        time.sleep(0.01)


@pytest.mark.forks
def test_a_forked_child_never_gets_its_parents_replies(requester: HubBroker) -> None:
    """The parent waits for a reply while it forks: the child's copy of the parent's table is
    empty, and the child's own broker has a reply topic of its own."""
    release = threading.Event()

    def slow_or_fast(message: Ping) -> Pong:
        if message.token == "slow":
            release.wait(60)
        return Pong(message.token, os.getpid())

    requester.subscribe_async(Ping, slow_or_fast, "responders")
    set_message_broker(requester)
    parent_replies: list[object] = []
    waiting = threading.Thread(
        target=lambda: parent_replies.append(requester.request(Ping("slow"), timeout=60))
    )
    waiting.start()
    wait_until(lambda: requester.pending_requests == 1, 30)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        with contextlib.suppress(BaseException):
            own = get_message_broker()
            assert requester.pending_requests == 0, "the parent's requests stay the parent's"
            assert own is not requester
            assert own.request(Ping("child"), timeout=30) == Pong("child", os.getppid())
            assert own.late_replies == 0
            own.close()
            code = 0
        os._exit(code)
    assert _wait_for_child(pid, 60) == 0
    release.set()
    waiting.join(60)
    assert parent_replies == [Pong("slow", os.getpid())]
    assert requester.late_replies == 0
    set_message_broker(None)


# -- the wire -----------------------------------------------------------------------------------


def test_routes_round_trip() -> None:
    topic = wire.reply_topic(b"0123456789abcdef")
    request = wire.pack_request_meta(wire.CODEC_DATACLASS, 1.5, 2**64 - 1, topic)
    assert wire.unpack_meta(request) == (wire.CODEC_DATACLASS, 1, 1.5)
    assert wire.route_of(request) == wire.Route(wire.ROUTE_REQUEST, 2**64 - 1, topic)
    for failed, kind in ((False, wire.ROUTE_REPLY), (True, wire.ROUTE_FAILURE)):
        reply = wire.pack_reply_meta(wire.CODEC_OBJECTS, 2.0, 7, failed)
        assert wire.route_of(reply) == wire.Route(kind, 7)
    assert wire.route_of(wire.pack_meta(wire.CODEC_OBJECTS, 3, 0.0)) is None
    assert wire.parse_failure(wire.pack_failure("a.B", "text\x00with nul")) == (
        "a.B",
        "text\x00with nul",
    )
    assert len(wire.pack_failure("T", "x" * 100_000)) <= 1 + 1 + wire.MAX_FAILURE_TEXT


@pytest.mark.parametrize(
    "frame",
    [
        wire.pack_meta(b"P", 2, 0.0) + wire.pack_reply_meta(b"P", 0.0, 1, False)[13:],  # 2 msgs
        wire.pack_reply_meta(b"P", 0.0, 1, False) + b"x",  # trailing bytes
        wire.pack_reply_meta(b"P", 0.0, 1, False)[:-1],  # short id
        wire.pack_meta(b"P", 1, 0.0) + b"z" + bytes(8),  # unknown kind
        wire.pack_request_meta(b"P", 0.0, 1, b"a.Type\x00"),  # not a reply topic
        wire.pack_request_meta(b"P", 0.0, 1, wire.REPLY_PREFIX + b"x"),  # no terminator
        wire.pack_request_meta(b"P", 0.0, 1, wire.REPLY_PREFIX + b"x\x00y\x00"),
    ],
)
def test_a_bad_route_is_malformed(frame: bytes) -> None:
    with pytest.raises(ValueError):
        wire.unpack_meta(frame)
