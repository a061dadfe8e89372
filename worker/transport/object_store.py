"""A step through the Ray object store: for actors on other hosts than the runner.

Each worker receives the shards' updated slices (the all-gather) and computes its block; it
sends shard k the block's chunk [lo_k, hi_k) itself, by an actor call, as soon as every
parameter in that range has its block sum: during the backward pass of its last micro-batch,
while the layers below are still being differentiated (the reduce-scatter overlapped with
backward, in buckets as PyTorch's DDP does; here a bucket is a shard's chunk, which the
object store moves in one transfer). Backward produces the top layers first, and the last
shard holds them, so its chunk leaves first. Shard k keeps the chunks in an inbox; once every
block is delivered the runner asks it to sum the N chunks in the fixed tree order, apply the
optimizer and return its updated slice. Every worker sends and receives about one model's
worth of bytes per step, through object-store copies and actor calls, which cost milliseconds
each: on one host the shared-memory transport (shared_memory.py) is used instead.

Why the workers send, rather than return their chunks for the runner to pass on: a transfer
between two hosts costs ~7 ms before its first byte (measured on the 10 Gbit/s namespace hosts,
bench/multihost.py), so the only cut is to start it earlier, and a call the worker makes
during backward starts it while the worker still computes.

K-FAC's factor-update steps add to each chunk the float64 statistics section covering that
shard's layers (worker/kfac_layout.py), sent after the block is complete, which the shard sums
in the same fixed tree as the gradient chunks. With a KL clip the shards first return each
layer's v.g, and the runner sends K-FAC's coefficient nu with the clipping coefficient.

This module owns both ends of the protocol: the runner's side (ObjectStoreTransport) and what
the actors do when called (compute_and_send, ChunkSender, ChunkInbox, reduce_pushed,
apply_and_return, reduce_apply_pushed, which ModelReplica and ParameterServerShard expose as
their remote methods). It lives in worker/ because the actors run it and must not import the
scheduler.

The runner's side reports what went wrong and decides nothing: a worker that dies or misses
the deadline comes back as WorkersLost (the shards have not been asked to reduce yet, so
`recompute` on a survivor completes the step with the same bits: its chunks replace any the
lost worker sent), a dead or silent shard, or one whose chunks never came, as ShardLost, an
error raised by the job's computation as BlockFailed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray

from worker.transport.liveness import Liveness, shard_lost
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
    from worker.flat_parameters import ParameterLayout, ParameterSlot
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
        # The step in progress: each block's call, owner and, once delivered, figures and
        # when its chunks were sent.
        self.work: StepWork | None = None
        self.calls: dict[int, ray.ObjectRef] = {}
        self.owners: dict[int, int] = {}
        self.delivered: dict[int, BlockResult] = {}
        self.sends: dict[int, ChunkSends] = {}

    def start(self) -> None:
        self.push_parameters()

    def push_parameters(self) -> None:
        """The runner's vector to every shard, and as the slices the workers start from."""
        self._shard_values([shard.load_parameters.remote(self.parameters[lo:hi])
                            for shard, (lo, hi) in zip(self.actors.shards, self.bounds)],
                           "while loading parameters")
        self.slices = [ray.put(np.array(self.parameters[lo:hi])) for lo, hi in self.bounds]

    def sync_parameters(self) -> None:
        """The shards' slices (in their object stores since the last step) into the runner's
        vector; the shard holding a slice is watched while it comes."""
        for (lo, hi), values in zip(self.bounds, self._shard_values(
                self.slices, "while reading its parameters")):
            self.parameters[lo:hi] = values

    def _shard_values(self, refs: list[ray.ObjectRef], when: str) -> list:
        """The values of one call per shard (shard k's ref at k: a call's, or an object it
        returned), between steps, waited on with heartbeats (liveness.py): a shard that died,
        misses its heartbeat or stays silent past the timeout is a lost one, ActorFailure
        for the runner's failure policy."""
        return self.liveness.answers_or_failure(dict(enumerate(refs)),
                                                dict(enumerate(self.actors.shards)),
                                                self.timeout_seconds, shard_lost(when))

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
        self.work, self.calls, self.owners, self.delivered, self.sends = work, {}, {}, {}, {}
        self.master_buffers = (None if work.master_buffers is None
                               else ray.put(work.master_buffers))
        return self.recompute(dict(enumerate(work.block_owners)))

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        work = self.work
        if work is None:
            raise RuntimeError("recompute() needs a step that returned WorkersLost")
        self._submit_blocks(work, owners)
        failure = self._collect_blocks(work)
        if failure is not None:
            return failure
        try:
            return self._reduce_and_apply(work)
        except ray.exceptions.RayActorError:
            return ShardLost(None, f"during step {work.step}")
        except ray.exceptions.RayTaskError as error:  # a shard's chunks never all came
            return ShardLost(None, f"during step {work.step}: {error.cause}")
        except _ShardGone as gone:
            return gone.failure

    def _submit_blocks(self, work: StepWork, owners: Mapping[int, int]) -> None:
        """Call each block's owner (block -> worker) to compute it and send its chunks."""
        shards = list(self.actors.shards)
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            self.calls[block] = self.actors.replicas[worker].compute_and_send.remote(
                work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers,
                self.bounds, block, shards, *self.slices)

    def _collect_blocks(self, work: StepWork) -> StepFailure | None:
        """Wait for every block not yet delivered. Owners that die, stop answering their
        heartbeat (liveness.py: a lost node is found in seconds) or let the step's deadline
        pass are lost, with the blocks they had not delivered; the other owners' blocks still
        in progress stay theirs."""
        pending = {block: call for block, call in self.calls.items()
                   if block not in self.delivered}
        if not pending:  # the lost blocks had all been delivered (direct.py): nothing to wait on
            return None
        awaited: dict[int, list[ray.ObjectRef]] = {}
        for block, ref in pending.items():
            awaited.setdefault(self.owners[block], []).append(ref)
        replicas = self.actors.replicas
        shards = self._shards_watched_with_blocks()
        waited = self.liveness.wait(awaited, {w: replicas[w] for w in awaited},
                                    work.deadline_seconds,
                                    watching={("shard", k): shard for k, shard in shards.items()})
        if lost_shards := sorted(k for _, k in waited.unanswered & {("shard", k) for k in shards}):
            return ShardLost(lost_shards[0], f"without answering its heartbeat in step "
                                             f"{work.step}")
        ready = set(waited.ready)
        lost: set[int] = set()  # died
        # Past the deadline (every owner still computing), or missed a heartbeat.
        silent: set[int] = set(waited.unanswered) if waited.unanswered else {
            self.owners[block] for block, ref in pending.items() if ref not in ready}
        for block, ref in pending.items():
            if ref not in ready:
                continue
            try:
                self.delivered[block], self.sends[block] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost.add(self.owners[block])
            except ray.exceptions.RayTaskError as error:  # the job's computation raised
                return self._block_error(work, block, error.cause)
        if not lost | silent:
            return None
        gone = lost | silent
        return WorkersLost(work.step, tuple(sorted(gone)),
                           tuple(b for b in range(len(work.block_ranges))
                                 if b not in self.delivered and self.owners[b] in gone),
                           tuple(sorted(silent - lost - waited.unanswered)),
                           tuple(sorted(waited.unanswered - lost)),
                           tuple(sorted(waited.raylet_gone - lost)))

    def _shards_watched_with_blocks(self) -> dict[int, object]:
        """Shards to send heartbeats while the blocks compute (shard index -> actor): none
        here, as no shard has been called yet."""
        return {}

    def _block_error(self, work: StepWork, block: int, cause: BaseException) -> StepFailure:
        """What a block's call that raised `cause` means: here, the job's computation
        failed."""
        return BlockFailed(work.step, block, self.owners[block],
                           f"{type(cause).__name__}: {cause}")

    def _reduce_and_apply(self, work: StepWork) -> StepOutcome:
        reduced, applied = self._reduce_and_apply_on_shards(work)
        return self._step_outcome(work, reduced, applied)

    def _reduce_and_apply_on_shards(self, work: StepWork
                                    ) -> tuple[list[ReduceResult], list[ApplyResult]]:
        """Every shard's figures once it has summed the step's chunks and applied; the
        updated slices stay in the shards' object stores (self.slices) for the next step."""
        shards = self.actors.shards
        # The shard waits for chunks still on their way; past the deadline it gives up.
        inbox = (work.step, len(work.block_ranges), work.deadline_seconds)
        if not work.waits_for_coefficients:
            calls = [shard.reduce_apply_pushed.options(num_returns=3).remote(*inbox, work.lr)
                     for shard in shards]
            reduced = self._from_shards([c[0] for c in calls], work)
            applied = self._from_shards([c[1] for c in calls], work)
            self.slices = [c[2] for c in calls]
        else:
            reduced = self._from_shards([shard.reduce_pushed.remote(*inbox) for shard in shards],
                                        work)
            coefficient, nu = apply_coefficients(
                work, sum(r.squared_norm for r in reduced),
                [dot for r in reduced for dot in r.direction_dots.values()])
            calls = [shard.apply_and_return.options(num_returns=2).remote(work.lr, coefficient,
                                                                          nu)
                     for shard in shards]
            applied = self._from_shards([c[0] for c in calls], work)
            self.slices = [c[1] for c in calls]
        return reduced, applied

    def _step_outcome(self, work: StepWork, reduced: Sequence[ReduceResult],
                      applied: Sequence[ApplyResult]) -> StepOutcome:
        blocks = range(len(work.block_ranges))
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
        communication, hidden = overlap_seconds(
            [self.sends[b] for b in blocks], [r.chunk_arrivals for r in reduced])
        return StepOutcome(block_stats, shard_stats, norms, self._micro_batch_buffers(work),
                           communication_seconds=communication,
                           hidden_communication_seconds=hidden)

    def _micro_batch_buffers(self, work: StepWork) -> list[np.ndarray] | None:
        """Each micro-batch's flat buffers after it, in micro-batch order (None: the model has
        none), from the delivered blocks' figures."""
        results = [self.delivered[b] for b in range(len(work.block_ranges))]
        if results[0].buffers is None:  # then every block's are: one model
            return None
        return [self.flatten_buffers(values) for r in results for values in r.buffers or ()]


    def _from_shards(self, refs: list[ray.ObjectRef], work: StepWork) -> list:
        """The values of one call per shard (shard k's ref at k). A shard that misses its
        heartbeat or the step's deadline raises _ShardGone; one that died, RayActorError."""
        waited = self.liveness.wait({k: [ref] for k, ref in enumerate(refs)},
                                    dict(enumerate(self.actors.shards)), work.deadline_seconds)
        if waited.raylet_gone:
            raise _ShardGone(ShardLost(min(waited.raylet_gone),
                                       f"with its raylet in step {work.step} (found by its "
                                       f"heartbeat)"))
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


