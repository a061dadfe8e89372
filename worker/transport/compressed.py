"""A step through the Ray object store with compressed gradients (the spec's
communication.compression): what travels in place of the gradient chunks of object_store.py.
The messages are calls' returns, which the runner passes on to the shards (the shards pull
them from the workers' object stores); they are small, so the uncompressed step's early
sending during backward would gain little here.

Top-k, one round, as the uncompressed step: each worker returns one (indices, values) message
per shard; shard k scatters the blocks' messages into dense parts and sums them in the fixed
tree order, applies the optimizer and returns its updated slice.

PowerSGD, two rounds (worker/compression.py has the math):
  worker b: compute the block, return per shard its dense runs and P_b = M_b Q   (round 1)
  shard k:  sum, orthogonalise P -> P^ (the matrices it answers for)
  worker b: given every shard's P^, return per shard Q_b = M_b^T P^                 (round 2)
  shard k:  sum Q, decompress its slice, apply; return the slice and Q (the next warm start)
The runner passes refs from one call to the next and holds the warm start's refs between
steps; a checkpoint fetches them with every block's error feedback (compression_state).

Bytes are counted where they are sent: a worker's messages (BlockStats.bytes_sent), and what
every worker receives from the shards: P^, the updated slices and Q (bytes_received).

A worker lost during a compressed step takes its blocks' error feedback with it: the step
returns ErrorFeedbackLost, and the job restarts from its last checkpoint (which holds them)
rather than recompute those blocks elsewhere with an empty memory.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import ray

from worker.compression import (
    Compression,
    ErrorFeedback,
    PowerSGD,
    PowerSGDPlan,
    PowerSGDShard,
    PowerSGDWorker,
    TopK,
    TopKShard,
    message_bytes,
    topk_messages,
)
from worker.transport.object_store import ObjectStoreTransport, _ShardGone, apply_and_return
from worker.transport.step import (
    BlockStats,
    ErrorFeedbackLost,
    ShardLost,
    ShardStats,
    StepFailure,
    StepOutcome,
    StepWork,
    WorkersLost,
    apply_coefficients,
)

if TYPE_CHECKING:
    from worker.flat_parameters import ParameterLayout
    from worker.parameter_server import ParameterServerShard, ReduceResult
    from worker.replica import ModelReplica


# --- the runner's side -------------------------------------------------------------------------


class CompressedObjectStoreTransport(ObjectStoreTransport):
    def __init__(self, *args, compression: Compression, **kwargs):
        super().__init__(*args, **kwargs)
        self.compression = compression
        # PowerSGD's warm start: each shard's Q of the matrices it answers for (refs); empty
        # before the first step, when every worker starts from the seed's.
        self.warm_q: list[ray.ObjectRef] = []

    def run_step(self, work: StepWork) -> StepOutcome | StepFailure:
        self.messages: dict[int, list[ray.ObjectRef]] = {}  # block -> its first messages
        outcome = super().run_step(work)
        if isinstance(outcome, WorkersLost):
            return ErrorFeedbackLost(work.step, outcome.workers)
        return outcome

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        """The blocks of `owners` (block -> worker); called by run_step for every block (a
        lost worker ends the step: run_step reports it as ErrorFeedbackLost)."""
        work = self.work
        if work is None:
            raise RuntimeError("recompute() needs a step in progress")
        if work.carries_statistics:
            raise ValueError("gradient compression does not carry K-FAC statistics")
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            refs = self.actors.replicas[worker].compress_block.options(
                num_returns=len(self.bounds) + 1).remote(
                block, work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers,
                self.bounds, *self.slices, *self.warm_q)
            self.messages[block], self.calls[block] = refs[:-1], refs[-1]
        failure = self._collect_blocks(work)
        if failure is not None:
            return failure
        try:
            return self._reduce_and_apply(work)
        except ray.exceptions.RayActorError:
            return ShardLost(None, f"during step {work.step}")
        except _ShardGone as gone:
            return gone.failure
        except _WorkersGone as gone:
            return gone.failure

    def _reduce_and_apply(self, work: StepWork) -> StepOutcome:
        blocks = range(len(work.block_ranges))
        shards = self.actors.shards
        firsts = [[self.messages[b][k] for b in blocks] for k in range(len(shards))]
        # Every round is submitted at once, each call taking the refs of the one before (Ray
        # starts a call when its arguments exist); the runner waits only for the figures.
        replies: list = []  # PowerSGD's round 1 on the shards
        seconds: list = []  # and round 2 on the workers
        second_bytes: list[int] | None = None
        if isinstance(self.compression, PowerSGD):
            replies = [shard.reduce_powersgd_first.options(num_returns=2).remote(*messages)
                       for shard, messages in zip(shards, firsts)]
            p_hat = [reply[0] for reply in replies]
            seconds = [self.actors.replicas[self.owners[b]].powersgd_second.options(
                num_returns=len(shards) + 1).remote(b, self.bounds, *p_hat) for b in blocks]
            messages_of_shard = [[call[k] for call in seconds] for k in range(len(shards))]
            reduce_name = "reduce_powersgd_second"
        else:
            messages_of_shard = firsts
            reduce_name = "reduce_topk"
        if not work.waits_for_coefficients:
            calls = [getattr(shard, reduce_name).options(num_returns=5).remote(work.lr, *messages)
                     for shard, messages in zip(shards, messages_of_shard)]
        else:
            reduced_calls = [getattr(shard, reduce_name).options(num_returns=5).remote(
                None, *messages) for shard, messages in zip(shards, messages_of_shard)]
            second_bytes = self._second_bytes(seconds, blocks, work)
            reduced_only = self._from_shards([c[0] for c in reduced_calls], work)
            coefficient, nu = apply_coefficients(work, sum(r.squared_norm for r in reduced_only),
                                                 ())
            applied_calls = [shard.apply_and_return.options(num_returns=2).remote(
                work.lr, coefficient, nu) for shard in shards]
            calls = [[r[0], r[1], a[0], a[1], r[4]]
                     for r, a in zip(reduced_calls, applied_calls)]
        if second_bytes is None:  # a worker lost in round 2 is found here, before the
            second_bytes = self._second_bytes(seconds, blocks, work)  # shards wait on it
        # Bytes each worker receives from shard k: P^ (PowerSGD), the updated slice, Q.
        received = ([0 for _ in shards] if not replies
                    else self._from_shards([reply[1] for reply in replies], work))
        # Each call: ReduceResult, warm Q (PowerSGD), ApplyResult, the slice, Q's bytes.
        reduced = self._from_shards([c[0] for c in calls], work)
        applied = self._from_shards([c[2] for c in calls], work)
        warm_bytes = self._from_shards([c[4] for c in calls], work)
        received = [p + q + a.bytes_updated for p, q, a in zip(received, warm_bytes, applied)]
        self.slices = [c[3] for c in calls]
        if isinstance(self.compression, PowerSGD):
            self.warm_q = [c[1] for c in calls]
        return self._outcome(work, reduced, applied, second_bytes, received)

    def _outcome(self, work: StepWork, reduced: list[ReduceResult], applied: list,
                 second_bytes: list[int], received: list[int]) -> StepOutcome:
        norms = np.zeros(len(self.slots))
        index = {slot.name: i for i, slot in enumerate(self.slots)}
        for r in reduced:
            for name, value in r.parameter_squared_norms.items():
                norms[index[name]] += value
        results = [self.delivered[b] for b in range(len(work.block_ranges))]
        block_stats = [BlockStats(r.loss_sum, r.samples, r.correct, r.seconds, r.write_seconds,
                                  r.bytes_written + extra)
                       for r, extra in zip(results, second_bytes)]
        shard_stats = [ShardStats(r.squared_norm, r.seconds, a.seconds, sent)
                       for r, a, sent in zip(reduced, applied, received)]
        micro = None
        if results[0].buffers is not None:
            micro = [self.flatten_buffers(values) for r in results for values in r.buffers or ()]
        return StepOutcome(block_stats, shard_stats, norms, micro)

    def _second_bytes(self, seconds: list, blocks: range, work: StepWork) -> list[int]:
        """Each block's round-2 message bytes (0 without a round 2)."""
        if not seconds:
            return [0 for _ in blocks]
        return self._from_workers([call[-1] for call in seconds], blocks, work)

    def _from_workers(self, refs: list[ray.ObjectRef], blocks: range,
                      work: StepWork) -> list:
        """The values of one call per block (block b's owner computes it); a worker lost
        meanwhile is a _ShardGone carrying ErrorFeedbackLost's step (the memories are gone)."""
        owners = {b: self.owners[b] for b in blocks}
        awaited: dict[int, list[ray.ObjectRef]] = {}
        for b, ref in zip(blocks, refs):
            awaited.setdefault(owners[b], []).append(ref)
        replicas = self.actors.replicas
        waited = self.liveness.wait(awaited, {w: replicas[w] for w in awaited},
                                    work.deadline_seconds)
        lost = set(waited.unanswered)
        if not lost and len(waited.ready) < len(refs):
            lost = {owners[b] for b, ref in zip(blocks, refs) if ref not in waited.ready}
        values = []
        for b, ref in zip(blocks, refs):
            if owners[b] in lost:
                continue
            try:
                values.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                lost.add(owners[b])
        if lost:
            raise _WorkersGone(ErrorFeedbackLost(work.step, tuple(sorted(lost))))
        return values

    # --- checkpoints ---------------------------------------------------------------------

    def compression_state(self, owners: Mapping[int, int]) -> dict[str, np.ndarray]:
        """Every block's error feedback (from `owners`: block -> its worker) and PowerSGD's warm
        start, under keys that do not depend on the shard count."""
        workers = sorted(set(owners.values()))
        states = dict(zip(workers, ray.get(
            [self.actors.replicas[w].error_feedback.remote() for w in workers],
            timeout=self.timeout_seconds)))
        state = {f"error_feedback/{b}": states[w][b] for b, w in owners.items()
                 if b in states[w]}
        for part in ray.get(self.warm_q, timeout=self.timeout_seconds):
            state.update({f"powersgd_q/{index}": q for index, q in part.items()})
        return state

    def load_compression_state(self, state: Mapping[str, np.ndarray],
                               owners: Mapping[int, int]) -> None:
        """Give each worker its blocks' error feedback and keep the warm start. A checkpoint
        of another block count (another worker count) gives block 0 the sum of its blocks'
        errors: the sum is what later steps owe (for PowerSGD, exactly what they send)."""
        saved = {int(key.removeprefix("error_feedback/")): value
                 for key, value in state.items() if key.startswith("error_feedback/")}
        if saved and saved.keys() != owners.keys():
            saved = {0: np.sum([saved[b] for b in sorted(saved)], axis=0)}
        errors: dict[int, dict[int, np.ndarray]] = {}
        for block, value in saved.items():
            errors.setdefault(owners[block], {})[block] = value
        ray.get([self.actors.replicas[w].load_error_feedback.remote(mine)
                 for w, mine in errors.items()], timeout=self.timeout_seconds)
        warm = {int(key.removeprefix("powersgd_q/")): value for key, value in state.items()
                if key.startswith("powersgd_q/")}
        self.warm_q = [ray.put(warm)] if warm else []


