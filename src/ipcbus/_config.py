"""The one place that reads (and writes) the environment."""

from __future__ import annotations

import os

__all__ = ["ENV_ADDRESS", "address_from_env", "export_address"]

ENV_ADDRESS = "IPCBUS_ADDRESS"


def address_from_env() -> str | None:
    """The hub address children and hand-started scripts find the hub by, if any."""
    return os.environ.get(ENV_ADDRESS) or None


def export_address(address: str) -> None:
    """Set ``IPCBUS_ADDRESS`` in this process when it is unset, so later children inherit it."""
    os.environ.setdefault(ENV_ADDRESS, address)
