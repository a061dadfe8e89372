"""How the actors of one job tell each other that a step's part is done, in microseconds.

A Ray actor call costs 1-3 ms per hop on a busy 2-core machine, several times per step: more
than the reduce and the optimizer together. Within one host the step's bytes already travel
through shared memory, so the signals travel through named pipes (FIFOs) in the same folder:
one reader per pipe, fixed-size records (smaller than PIPE_BUF, so every write is atomic even
with several writers), a blocking read with a deadline. Ray still places the actors, runs their
step loops and reports their deaths.

Messages are plain structs: nothing here is unpickled.
"""

from __future__ import annotations

import os
import select
import struct
from dataclasses import astuple, dataclass
from typing import ClassVar, TypeVar

Message = TypeVar("Message", bound="_Record")


class _Record:
    layout: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.layout.pack(*astuple(self))

    @classmethod
    def unpack(cls: type[Message], data: bytes) -> Message:
        return cls(*cls.layout.unpack(data))


STOP, COMPUTE = 0, 1
REDUCE_AND_APPLY, REDUCE_THEN_WAIT, APPLY = 1, 2, 3


@dataclass(frozen=True)
class WorkerCommand(_Record):
    """Runner -> worker: compute micro-shards [micro_lo, micro_hi) of the step's plan into
    gradient block `block`; `samples` is the step's sample count (the loss's divisor)."""

    layout: ClassVar = struct.Struct("<iqqqqq")
    op: int
    step: int
    block: int
    micro_lo: int
    micro_hi: int
    samples: int


@dataclass(frozen=True)
class ShardCommand(_Record):
    """Runner -> shard: reduce `blocks` blocks of `step` once the workers say they are written,
    then apply at `lr` (REDUCE_AND_APPLY), or report the norm and wait for APPLY with the global
    clipping `coefficient` (REDUCE_THEN_WAIT)."""

    layout: ClassVar = struct.Struct("<iqqdd")
    op: int
    step: int
    blocks: int
    lr: float
    coefficient: float


@dataclass(frozen=True)
class BlockWritten(_Record):
    """Worker -> every shard: gradient block `block` of `step` is in shared memory."""

    layout: ClassVar = struct.Struct("<qq")
    step: int
    block: int


WORKER_REPORT, SHARD_REDUCED, SHARD_APPLIED = 1, 2, 3


@dataclass(frozen=True)
class Report(_Record):
    """Worker or shard -> runner. For WORKER_REPORT `index` is the block and the values are
    (loss sum, samples, correct, compute seconds, bytes written, write seconds); for
    SHARD_REDUCED the shard and (squared norm, reduce seconds); for SHARD_APPLIED (squared
    norm, reduce seconds, apply seconds, bytes updated). `ok` 0 reports an error."""

    layout: ClassVar = struct.Struct("<iqqidddddd")
    kind: int
    index: int
    step: int
    ok: int
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    e: float = 0.0
    f: float = 0.0


class ChannelTimeout(TimeoutError):
    """No message within the deadline: the peer is slow or gone."""


class Channel:
    """One end of a named pipe. Opened read-write (Linux) so that opening never blocks waiting
    for the other side and a reader never sees end-of-file when writers come and go."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)

    @staticmethod
    def create(path: str) -> str:
        os.mkfifo(path, 0o600)
        return path

    def send(self, message: _Record) -> None:
        os.write(self.fd, message.pack())

    def receive(self, kind: type[Message], timeout: float | None = None) -> Message:
        """The next message, or ChannelTimeout after `timeout` seconds (None: wait)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            raise ChannelTimeout(f"no message on {os.path.basename(self.path)} "
                                 f"within {timeout} s")
        data = os.read(self.fd, kind.layout.size)
        return kind.unpack(data)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class ChannelPaths:
    """Where one job's pipes are: one inbox per worker, two per shard, one for the runner."""

    directory: str
    workers: int
    shards: int

    def worker(self, w: int) -> str:
        return os.path.join(self.directory, f"worker-{w}.fifo")

    def shard_commands(self, k: int) -> str:
        return os.path.join(self.directory, f"shard-{k}-commands.fifo")

    def shard_blocks(self, k: int) -> str:
        return os.path.join(self.directory, f"shard-{k}-blocks.fifo")

    def runner(self) -> str:
        return os.path.join(self.directory, "runner.fifo")

    def create_all(self) -> None:
        for w in range(self.workers):
            Channel.create(self.worker(w))
        for k in range(self.shards):
            Channel.create(self.shard_commands(k))
            Channel.create(self.shard_blocks(k))
        Channel.create(self.runner())
