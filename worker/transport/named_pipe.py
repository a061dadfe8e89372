"""A named pipe carrying fixed-size records between processes of one host, in microseconds.

A Ray actor call costs 1-3 ms per hop on a busy 2-core machine; a pipe a few microseconds.
One reader per pipe; records are smaller than PIPE_BUF, so every write is atomic even with
several writers; a blocking read takes a deadline. Records are plain structs: nothing read
from a pipe is unpickled. The shared-memory transport's messages (shared_memory.py) are
Records sent through these Channels.
"""

from __future__ import annotations

import os
import select
import struct
from dataclasses import Field, astuple
from typing import Any, ClassVar, TypeVar

Message = TypeVar("Message", bound="Record")


class Record:
    """A dataclass with a struct layout: its fields, in order, packed little-endian."""

    layout: ClassVar[struct.Struct]
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # each subclass is a @dataclass

    def pack(self) -> bytes:
        return self.layout.pack(*astuple(self))

    @classmethod
    def unpack(cls: type[Message], data: bytes) -> Message:
        return cls(*cls.layout.unpack(data))


class ChannelTimeout(TimeoutError):
    """No message within the deadline: the peer is slow or gone."""


class Channel:
    """One end of a named pipe. Opened read-write (Linux) so that opening never blocks waiting
    for the other side and a reader never sees end-of-file when writers come and go."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        # poll, not select: select cannot watch a descriptor numbered 1024 or more, which a
        # server holding many connections and files hands out (its jobs then failed).
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    @staticmethod
    def create(path: str) -> str:
        os.mkfifo(path, 0o600)
        return path

    def send(self, message: Record) -> None:
        os.write(self.fd, message.pack())

    def receive(self, kind: type[Message], timeout: float | None = None) -> Message:
        """The next message, or ChannelTimeout after `timeout` seconds (None: wait)."""
        return kind.unpack(self.receive_bytes(kind.layout.size, timeout))

    def receive_bytes(self, size: int, timeout: float | None = None) -> bytes:
        """The next record of `size` bytes, for a pipe that carries several record types."""
        if not self._ready(timeout):
            raise ChannelTimeout(f"no message on {os.path.basename(self.path)} "
                                 f"within {timeout} s")
        return os.read(self.fd, size)

    def discard_pending(self, kind: type[Record]) -> None:
        """Read and drop every message already waiting."""
        while self._ready(0):
            os.read(self.fd, kind.layout.size)

    def _ready(self, timeout: float | None) -> bool:
        """Whether a message waits, within `timeout` seconds (None: wait for one)."""
        return bool(self._poll.poll(None if timeout is None else max(0, timeout) * 1000))

    def close(self) -> None:
        """Idempotent: a second close must not close a descriptor reused meanwhile."""
        if self.fd >= 0:
            self._poll.unregister(self.fd)
            os.close(self.fd)
            self.fd = -1