class _WorkersGone(Exception):
    def __init__(self, failure: ErrorFeedbackLost):
        super().__init__(failure.step)
        self.failure = failure


# --- the workers' side -------------------------------------------------------------------------


def compress_block(replica: ModelReplica, block: int,
                   micro_batches: list[tuple[int, np.ndarray]], step: int, batch_size: int,
                   master_buffers: np.ndarray | None, bounds: list[tuple[int, int]],
                   *arrays) -> tuple:
    """Compute block `block` (after taking the shards' slices, the all-gather) and return its
    first message per shard, then (the block's figures, bytes_written the messages', None),
    the shape of compute_and_send's answer."""
    slices, warm = arrays[:len(bounds)], arrays[len(bounds):]
    gradient = np.empty_like(replica.flat)
    result = replica.compute(replica.layout.views(gradient), micro_batches, step, batch_size,
                             master_buffers, parameter_slices=list(zip(bounds, slices)))
    start = time.perf_counter()
    compression = replica.job.compression
    memory = _memory(replica)
    messages: list
    if isinstance(compression, TopK):
        messages = topk_messages(memory, block, gradient, bounds, compression.ratio)
    else:
        warm_q = {index: q for part in warm for index, q in part.items()}
        messages = _powersgd(replica).first(block, gradient, warm_q or _initial_q(replica),
                                            bounds)
    result = dataclasses.replace(result, bytes_written=message_bytes(messages),
                                 write_seconds=result.write_seconds + time.perf_counter() - start)
    return (*messages, (result, None))  # no chunk sends to time: the runner passes the messages


