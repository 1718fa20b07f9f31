"""The hub's quiet sockets (server/quiet_sockets.py): polled by their ZMQ_FD, read before the
first poll, and looked at again, without waiting, when a read left something behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from ipcbus.server.quiet_sockets import QuietSockets

Pair = tuple[zmq.Socket[bytes], zmq.Socket[bytes]]


@pytest.fixture
def pair() -> Iterator[Pair]:
    context = zmq.Context()
    reader, writer = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    reader.bind("inproc://quiet")
    writer.connect("inproc://quiet")
    try:
        yield reader, writer
    finally:
        reader.close(linger=0)
        writer.close(linger=0)
        context.term()


def _poll(quiet: QuietSockets, timeout_ms: int) -> list[zmq.Socket[bytes]]:
    poller = zmq.Poller()
    quiet.register(poller)
    return quiet.ready(dict(poller.poll(0 if quiet.pending else timeout_ms)))


def _drain(sock: zmq.Socket[bytes], most: int = 1000) -> int:
    read = 0
    while read < most:
        try:
            sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        read += 1
    return read


def test_what_came_before_the_first_poll_is_read(pair: Pair) -> None:
    reader, writer = pair
    writer.send(b"early")  # the reader never read: ZeroMQ will not signal its descriptor
    quiet = QuietSockets([reader])
    assert quiet.pending
    assert _poll(quiet, 1000) == [reader]
    assert _drain(reader) == 1
    quiet.read(reader)
    assert not quiet.pending


def test_a_read_cut_short_is_taken_up_next_turn_without_a_signal(pair: Pair) -> None:
    reader, writer = pair
    quiet = QuietSockets([reader])
    assert _poll(quiet, 0) == [reader]
    _drain(reader)
    quiet.read(reader)  # empty: the descriptor is armed
    assert _poll(quiet, 0) == []
    for number in range(5):
        writer.send(b"%d" % number)
    assert _poll(quiet, 5000) == [reader]  # the descriptor signalled
    assert _drain(reader, most=2) == 2  # a burst cut short
    quiet.read(reader)
    assert quiet.pending  # three are left: the next poll does not wait for a signal
    assert _poll(quiet, 5000) == [reader]
    assert _drain(reader) == 3
    quiet.read(reader)
    assert not quiet.pending
    assert _poll(quiet, 0) == []
