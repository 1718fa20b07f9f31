"""Unit tests of the retry rule (ipcbus.core.retry) and the option records (ipcbus.config)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import pytest

from ipcbus.config import ClientOptions, HubOptions
from ipcbus.core.retry import MAX_RETRY_DELAY, QueuePolicy, Verdict, after_failure

from .messages import OrderPlaced

NAN = float("nan")
INF = float("inf")

# -- QueuePolicy ------------------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = QueuePolicy()
    assert (policy.max_attempts, policy.retry_backoff, policy.prefetch) == (3, 0.05, 1000)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_attempts": 1, "prefetch": 1, "retry_backoff": 0.0},
        {"max_attempts": 1000, "prefetch": 100_000, "retry_backoff": 1e9},
        {"retry_backoff": INF},
        {"retry_backoff": 1},  # an int is a number
    ],
)
def test_policy_accepts(changes: dict[str, Any]) -> None:
    policy = QueuePolicy(**changes)
    for name, value in changes.items():
        assert getattr(policy, name) == value


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prefetch": 0}, "prefetch must be an int >= 1"),
        ({"prefetch": -1}, "prefetch must be an int >= 1"),
        ({"prefetch": 1.0}, "prefetch must be an int >= 1"),
        ({"prefetch": "10"}, "prefetch must be an int >= 1"),
        ({"prefetch": None}, "prefetch must be an int >= 1"),
        ({"max_attempts": 0}, "max_attempts must be an int >= 1"),
        ({"max_attempts": -3}, "max_attempts must be an int >= 1"),
        ({"max_attempts": 2.5}, "max_attempts must be an int >= 1"),
        ({"max_attempts": "3"}, "max_attempts must be an int >= 1"),
        ({"retry_backoff": -0.001}, "retry_backoff must be >= 0"),
        ({"retry_backoff": -INF}, "retry_backoff must be >= 0"),
        ({"retry_backoff": NAN}, "retry_backoff must be >= 0"),
    ],
)
def test_policy_refuses(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QueuePolicy(**changes)


def test_policy_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QueuePolicy().max_attempts = 5  # type: ignore[misc]


@pytest.mark.parametrize("attempt", [-1, 0, 1])
def test_the_first_attempt_does_not_wait(attempt: int) -> None:
    assert QueuePolicy(retry_backoff=2.0).delay_before(attempt) == 0.0


def test_delays_double_from_the_backoff() -> None:
    policy = QueuePolicy(retry_backoff=0.5)
    assert [policy.delay_before(attempt) for attempt in range(1, 7)] == [
        0.0,
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
    ]


def test_delays_are_capped() -> None:
    policy = QueuePolicy(retry_backoff=1.0)
    assert policy.delay_before(10) == 256.0
    assert policy.delay_before(11) == MAX_RETRY_DELAY
    assert policy.delay_before(50) == MAX_RETRY_DELAY


def test_a_zero_backoff_never_waits() -> None:
    policy = QueuePolicy(retry_backoff=0.0)
    assert {policy.delay_before(attempt) for attempt in (2, 3, 100, 10**6)} == {0.0}


@pytest.mark.parametrize("backoff", [1e-9, 0.05, 1e6, 1e300, 1.7976931348623157e308, INF])
def test_huge_attempts_and_backoffs_do_not_overflow(backoff: float) -> None:
    policy = QueuePolicy(retry_backoff=backoff, max_attempts=10**6)
    delay = policy.delay_before(10**6)
    assert isinstance(delay, float)
    assert 0.0 < delay <= MAX_RETRY_DELAY
    assert not math.isnan(delay)


def test_delays_never_decrease() -> None:
    policy = QueuePolicy(retry_backoff=0.003)
    delays = [policy.delay_before(attempt) for attempt in range(1, 200)]
    assert delays == sorted(delays)
    assert delays[-1] == MAX_RETRY_DELAY


# -- after_failure ----------------------------------------------------------------------------


def raised(text: str) -> BaseException:
    try:
        raise ValueError(text)
    except ValueError as exc:
        return exc


def handler(message: OrderPlaced) -> None:
    """A named handler, for the log line."""


def test_after_failure_retries_with_the_next_attempts_delay_until_max_attempts() -> None:
    policy = QueuePolicy(max_attempts=4, retry_backoff=0.25)
    message = OrderPlaced(1)
    verdicts = [
        after_failure(policy, "workers", handler, message, attempt, raised(f"attempt {attempt}"))
        for attempt in (1, 2, 3, 4, 5)
    ]
    assert verdicts == [
        Verdict(retry=True, delay=0.25),
        Verdict(retry=True, delay=0.5),
        Verdict(retry=True, delay=1.0),
        Verdict(retry=False, delay=0.0),
        Verdict(retry=False, delay=0.0),
    ]


def test_a_single_attempt_is_never_retried() -> None:
    policy = QueuePolicy(max_attempts=1)
    verdict = after_failure(policy, "workers", handler, OrderPlaced(1), 1, raised("once"))
    assert verdict == Verdict(retry=False, delay=0.0)


def test_after_failure_logs_once_at_error_with_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = raised("the handler's own words")
    policy = QueuePolicy(max_attempts=3)
    with caplog.at_level(logging.DEBUG, logger="ipcbus.core.retry"):
        after_failure(policy, "shipping", handler, OrderPlaced(77), 2, exc)
    records = [record for record in caplog.records if record.name == "ipcbus.core.retry"]
    assert len(records) == 1
    (record,) = records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[1] is exc
    text = record.getMessage()
    assert "'shipping'" in text
    assert "OrderPlaced(order_id=77" in text
    assert "attempt 2 of 3" in text
    assert "handler" in text
    assert "Traceback (most recent call last)" in caplog.text
    assert "ValueError: the handler's own words" in caplog.text


def test_the_last_attempt_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ipcbus.core.retry"):
        after_failure(QueuePolicy(max_attempts=2), "q", handler, OrderPlaced(5), 2, raised("x"))
    assert [record.getMessage().endswith("(attempt 2 of 2)") for record in caplog.records] == [True]


# -- HubOptions -------------------------------------------------------------------------------


def test_hub_option_defaults() -> None:
    options = HubOptions()
    assert dataclasses.asdict(options) == {
        "hwm": 1000,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 3.0,
        "max_held": 100_000,
        "max_held_bytes": 1024 * 1024 * 1024,
        "max_message_size": 256 * 1024 * 1024,
        "handshake_timeout": 5.0,
        "drain_timeout": 5.0,
        "stall_timeout": 30.0,
        "restart_grace": 1.0,
        "max_pending_handshakes": 256,
        "max_dead_letters": 1000,
        "max_dead_letter_bytes": 64 * 1024 * 1024,
        "metrics_port": None,
        "metrics_host": "127.0.0.1",
        "tcp_publish_port": 0,
        "tcp_fanout_port": 0,
        "journal": None,
        "journal_fsync": True,
        "journal_max_bytes": 1024 * 1024 * 1024,
        "spool": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        "spool_linger": 60.0,
    }
    assert HubOptions.names() == tuple(dataclasses.asdict(options))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hwm": 0}, "hwm must be > 0"),
        ({"metrics_port": 65536}, "metrics_port must be a port number"),
        ({"tcp_fanout_port": -1}, "tcp_fanout_port must be a port number"),
        ({"hwm": -5}, "hwm must be > 0"),
        ({"heartbeat_interval": 0.0}, "heartbeat_interval must be > 0"),
        ({"heartbeat_interval": NAN}, "heartbeat_interval must be > 0"),
        ({"heartbeat_timeout": -1.0}, "heartbeat_timeout must be > 0"),
        ({"max_held": 0}, "max_held must be > 0"),
        ({"max_held_bytes": 0}, "max_held_bytes must be > 0"),
        ({"max_dead_letters": 0}, "max_dead_letters must be > 0"),
        ({"max_dead_letter_bytes": -1}, "max_dead_letter_bytes must be > 0"),
        ({"max_message_size": 0}, "max_message_size must be > 0"),
        ({"handshake_timeout": 0}, "handshake_timeout must be > 0"),
        ({"stall_timeout": -0.1}, "stall_timeout must be > 0"),
        ({"drain_timeout": -1.0}, "drain_timeout and restart_grace must be >= 0"),
        ({"restart_grace": -0.5}, "drain_timeout and restart_grace must be >= 0"),
        ({"heartbeat_timeout": 0.5}, "heartbeat_timeout must be longer than heartbeat_interval"),
        (
            {"heartbeat_interval": 4.0, "heartbeat_timeout": 3.0},
            "heartbeat_timeout must be longer than heartbeat_interval",
        ),
    ],
)
def test_hub_options_refuse(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HubOptions(**changes)


def test_hub_options_accept_zero_drain_and_grace() -> None:
    options = HubOptions(drain_timeout=0.0, restart_grace=0.0)
    assert (options.drain_timeout, options.restart_grace) == (0.0, 0.0)


@pytest.mark.parametrize(
    ("record", "name"),
    [(HubOptions, "drain_timeout"), (HubOptions, "restart_grace"), (ClientOptions, "linger")],
)
def test_options_refuse_nan_where_zero_is_allowed(record: type, name: str) -> None:
    with pytest.raises(ValueError):
        record(**{name: NAN})


def test_hub_options_with_changes_and_checks_again() -> None:
    options = HubOptions()
    changed = options.with_(hwm=10, drain_timeout=0.5)
    assert (changed.hwm, changed.drain_timeout) == (10, 0.5)
    assert changed.heartbeat_timeout == options.heartbeat_timeout
    assert options.hwm == 1000  # the original is unchanged
    with pytest.raises(ValueError, match="heartbeat_timeout must be longer"):
        options.with_(heartbeat_interval=3.0)
    with pytest.raises(TypeError):
        options.with_(no_such_option=1)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        HubOptions().hwm = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClientOptions().linger = 1.0  # type: ignore[misc]


# -- ClientOptions ----------------------------------------------------------------------------


def test_client_option_defaults() -> None:
    options = ClientOptions()
    assert dataclasses.asdict(options) == {
        "connect_timeout": 10.0,
        "subscribe_timeout": 30.0,
        "publish_timeout": None,
        "linger": 10.0,
        "max_pending": 10_000,
        "max_batch": 1000,
        "hwm": 1000,
        "dispatch_queue": 64,
        "hub_lost_timeout": 30.0,
        "on_hub_state": None,
    }
    assert ClientOptions.names() == tuple(dataclasses.asdict(options))


def test_client_timeouts_may_be_none_and_linger_zero() -> None:
    options = ClientOptions(connect_timeout=None, subscribe_timeout=None, linger=0.0)
    assert (options.connect_timeout, options.subscribe_timeout, options.linger) == (
        None,
        None,
        0.0,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_pending": 0}, "max_pending must be > 0"),
        ({"max_batch": -1}, "max_batch must be > 0"),
        ({"hwm": 0}, "hwm must be > 0"),
        ({"dispatch_queue": 0}, "dispatch_queue must be > 0"),
        ({"linger": -0.1}, "linger must be >= 0"),
    ],
)
def test_client_options_refuse(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientOptions(**changes)


def test_client_options_with() -> None:
    options = ClientOptions().with_(publish_timeout=2.5, max_batch=7)
    assert (options.publish_timeout, options.max_batch) == (2.5, 7)
    assert options.linger == 10.0
    with pytest.raises(ValueError, match="max_pending must be > 0"):
        options.with_(max_pending=0)


def test_a_failure_log_line_shows_a_big_payload_by_its_size() -> None:
    """A 16 MB field logged whole made a 64 MB log line per failed attempt."""
    from dataclasses import dataclass

    from ipcbus import DeadLetter, Message
    from ipcbus.core.failures import Brief

    @dataclass(frozen=True)
    class Upload(Message):
        name: str
        data: bytes

    small = Upload("a.png", b"x")
    assert repr(Brief(small)) == repr(small)
    big = DeadLetter("q", Upload("b.png", bytes(16 * 1024 * 1024)), 3, "ValueError: " + "e" * 10**6)
    text = repr(Brief(big))
    assert "<bytes of 16777216 bytes>" in text
    assert "Upload(name='b.png'" in text
    assert len(text) < 1000
