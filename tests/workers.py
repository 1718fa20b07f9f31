"""Imported by worker processes only (never by the test session itself, whose registry would
otherwise bind this module-level Consumer to every broker of every test)."""

from __future__ import annotations

import os

from ipcbus import Consumer, get_message_broker

from .messages import Ping, Pong

pings = Consumer(Ping)


@pings.on_message
def answer(message: Ping) -> None:
    get_message_broker().publish(Pong(message.token, os.getpid()))