# --- when the chunks travelled: the overlap of communication with backward ----------------


@dataclasses.dataclass(frozen=True)
class ChunkSends:
    """When (time.time()) a worker sent each shard its chunk of a block, and when its block
    was complete: the overlap figures compare these with when the chunks arrived."""

    sent_at: dict[int, float]  # shard -> when its chunk was sent
    computed_at: float


def overlap_seconds(sends: Sequence[ChunkSends],
                    arrivals: Sequence[Mapping[int, float]]) -> tuple[float, float]:
    """(seconds the step's chunks spent between sender and shard, the part of those seconds
    during which their senders were still computing), summed over the chunks. `arrivals[k]`:
    block -> when shard k received that block's chunk. The clocks of two real hosts differ by
    their skew; the namespace hosts share one clock."""
    communication = hidden = 0.0
    for shard, arrived in enumerate(arrivals):
        for block, at in arrived.items():
            sent = sends[block].sent_at.get(shard)
            if sent is None:
                continue
            communication += max(0.0, at - sent)
            hidden += max(0.0, min(at, sends[block].computed_at) - sent)
    return communication, hidden


# --- the actors' side ----------------------------------------------------------------------------


class ChunkSender:
    """A worker's reduce-scatter of one block: shard k is sent block[lo_k:hi_k] as soon as
    every parameter that overlaps it has its block sum (`parameter_ready`, called from the
    backward pass's gradient hooks), the rest when the block is complete (`finish`)."""

    def __init__(self, layout: ParameterLayout, block: np.ndarray,
                 bounds: Sequence[tuple[int, int]],
                 send: Callable[[int, np.ndarray], None]):
        self.block, self.bounds, self.send = block, list(bounds), send
        self.views = layout.views(block)
        self.names = [slot.name for slot in layout.slots]
        # Shard k waits for the parameters (by index) that have elements in [lo_k, hi_k).
        self.shards_of: list[list[int]] = [
            [k for k, (lo, hi) in enumerate(self.bounds)
             if slot.offset < hi and lo < slot.offset + slot.size]
            for slot in layout.slots]
        self.waiting = [{i for i, shards in enumerate(self.shards_of) if k in shards}
                        for k in range(len(self.bounds))]
        self.sent_at: dict[int, float] = {}
        self.reported: set[int] = set()

    def parameter_ready(self, index: int, block_sum: np.ndarray) -> None:
        if index in self.reported:  # a chunk holding its first value may have left already
            raise RuntimeError(f"the gradient of {self.names[index]} was final twice in one "
                               f"backward pass (a weight shared with a recomputed segment?)")
        self.reported.add(index)
        np.copyto(self.views[self.names[index]], block_sum)
        for k in self.shards_of[index]:
            self.waiting[k].discard(index)
            if not self.waiting[k]:
                self._send(k)

    def finish(self) -> None:
        """The block is complete: send every chunk not sent yet (parameters without a
        gradient hook call: unused, frozen, or a block without micro-batches)."""
        for k in range(len(self.bounds)):
            self._send(k)

    def _send(self, k: int) -> None:
        if k in self.sent_at:
            return
        self.sent_at[k] = time.time()
        lo, hi = self.bounds[k]
        self.send(k, self.block[lo:hi])


