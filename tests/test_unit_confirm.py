"""What a client keeps of what the hub has not confirmed (client/confirm.py), without a hub."""

from __future__ import annotations

import logging

import pytest

from ipcbus.client.confirm import Unconfirmed
from ipcbus.client.outbox import FlushMarker, Outbox
from ipcbus.wire import protocol as wire

from .hubtools import paired_channel

TICK = wire.topic_for("app.Tick")
JOB = wire.topic_for("app.Job")


def test_a_confirmation_drops_what_was_sent_before_it() -> None:
    window = Unconfirmed()
    window.sent(10, TICK, 10, None)
    window.sent(15, JOB, 5, [b"job-request"])
    window.sent(20, TICK, 5, None)
    window.confirmed(15)
    assert [entry[0] for entry in window.window] == [20]


def test_confirmations_are_asked_every_32_batches_of_1024_messages_one_at_a_time() -> None:
    window = Unconfirmed()
    assert window.ask(0.0) is None  # nothing to confirm
    for position in range(1, 32):
        window.sent(position * 32, TICK, 32, None)
    assert window.ask(window._oldest) is None  # 31 batches, 992 messages, no time passed
    window.sent(32 * 32, TICK, 32, None)
    token = window.ask(window._oldest)
    assert token is not None
    window.sent(33 * 32, TICK, 32, None)
    assert window.ask(window._oldest + 10) is None  # one request outstanding
    window.confirmed(32 * 32)
    assert window.ask(window._oldest + 0.2) is None
    assert window.ask(window._oldest + 0.26) is not None  # what is left, after 0.25 s


def test_a_quiet_publisher_asks_by_time_not_every_32_messages() -> None:
    """On a quiet bus every message is a batch: asking every 32 put a confirmation, and its
    answer waking the I/O thread, into 1 round trip in 32 (30-60 % of the slowest 1 %)."""
    window = Unconfirmed()
    for position in range(1, 1001):
        window.sent(position, TICK, 1, None)
        assert window.ask(window._oldest) is None, f"asked at message {position}"
    assert window.ask(window._oldest + 0.26) is not None


def test_a_new_hub_gets_the_queue_messages_again_and_broadcast_is_in_doubt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    window = Unconfirmed()
    window.sent(100, TICK, 100, None)  # confirmed below
    window.confirmed(100)
    window.sent(110, TICK, 10, None)
    window.sent(113, JOB, 3, [b"job-request"])
    window.sent(120, TICK, 7, None)
    with caplog.at_level(logging.WARNING, logger="ipcbus.client.confirm"):
        window.replaced()
    assert window.in_doubt == {"app.Tick": 17}
    assert window.in_doubt_total == 17
    assert list(window.resend) == [[b"job-request"]]
    assert "17 broadcast messages (app.Tick: 17)" in caplog.text
    assert "3 queue messages" in caplog.text
    # No confirmation is asked before what waits to go again has gone: it would cover it.
    assert window.ask(window._oldest + 10) is None
    # Sent again and still unconfirmed: a second dead hub sends it again, once.
    window.replaced()
    assert list(window.resend) == [[b"job-request"]]
    assert window.in_doubt_total == 17
    window.confirmed(200)
    assert not window.window


def test_a_flush_asked_again_of_a_new_hub_is_not_confirmed_by_the_old_request() -> None:
    """The first FLUSH may still be in the data pipe ZeroMQ hands to the next hub, before what
    the client sends again: its answer must not count as the answer to the request asked
    again."""
    outbox = Outbox(1000, lambda rejected: None)
    marker = FlushMarker(b"7")
    outbox.append(marker)
    assert outbox.take() == wire.flush(b"7")
    outbox.resend_flushes()
    again = outbox.take()
    assert again is not None
    assert again != wire.flush(b"7")
    outbox.flushed(b"7")  # the answer to the first request, through the old pipe
    assert not marker.done.is_set()
    outbox.flushed(again[1])
    assert marker.done.is_set()


def test_only_the_hub_that_welcomed_the_client_confirms_a_flush() -> None:
    """A FLUSH still in the data pipe when the hub died reaches the next hub, which may answer
    it before the client has read its WELCOME: that answer would confirm, after the batches the
    pipe handed over, the ones the dead hub lost in its socket buffers (never sent again). The
    client takes a FLUSHED only from the hub that welcomed it; the flush is asked again, under a
    new token, once the new hub has (Outbox.resend_flushes)."""

    from ipcbus.client.data import DataChannel
    from ipcbus.client.session import Session

    outbox = Outbox(1000, lambda rejected: None)
    session = Session("ipc://test")
    session.hub_id = b"dead-hub"
    channel = DataChannel(outbox, session, lambda: None, lambda: None, 10_000)
    with paired_channel(channel, "flushed-by-whom") as (hub_side, client_side):
        marker = FlushMarker(b"7")
        outbox.append(marker)
        channel.pump()
        assert hub_side.poll(1000)
        assert hub_side.recv_multipart() == wire.flush(b"7")
        # The new hub answers the request it found in the pipe, before its WELCOME is read.
        hub_side.send_multipart(wire.flushed(b"", b"7", b"new-hub")[1:])
        assert client_side.poll(1000)
        channel.pump()
        assert not marker.done.is_set()
        assert outbox.flushes, "the old request was forgotten"
        # Its WELCOME read: the flush is asked again, and the new hub's answer counts.
        session.hub_id = b"new-hub"
        outbox.resend_flushes()
        channel.pump()
        assert hub_side.poll(1000)
        token = hub_side.recv_multipart()[1]
        assert token != b"7"
        hub_side.send_multipart(wire.flushed(b"", token, b"new-hub")[1:])
        assert client_side.poll(1000)
        channel.pump()
        assert marker.done.is_set()