def powersgd_second(replica: ModelReplica, block: int, bounds: list[tuple[int, int]],
                    *p_hats: dict[int, np.ndarray]) -> tuple:
    """Round 2: Q_b per shard, then the messages' bytes."""
    p_hat = {index: p for part in p_hats for index, p in part.items()}
    messages = _powersgd(replica).second(block, p_hat, bounds)
    return (*messages, message_bytes(messages))


def _memory(replica: ModelReplica) -> ErrorFeedback:
    if replica.error_feedback_memory is None:
        replica.error_feedback_memory = ErrorFeedback(replica.layout.size, replica.flat.dtype)
    return replica.error_feedback_memory


def _powersgd(replica: ModelReplica) -> PowerSGDWorker:
    if replica.powersgd is None:
        compression = replica.job.compression
        assert isinstance(compression, PowerSGD)
        replica.powersgd = PowerSGDWorker(PowerSGDPlan.of(replica.layout, compression.rank),
                                          _memory(replica))
    return replica.powersgd


def _initial_q(replica: ModelReplica) -> dict[int, np.ndarray]:
    return _powersgd(replica).plan.initial_q(replica.job.seed, replica.flat.dtype)


def error_feedback(replica: ModelReplica) -> dict[int, np.ndarray]:
    return _memory(replica).state()