def compute_and_send(replica: ModelReplica, micro_batches: list[tuple[int, np.ndarray]],
                     step: int, batch_size: int, master_buffers: np.ndarray | None,
                     bounds: list[tuple[int, int]], block_index: int, shards: Sequence,
                     *slices: np.ndarray) -> tuple[BlockResult, ChunkSends]:
    """A worker's step: take the shards' updated slices (the all-gather), compute the block and
    send each shard its chunk (the reduce-scatter) by an actor call as soon as it is known.
    Returns the block's figures and when its chunks left."""

    def send(k: int, chunk: np.ndarray, section: np.ndarray | None) -> None:
        shards[k].accept_chunk.remote(step, block_index, chunk, section)

    return compute_and_stream(replica, micro_batches, step, batch_size, master_buffers, bounds,
                              list(zip(bounds, slices)), send)


def compute_and_stream(replica: ModelReplica, micro_batches: list[tuple[int, np.ndarray]],
                       step: int, batch_size: int, master_buffers: np.ndarray | None,
                       bounds: list[tuple[int, int]],
                       parameter_slices: Sequence[tuple[tuple[int, int], np.ndarray]],
                       send: Callable[[int, np.ndarray, np.ndarray | None], None],
                       ) -> tuple[BlockResult, ChunkSends]:
    """Compute a block from the replica's parameters (`parameter_slices` written in first)
    and `send(k, chunk, statistics section or None)` shard k its chunk as soon as it is known;
    on a K-FAC factor-update step every chunk goes with its statistics section, once the block
    is complete. Returns the block's figures and when its chunks left. The transports that
    stream chunks (this one, direct.py) differ only in `send`."""
    # A fresh block each call: a chunk sent may still be on its way while the next block is
    # computed (an actor call copies it when sent, a socket link when its turn comes).
    block = np.empty_like(replica.flat)
    kfac = replica.kfac
    statistics = (np.empty(kfac.statistics_size)
                  if kfac is not None and replica.carries_statistics(step) else None)

    def send_chunk(k: int, chunk: np.ndarray) -> None:
        section = None
        if kfac is not None and statistics is not None:
            lo, hi = kfac.statistics_bounds(*bounds[k])
            section = statistics[lo:hi]
        send(k, chunk, section)

    sender = ChunkSender(replica.layout, block, bounds, send_chunk)
    result = replica.compute(replica.layout.views(block), micro_batches, step, batch_size,
                             master_buffers, parameter_slices=parameter_slices,
                             statistics=statistics,
                             chunk_sender=sender if statistics is None else None)
    computed_at = time.time()
    sender.finish()
    return result, ChunkSends(sender.sent_at, computed_at)


