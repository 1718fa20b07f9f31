"""Unit tests of the bus secret and the ZAP decision (ipcbus.wire.keys); files in tmp_path only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from ipcbus.exceptions import HubUnavailableError, InsecurePathError
from ipcbus.wire import keys
from ipcbus.wire.address import Address
from ipcbus.wire.keys import (
    USERNAME,
    admits,
    load_or_create_secret,
    read_bus_secret,
    read_secret,
)

SECRET = b"0123456789abcdef" * 4
OTHER_SECRET = b"fedcba9876543210" * 4


def client_public_key(secret: bytes) -> bytes:
    """The raw 32-byte public key a ZAP request carries for a CURVE client holding ``secret``."""
    return z85.decode(keys._curve_pair(secret, b"client")[0])


def ipc_address(directory: Path) -> Address:
    return Address.parse(f"ipc://{directory}/hub.sock")


def write_file(path: Path, content: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


# -- admits -----------------------------------------------------------------------------------


def test_curve_with_the_derived_client_key_is_admitted() -> None:
    key = client_public_key(SECRET)
    assert len(key) == 32
    assert admits(SECRET, b"CURVE", [key]) is True


@pytest.mark.parametrize(
    "credentials",
    [
        [client_public_key(OTHER_SECRET)],  # another bus
        [z85.decode(keys._curve_pair(SECRET, b"server")[0])],  # the server's own key
        [z85.decode(zmq.curve_keypair()[0])],  # any other key
        [keys._curve_pair(SECRET, b"client")[0]],  # the Z85 text, not the key
        [bytes(32)],
        [],
        [client_public_key(SECRET), client_public_key(SECRET)],
    ],
)
def test_curve_with_any_other_key_is_refused(credentials: list[bytes]) -> None:
    assert admits(SECRET, b"CURVE", credentials) is False


@pytest.mark.parametrize(
    "credentials",
    [
        [USERNAME, SECRET],  # even the right username and secret: PLAIN puts it on the wire
        [USERNAME, OTHER_SECRET],  # wrong secret
        [b"admin", SECRET],  # wrong username
        [USERNAME],  # wrong credential count
        [USERNAME, SECRET, SECRET],
        [client_public_key(SECRET)],
        [],
    ],
)
def test_plain_is_refused(credentials: list[bytes]) -> None:
    assert admits(SECRET, b"PLAIN", credentials) is False


@pytest.mark.parametrize(
    ("mechanism", "credentials"),
    [
        (b"NULL", []),
        (b"GSSAPI", [USERNAME, SECRET]),
        (b"curve", [client_public_key(SECRET)]),  # mechanisms are case-sensitive
        (b"", [client_public_key(SECRET)]),
        (b"CURVE", [USERNAME, SECRET]),  # PLAIN credentials under CURVE
    ],
)
def test_other_mechanisms_are_refused(mechanism: bytes, credentials: list[bytes]) -> None:
    assert admits(SECRET, mechanism, credentials) is False


def test_curve_pairs_are_derived_per_role_and_secret() -> None:
    server_public, server_secret = keys._curve_pair(SECRET, b"server")
    client_public, _ = keys._curve_pair(SECRET, b"client")
    assert keys._curve_pair(SECRET, b"server") == (server_public, server_secret)  # stable
    assert server_public != client_public
    assert keys._curve_pair(OTHER_SECRET, b"server")[0] != server_public
    assert zmq.curve_public(server_secret) == server_public


# -- creating and reading the key file --------------------------------------------------------


def test_load_or_create_secret_creates_a_0600_file(tmp_path: Path) -> None:
    address = ipc_address(tmp_path)
    secret = load_or_create_secret(address)
    assert len(secret) == 64
    int(secret, 16)  # hex
    key = tmp_path / "hub.sock.key"
    assert address.key_file == str(key)
    assert key.read_bytes() == secret
    info = key.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    assert read_secret(str(key)) == secret
    assert read_bus_secret(address) == secret


def test_each_new_key_file_gets_a_new_secret(tmp_path: Path) -> None:
    first = load_or_create_secret(Address.parse(f"ipc://{tmp_path}/a"))
    second = load_or_create_secret(Address.parse(f"ipc://{tmp_path}/b"))
    assert first != second


def test_load_or_create_secret_reuses_an_existing_file(tmp_path: Path) -> None:
    address = ipc_address(tmp_path)
    first = load_or_create_secret(address)
    assert load_or_create_secret(address) == first
    assert Path(address.key_file).read_bytes() == first


def test_an_existing_secret_written_by_hand_is_reused(tmp_path: Path) -> None:
    address = ipc_address(tmp_path)
    write_file(Path(address.key_file), OTHER_SECRET + b"\n")  # a trailing newline is tolerated
    assert load_or_create_secret(address) == OTHER_SECRET
    assert read_secret(address.key_file) == OTHER_SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o601, 0o610])
def test_a_key_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    address = ipc_address(tmp_path)
    load_or_create_secret(address)
    os.chmod(address.key_file, mode)
    with pytest.raises(HubUnavailableError, match="mode 0600"):
        read_secret(address.key_file)
    with pytest.raises(HubUnavailableError, match="mode 0600"):
        load_or_create_secret(address)
    with pytest.raises(HubUnavailableError, match="mode 0600"):
        read_bus_secret(address)


def test_a_0400_key_file_is_accepted(tmp_path: Path) -> None:
    address = ipc_address(tmp_path)
    secret = load_or_create_secret(address)
    os.chmod(address.key_file, 0o400)
    assert read_secret(address.key_file) == secret


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    write_file(target, SECRET)
    address = ipc_address(tmp_path)
    link = Path(address.key_file)
    link.symlink_to(target)
    assert read_secret(str(target)) == SECRET
    with pytest.raises(HubUnavailableError, match="symbolic link"):
        read_secret(str(link))
    with pytest.raises(HubUnavailableError, match="symbolic link"):
        load_or_create_secret(address)  # it exists: never followed, never replaced
    assert link.is_symlink()
    assert target.read_bytes() == SECRET


def test_a_dangling_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    address = ipc_address(tmp_path)
    Path(address.key_file).symlink_to(target)
    with pytest.raises(HubUnavailableError):
        load_or_create_secret(address)
    assert not target.exists()  # O_EXCL: no file created through the link


@pytest.mark.parametrize(
    "content",
    [b"", b"short", SECRET[:-1], SECRET + b"0", SECRET + b" extra", b"x" * 200],
)
def test_a_key_file_of_the_wrong_length_is_refused(tmp_path: Path, content: bytes) -> None:
    address = ipc_address(tmp_path)
    write_file(Path(address.key_file), content)
    with pytest.raises(HubUnavailableError, match="does not hold an ipcbus secret"):
        read_secret(address.key_file)
    with pytest.raises(HubUnavailableError, match="does not hold an ipcbus secret"):
        load_or_create_secret(address)


def test_a_missing_key_file_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(HubUnavailableError, match="is a hub running") as caught:
        read_secret(str(tmp_path / "absent.key"))
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(HubUnavailableError, match="is a hub running"):
        read_bus_secret(ipc_address(tmp_path))


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    address = ipc_address(tmp_path)
    Path(address.key_file).mkdir(mode=0o700)
    with pytest.raises(HubUnavailableError, match="not a regular file"):
        read_secret(address.key_file)
    with pytest.raises(HubUnavailableError, match="not a regular file"):
        load_or_create_secret(address)


def test_a_home_directory_others_may_write_to_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(0o770)
    address = ipc_address(home)
    with pytest.raises(InsecurePathError, match="writable by other users"):
        load_or_create_secret(address)
    assert not Path(address.key_file).exists()
    with pytest.raises(HubUnavailableError, match="refusing the hub's directory"):
        read_bus_secret(address)


def test_a_missing_home_directory_is_refused(tmp_path: Path) -> None:
    address = ipc_address(tmp_path / "absent")
    with pytest.raises(InsecurePathError, match="cannot check"):
        load_or_create_secret(address)
    with pytest.raises(HubUnavailableError, match="refusing the hub's directory"):
        read_bus_secret(address)
