"""Sends of the hub's control plane that never wait (hub process): a reply to one peer, and
an announcement to each client of a set. A peer that left or reads nothing is not waiting."""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

__all__ = ["send_reply", "send_to_each"]

logger = logging.getLogger("ipcbus.server.control")

Socket = zmq.Socket[bytes]


def send_reply(router: Socket, frames: list[bytes]) -> None:
    """Send ``[identity, header, *body]`` without waiting: a peer that left (EHOSTUNREACH) or
    reads nothing (EAGAIN) is not waiting for it."""
    try:
        router.send_multipart(frames, zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        logger.debug("reply to %r dropped: %s", frames[0], exc)


def send_to_each(
    control: Socket, pending: set[bytes], build: Callable[[bytes], list[bytes]]
) -> None:
    """Tell each client in ``pending`` what ``build`` says; one whose pipe is full stays
    pending for the next turn (an announcement lost would leave it with a stale view)."""
    for identity in list(pending):
        try:
            control.send_multipart(build(identity), zmq.NOBLOCK)
        except zmq.Again:
            continue
        except zmq.ZMQError as exc:  # EHOSTUNREACH: gone, the heartbeats will tell
            logger.debug("announcement to %r dropped: %s", identity, exc)
        pending.discard(identity)
