"""One service per data folder and per port.

Two servers on one data folder would each run every queued job (twice the work, two writers of
one checkpoint); two on one port would split the clients between two job stores at random. So
a server holds an exclusive lock on `<data folder>/chainrule.lock` for as long as it runs, and
binds its port without SO_REUSEPORT. The second server is refused before it opens the store or
starts Ray, with a message naming who holds the folder or which port is taken.

The lock is flock(2): the kernel drops it when its holder exits, SIGKILL included, so a crash
never leaves a stale lock behind; the file only says who holds it (PID, address, since when).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

LOCK_FILE = "chainrule.lock"
UNIX_PREFIX = "unix:"


class AlreadyInUse(OSError):
    """The data folder or the port is another server's: the message says whose or which."""


class DataFolderLock:
    """The exclusive lock on one data folder, held from `acquire` to `release`."""

    def __init__(self, path: Path, descriptor: int):
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def acquire(cls, data_dir: str | Path, address: str) -> DataFolderLock:
        """Lock `data_dir` for this process, or AlreadyInUse naming the holder."""
        path = Path(data_dir) / LOCK_FILE
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # in a private folder
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise AlreadyInUse(f"the data folder {data_dir} is in use by another chainrule "
                               f"server ({_describe_holder(path)}); stop it, or give this one "
                               f"another --data-dir") from None
        lock = cls(path, descriptor)
        lock.record(address)
        return lock

    def record(self, address: str) -> None:
        """Say who holds the lock (written again once the port is known)."""
        if self._descriptor is None:
            return
        holder = json.dumps({"pid": os.getpid(), "address": address, "since": time.time()})
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, holder.encode(), 0)

    def release(self) -> None:
        """Unlock (idempotent). The file stays: removing it would let a third server lock a
        new file while a second one still waits on the old one."""
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor drops the flock
            self._descriptor = None


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"PID {holder['pid']}, serving {holder['address']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its PID is not recorded yet"  # it is writing the file this very moment


def check_port_free(address: str, option: str = "--address") -> None:
    """AlreadyInUse naming the port (and the `option` that chose it) when something listens
    on any address `address` resolves to. gRPC alone would not say: on a name with several
    addresses (localhost: 127.0.0.1 and ::1) it serves on whichever it could bind, and counts
    that as success."""
    if address.startswith(UNIX_PREFIX):
        _check_socket_free(unix_socket_path(address))
        return
    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    if port == 0:
        return  # any free port
    host = host.strip("[]")
    for family, kind, protocol, _, socket_address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM):
        try:
            with socket.socket(family, kind, protocol) as probe:
                # As gRPC binds: SO_REUSEADDR, so a closed connection's TIME_WAIT is no
                # conflict; a listening socket still is.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(socket_address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise AlreadyInUse(f"port {port} is in use on {socket_address[0]} (another "
                                   f"server?); choose another {option}") from None
            # Anything else (no IPv6 here, say) is gRPC's to judge when it binds.


def unix_socket_path(address: str) -> str:
    """The file of a gRPC unix address: unix:PATH or unix:///ABSOLUTE/PATH."""
    path = address.removeprefix(UNIX_PREFIX)
    return path[2:] if path.startswith("//") else path


def _check_socket_free(path: str) -> None:
    """AlreadyInUse when a server answers on the socket `path`, or `path` is not a socket.
    gRPC would unlink a live server's socket and take its place; a stale one (nobody
    answers: its server was killed) is left for gRPC to replace."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AlreadyInUse(f"{path} exists and is not a socket; choose another --address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return
    raise AlreadyInUse(f"another server listens on {path}; stop it, or choose another "
                       f"--address")
