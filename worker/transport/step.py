"""What a step asks of a transport and what it gets back, whichever way the bytes travel.

A transport moves a step's plan, gradients and parameters, and notices what went wrong; it
never decides what to do about it. `run_step` returns the step's outcome or a failure value
(workers lost, a shard lost, an error in the job's own computation); the runner asks its
failure policy (scheduler/failure_policy.py) and tells the worker group and the transport to
carry the decision out, e.g. `recompute`: the lost workers' blocks on survivors, same step.

These types live in worker/ because both ends of each transport do (see worker/transport/):
the scheduler imports them from here, and the actors never import the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from worker.backprop.optim.clip import clip_coefficient
from worker.backprop.optim.kfac import kl_clip_coefficient
from worker.shard_state_replica import KeptState


@dataclass(frozen=True)
class StepWork:
    step: int
    micro_batches: list[tuple[int, np.ndarray]]  # (global index, sample indices), tree order
    block_ranges: list[tuple[int, int]]  # block b computes micro_batches[lo:hi]
    block_owners: list[int]  # block b's worker, chosen by the runner from the live workers
    samples: int  # the step's sample count, the loss's divisor
    lr: float
    max_norm: float | None  # global-norm clipping, or None
    master_buffers: np.ndarray | None  # flat BatchNorm statistics at the step's start
    # K-FAC: the blocks carry factor statistics (worker/kfac_layout.py), and the KL clip's
    # bound (None: off), for which the shards report v.g before they apply.
    carries_statistics: bool = False
    kl_clip: float | None = None
    # A peer that has not answered this long into the step is lost: the runner's adaptive
    # deadline (scheduler/step_deadline.py), a few times the job's own median step.
    deadline_seconds: float = 120.0

    @property
    def waits_for_coefficients(self) -> bool:
        """Whether the shards report after reducing and wait for the runner's coefficients
        (global-norm clipping, K-FAC's KL clip), rather than apply at once."""
        return self.max_norm is not None or self.kl_clip is not None


def apply_coefficients(work: StepWork, squared_norm: float,
                       direction_dots: Iterable[float]) -> tuple[float, float]:
    """(clipping coefficient c, K-FAC's KL coefficient nu) from every shard's squared norm
    (summed) and every K-FAC layer's v.g (added by math.fsum, exactly rounded, so neither the
    shard count nor their order changes nu's bits). v.g of the clipped gradient is c^2 v.g:
    preconditioning is linear."""
    clip = 1.0 if work.max_norm is None else clip_coefficient(math.sqrt(squared_norm),
                                                              work.max_norm)
    nu = kl_clip_coefficient(work.lr, work.kl_clip, clip * clip * math.fsum(direction_dots))
    return clip, nu


@dataclass(frozen=True)
class BlockStats:
    loss_sum: float
    samples: int
    correct: int
    compute_seconds: float
    write_seconds: float
    bytes_sent: int
    # A compressed job's worker applying the last step's update itself before computing
    # (worker/transport/compressed.py); 0 where the shards apply it.
    apply_seconds: float = 0.0


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
    micro_batch_buffers: list[np.ndarray] | None  # flat buffers after each micro-batch
    gather_seconds: float = 0.0
    # Object-store transport: the seconds gradient chunks spent between worker and shard,
    # summed over chunks, and the part of them while their workers still computed.
    communication_seconds: float = 0.0
    hidden_communication_seconds: float = 0.0


# --- what can go wrong in a step: values, for the failure policy to decide on ----------------


@dataclass(frozen=True)
class WorkersLost:
    """Workers that died, stayed silent past the step's deadline, or missed a heartbeat
    (worker/transport/liveness.py). The step is not over: the shards still wait for
    `unfinished_blocks` (blocks the lost workers owned and had not delivered), which
    `recompute` can hand to survivors; the parameters have not moved. `delivered_blocks`:
    (block, lost worker) of blocks whole before their worker was lost, which every shard
    counts, with figures the transport kept (from the shards over direct connections:
    worker/transport/direct.py; from shared memory: worker/transport/shared_memory.py);
    nothing to recompute."""

    step: int
    workers: tuple[int, ...]
    unfinished_blocks: tuple[int, ...]
    silent: tuple[int, ...] = ()  # those of `workers` lost to the deadline
    unanswered: tuple[int, ...] = ()  # those that missed a heartbeat; the rest died
    # Those of `unanswered` whose raylet is gone (their heartbeat said so, or its port refused
    # a connection: worker/transport/liveness.py).
    raylet_gone: tuple[int, ...] = ()
    # Those that never connected to the shards (the direct transport: worker/transport/direct.py).
    unconnected: tuple[int, ...] = ()
    delivered_blocks: tuple[tuple[int, int], ...] = ()

    def with_delivered(self, owners: Mapping[int, int]) -> WorkersLost:
        """These of the unfinished blocks (block -> its lost owner) turned out whole: every
        shard counts them, none is recomputed (both transports' rule for a lost block)."""
        return replace(
            self, unfinished_blocks=tuple(b for b in self.unfinished_blocks if b not in owners),
            delivered_blocks=self.delivered_blocks + tuple(sorted(owners.items())))


@dataclass(frozen=True)
class ShardLost:
    """A parameter-server shard died: its slice's optimizer state is gone."""

    shard: int | None  # None when the transport cannot tell which one
    when: str  # "during step 12", "at the checkpoint of step 15", ...


@dataclass(frozen=True)
class BlockFailed:
    """The job's own computation raised on a worker (bad data, a NaN check...): the worker is
    alive, and recomputing the block elsewhere would raise the same error."""

    step: int
    block: int
    worker: int
    message: str


@dataclass(frozen=True)
class ErrorFeedbackLost:
    """Workers of a job with gradient compression died or fell silent: the error-feedback
    memories of their blocks (worker/compression.py) died with them, so no survivor can
    compute those blocks' messages; only a checkpoint has them."""

    step: int
    workers: tuple[int, ...]


@dataclass(frozen=True)
class LostBlockApplied:
    """A shard applied a step while a survivor was computing one of its blocks again, and its
    new parameters reached the survivor: the block's figures and BatchNorm statistics can no
    longer be computed at the step's parameters. Only a checkpoint can run the step again
    (the weights stay the same bits). Over direct connections (worker/transport/direct.py) a
    shard counts a lost worker's block only when the runner finds it delivered, and then no
    survivor recomputes it, so this reports a broken rule, not a timing: it is kept as the
    check on that rule, with its restart."""

    step: int
    worker: int  # the survivor whose recomputation found it
    shard: int


@dataclass(frozen=True)
class WorkerNotFenced:
    """Shared memory: the runner could not make sure that lost workers' processes have ended
    (worker/transport/worker_processes.py says why), so their blocks cannot go to a survivor
    writing the same buffers. Only every actor restarting on new arrays (from the kept state
    or a checkpoint: the same bits) leaves nothing a stray process could write into."""

    step: int
    workers: tuple[int, ...]
    why: str


StepFailure = (WorkersLost | ShardLost | BlockFailed | ErrorFeedbackLost | LostBlockApplied
               | WorkerNotFenced)


class ActorFailure(RuntimeError):
    """A failure found outside a step (a shard dead at a checkpoint or while starting): raised
    by the mechanism so that the runner can hand `failure` to its failure policy."""

    def __init__(self, failure: StepFailure):
        super().__init__(describe(failure))
        self.failure = failure


def describe(failure: StepFailure) -> str:
    if isinstance(failure, WorkersLost):
        return f"workers {list(failure.workers)} lost during step {failure.step}"
    if isinstance(failure, ShardLost):
        which = "a parameter-server shard" if failure.shard is None else (
            f"parameter-server shard {failure.shard}")
        return f"{which} died {failure.when}"
    if isinstance(failure, ErrorFeedbackLost):
        return (f"workers {list(failure.workers)} lost during step {failure.step}, with their "
                f"blocks' gradient-compression error feedback")
    if isinstance(failure, LostBlockApplied):
        return (f"a lost worker's gradient reached parameter-server shard {failure.shard}, "
                f"which applied step {failure.step} before worker {failure.worker} could "
                f"compute the lost block again")
    if isinstance(failure, WorkerNotFenced):
        return (f"workers {list(failure.workers)} lost at step {failure.step} could not be "
                f"stopped from writing into shared memory ({failure.why})")
    return f"worker {failure.worker} failed on step {failure.step}: {failure.message}"


# --- the interface both transports implement -----------------------------------------------


class JobActors(Protocol):
    """The job's actor handles, by slot (scheduler/worker_group.py): a replacement replica
    appears at its slot, so a transport reads them here rather than keeping a copy."""

    @property
    def replicas(self) -> list: ...

    @property
    def shards(self) -> list: ...


class StepTransport(Protocol):
    def start(self) -> None: ...

    def run_step(self, work: StepWork) -> StepOutcome | StepFailure: ...

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        """Go on with the step that just returned WorkersLost, block -> worker reassigned."""

    def sync_parameters(self) -> None:
        """Make the runner's parameter vector current (before evaluation or a checkpoint)."""

    def push_parameters(self) -> None:
        """Send the runner's parameter vector to every actor (after restoring a checkpoint)."""

    def worker_replaced(self, worker: int) -> None:
        """A new replica took slot `worker`: connect it before its first block."""

    def kept_state(self, step: int) -> KeptState | None:
        """The job's parameters and optimizer state as the shards kept them after `step`
        (worker/shard_state_replica.py), or None when they keep none."""

    def stop(self) -> None: ...