class ChunkInbox:
    """A shard's chunks of the step in progress, as the workers send them: block -> chunk
    (a recomputed block's chunk replaces the lost worker's, which has the same bits)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.gradients: dict[tuple[int, int], np.ndarray] = {}  # (step, block) -> chunk
        self.statistics: dict[tuple[int, int], np.ndarray] = {}
        self.arrivals: dict[tuple[int, int], float] = {}

    def accept(self, step: int, block: int, gradient: np.ndarray,
               statistics: np.ndarray | None) -> None:
        with self.changed:
            self.gradients[step, block] = gradient
            if statistics is not None:
                self.statistics[step, block] = statistics
            self.arrivals[step, block] = time.time()
            self.changed.notify_all()

    def take(self, step: int, blocks: int, with_statistics: bool, timeout_seconds: float
             ) -> tuple[list[np.ndarray], list[np.ndarray], dict[int, float]]:
        """Step `step`'s chunks of blocks 0..blocks-1 (then their statistics sections), and
        when each arrived; raises TimeoutError if they are not all in within the timeout.
        Empties the inbox: nothing of another step can still be needed."""
        keys = [(step, b) for b in range(blocks)]

        def complete() -> bool:
            return all(key in self.gradients and (not with_statistics or key in self.statistics)
                       for key in keys)

        with self.changed:
            if not self.changed.wait_for(complete, timeout=timeout_seconds):
                missing = [b for s, b in keys if (s, b) not in self.gradients]
                raise TimeoutError(f"step {step}: the chunks of blocks {missing} did not arrive "
                                   f"within {timeout_seconds:g} s")
            gradients = [self.gradients[key] for key in keys]
            statistics = [self.statistics[key] for key in keys] if with_statistics else []
            arrivals = {b: self.arrivals[s, b] for s, b in keys}
            self.gradients, self.statistics, self.arrivals = {}, {}, {}
        return gradients, statistics, arrivals


def reduce_pushed(shard: ParameterServerShard, step: int, blocks: int,
                  timeout_seconds: float) -> ReduceResult:
    """Sum the step's gradient chunks in block order (on a K-FAC factor-update step also their
    statistics sections), once all have arrived."""
    gradients, statistics, arrivals = shard.inbox.take(
        step, blocks, shard.expects_statistics(), timeout_seconds)
    reduced = shard.reduce(gradients, statistics) if statistics else shard.reduce(gradients)
    return dataclasses.replace(reduced, chunk_arrivals=arrivals)


def apply_and_return(shard: ParameterServerShard, lr: float, coefficient: float = 1.0,
                     kl_coefficient: float = 1.0) -> tuple[ApplyResult, np.ndarray]:
    """Apply, and return the updated slice for the replicas (the all-gather)."""
    return shard.apply(lr, coefficient, kl_coefficient), shard.parameters


def reduce_apply_pushed(shard: ParameterServerShard, step: int, blocks: int,
                        timeout_seconds: float, lr: float) -> tuple:
    return (reduce_pushed(shard, step, blocks, timeout_seconds),
            *apply_and_return(shard, lr))
