"""A step through the Ray object store: for actors on other hosts than the runner.

Each worker receives the shards' updated slices (the all-gather), computes its block and
returns it cut into one chunk per shard (the reduce-scatter); shard k sums the N chunks it is
given in the fixed tree order, applies the optimizer and returns its updated slice. Every
worker still sends and receives about one model's worth of bytes per step, but through
object-store copies and actor calls, which cost milliseconds each: on one host the shared-
memory transport (shared_memory.py) is used instead.

K-FAC's factor-update steps add to each worker's returns one float64 statistics chunk per
shard (the section of the statistics vector covering that shard's layers, worker/kfac_layout.py),
which the shard sums in the same fixed tree as the gradient chunks. With a KL clip the shards
first return each layer's v.g, and the runner sends K-FAC's coefficient nu with the clipping
coefficient.

This module owns both ends of the protocol: the runner's side (ObjectStoreTransport) and what
the actors do when called (compute_chunks, reduce_chunks, apply_and_return,
reduce_apply_chunks, which ModelReplica and ParameterServerShard expose as their remote
methods). It lives in worker/ because the actors run it and must not import the scheduler.

The runner's side reports what went wrong and decides nothing: a worker that dies or misses
the deadline comes back as WorkersLost (the shards have not been called yet, so `recompute` on
a survivor completes the step with the same bits), a dead or silent shard as ShardLost, an
error raised by the job's computation as BlockFailed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray

from worker.transport.liveness import Liveness
from worker.transport.step import (
    BlockFailed,
    BlockStats,
    JobActors,
    ShardLost,
    ShardStats,
    StepFailure,
    StepOutcome,
    StepWork,
    WorkersLost,
    apply_coefficients,
)

if TYPE_CHECKING:
    from worker.flat_parameters import ParameterSlot
    from worker.parameter_server import ApplyResult, ParameterServerShard, ReduceResult
    from worker.replica import BlockResult, ModelReplica


# --- the runner's side -------------------------------------------------------------------------


class ObjectStoreTransport:
    def __init__(self, actors: JobActors, parameters: np.ndarray, bounds: list[tuple[int, int]],
                 slots: list[ParameterSlot], flatten_buffers: Callable[[dict], np.ndarray],
                 *, timeout_seconds: float,
                 statistics_bounds: Sequence[tuple[int, int]] = (),
                 liveness: Liveness | None = None):
        """`liveness` (default Liveness()) paces the heartbeats that find a lost actor while
        a step waits on it."""
        self.actors = actors
        self.liveness = liveness or Liveness()
        self.parameters, self.bounds, self.slots = parameters, bounds, slots
        # K-FAC: each shard's section of the statistics vector (float64), its chunk's size.
        self.statistics_bytes = sum(hi - lo for lo, hi in statistics_bounds) * 8
        self.flatten_buffers = flatten_buffers
        self.timeout_seconds = timeout_seconds
        self.slices: list = []
        # The step in progress: each block's call (its chunk refs, then its statistics' ref),
        # owner and, once delivered, statistics.
        self.work: StepWork | None = None
        self.calls: dict[int, list[ray.ObjectRef]] = {}
        self.owners: dict[int, int] = {}
        self.delivered: dict[int, BlockResult] = {}

    def start(self) -> None:
        self.push_parameters()

    def push_parameters(self) -> None:
        """The runner's vector to every shard, and as the slices the workers start from."""
        ray.get([shard.load_parameters.remote(self.parameters[lo:hi])
                 for shard, (lo, hi) in zip(self.actors.shards, self.bounds)],
                timeout=self.timeout_seconds)
        self.slices = [ray.put(np.array(self.parameters[lo:hi])) for lo, hi in self.bounds]

    def sync_parameters(self) -> None:
        for (lo, hi), values in zip(self.bounds,
                                    ray.get(self.slices, timeout=self.timeout_seconds)):
            self.parameters[lo:hi] = values

    def worker_replaced(self, worker: int) -> None:
        pass  # a replica is stateless here: each call brings the parameters it needs

    def kept_state(self, step: int) -> None:
        """Shards on other hosts keep no replica of their state (it would cross the network
        every step): a lost one restarts the job from its last checkpoint."""
        return None

    def stop(self) -> None:
        pass

    # --- one step ----------------------------------------------------------------------------

    def run_step(self, work: StepWork) -> StepOutcome | StepFailure:
        self.work, self.calls, self.owners, self.delivered = work, {}, {}, {}
        self.master_buffers = (None if work.master_buffers is None
                               else ray.put(work.master_buffers))
        return self.recompute(dict(enumerate(work.block_owners)))

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        work = self.work
        if work is None:
            raise RuntimeError("recompute() needs a step that returned WorkersLost")
        chunks = len(self.bounds) * (2 if work.carries_statistics else 1)
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            self.calls[block] = self.actors.replicas[worker].compute_chunks.options(
                num_returns=chunks + 1).remote(
                work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers,
                self.bounds, *self.slices)
        failure = self._collect_blocks(work)
        if failure is not None:
            return failure
        try:
            return self._reduce_and_apply(work)
        except ray.exceptions.RayActorError:
            return ShardLost(None, f"during step {work.step}")
        except _ShardGone as gone:
            return gone.failure

    def _collect_blocks(self, work: StepWork) -> StepFailure | None:
        """Wait for every block not yet delivered. Owners that die, stop answering their
        heartbeat (liveness.py: a lost node is found in seconds) or let the step's deadline
        pass are lost, with the blocks they had not delivered; the other owners' blocks still
        in progress stay theirs."""
        pending = {block: call[-1] for block, call in self.calls.items()
                   if block not in self.delivered}
        awaited: dict[int, list[ray.ObjectRef]] = {}
        for block, ref in pending.items():
            awaited.setdefault(self.owners[block], []).append(ref)
        replicas = self.actors.replicas
        waited = self.liveness.wait(awaited, {w: replicas[w] for w in awaited},
                                    work.deadline_seconds)
        ready = set(waited.ready)
        lost: set[int] = set()  # died
        # Past the deadline (every owner still computing), or missed a heartbeat.
        silent: set[int] = set(waited.unanswered) if waited.unanswered else {
            self.owners[block] for block, ref in pending.items() if ref not in ready}
        for block, ref in pending.items():
            if ref not in ready:
                continue
            try:
                self.delivered[block] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.add(self.owners[block])
            except ray.exceptions.RayTaskError as error:  # the job's computation raised
                cause = error.cause
                return BlockFailed(work.step, block, self.owners[block],
                                   f"{type(cause).__name__}: {cause}")
        if not lost | silent:
            return None
        gone = lost | silent
        return WorkersLost(work.step, tuple(sorted(gone)),
                           tuple(b for b in range(len(work.block_ranges))
                                 if b not in self.delivered and self.owners[b] in gone),
                           tuple(sorted(silent - lost - waited.unanswered)),
                           tuple(sorted(waited.unanswered - lost)))

    def _reduce_and_apply(self, work: StepWork) -> StepOutcome:
        blocks = range(len(work.block_ranges))
        shard_count = len(self.bounds)
        chunks_of_shard = [[self.calls[b][k] for b in blocks] for k in range(shard_count)]
        if work.carries_statistics:  # then each shard's statistics chunks, in block order
            for k in range(shard_count):
                chunks_of_shard[k] += [self.calls[b][shard_count + k] for b in blocks]
        shards = self.actors.shards
        if not work.waits_for_coefficients:
            calls = [shard.reduce_apply_chunks.options(num_returns=3).remote(work.lr, *chunks)
                     for shard, chunks in zip(shards, chunks_of_shard)]
            reduced = self._from_shards([c[0] for c in calls], work)
            applied = self._from_shards([c[1] for c in calls], work)
            self.slices = [c[2] for c in calls]
        else:
            reduced = self._from_shards([shard.reduce_chunks.remote(*chunks)
                                         for shard, chunks in zip(shards, chunks_of_shard)],
                                        work)
            coefficient, nu = apply_coefficients(
                work, sum(r.squared_norm for r in reduced),
                [dot for r in reduced for dot in r.direction_dots.values()])
            calls = [shard.apply_and_return.options(num_returns=2).remote(work.lr, coefficient,
                                                                          nu)
                     for shard in shards]
            applied = self._from_shards([c[0] for c in calls], work)
            self.slices = [c[1] for c in calls]
        norms = np.zeros(len(self.slots))
        index = {slot.name: i for i, slot in enumerate(self.slots)}
        for r in reduced:
            for name, value in r.parameter_squared_norms.items():
                norms[index[name]] += value
        results = [self.delivered[b] for b in blocks]
        sent = sum(hi - lo for lo, hi in self.bounds) * self.parameters.itemsize
        if work.carries_statistics:
            sent += self.statistics_bytes
        block_stats = [BlockStats(r.loss_sum, r.samples, r.correct, r.seconds, r.write_seconds,
                                  sent)
                       for r in results]
        shard_stats = [ShardStats(r.squared_norm, r.seconds, a.seconds, a.bytes_updated)
                       for r, a in zip(reduced, applied)]
        micro = None
        if results[0].buffers is not None:  # then every block's are: one model
            micro = [self.flatten_buffers(values) for r in results for values in r.buffers or ()]
        return StepOutcome(block_stats, shard_stats, norms, micro)


    def _from_shards(self, refs: list[ray.ObjectRef], work: StepWork) -> list:
        """The values of one call per shard (shard k's ref at k). A shard that misses its
        heartbeat or the step's deadline raises _ShardGone; one that died, RayActorError."""
        waited = self.liveness.wait({k: [ref] for k, ref in enumerate(refs)},
                                    dict(enumerate(self.actors.shards)), work.deadline_seconds)
        if waited.unanswered:
            raise _ShardGone(ShardLost(min(waited.unanswered),
                                       f"without answering its heartbeat in step {work.step}"))
        if len(waited.ready) < len(refs):
            raise _ShardGone(ShardLost(None, f"silent past the deadline of step {work.step}"))
        return ray.get(refs)


