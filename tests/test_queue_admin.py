"""Looking after queue groups, as an operator does: a real hub process, real consumers, the
``ipcbus`` subcommands run as subprocesses (exit codes and ``--json``), and the Python API of
``Hub`` and ``HubBroker``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from ipcbus import (
    BrokerClosedError,
    Hub,
    HubBroker,
    Message,
    QueueInUseError,
    UnknownQueueError,
    decode_dead_letter,
)
from ipcbus.wire import protocol as _wire
from ipcbus.wire import queue_admin as admin_wire
from ipcbus.wire.address import Address
from ipcbus.wire.keys import prove, read_bus_secret
from ipcbus.wire.statistics import HubStatistics

from .conftest import wait_until
from .hubtools import run_cli
from .messages import Blob, Tick

pytestmark = [pytest.mark.hub, pytest.mark.queue_groups, pytest.mark.usefixtures("no_leftovers")]

WORK = "tests.messages.Tick/work"
EXIT_CODES = (
    "exit codes: 0 ok, 1 failed, 2 usage, 3 address, 4 unavailable, 5 unknown queue, 6 in use"
)
COMMANDS = ["queues", "dead-letters", "requeue", "purge", "delete-queue"]


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(f"ipc://{tmp_path}/hub", start_method="fork") as running:
        yield running


def cli(hub: Hub, *args: str) -> Any:
    """Run ``ipcbus *args --address <hub>``; returns (exit code, stdout, stderr)."""
    done = run_cli(*args, "--address", hub.address)
    return done.returncode, done.stdout, done.stderr


def cli_json(hub: Hub, *args: str) -> Any:
    code, out, err = cli(hub, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def queue_row(hub: Hub, queue: str) -> dict[str, Any]:
    (row,) = [row for row in cli_json(hub, "queues") if row["queue"] == queue]
    return row  # type: ignore[no-any-return]


class Worker:
    """A queue consumer in this process (the hub is another): fails while ``failing`` is set."""

    def __init__(self, broker: HubBroker, queue_name: str = "work", **policy: Any) -> None:
        self.failing = threading.Event()
        self.done: list[tuple[Message, int]] = []
        self._lock = threading.Lock()
        self.subscription = broker.subscribe_async(Tick, self.handle, queue_name, **policy)

    def handle(self, message: Tick) -> None:
        from ipcbus import AsyncMessageContext

        if self.failing.is_set():
            raise ValueError(f"cannot handle {message.seq}")
        with self._lock:
            self.done.append((message, AsyncMessageContext.current().attempt))


# -- help, usage, unavailable -----------------------------------------------------------------


def test_every_queue_command_lists_its_exit_codes() -> None:
    for command in COMMANDS:
        shown = run_cli(command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert EXIT_CODES in " ".join(shown.stdout.split()), command
        assert "--json" in shown.stdout


def test_usage_unknown_queue_and_unavailable_hub(hub: Hub, tmp_path: Path) -> None:
    for command in COMMANDS[1:]:
        code, _out, err = cli(hub, command, "no-slash-here")
        assert code == 2, (command, err)
        assert "module.Type/queue_name" in err
        code, _out, err = cli(hub, command, "tests.messages.Tick/nobody")
        assert code == 5, (command, err)
        assert "no queue group tests.messages.Tick/nobody" in err
    assert cli(hub, "dead-letters", WORK, "--limit", "-1")[0] == 2
    for args in (["queues"], ["purge", WORK]):
        gone = run_cli(*args, "--address", f"ipc://{tmp_path}/nobody", "--timeout", "0.5")
        assert gone.returncode == 4
        assert "no hub answered" in gone.stderr
    assert run_cli("queues").returncode == 2  # no address at all


# -- queues -----------------------------------------------------------------------------------


def test_queues_shows_each_group(hub: Hub) -> None:
    assert cli_json(hub, "queues") == []
    with HubBroker(hub.address) as broker:
        broker.declare_queue(Blob, "idle")
        worker = Worker(broker)
        for seq in range(20):
            broker.publish(Tick(seq))
            broker.publish(Blob(seq))
        broker.flush(10)
        wait_until(lambda: len(worker.done) == 20)
        wait_until(lambda: queue_row(hub, WORK)["acked"] == 20, timeout=20)
        work, idle = queue_row(hub, WORK), queue_row(hub, "tests.messages.Blob/idle")
        assert (work["consumers"], work["held"], work["in_flight"]) == (1, 0, 0)
        assert (work["published"], work["delivered"], work["redelivered"]) == (20, 20, 0)
        assert (work["dead_letters"], work["dead_letters_evicted"]) == (0, 0)
        assert (work["max_dead_letters"], work["max_dead_letter_bytes"]) == (1000, 64 * 2**20)
        assert work["ack_rate"] >= 0
        assert work["publish_rate"] >= 0
        assert (idle["consumers"], idle["held"], idle["acked"]) == (0, 20, 0)
        code, table, err = cli(hub, "queues")
        assert code == 0, err
        assert "acked/s" in table.splitlines()[0]
        assert any(line.split()[:4] == [WORK, "1", "0", "0"] for line in table.splitlines())
        worker.subscription.cancel()


# -- dead letters and requeue -----------------------------------------------------------------


def test_a_job_that_failed_max_attempts_is_kept_with_its_payload_then_requeued_and_processed(
    hub: Hub,
) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, max_attempts=2, retry_backoff=0.0)
        worker.failing.set()
        broker.publish(Tick(7, "job"))
        broker.flush(10)
        wait_until(lambda: queue_row(hub, WORK)["dead_letters"] == 1, timeout=20)

        listed = cli_json(hub, "dead-letters", WORK)
        assert (listed["kept"], listed["evicted"], listed["max_dead_letters"]) == (1, 0, 1000)
        (dead,) = listed["dead_letters"]
        assert (dead["attempts"], dead["error"]) == (2, "ValueError: cannot handle 7")
        assert dead["decoded"] is True
        assert dead["message"] == {"seq": 7, "source": "job"}
        assert (dead["type"], dead["size"] > 0) == ("tests.messages.Tick", True)
        code, table, err = cli(hub, "dead-letters", WORK)
        assert code == 0, err
        assert dead["message_id"] in table
        assert "Tick(seq=7, source='job')" in table
        row = queue_row(hub, WORK)
        assert (row["dead_lettered"], row["held"], row["in_flight"]) == (1, 0, 0)

        worker.failing.clear()  # the cause is fixed
        requeued = cli_json(hub, "requeue", WORK, "--id", dead["message_id"])
        assert requeued == {"queue": WORK, "requeued": 1, "missing": []}
        wait_until(lambda: worker.done == [(Tick(7, "job"), 1)], timeout=20)  # attempt reset
        assert cli_json(hub, "dead-letters", WORK)["dead_letters"] == []
        wait_until(lambda: queue_row(hub, WORK)["acked"] == 1, timeout=20)
        assert queue_row(hub, WORK)["requeued"] == 1

        code, out, err = cli(hub, "requeue", WORK, "--id", dead["message_id"])  # gone now
        assert code == 5, err
        assert "requeued 0 dead letters" in out
        assert dead["message_id"] in err
        worker.subscription.cancel()


def test_requeue_without_ids_puts_back_every_dead_letter(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, max_attempts=1)
        worker.failing.set()
        for seq in range(5):
            broker.publish(Tick(seq))
        broker.flush(10)
        wait_until(lambda: queue_row(hub, WORK)["dead_letters"] == 5, timeout=20)
        worker.failing.clear()
        code, out, err = cli(hub, "requeue", WORK)
        assert (code, out.strip()) == (0, "requeued 5 dead letters"), err
        wait_until(lambda: len(worker.done) == 5, timeout=20)
        assert sorted(message.seq for message, _attempt in worker.done) == list(range(5))  # type: ignore[attr-defined]
        worker.subscription.cancel()


def test_dead_letters_are_bounded_by_count_and_bytes_and_counted(tmp_path: Path) -> None:
    options = {"max_dead_letters": 3, "max_dead_letter_bytes": 10_000}
    with (
        Hub(f"ipc://{tmp_path}/hub", start_method="fork", **options) as hub,
        HubBroker(hub.address) as broker,
    ):
        worker = Worker(broker, max_attempts=1)
        worker.failing.set()

        def fail(message: Blob) -> None:
            raise ValueError("too big to handle")

        blobs = broker.subscribe_async(Blob, fail, "big", max_attempts=1)
        for seq in range(5):
            broker.publish(Tick(seq))
        broker.publish(Blob(1, b"x" * 20_000))  # alone over the byte bound
        broker.flush(10)
        wait_until(lambda: queue_row(hub, WORK)["dead_lettered"] == 5, timeout=20)
        wait_until(lambda: queue_row(hub, "tests.messages.Blob/big")["dead_lettered"] == 1)
        listed = cli_json(hub, "dead-letters", WORK)
        assert (listed["kept"], listed["evicted"], len(listed["dead_letters"])) == (3, 2, 3)
        assert (listed["max_dead_letters"], listed["max_dead_letter_bytes"]) == (3, 10_000)
        assert len(cli_json(hub, "dead-letters", WORK, "--limit", "2")["dead_letters"]) == 2
        big = queue_row(hub, "tests.messages.Blob/big")
        assert (big["dead_letters"], big["dead_letters_evicted"], big["dead_letter_bytes"]) == (
            0,
            1,
            0,
        )
        code, table, _err = cli(hub, "queues")
        assert code == 0
        assert "3+2" in table
        assert "evicted" in table
        worker.subscription.cancel()
        blobs.cancel()


def test_a_dead_letter_whose_class_is_not_importable_shows_type_and_size(hub: Hub) -> None:
    @dataclass(frozen=True)
    class Local(Message):
        value: int

    def fail(message: Local) -> None:
        raise RuntimeError("no")

    name = f"{Local.__module__}.{Local.__qualname__}"
    with HubBroker(hub.address) as broker:
        subscription = broker.subscribe_async(Local, fail, "local", max_attempts=1)
        broker.publish(Local(1))
        broker.flush(10)
        wait_until(lambda: queue_row(hub, f"{name}/local")["dead_letters"] == 1, timeout=20)
        (dead,) = cli_json(hub, "dead-letters", f"{name}/local")["dead_letters"]
        assert (dead["decoded"], dead["message"], dead["type"]) == (False, None, name)
        assert dead["size"] > 0
        assert "ImportError" in dead["decode_error"]
        code, table, err = cli(hub, "dead-letters", f"{name}/local")
        assert code == 0, err
        assert f"<{name}, {dead['size']} bytes>" in table
        # The Python API hands out the payload; this process has the class.
        (record,) = broker.dead_letters(name, "local")
        assert decode_dead_letter(record, Local) == Local(1)
        with pytest.raises(ImportError):
            decode_dead_letter(record)
        subscription.cancel()


def test_no_decode_never_unpickles(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, max_attempts=1)
        worker.failing.set()
        broker.publish(Tick(3))
        broker.flush(10)
        wait_until(lambda: queue_row(hub, WORK)["dead_letters"] == 1, timeout=20)
        (dead,) = cli_json(hub, "dead-letters", WORK, "--no-decode")["dead_letters"]
        assert (dead["decoded"], dead["message"], dead["type"]) == (
            False,
            None,
            "tests.messages.Tick",
        )
        worker.subscription.cancel()


# -- purge and delete-queue -------------------------------------------------------------------


def test_purge_empties_what_a_group_holds_and_says_how_many(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        broker.declare_queue(Tick, "held")
        for seq in range(50):
            broker.publish(Tick(seq))
        broker.flush(10)
        assert queue_row(hub, "tests.messages.Tick/held")["held"] == 50
        assert cli_json(hub, "purge", "tests.messages.Tick/held") == {
            "queue": "tests.messages.Tick/held",
            "purged": 50,
        }
        row = queue_row(hub, "tests.messages.Tick/held")
        assert (row["held"], row["purged"], row["published"]) == (0, 50, 50)
        code, out, err = cli(hub, "purge", "tests.messages.Tick/held")
        assert (code, out.strip()) == (0, "purged 0 messages"), err
        # The group is still there and holds what comes next.
        broker.publish(Tick(99))
        broker.flush(10)
        assert queue_row(hub, "tests.messages.Tick/held")["held"] == 1


def test_delete_queue_refuses_a_group_in_use(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, queue_name="busy")
        code, _out, err = cli(hub, "delete-queue", "tests.messages.Tick/busy")
        assert code == 6, err
        assert "still has consumers" in err
        assert queue_row(hub, "tests.messages.Tick/busy")["consumers"] == 1
        worker.subscription.cancel()
        wait_until(lambda: queue_row(hub, "tests.messages.Tick/busy")["consumers"] == 0)
        broker.publish(Tick(1))
        broker.flush(10)
        deleted = cli_json(hub, "delete-queue", "tests.messages.Tick/busy")
        assert deleted == {"queue": "tests.messages.Tick/busy", "dropped": 1}
        assert cli_json(hub, "queues") == []
        assert cli(hub, "delete-queue", "tests.messages.Tick/busy")[0] == 5


# -- the Python API ---------------------------------------------------------------------------


def test_the_python_api_of_hub_and_hub_broker(hub: Hub) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, max_attempts=1)
        worker.failing.set()
        broker.publish(Tick(1))
        broker.publish(Tick(2))
        broker.flush(10)
        wait_until(lambda: [q.dead_letters for q in hub.queues()] == [2], timeout=20)
        (stats,) = broker.queues()
        assert (stats.queue, stats.consumers, stats.dead_lettered) == (WORK, 1, 2)
        first, second = hub.dead_letters(Tick, "work")
        assert {decode_dead_letter(first), decode_dead_letter(second)} == {Tick(1), Tick(2)}
        assert first.payload is not None
        assert first.size == len(first.payload)
        worker.failing.clear()
        done = broker.requeue(Tick, "work", [first.message_id, "nope-1"])
        assert (done.requeued, done.missing) == (1, ("nope-1",))
        wait_until(lambda: len(worker.done) == 1, timeout=20)
        assert [r.message_id for r in hub.dead_letters("tests.messages.Tick", "work")] == [
            second.message_id
        ]
        with pytest.raises(UnknownQueueError, match="nobody"):
            hub.purge(Tick, "nobody")
        with pytest.raises(QueueInUseError):
            hub.delete_queue(Tick, "work")
        with pytest.raises(TypeError):
            hub.purge(42, "work")  # type: ignore[arg-type]
        worker.subscription.cancel()
        broker.declare_queue(Tick, "later")
        broker.publish(Tick(3))
        broker.flush(10)
        assert hub.purge(Tick, "later") == 1
    with pytest.raises(BrokerClosedError):
        broker.queues()


# -- hostile admin requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        [],
        [b"nonsense"],
        [admin_wire.QUEUES, b"extra"],
        [admin_wire.PURGE, b"tests.messages.Tick\x00"],
        [admin_wire.PURGE, b"no-terminator", b"work"],
        [admin_wire.PURGE, b"tests.messages.Tick\x00", b"\xff\xfe"],
        [admin_wire.DEAD_LETTERS, b"tests.messages.Tick\x00", b"work", b"-5", b"1"],
        [admin_wire.DEAD_LETTERS, b"tests.messages.Tick\x00", b"work", b"9" * 40, b"1"],
        [admin_wire.REQUEUE, b"tests.messages.Tick\x00", b"work", b"x" * (2**20 + 1)],
        [admin_wire.DELETE, _wire.SYNC_PREFIX + b"x\x00", b"work"],
    ],
    ids=lambda body: repr(body)[:40],
)
def test_a_malformed_admin_request_is_counted_and_dropped(hub: Hub, body: list[bytes]) -> None:
    with HubBroker(hub.address) as broker:
        worker = Worker(broker, max_attempts=1)
        worker.failing.set()
        broker.publish(Tick(1))
        broker.flush(10)
        wait_until(lambda: hub.queues()[0].dead_letters == 1, timeout=20)
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        try:
            dealer.linger = 0
            prove(dealer, read_bus_secret(Address.parse(hub.address)))
            dealer.connect(hub.address)
            before = hub.statistics()
            dealer.send_multipart([_wire.header(admin_wire.QUEUE_ADMIN), *body])
            dealer.send_multipart([_wire.header(_wire.STATS)])  # answered after it, in order
            assert dealer.poll(10_000), "the hub did not answer"
            head, *rest = dealer.recv_multipart()
            assert head == _wire.header(_wire.STATS), "a malformed request was answered"
            after = HubStatistics.from_json(rest[0])
        finally:
            dealer.close(linger=0)
            context.term()
        assert after.malformed_dropped - before.malformed_dropped == 1
        (stats,) = hub.queues()
        assert (stats.dead_letters, stats.consumers, stats.held) == (1, 1, 0)
        worker.subscription.cancel()
