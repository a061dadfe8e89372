"""A step through the Ray object store with compressed gradients (the spec's
communication.compression): what travels in place of the gradient chunks of object_store.py
and of the updated slices. compressed_direct.py sends the same messages over direct.py's
connections instead (the default; the same bits), and reuses this module's runner side and
workers' functions. Both halves of the all-reduce are compressed: the shards sum the
workers' messages and answer every worker with the step gradient in compressed form, and every
worker applies the optimizer step itself (Vogels et al.'s PowerSGD all-reduces P and Q and
each worker steps with the same decompressed gradient; here the shards do the summing).

Top-k, one round: each worker returns one (indices, values) message per shard; shard k
scatters the blocks' messages into dense parts, sums them in the fixed tree order and answers
with the sum's nonzero entries (at most the blocks' pairs together).

PowerSGD, two rounds (worker/compression.py has the math):
  worker b: apply the last step's update; compute the block, return per shard its dense runs
            and P_b = M_b Q                                                     (round 1)
  shard k:  sum, orthogonalise P -> P^ (the matrices it answers for)
  worker b: given every shard's P^, return per shard Q_b = M_b^T P^              (round 2)
  shard k:  sum Q; answer with its dense runs' sums and Q (the matrices it answers for)
Every worker then holds P^, Q and the dense sums: the step gradient, P^ Q^T formed elementwise
so that every worker has the same bits. The runner passes refs from one call to the next and
never waits for the gradient itself, only for the shards' norms (its clipping coefficient and
the step's figures).

Why every worker steps the optimizer rather than the shards: a shard's updated slice is as
large as its gradient, so the all-gather would carry whole parameters back (on the reference
MLP 7.4 MB a step against 0.09 MB of factors). Each worker keeps the optimizer state of the
whole vector (a ParameterServerShard over [0, size), replicated_optimizer) and steps it with
the same inputs in the same order, so the replicas stay bitwise equal; sync_parameters checks
that on every checkpoint and evaluation, and a checkpoint takes one worker's state. A step's
update is applied at the start of the next step's call (no round trip of its own), or by
sync_parameters when the runner needs the parameters before that. The shards need nothing
from one step to the next, and hold no optimizer state.

Bytes are counted where they are sent: a worker's messages (BlockStats.bytes_sent), and what
every worker receives from the shards: P^ and the replies (bytes_received).

A worker lost during a compressed step takes its blocks' error feedback with it: the step
returns ErrorFeedbackLost, and the job restarts from its last checkpoint (which holds them)
rather than recompute those blocks elsewhere with an empty memory. One lost between steps
(while the runner takes a checkpoint, the parameters or the optimizer state, or loads them)
is the same failure, raised as ActorFailure(ErrorFeedbackLost) for the failure policy. A
lost shard is a ShardLost, as on the uncompressed path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
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
    topk_decompress,
    topk_messages,
    topk_reply,
)
from worker.transport.object_store import ObjectStoreTransport, _ShardGone
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


@dataclasses.dataclass(frozen=True)
class StepUpdate:
    """What every worker needs, besides the shards' replies, to apply step `step`'s update."""

    step: int
    lr: float
    clip_coefficient: float  # global-norm clipping's, from every shard's norm (1.0: none)


# --- the runner's side -------------------------------------------------------------------------


class CompressedObjectStoreTransport(ObjectStoreTransport):
    def __init__(self, *args, compression: Compression, **kwargs):
        super().__init__(*args, **kwargs)
        self.compression = compression
        # The last step's update while the workers have not applied it: what it is, and each
        # shard's reply (refs); the next step's calls, or sync_parameters, carry it.
        self.update: tuple[StepUpdate, list[ray.ObjectRef]] | None = None

    # --- the parameters and the optimizer state live on the workers -------------------------

    def push_parameters(self) -> None:
        """The runner's vector to every worker (each steps its own copy)."""
        values = ray.put(np.array(self.parameters))
        self._on_every_worker(lambda replica: replica.load_parameter_vector.remote(values))
        self.update = None

    def sync_parameters(self) -> None:
        """Every worker applies the pending update; the runner takes one's vector, after
        checking that all of them hold the same bits (they apply the same update: a
        difference is a bug, found here rather than as a slowly drifting model)."""
        if self.update is not None:
            update, replies = self.update
            digests = self._apply_update_on_every_worker(update, replies)
            self.update = None
            if len(set(digests)) != 1:
                raise RuntimeError(f"the workers' parameters differ after step {update.step} "
                                   f"(digests {digests}): a replicated update went wrong")
        first = self.actors.replicas[0]
        self.parameters[:] = self._answers({0: first.parameter_vector.remote()})[0]

    def _apply_update_on_every_worker(self, update: StepUpdate,
                                      replies: list[ray.ObjectRef]) -> list[str]:
        """Every worker applies `update` now; their digests (sync_parameters)."""
        return self._on_every_worker(
            lambda replica: replica.apply_step_update.remote(self.bounds, update, *replies))

    def optimizer_state(self) -> tuple[int, dict[str, np.ndarray]]:
        """(optimizer steps, state) of the whole vector, from one worker (all hold the same),
        in the shards' format: a checkpoint does not depend on where the optimizer ran."""
        self._require_synced("optimizer_state")
        return self._answers({0: self.actors.replicas[0].optimizer_state.remote()})[0]

    def load_optimizer_state(self, optimizer_steps: int, state: dict[str, np.ndarray]) -> None:
        saved = ray.put(state)
        self._on_every_worker(
            lambda replica: replica.load_optimizer_state.remote(optimizer_steps, saved))

    def _require_synced(self, what: str) -> None:
        if self.update is not None:
            raise RuntimeError(f"{what}() before sync_parameters(): step "
                               f"{self.update[0].step}'s update is not applied yet")

    def _on_every_worker(self, call) -> list:
        """One call to every worker, in parallel."""
        return self._answers({worker: call(replica)
                              for worker, replica in enumerate(self.actors.replicas)})

    def _answers(self, calls: Mapping[int, ray.ObjectRef]) -> list:
        """The answers of calls made between steps (worker -> its call), in that order, under
        one deadline, waited on with heartbeats (liveness.py). A dead, stopped or silent worker
        has taken its blocks' error feedback with it: ActorFailure(ErrorFeedbackLost) for the
        runner's failure policy, never a raw Ray error (which would end the job as failed
        rather than restart it)."""
        replicas = self.actors.replicas
        step = self.work.step if self.work is not None else 0
        return self.liveness.answers_or_failure(
            calls, {w: replicas[w] for w in calls}, self.timeout_seconds,
            lambda gone: ErrorFeedbackLost(step, tuple(sorted(gone.actors))))

    # --- one step ----------------------------------------------------------------------------

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
        update, replies = self.update if self.update is not None else (None, [])
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            refs = self.actors.replicas[worker].compress_block.options(
                num_returns=len(self.bounds) + 1).remote(
                block, work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers,
                self.bounds, update, *replies)
            self.messages[block], self.calls[block] = refs[:-1], refs[-1]
        failure = self._collect_blocks(work)
        if failure is not None:
            return failure
        self.update = None  # every block's worker has applied it
        try:
            return self._reduce(work)
        except ray.exceptions.RayActorError:
            return ShardLost(None, f"during step {work.step}")
        except _ShardGone as gone:
            return gone.failure
        except _WorkersGone as gone:
            return gone.failure

    def _reduce(self, work: StepWork) -> StepOutcome:
        blocks = range(len(work.block_ranges))
        shards = self.actors.shards
        firsts = [[self.messages[b][k] for b in blocks] for k in range(len(shards))]
        # Every round is submitted at once, each call taking the refs of the one before (Ray
        # starts a call when its arguments exist); the runner waits only for the figures.
        p_hat_calls: list = []  # PowerSGD's round 1 on the shards
        seconds: list = []  # and round 2 on the workers
        if isinstance(self.compression, PowerSGD):
            p_hat_calls = [shard.reduce_powersgd_first.options(num_returns=2).remote(*messages)
                           for shard, messages in zip(shards, firsts)]
            p_hat = [call[0] for call in p_hat_calls]
            seconds = [self.actors.replicas[self.owners[b]].powersgd_second.options(
                num_returns=len(shards) + 1).remote(b, self.bounds, *p_hat) for b in blocks]
            messages_of_shard = [[call[k] for call in seconds] for k in range(len(shards))]
            reduce_name = "reduce_powersgd_second"
        else:
            messages_of_shard = firsts
            reduce_name = "reduce_topk"
        # Each: ReduceResult, the reply to every worker, the reply's bytes.
        calls = [getattr(shard, reduce_name).options(num_returns=3).remote(*messages)
                 for shard, messages in zip(shards, messages_of_shard)]
        # A worker lost in round 2 is found here, before the shards' calls that wait on it.
        second_rounds = self._second_rounds(seconds, blocks, work)
        reduced = self._from_shards([c[0] for c in calls], work)
        coefficient, _ = apply_coefficients(work, sum(r.squared_norm for r in reduced), ())
        self.update = (StepUpdate(work.step, work.lr, coefficient), [c[1] for c in calls])
        # Bytes each worker receives from shard k: P^ (PowerSGD) and its reply.
        received = self._from_shards([c[2] for c in calls], work)
        if p_hat_calls:
            firsts_done = self._from_shards([call[1] for call in p_hat_calls], work)
            received = [p + r for (p, _), r in zip(firsts_done, received)]
            reduced = [dataclasses.replace(r, seconds=r.seconds + first_seconds)
                       for r, (_, first_seconds) in zip(reduced, firsts_done)]
        return self._outcome(work, reduced, second_rounds, received)

    def _outcome(self, work: StepWork, reduced: list[ReduceResult],
                 second_rounds: list[tuple[int, float]], received: list[int]) -> StepOutcome:
        norms = np.zeros(len(self.slots))
        index = {slot.name: i for i, slot in enumerate(self.slots)}
        for r in reduced:
            for name, value in r.parameter_squared_norms.items():
                norms[index[name]] += value
        results = [self.delivered[b] for b in range(len(work.block_ranges))]
        block_stats = [BlockStats(r.loss_sum, r.samples, r.correct, r.seconds,
                                  r.write_seconds + extra_seconds, r.bytes_written + extra,
                                  r.apply_seconds)
                       for r, (extra, extra_seconds) in zip(results, second_rounds)]
        shard_stats = [ShardStats(r.squared_norm, r.seconds, 0.0, sent)
                       for r, sent in zip(reduced, received)]
        micro = None
        if results[0].buffers is not None:
            micro = [self.flatten_buffers(values) for r in results for values in r.buffers or ()]
        return StepOutcome(block_stats, shard_stats, norms, micro)

    def _second_rounds(self, seconds: list, blocks: range,
                       work: StepWork) -> list[tuple[int, float]]:
        """Each block's round-2 (message bytes, seconds); (0, 0.0) without a round 2."""
        if not seconds:
            return [(0, 0.0) for _ in blocks]
        return self._from_workers([call[-1] for call in seconds], blocks, work)

    def _from_workers(self, refs: list[ray.ObjectRef], blocks: range,
                      work: StepWork) -> list:
        """The values of one call per block (block b's owner computes it); a worker lost
        meanwhile is a _WorkersGone carrying ErrorFeedbackLost (the memories are gone)."""
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
        start (one worker's: all hold the same), under keys that do not depend on the shard
        count."""
        self._require_synced("compression_state")
        workers = sorted(set(owners.values()))
        states = dict(zip(workers, self._answers(
            {w: self.actors.replicas[w].compression_state.remote() for w in workers})))
        state = {f"error_feedback/{b}": states[w][0][b] for b, w in owners.items()
                 if b in states[w][0]}
        state.update({f"powersgd_q/{index}": q for index, q in states[workers[0]][1].items()})
        return state

    def load_compression_state(self, state: Mapping[str, np.ndarray],
                               owners: Mapping[int, int]) -> None:
        """Give each worker its blocks' error feedback, and every worker the warm start. A
        checkpoint of another block count (another worker count) gives block 0 the sum of
        its blocks' errors: the sum is what later steps owe (for PowerSGD, exactly what they
        send)."""
        saved = {int(key.removeprefix("error_feedback/")): value
                 for key, value in state.items() if key.startswith("error_feedback/")}
        if saved and saved.keys() != owners.keys():
            saved = {0: np.sum([saved[b] for b in sorted(saved)], axis=0)}
        errors: dict[int, dict[int, np.ndarray]] = {}
        for block, value in saved.items():
            errors.setdefault(owners[block], {})[block] = value
        warm = {int(key.removeprefix("powersgd_q/")): value for key, value in state.items()
                if key.startswith("powersgd_q/")}
        self._answers({w: replica.load_compression_state.remote(errors.get(w, {}), warm)
                       for w, replica in enumerate(self.actors.replicas)})


class _WorkersGone(Exception):
    def __init__(self, failure: ErrorFeedbackLost):
        super().__init__(failure.step)
        self.failure = failure


# --- the workers' side -------------------------------------------------------------------------


def compress_block(replica: ModelReplica, block: int,
                   micro_batches: list[tuple[int, np.ndarray]], step: int, batch_size: int,
                   master_buffers: np.ndarray | None, bounds: list[tuple[int, int]],
                   update: StepUpdate | None, *replies) -> tuple:
    """Apply the last step's `update` (with the shards' `replies`), compute block `block` and
    return its first message per shard, then (the block's figures, bytes_written the
    messages', None), the shape of compute_and_send's answer."""
    apply_seconds = 0.0
    if update is not None:
        apply_seconds = apply_update(replica, bounds, update, replies)
    gradient = np.empty_like(replica.flat)
    result = replica.compute(replica.layout.views(gradient), micro_batches, step, batch_size,
                             master_buffers)
    start = time.perf_counter()
    messages = first_messages(replica, block, gradient, bounds)
    result = dataclasses.replace(result, bytes_written=message_bytes(messages),
                                 write_seconds=result.write_seconds + time.perf_counter() - start,
                                 apply_seconds=apply_seconds)
    return (*messages, (result, None))  # no chunk sends to time: the runner passes the messages


def first_messages(replica: ModelReplica, block: int, gradient: np.ndarray,
                   bounds: Sequence[tuple[int, int]]) -> list:
    """Block `block`'s first (top-k: only) message to each shard: top-k's (indices, values)
    pairs, or PowerSGD's dense runs and P_b."""
    compression = replica.job.compression
    if isinstance(compression, TopK):
        return topk_messages(_memory(replica), block, gradient, bounds, compression.ratio)
    worker = powersgd_worker(replica)
    return worker.first(block, gradient, worker.warm_q, bounds)


def powersgd_second(replica: ModelReplica, block: int, bounds: list[tuple[int, int]],
                    *p_hats: dict[int, np.ndarray]) -> tuple:
    """Round 2: Q_b per shard, then (the messages' bytes, the seconds they took)."""
    start = time.perf_counter()
    p_hat = {index: p for part in p_hats for index, p in part.items()}
    messages = powersgd_worker(replica).second(block, p_hat, bounds)
    return (*messages, (message_bytes(messages), time.perf_counter() - start))


def apply_step_update(replica: ModelReplica, bounds: list[tuple[int, int]], update: StepUpdate,
                      *replies) -> str:
    """Apply `update` now (the runner needs the parameters before the next step); returns a
    digest of the parameter vector, which every worker's must match."""
    apply_update(replica, bounds, update, replies)
    return hashlib.blake2b(replica.flat.data, digest_size=16).hexdigest()


def apply_update(replica: ModelReplica, bounds: Sequence[tuple[int, int]], update: StepUpdate,
                 replies: Sequence) -> float:
    """The step gradient rebuilt from the shards' replies, then the optimizer step on the
    whole vector; returns its seconds. Once per step and worker: every block's call carries
    the update, and a worker computing two blocks must not step its optimizer twice."""
    start = time.perf_counter()
    optimizer = replicated_optimizer(replica)
    with replica._compute_lock:  # two blocks' calls may run at once (two actor threads)
        if replica.applied_update_step == update.step:
            return 0.0
        if isinstance(replica.job.compression, TopK):
            topk_decompress(optimizer.gradient, replies, bounds)
        else:
            powersgd_worker(replica).decompress(optimizer.gradient, replies, bounds)
        optimizer.apply(update.lr, update.clip_coefficient)
        replica.applied_update_step = update.step
    return time.perf_counter() - start


def replicated_optimizer(replica: ModelReplica) -> ParameterServerShard:
    """The worker's optimizer over its whole parameter vector: the shards' own code over
    [0, size), stepping the replica's vector in place."""
    if replica.replicated_optimizer is None:
        from worker.parameter_server import ParameterServerShard, ShardSetup

        job = replica.job
        setup = ShardSetup(0, (0, replica.layout.size), replica.layout, None, 1,
                           job.optimizer, job.hyperparameters, job.clipping.max_value)
        replica.replicated_optimizer = ParameterServerShard(setup, owns_process=False,
                                                            parameters=replica.flat)
    return replica.replicated_optimizer


def _memory(replica: ModelReplica) -> ErrorFeedback:
    if replica.error_feedback_memory is None:
        replica.error_feedback_memory = ErrorFeedback(replica.layout.size, replica.flat.dtype)
    return replica.error_feedback_memory


def powersgd_worker(replica: ModelReplica) -> PowerSGDWorker:
    if replica.powersgd is None:
        compression = replica.job.compression
        assert isinstance(compression, PowerSGD)
        plan = PowerSGDPlan.of(replica.layout, compression.rank)
        replica.powersgd = PowerSGDWorker(plan, _memory(replica),
                                          plan.initial_q(replica.job.seed, replica.flat.dtype))
    return replica.powersgd


def compression_state(replica: ModelReplica) -> tuple[dict[int, np.ndarray],
                                                      dict[int, np.ndarray]]:
    """(each block's error feedback, PowerSGD's warm start or {})."""
    warm_q = {}
    if isinstance(replica.job.compression, PowerSGD):
        warm_q = {index: np.array(q) for index, q in powersgd_worker(replica).warm_q.items()}
    return _memory(replica).state(), warm_q


def load_compression_state(replica: ModelReplica, errors: Mapping[int, np.ndarray],
                           warm_q: Mapping[int, np.ndarray]) -> None:
    _memory(replica).load(errors)
    if warm_q:
        powersgd_worker(replica).warm_q = dict(warm_q)


# --- the shards' side --------------------------------------------------------------------------


def reduce_topk(shard: ParameterServerShard, *messages) -> tuple:
    """Sum the blocks' top-k messages. Returns (ReduceResult, the reply: the sum's nonzero
    entries, its bytes)."""
    compressed = shard.compressed
    assert isinstance(compressed, TopKShard)
    reduced = shard.reduce(compressed.dense_parts(messages))
    reply = topk_reply(shard.gradient)
    return reduced, reply, message_bytes([reply])


def reduce_powersgd_first(shard: ParameterServerShard, *messages: np.ndarray
                          ) -> tuple[dict[int, np.ndarray], tuple[int, float]]:
    """Round 1: P^ of the matrices this shard answers for, and (its bytes, sent to every
    worker; the seconds the round took)."""
    start = time.perf_counter()
    compressed = shard.compressed
    assert isinstance(compressed, PowerSGDShard)
    p_hat = compressed.reduce_first(messages)
    return p_hat, (message_bytes(list(p_hat.values())), time.perf_counter() - start)


def reduce_powersgd_second(shard: ParameterServerShard, *messages: np.ndarray) -> tuple:
    """Round 2: (ReduceResult, the reply: the dense runs' sums and Q of the matrices this
    shard answers for, its bytes)."""
    from worker.parameter_server import ReduceResult

    compressed = shard.compressed
    assert isinstance(compressed, PowerSGDShard)
    start = time.perf_counter()
    owned_q, norms = compressed.reduce_second(messages)
    reduced = ReduceResult(sum(norms.values()), norms, time.perf_counter() - start)
    reply = (compressed.dense_total, owned_q)
    return reduced, reply, message_bytes([compressed.dense_total, *owned_q.values()])


def shard_compression(compression: Compression | None, layout: ParameterLayout,
                      bounds: tuple[int, int],
                      block_count: int) -> TopKShard | PowerSGDShard | None:
    """What shard [lo, hi) keeps for `compression` (None: nothing)."""
    if isinstance(compression, TopK):
        return TopKShard(block_count, bounds[1] - bounds[0], layout.dtype)
    if isinstance(compression, PowerSGD):
        return PowerSGDShard(PowerSGDPlan.of(layout, compression.rank), layout, bounds,
                             block_count, layout.dtype)
    return None
