"""What a step asks of a transport and what it gets back, whichever way the bytes travel.

Two transports carry a step between the runner, the replicas and the parameter-server shards:
shared memory with pipes when every actor is on the runner's host (shared_memory_transport.py),
and the Ray object store when they are not (object_store_transport.py). The runner writes the
plan and the records; a transport moves gradients and parameters and recovers lost workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class StepWork:
    step: int
    micro_shards: list[tuple[int, np.ndarray]]  # (global index, sample indices), tree order
    block_ranges: list[tuple[int, int]]  # block b computes micro_shards[lo:hi]
    samples: int  # the step's sample count, the loss's divisor
    lr: float
    max_norm: float | None  # global-norm clipping, or None
    master_buffers: np.ndarray | None  # flat BatchNorm statistics at the step's start


@dataclass(frozen=True)
class BlockStats:
    loss_sum: float
    samples: int
    correct: int
    compute_seconds: float
    write_seconds: float
    bytes_sent: int


@dataclass(frozen=True)
class ShardStats:
    squared_norm: float
    reduce_seconds: float
    apply_seconds: float
    bytes_updated: int


@dataclass
class StepOutcome:
    blocks: list[BlockStats]
    shards: list[ShardStats]
    parameter_squared_norms: np.ndarray  # one per parameter slot, summed over shards
    micro_shard_buffers: list[np.ndarray] | None  # flat buffers after each micro-shard
    gather_seconds: float = 0.0


@dataclass
class WorkerPool:
    """Which workers are still alive, and how many were lost."""

    alive: list[int]
    failures: int = 0
    owners: dict[int, int] = field(default_factory=dict)  # block -> worker computing it
    replacements: int = 0  # replicas started in place of lost ones

    def drop(self, worker: int) -> None:
        if worker in self.alive:
            self.alive.remove(worker)
            self.failures += 1

    def rejoin(self, worker: int) -> None:
        """A replacement replica takes its slot back (slots stay sorted: block b goes to
        alive[b % len(alive)], the same worker as before the loss)."""
        self.alive = sorted({*self.alive, worker})

    def owner_for(self, position: int) -> int:
        return self.alive[position % len(self.alive)]


class WorkerLost(RuntimeError):
    """Every worker of the job failed."""


class JobFailed(RuntimeError):
    """The job cannot go on: an error in its computation."""


class ShardLost(RuntimeError):
    """A parameter-server shard died: its optimizer state is gone, so the runner restarts the
    job's actors from the last checkpoint and replays."""


class StepTransport(Protocol):
    def start(self) -> None: ...
    def run_step(self, work: StepWork) -> StepOutcome: ...
    def sync_parameters(self) -> None:
        """Make the runner's parameter vector current (before evaluation or a checkpoint)."""
    def push_parameters(self) -> None:
        """Send the runner's parameter vector to every actor (after restoring a checkpoint)."""
    def worker_replaced(self, worker: int) -> None:
        """A new replica took slot `worker`: connect it before its first block."""
    def stop(self) -> None: ...
