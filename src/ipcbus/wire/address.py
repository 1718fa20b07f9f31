"""A hub's address, parsed once: ``ipc:///path/to/socket`` or ``tcp://host:port``.

Every other module asks an :class:`Address` what it needs (its data endpoints, the socket files,
where the hub keeps its key file) instead of looking at prefixes itself.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from .paths import check_directory, ensure_private_directory

__all__ = ["Address"]

IPC = "ipc"
TCP = "tcp"


@dataclass(frozen=True)
class Address:
    """A parsed hub address; ``str(address)`` is the text it was parsed from."""

    text: str
    scheme: str
    path: str = ""  # ipc: the control socket's file
    host: str = ""  # tcp: without the brackets of an IPv6 literal
    port: str = ""  # tcp: digits

    @classmethod
    def parse(cls, text: str | Address) -> Address:
        """``ValueError`` for anything but a well-formed ``ipc://`` or ``tcp://`` address."""
        if isinstance(text, Address):
            return text
        if not isinstance(text, str):
            raise TypeError(f"a hub address is a str, not {type(text).__name__}")
        scheme, separator, rest = text.partition("://")
        if separator and scheme == IPC:
            if not rest or "\x00" in rest:
                raise ValueError(f"an ipc address needs a path: {text!r}")
            return cls(text, IPC, path=rest)
        if separator and scheme == TCP:
            host, colon, port = rest.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            # isdigit() is true for non-ASCII digits, which int() accepts too.
            digits = port.isascii() and port.isdigit()
            # Port 0: the hub picks one when it binds, and reports the address it got.
            if not colon or not host or not digits or not 0 <= int(port) < 65536:
                raise ValueError(f"a tcp address needs a host and a port: {text!r}")
            return cls(text, TCP, host=host, port=port)
        raise ValueError(f"unsupported address {text!r}: use ipc:// or tcp://")

    def __str__(self) -> str:
        return self.text

    @property
    def is_ipc(self) -> bool:
        return self.scheme == IPC

    @property
    def is_tcp(self) -> bool:
        return self.scheme == TCP

    @property
    def _bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def picks_port(self) -> bool:
        """A tcp address with port 0: the hub serves at a port the system picks."""
        return self.is_tcp and int(self.port) == 0

    def with_port(self, port: int) -> Address:
        """The same tcp host at ``port``."""
        return Address.parse(f"tcp://{self._bracketed_host}:{port}")

    def data_endpoints(self, publish_port: int = 0, fanout_port: int = 0) -> tuple[str, str]:
        """Where the hub binds its publish and fan-out sockets, beside its control socket.

        For tcp, a port of 0 is chosen by the system at bind time; the hub reports the endpoints
        it got in WELCOME."""
        if self.is_ipc:
            return f"ipc://{self.path}.in", f"ipc://{self.path}.pub"
        host = self._bracketed_host
        return (
            f"tcp://{host}:{publish_port or '*'}",
            f"tcp://{host}:{fanout_port or '*'}",
        )

    def socket_files(self) -> tuple[str, ...]:
        """The files of the hub's sockets (none for tcp)."""
        if not self.is_ipc:
            return ()
        return self.path, self.path + ".in", self.path + ".pub"

    @property
    def home(self) -> str:
        """The directory of the hub's files: the ipc socket's; for tcp a per-user directory of
        the temporary directory (copy the key file to the same place on other machines)."""
        if self.is_ipc:
            return os.path.dirname(os.path.abspath(self.path))
        return os.path.join(tempfile.gettempdir(), f"ipcbus-{os.getuid()}")

    def check_home(self) -> None:
        """Refuse (``InsecurePathError``) a home directory another user could control; the tcp
        one is created, mode 0700, if it does not exist."""
        if self.is_ipc:
            check_directory(self.home)
        else:
            ensure_private_directory(self.home)

    def hub_file(self, suffix: str) -> str:
        """Where the hub at this address keeps a file (its key, its queue groups, its lock):
        beside an ipc socket; for tcp in the per-user directory (see ``home``). Call
        ``check_home()`` before trusting it."""
        if self.is_ipc:
            return self.path + suffix
        return os.path.join(self.home, f"tcp-{self.host}-{self.port}{suffix}")

    @property
    def key_file(self) -> str:
        return self.hub_file(".key")


def endpoint_file(endpoint: str) -> str | None:
    """The file of an ipc endpoint the hub reports (``None`` for tcp)."""
    scheme, _, rest = endpoint.partition("://")
    return rest if scheme == IPC else None
