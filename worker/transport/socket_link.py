"""One TCP connection carrying typed messages of numpy arrays between two hosts, without copies.

A message is a fixed-size header (a Record of the protocol that uses the link: direct.py) and
the raw bytes of the arrays it announces. Arrays leave by `socket.sendmsg` straight from their
memory and arrive by `recv_into` straight into the array that will hold them: the only copies
are the kernel's. Nothing read from a link is unpickled, and the receiver checks each header
against the sizes it expects before it reads a byte of the payload (the protocol's job).

Sending goes through a writer thread per link, so a caller hands over an array and goes on
computing while it leaves (the reduce-scatter overlapped with backward); `flush` waits until
every queued message is in the kernel's hands, which delivers it even if this process then
dies. A link whose peer closed it or whose send failed is closed for good: LinkClosed, at
once, is how one side learns the other is gone. `wait_acknowledged` goes further: until the
peer's kernel has acknowledged every byte, which then reaches the peer even if this host goes
away (the direct transport's proof that a block was delivered, direct.py).
"""

from __future__ import annotations

import fcntl
import queue
import socket
import struct
import sys
import termios
import threading
import time
from typing import TypeVar

import numpy as np

from worker.transport.named_pipe import Record

Header = TypeVar("Header", bound=Record)

# Linux's SIOCOUTQ (termios.TIOCOUTQ on a socket): bytes of the send queue the peer has not yet
# acknowledged (sent or not). Elsewhere only the kernel's hands are known (flush).
_UNACKNOWLEDGED_BYTES = termios.TIOCOUTQ if sys.platform == "linux" else None
# Polling it: a loopback peer acknowledges within microseconds, a remote one within a round
# trip, so the first looks come quickly and later ones no more often than this.
_ACKNOWLEDGED_POLL_SECONDS = 0.001


class LinkClosed(ConnectionError):
    """The peer closed the connection, or it broke: the peer is gone."""


def listen(host: str) -> socket.socket:
    """A listening socket on `host` (an address of this host) at a port the kernel picks."""
    return socket.create_server((host, 0), backlog=64)


def connect(address: tuple[str, int], timeout_seconds: float) -> socket.socket:
    connection = socket.create_connection(address, timeout=timeout_seconds)
    connection.settimeout(None)
    return connection


class Link:
    def __init__(self, connection: socket.socket, name: str):
        """`name` says who is at the other end, for error messages."""
        self.connection, self.name = connection, name
        # Small messages (headers, hellos) must not wait for Nagle's timer.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._changed = threading.Condition()
        self._unsent = 0  # messages queued and not yet in the kernel's hands
        self.closed = False
        self._outbox: queue.SimpleQueue[tuple[bytes, tuple[np.ndarray, ...]] | None] = (
            queue.SimpleQueue())
        threading.Thread(target=self._write_queued, name=f"send to {name}", daemon=True).start()

    # --- sending ---------------------------------------------------------------------------

    def send(self, header: Record, *arrays: np.ndarray) -> None:
        """Queue one message; the arrays must not change until `flush` returns. Messages
        leave in the order they were queued."""
        with self._changed:
            if self.closed:
                raise LinkClosed(f"the connection to {self.name} is closed")
            self._unsent += 1
        self._outbox.put((header.pack(), arrays))

    def flush(self, timeout_seconds: float) -> None:
        """Wait until every queued message is in the kernel's send buffer. LinkClosed if the
        link closed first, TimeoutError if the peer took too little for `timeout_seconds`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._unsent == 0 or self.closed,
                                          timeout=timeout_seconds):
                raise TimeoutError(f"{self.name} took no data for {timeout_seconds:g} s")
            if self._unsent:
                raise LinkClosed(f"the connection to {self.name} closed while sending")

    def wait_acknowledged(self, timeout_seconds: float) -> None:
        """`flush`, then wait until the peer's kernel has acknowledged every byte sent: they
        are then the peer's to read, whatever becomes of this process or host. LinkClosed or
        TimeoutError as for `flush`."""
        deadline = time.monotonic() + timeout_seconds
        self.flush(timeout_seconds)
        if _UNACKNOWLEDGED_BYTES is None:
            return
        pause = 1e-5
        while True:
            try:
                answer = fcntl.ioctl(self.connection.fileno(), _UNACKNOWLEDGED_BYTES,
                                     struct.pack("i", 0))
            except (OSError, ValueError) as error:  # ValueError: closed meanwhile (fd -1)
                raise LinkClosed(f"the connection to {self.name} closed: {error}") from error
            if struct.unpack("i", answer)[0] == 0:
                return
            if self.closed:
                raise LinkClosed(f"the connection to {self.name} closed before {self.name} "
                                 f"acknowledged what was sent")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} did not acknowledge what was sent within "
                                   f"{timeout_seconds:g} s")
            time.sleep(pause)
            pause = min(2 * pause, _ACKNOWLEDGED_POLL_SECONDS)

    def _write_queued(self) -> None:
        while (item := self._outbox.get()) is not None:
            header, arrays = item
            try:
                self._send_all([memoryview(header)] + [a.data.cast("B")
                                                       for a in arrays if a.nbytes])
            except OSError:
                self.close()
                return
            with self._changed:
                self._unsent -= 1
                self._changed.notify_all()

    def _send_all(self, buffers: list[memoryview]) -> None:
        """sendmsg until every byte of `buffers` is sent (one call may send part of them)."""
        while buffers:
            sent = self.connection.sendmsg(buffers)
            while buffers and sent >= len(buffers[0]):
                sent -= len(buffers[0])
                buffers.pop(0)
            if buffers and sent:
                buffers[0] = buffers[0][sent:]

    # --- receiving (one reader thread per link) --------------------------------------------

    def receive_header(self, kind: type[Header], deadline: float | None = None) -> Header:
        data = bytearray(kind.layout.size)
        self.receive_into(memoryview(data), deadline)
        return kind.unpack(bytes(data))

    def receive_into(self, destination: np.ndarray | memoryview,
                     deadline: float | None = None) -> None:
        """Fill `destination` (contiguous) with the next bytes of the stream; LinkClosed if
        the peer closed the connection or it broke, or if `deadline` (time.monotonic()) passes
        first: a deadline bounds the whole message, not each read, so a peer sending a byte
        at a time cannot stretch it."""
        view = (destination.data.cast("B") if isinstance(destination, np.ndarray)
                else destination)
        received = 0
        while received < len(view):
            try:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("the deadline passed")
                    self.connection.settimeout(left)
                count = self.connection.recv_into(view[received:])
            except OSError as error:  # socket.timeout and TimeoutError are OSErrors
                self.close()
                raise LinkClosed(f"the connection to {self.name} broke: {error}") from error
            if count == 0:
                self.close()
                raise LinkClosed(f"{self.name} closed the connection")
            received += count
        if deadline is not None:
            try:
                self.connection.settimeout(None)  # blocking again, for the writer's sends
            except OSError as error:  # closed meanwhile
                raise LinkClosed(f"the connection to {self.name} closed: {error}") from error

    def close(self) -> None:
        """Idempotent; wakes a flush waiting on this link and ends the writer thread."""
        with self._changed:
            if self.closed:
                return
            self.closed = True
            self._changed.notify_all()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected
        self.connection.close()
        self._outbox.put(None)
