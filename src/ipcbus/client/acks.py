"""The acks a client's queue handlers produce, collected until the I/O thread takes them.

Any thread adds; whoever flushes hands the I/O thread one list. Before they are sent,
neighbouring answers of one delivery stream with the same outcome become one range
(``coalesce``: a whole run acknowledged in one entry, several runs too when they follow each
other): the ACK frames, not the handlers, cost most of what a queue message cost before (pyzmq
spends 3-6 µs per frame on the 2-core machine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..wire import protocol as wire

__all__ = ["AckBuffer", "coalesce"]


def coalesce(answers: list[wire.Ack]) -> list[wire.Ack]:
    """The same answers in fewer entries: ranges of one stream that follow each other with the
    same outcome (and delay and error) become one."""
    if len(answers) < 2:
        return answers
    ordered = sorted(answers, key=lambda ack: (ack.stream, ack.first))
    merged = [ordered[0]]
    for ack in ordered[1:]:
        last = merged[-1]
        if (
            ack.stream == last.stream
            and ack.first == last.last + 1
            and ack.outcome == last.outcome
            and ack.retry_delay == last.retry_delay
            and ack.error == last.error
        ):
            merged[-1] = wire.Ack(
                last.stream, last.first, ack.last, last.outcome, last.retry_delay, last.error
            )
        else:
            merged.append(ack)
    return merged


class AckBuffer:
    def __init__(self, send: Callable[[list[wire.Ack]], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._answers: list[wire.Ack] = []
        self.flush_scheduled = False  # the event loop has a flush queued (see QueueRunner)

    def add(self, answer: wire.Ack) -> None:
        with self._lock:
            self._answers.append(answer)

    def extend(self, answers: list[wire.Ack]) -> None:
        with self._lock:
            self._answers += answers

    def __len__(self) -> int:
        return len(self._answers)

    def flush(self) -> None:
        """Hand what was collected to the I/O thread (any thread may call it)."""
        with self._lock:
            answers, self._answers = self._answers, []
            self.flush_scheduled = False
        if answers:
            self._send(answers)  # merged where they meet the I/O thread (IOThread.ack)