class _ShardGone(Exception):
    """A shard stopped answering during a step: unwinds _reduce_and_apply to recompute()."""

    def __init__(self, failure: ShardLost):
        super().__init__(failure.when)
        self.failure = failure


# --- the actors' side ----------------------------------------------------------------------------


def compute_chunks(replica: ModelReplica, micro_batches: list[tuple[int, np.ndarray]],
                   step: int, batch_size: int, master_buffers: np.ndarray | None,
                   bounds: list[tuple[int, int]], *slices: np.ndarray) -> tuple:
    """A worker's step: take the shards' updated slices (the all-gather), compute the block,
    return it cut into one chunk per shard (the reduce-scatter), on a K-FAC factor-update step
    then its statistics cut into one section per shard, and last the block's figures."""
    # A fresh block each call: Ray copies the returned chunks after this function returns,
    # when another call may already be computing.
    block = np.empty_like(replica.flat)
    kfac = replica.kfac
    statistics = (np.empty(kfac.statistics_size)
                  if kfac is not None and replica.carries_statistics(step) else None)
    result = replica.compute(replica.layout.views(block), micro_batches, step, batch_size,
                             master_buffers, parameter_slices=list(zip(bounds, slices)),
                             statistics=statistics)
    chunks = [block[lo:hi] for lo, hi in bounds]
    if kfac is not None and statistics is not None:
        sections = [kfac.statistics_bounds(lo, hi) for lo, hi in bounds]
        chunks += [statistics[lo:hi] for lo, hi in sections]
    return (*chunks, result)


def reduce_chunks(shard: ParameterServerShard, *chunks: np.ndarray) -> ReduceResult:
    """Gradient chunks in block order, on a K-FAC factor-update step followed by as many
    statistics chunks."""
    if shard.expects_statistics():
        half = len(chunks) // 2
        return shard.reduce(list(chunks[:half]), list(chunks[half:]))
    return shard.reduce(list(chunks))


def apply_and_return(shard: ParameterServerShard, lr: float, coefficient: float = 1.0,
                     kl_coefficient: float = 1.0) -> tuple[ApplyResult, np.ndarray]:
    """Apply, and return the updated slice for the replicas (the all-gather)."""
    return shard.apply(lr, coefficient, kl_coefficient), shard.parameters


def reduce_apply_chunks(shard: ParameterServerShard, lr: float, *chunks: np.ndarray) -> tuple:
    return (reduce_chunks(shard, *chunks), *apply_and_return(shard, lr))
