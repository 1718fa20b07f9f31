"""The exit codes of every ``ipcbus`` subcommand, named (dramatiq's habit) so that scripts can
tell failures apart. A module of its own so that the subcommands kept outside ``cli`` (``worker``,
``tail``) return the same codes without importing ``cli``, which registers them."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["EPILOG", "ExitCode"]


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # anything else went wrong (the message says what)
    USAGE = 2  # bad arguments (argparse's own code)
    ADDRESS = 3  # a malformed address; for `ipcbus hub` also one unsafe or already served
    UNAVAILABLE = 4  # no hub answered


EPILOG = "exit codes: " + ", ".join(f"{code.value} {code.name.lower()}" for code in ExitCode)