def load_error_feedback(replica: ModelReplica, errors: Mapping[int, np.ndarray]) -> None:
    _memory(replica).load(errors)


# --- the shards' side --------------------------------------------------------------------------


def reduce_topk(shard: ParameterServerShard, lr: float | None, *messages) -> tuple:
    """Sum the blocks' top-k messages; with `lr`, apply too. Returns (ReduceResult, no warm
    start, ApplyResult or None, the slice or None, 0 bytes besides the slice)."""
    compressed = shard.compressed
    assert isinstance(compressed, TopKShard)
    reduced = shard.reduce(compressed.dense_parts(messages))
    return (reduced, None, *_apply(shard, lr), 0)


def reduce_powersgd_first(shard: ParameterServerShard,
                          *messages: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Round 1: P^ of the matrices this shard answers for, and its bytes (sent to every
    worker)."""
    compressed = shard.compressed
    assert isinstance(compressed, PowerSGDShard)
    p_hat = compressed.reduce_first(messages)
    return p_hat, message_bytes(list(p_hat.values()))


def reduce_powersgd_second(shard: ParameterServerShard, lr: float | None,
                           *messages: np.ndarray) -> tuple:
    """Round 2: (ReduceResult, warm Q, ApplyResult or None, the slice or None, Q's bytes)."""
    compressed = shard.compressed
    assert isinstance(compressed, PowerSGDShard)
    gradient, warm_q = compressed.reduce_second(messages)
    reduced = shard.reduce([gradient])
    return (reduced, warm_q, *_apply(shard, lr), message_bytes(list(warm_q.values())))


def _apply(shard: ParameterServerShard, lr: float | None) -> tuple:
    if lr is None:  # the runner's coefficients come first (global-norm clipping)
        return None, None
    return apply_and_return(shard, lr)


def shard_compression(compression: Compression | None, layout: ParameterLayout,
                      bounds: tuple[int, int],
                      block_count: int) -> TopKShard | PowerSGDShard | None:
    """What shard [lo, hi) keeps for `compression` (None: nothing)."""
    if isinstance(compression, TopK):
        return TopKShard(block_count, bounds[1] - bounds[0], layout.dtype)
    if isinstance(compression, PowerSGD):
        return PowerSGDShard(PowerSGDPlan.of(layout, compression.rank), bounds, block_count,
                             layout.dtype)
    return None

