"""A step over shared memory and named pipes, when every actor of the job is on the runner's host.

The parameters, one gradient block per worker, the step's plan and the per-parameter norms live
in shared memory (worker/shared_memory.py); the replicas and shards run step loops that wake on
fixed-size messages through named pipes (named_pipe.py). A Ray call costs milliseconds per hop;
a pipe, microseconds. One step:

  runner --WorkerCommand(COMPUTE)--> worker w: compute block b into gradient block b, then
      its report into report row b and the step's number into written_at[b] (last)
  worker --BlockWritten--> every shard;  worker --BlockReport--> runner
  runner --ShardCommand(REDUCE_AND_APPLY)--> shard k: once every block is written, sum the
      blocks' slices into its own accumulator in the fixed tree order, apply the optimizer to
      its slice of the shared parameters;  shard --ShardReport(SHARD_APPLIED)--> runner
  (with global-norm clipping: REDUCE_THEN_WAIT, SHARD_REDUCED with the norm, then APPLY with
  the coefficient computed from every shard's norm)

K-FAC adds, on its factor-update steps, one float64 statistics block per worker beside the
gradient blocks (worker/kfac_layout.py): the worker writes its block's factor statistics there,
and each shard sums the section of its own layers over the blocks in the same fixed tree as
their gradients. With a KL clip the shards write each layer's v.g into a shared table and report
SHARD_REDUCED; APPLY then brings K-FAC's coefficient nu beside the clipping coefficient.

This module owns both ends of that protocol: the messages, the runner's side
(SharedMemoryTransport) and the actors' step loops (serve_worker, serve_shard, which
ModelReplica.serve and ParameterServerShard.serve run). It lives in worker/ because the actors
run it and must not import the scheduler (services -> scheduler -> worker); the runner's side
imports nothing from the scheduler either.

The runner's side reports what went wrong and decides nothing: a dead or silent worker comes
back as WorkersLost, a dead shard as ShardLost, a job error as BlockFailed, a lost worker whose
process it cannot end as WorkerNotFenced (ActorFailure between steps); start() raises
CannotFence when it could not end the job's worker processes at all.

A worker lost mid-step may have told some shards that its block is written and not others
(it dies between two BlockWritten), and a shard told of every block applies the step at once:
a survivor recomputing the block would then compute on parameters that shard has moved. So
the runner first ends the lost worker's process (worker_processes.py: it can write nothing
more, and everything it wrote is visible), then reads written_at: a block stamped with the
step is whole in shared memory with its gradient, BatchNorm rows, K-FAC statistics and
report, written before any shard was told. The runner counts it (its figures from the report
row) and tells every shard it is written (a shard told twice counts it once): WorkersLost's
`delivered_blocks`, nothing recomputed. An unstamped block no shard was told of, so no shard
has applied the step: `recompute` on a survivor completes it at the step's parameters, with
the same bits. The direct transport settles lost blocks by the same rule (direct.py), with
the shards holding the figures since nothing is shared there.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, unique
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import ray

from worker.shard_state_replica import (
    KeptState,
    ShardReplicaSpec,
    ShardStateWriter,
    read_kept_state,
    replica_arrays,
)
from worker.shared_memory import SharedArrayGroup, SharedArraySpec
from worker.transport.named_pipe import Channel, ChannelTimeout, Record
from worker.transport.step import (
    ActorFailure,
    BlockFailed,
    BlockStats,
    JobActors,
    ShardLost,
    ShardStats,
    StepFailure,
    StepOutcome,
    StepWork,
    WorkerNotFenced,
    WorkersLost,
    apply_coefficients,
)
from worker.transport.worker_processes import (
    PROCESS_FIELDS,
    CannotFence,
    actor_process_identity,
    end_worker_process,
    why_not_fenceable,
)

if TYPE_CHECKING:
    from worker.parameter_server import ParameterServerShard
    from worker.replica import ModelReplica

# How often the runner, waiting for a step's reports, checks whether a peer has died.
LIVENESS_CHECK_SECONDS = 0.5


# --- the messages ----------------------------------------------------------------------------


@unique
class Op(IntEnum):
    """What a command asks; one numbering for every command, so no two ops compare equal."""

    STOP = 0
    COMPUTE = 1  # worker: compute a block
    REDUCE_AND_APPLY = 2  # shard: sum the blocks, then apply the optimizer
    REDUCE_THEN_WAIT = 3  # shard: sum the blocks, report the norm, wait for APPLY
    APPLY = 4  # shard: apply with the global clipping coefficient


@unique
class ReportKind(IntEnum):
    BLOCK_DONE = 1
    BLOCK_FAILED = 2  # the job's computation raised; the message waits in last_error_message
    SHARD_REDUCED = 3
    SHARD_APPLIED = 4


@dataclass(frozen=True)
class WorkerCommand(Record):
    """Runner -> worker: compute micro-batches [micro_lo, micro_hi) of the step's plan into
    gradient block `block`; `samples` is the step's sample count (the loss's divisor)."""

    layout: ClassVar = struct.Struct("<iqqqqq")
    op: Op
    step: int
    block: int = 0
    micro_lo: int = 0
    micro_hi: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))  # an unknown code fails here, loudly


@dataclass(frozen=True)
class ShardCommand(Record):
    """Runner -> shard: reduce `blocks` blocks of `step` once the workers say they are written,
    then apply at `lr` (REDUCE_AND_APPLY), or report the norm and wait for APPLY with the global
    clipping `coefficient` and K-FAC's `kl_coefficient` (REDUCE_THEN_WAIT)."""

    layout: ClassVar = struct.Struct("<iqqddd")
    op: Op
    step: int
    blocks: int = 0
    lr: float = 0.0
    coefficient: float = 1.0
    kl_coefficient: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))


@dataclass(frozen=True)
class BlockWritten(Record):
    """Worker -> every shard: gradient block `block` of `step` is in shared memory."""

    layout: ClassVar = struct.Struct("<qq")
    step: int
    block: int


# Both reports travel through the runner's one inbox, so they have the same size (the shard's
# is padded) and start with their kind.
REPORT_BYTES = 72


@dataclass(frozen=True)
class BlockReport(Record):
    """Worker -> runner: block `block` of `step` is done (or failed: BLOCK_FAILED)."""

    layout: ClassVar = struct.Struct("<iqqdqqdqd4x")
    kind: ReportKind
    step: int
    block: int
    loss_sum: float = 0.0
    samples: int = 0
    correct: int = 0
    compute_seconds: float = 0.0
    bytes_written: int = 0
    write_seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ReportKind(self.kind))


@dataclass(frozen=True)
class ShardReport(Record):
    """Shard -> runner: the slice's squared norm and reduce time (SHARD_REDUCED), or those and
    the apply time and the parameter bytes updated (SHARD_APPLIED; after REDUCE_THEN_WAIT the
    first two are 0, the runner keeps them from SHARD_REDUCED)."""

    layout: ClassVar = struct.Struct("<iqqdddq20x")
    kind: ReportKind
    step: int
    shard: int
    squared_norm: float = 0.0
    reduce_seconds: float = 0.0
    apply_seconds: float = 0.0
    bytes_updated: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ReportKind(self.kind))


assert BlockReport.layout.size == ShardReport.layout.size == REPORT_BYTES


def decode_report(data: bytes) -> BlockReport | ShardReport:
    (kind,) = struct.unpack_from("<i", data)
    if kind in (ReportKind.BLOCK_DONE, ReportKind.BLOCK_FAILED):
        return BlockReport.unpack(data)
    return ShardReport.unpack(data)


# --- where one job's step lives --------------------------------------------------------------


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


@dataclass(frozen=True)
class StepPlanSpec:
    """Where a step's plan lives in shared memory, written by the runner before each step:
    the sample indices of every micro-batch back to back, and their offsets (micro-batch m is
    indices[offsets[m]:offsets[m + 1]]). Buffers (BatchNorm statistics) travel the same way:
    the step's starting values, and each micro-batch's values after its forward pass."""

    indices: SharedArraySpec
    offsets: SharedArraySpec
    master_buffers: SharedArraySpec | None
    micro_batch_buffers: SharedArraySpec | None  # one row per micro-batch


@dataclass(frozen=True)
class SharedStep:
    """Everything an actor's step loop maps or opens: picklable, a few hundred bytes."""

    channels: ChannelPaths
    plan: StepPlanSpec
    gradient_blocks: tuple[SharedArraySpec, ...]  # block b: written by its worker, read only
    norms: SharedArraySpec  # row k: shard k's squared norm per parameter slot
    # Row b: block b's BlockReport, written before any shard is told the block is written;
    # entry b: the step whose block b is whole in shared memory (-1: none of this step yet).
    block_reports: SharedArraySpec
    written_at: SharedArraySpec
    worker_processes: SharedArraySpec  # row w: slot w's process (worker_processes.py)
    # K-FAC: block b's factor statistics (float64, worker/kfac_layout.py), and row k: shard
    # k's v.g per K-FAC layer (zero for the layers it does not own).
    statistics_blocks: tuple[SharedArraySpec, ...] = ()
    direction_dots: SharedArraySpec | None = None
    # Where each shard keeps a copy of its state after every step (worker/shard_state_replica.py)
    shard_state: ShardReplicaSpec | None = None


# --- the runner's side -------------------------------------------------------------------------


@dataclass(frozen=True)
class StepArraySizes:
    """The sizes of a job's step arrays, known before its actors start, so that the runner can
    check the shared-memory folder's room for all of them first (a job without room then runs
    on the object store without having started actors for nothing)."""

    workers: int
    shards: int
    parameter_count: int
    slots: int
    max_samples: int
    max_micro_batches: int
    buffer_size: int
    dtype: str
    statistics_size: int = 0
    kfac_layers: int = 0
    # The optimizer state's array names when the shards keep a replica of their state (an
    # elementwise rule: worker/shard_state_replica.py); None: no replica.
    replicated_state: tuple[str, ...] | None = None

    def arrays(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(label, shape, dtype) of every array of the step, as SharedStep maps them."""
        workers, shards, dtype = self.workers, self.shards, self.dtype
        wanted: list[tuple[str, tuple[int, ...], str]] = [
            ("plan-indices", (self.max_samples,), "int64"),
            ("plan-offsets", (self.max_micro_batches + 1,), "int64"),
            ("parameter-norms", (shards, self.slots), "float64"),
            *[(f"gradient-block-{b}", (self.parameter_count,), dtype) for b in range(workers)],
            ("block-reports", (workers, REPORT_BYTES), "uint8"),
            ("blocks-written-at", (workers,), "int64"),
            ("worker-processes", (workers, PROCESS_FIELDS), "int64"),
        ]
        if self.buffer_size:
            wanted += [("master-buffers", (self.buffer_size,), dtype),
                       ("micro-batch-buffers", (self.max_micro_batches, self.buffer_size),
                        dtype)]
        if self.statistics_size:
            wanted += [(f"statistics-block-{b}", (self.statistics_size,), "float64")
                       for b in range(workers)]
        if self.kfac_layers:
            wanted.append(("direction-dots", (shards, self.kfac_layers), "float64"))
        if self.replicated_state is not None:
            wanted += replica_arrays(shards, self.parameter_count, self.replicated_state, dtype)
        return wanted



@dataclass
class _StepInProgress:
    work: StepWork
    owners: dict[int, int]  # block -> the worker computing it now
    deadline: float
    blocks: dict[int, BlockStats] = field(default_factory=dict)
    reduced: dict[int, ShardReport] = field(default_factory=dict)
    applied: dict[int, ShardStats] = field(default_factory=dict)


class SharedMemoryTransport:
    def __init__(self, shared: SharedArrayGroup, actors: JobActors, sizes: StepArraySizes,
                 timeout_seconds: float):
        self.actors = actors
        self.timeout_seconds = timeout_seconds
        workers, shards = sizes.workers, sizes.shards
        statistics_size = sizes.statistics_size
        wanted = sizes.arrays()
        arrays = {Path(spec.path).name: spec for spec in shared.create_all(wanted)}
        self.step_spec = SharedStep(
            ChannelPaths(str(shared.directory), workers, shards),
            StepPlanSpec(arrays["plan-indices"], arrays["plan-offsets"],
                         arrays.get("master-buffers"), arrays.get("micro-batch-buffers")),
            tuple(arrays[f"gradient-block-{b}"] for b in range(workers)),
            arrays["parameter-norms"],
            arrays["block-reports"],
            arrays["blocks-written-at"],
            arrays["worker-processes"],
            tuple(arrays[f"statistics-block-{b}"] for b in range(workers))
            if statistics_size else (),
            arrays.get("direction-dots"),
            ShardReplicaSpec((arrays["shard-replica-0"], arrays["shard-replica-1"]),
                             arrays["shard-replica-steps"], sizes.replicated_state)
            if sizes.replicated_state is not None else None,
        )
        self.worker_loops: dict[int, ray.ObjectRef | None] = {}
        self.shard_loops: list[ray.ObjectRef] = []
        self.current: _StepInProgress | None = None

    def start(self) -> None:
        spec = self.step_spec
        plan = spec.plan
        self.plan_indices, self.plan_offsets = plan.indices.attach(), plan.offsets.attach()
        self.master_buffers = plan.master_buffers.attach() if plan.master_buffers else None
        self.micro_buffers = (plan.micro_batch_buffers.attach()
                              if plan.micro_batch_buffers else None)
        self.norm_table = spec.norms.attach()
        self.dots_table = spec.direction_dots.attach() if spec.direction_dots else None
        self.block_reports, self.written_at = spec.block_reports.attach(), spec.written_at.attach()
        self.worker_processes = spec.worker_processes.attach()
        spec.channels.create_all()
        self.inbox = Channel(spec.channels.runner())
        self.worker_inboxes = [Channel(spec.channels.worker(w))
                               for w in range(spec.channels.workers)]
        self.shard_inboxes = [Channel(spec.channels.shard_commands(k))
                              for k in range(spec.channels.shards)]
        # Where the runner tells the shards that a lost worker's block is written.
        self.shard_blocks = [Channel(spec.channels.shard_blocks(k))
                             for k in range(spec.channels.shards)]
        self._record_processes(range(len(self.actors.replicas)))
        self.worker_loops = {w: replica.serve.remote(spec, w)
                             for w, replica in enumerate(self.actors.replicas)}
        if spec.shard_state is not None:  # nothing kept yet (not step 0's zeros)
            spec.shard_state.steps.attach()[:] = -1
        self.shard_loops = [shard.serve.remote(spec) for shard in self.actors.shards]

    @property
    def keeps_shard_state(self) -> bool:
        """Whether the shards keep their state after every step (an elementwise rule)."""
        return self.step_spec.shard_state is not None

    def kept_state(self, step: int) -> KeptState | None:
        """What the shards kept after `step` (worker/shard_state_replica.py), or None."""
        if self.step_spec.shard_state is None:
            return None
        return read_kept_state(self.step_spec.shard_state, step)

    def sync_parameters(self) -> None:
        pass  # the runner's vector is the shared one

    def push_parameters(self) -> None:
        pass

    def stop_shard_loops(self) -> None:
        """Ask every shard's step loop to end once it has done the command in hand (after a
        shard is lost, before the standby takes its place: settle_after_lost_shards waits for
        that; the lost shard's STOP is dropped with its other pending commands)."""
        for inbox in self.shard_inboxes:
            inbox.send(ShardCommand(Op.STOP, 0))

    def settle_after_lost_shards(self) -> bool:
        """After ShardLost in a step, with every shard killed (or the lost one killed and the
        others told to stop: stop_shard_loops): wait until every block of the step is
        reported (the workers wait for commands; a stopping shard has the blocks it sums)
        and the shards' step loops have ended (no process writes the parameters any more).
        False when the blocks are not all in within the step's deadline, a worker is lost or
        fails meanwhile (checked first: a stopping shard waits for every block), or the loops
        do not end within the transport's timeout (killed actors' end once Ray has reaped
        them; a generous bound)."""
        step = self.current
        if step is None:
            return False
        deadline = time.monotonic() + step.work.deadline_seconds
        block_count = len(step.work.block_ranges)
        while len(step.blocks) < block_count:
            if time.monotonic() > deadline or self._find_lost_workers():
                return False
            try:
                report = decode_report(self.inbox.receive_bytes(REPORT_BYTES,
                                                                LIVENESS_CHECK_SECONDS))
            except ChannelTimeout:
                continue
            if isinstance(report, BlockReport) and report.step == step.work.step:
                if report.kind == ReportKind.BLOCK_FAILED:
                    return False
                step.blocks[report.block] = _block_stats(report)
        ended, _ = ray.wait(self.shard_loops, num_returns=len(self.shard_loops),
                            timeout=self.timeout_seconds)
        return len(ended) == len(self.shard_loops)

    def _find_lost_workers(self) -> bool:
        serving = [loop for loop in self.worker_loops.values() if loop is not None]
        ended, _ = ray.wait(serving, num_returns=len(serving), timeout=0)
        return bool(ended)

    def shards_replaced(self) -> None:
        """New shards took every slot (the step's workers idle, settle_after_lost_shards):
        drop what the old ones were sent or sent back, and start the new ones' step loops."""
        for inbox in self.shard_inboxes:
            inbox.discard_pending(ShardCommand)
        for blocks_written in self.shard_blocks:
            blocks_written.discard_pending(BlockWritten)
        while True:  # the runner's inbox: reports of the step as it first ran
            try:
                self.inbox.receive_bytes(REPORT_BYTES, 0)
            except ChannelTimeout:
                break
        self.shard_loops = [shard.serve.remote(self.step_spec) for shard in self.actors.shards]

    def worker_replaced(self, worker: int) -> None:
        """Start the new replica's step loop on the slot's inbox, emptied first: commands sent
        to the lost replica must not reach its successor. ActorFailure (WorkerNotFenced) when
        the new replica's process could not be ended if it were lost."""
        self.worker_inboxes[worker].discard_pending(WorkerCommand)
        try:
            self._record_processes([worker])
        except CannotFence as error:
            step = self.current.work.step if self.current is not None else 0
            raise ActorFailure(WorkerNotFenced(step, (worker,), str(error))) from error
        self.worker_loops[worker] = self.actors.replicas[worker].serve.remote(self.step_spec,
                                                                              worker)

    def workers_removed(self, workers: tuple[int, ...]) -> None:
        """These workers were found lost outside a step (and removed): their step loops are no
        longer watched, so that no step reports them again, and their processes are ended,
        so that none reads a command meant for its slot's replacement. ActorFailure
        (WorkerNotFenced) when that cannot be made sure of."""
        for worker in workers:
            self.worker_loops[worker] = None
        try:
            self._end_processes(workers)
        except CannotFence as error:
            step = self.current.work.step if self.current is not None else 0
            raise ActorFailure(WorkerNotFenced(step, tuple(sorted(workers)), str(error))) from error

    def stop(self) -> None:
        for inbox in getattr(self, "worker_inboxes", []):
            inbox.send(WorkerCommand(Op.STOP, 0))
        for inbox in getattr(self, "shard_inboxes", []):
            inbox.send(ShardCommand(Op.STOP, 0))
        # The runner's ends of the pipes: a server runs job after job in one process (it leaked
        # three descriptors a job).
        for channel in [getattr(self, "inbox", None), *getattr(self, "worker_inboxes", []),
                        *getattr(self, "shard_inboxes", []), *getattr(self, "shard_blocks", [])]:
            if channel is not None:
                channel.close()
        self.worker_inboxes, self.shard_inboxes, self.shard_blocks = [], [], []

    # --- one step ----------------------------------------------------------------------------

    def run_step(self, work: StepWork) -> StepOutcome | StepFailure:
        self._write_plan(work)
        self.written_at[:] = -1  # before any command: a stamp then is this step's
        step = self.current = _StepInProgress(work, {}, time.monotonic() + work.deadline_seconds)
        for block, worker in enumerate(work.block_owners):
            self._send_block(step, block, worker)
        op = Op.REDUCE_THEN_WAIT if work.waits_for_coefficients else Op.REDUCE_AND_APPLY
        for inbox in self.shard_inboxes:
            inbox.send(ShardCommand(op, work.step, len(work.block_ranges), work.lr))
        return self._await_reports(step)

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        step = self.current
        if step is None:
            raise RuntimeError("recompute() needs a step that returned WorkersLost")
        for block, worker in owners.items():
            self._send_block(step, block, worker)
        return self._await_reports(step)

    def _write_plan(self, work: StepWork) -> None:
        offset = 0
        self.plan_offsets[0] = 0
        for m, (_, indices) in enumerate(work.micro_batches):
            self.plan_indices[offset:offset + len(indices)] = indices
            offset += len(indices)
            self.plan_offsets[m + 1] = offset
        if self.master_buffers is not None:
            self.master_buffers[:] = work.master_buffers

    def _send_block(self, step: _StepInProgress, block: int, worker: int) -> None:
        lo, hi = step.work.block_ranges[block]
        step.owners[block] = worker
        self.worker_inboxes[worker].send(
            WorkerCommand(Op.COMPUTE, step.work.step, block, lo, hi, step.work.samples))

    def _await_reports(self, step: _StepInProgress) -> StepOutcome | StepFailure:
        work = step.work
        block_count, shard_count = len(work.block_ranges), len(self.shard_inboxes)
        while len(step.blocks) < block_count or len(step.applied) < shard_count:
            try:
                report = decode_report(self.inbox.receive_bytes(REPORT_BYTES,
                                                                LIVENESS_CHECK_SECONDS))
            except ChannelTimeout:
                failure = self._find_lost_peers(step)
                if failure is not None:
                    return failure
                continue
            if report.step != work.step:
                continue  # a late duplicate from a recomputed block of an earlier step
            if isinstance(report, BlockReport):
                if report.kind == ReportKind.BLOCK_FAILED:
                    return self._block_failed(step, report.block)
                step.blocks[report.block] = _block_stats(report)
            elif report.kind == ReportKind.SHARD_REDUCED:
                step.reduced[report.shard] = report
                if len(step.reduced) == shard_count:
                    squared = sum(step.reduced[k].squared_norm for k in range(shard_count))
                    dots = self.dots_table.ravel() if self.dots_table is not None else ()
                    coefficient, nu = apply_coefficients(work, squared, dots)
                    for inbox in self.shard_inboxes:
                        inbox.send(ShardCommand(Op.APPLY, work.step, block_count, work.lr,
                                                coefficient, nu))
            else:  # SHARD_APPLIED; with clipping the norm came first, in SHARD_REDUCED
                first = step.reduced.get(report.shard, report)
                step.applied[report.shard] = ShardStats(first.squared_norm, first.reduce_seconds,
                                                        report.apply_seconds,
                                                        report.bytes_updated)
        buffers = None
        if self.micro_buffers is not None:
            buffers = [self.micro_buffers[m] for m in range(len(work.micro_batches))]
        return StepOutcome([step.blocks[b] for b in range(block_count)],
                           [step.applied[k] for k in range(shard_count)],
                           self.norm_table.sum(axis=0), buffers)

    def _block_failed(self, step: _StepInProgress, block: int) -> BlockFailed:
        worker = step.owners[block]
        message = ray.get(self.actors.replicas[worker].last_error_message.remote(),
                          timeout=self.timeout_seconds)
        return BlockFailed(step.work.step, block, worker, message)

    def _find_lost_peers(self, step: _StepInProgress) -> StepFailure | None:
        """No report for a while: a step loop that ended is a dead peer; past the deadline, a
        worker that has not delivered its block, or a shard that has not reported when every
        block is in, is a silent one."""
        work = step.work
        finished, _ = ray.wait(self.shard_loops, num_returns=len(self.shard_loops), timeout=0)
        if finished:
            return ShardLost(self.shard_loops.index(finished[0]), f"during step {work.step}")
        serving = {w: loop for w, loop in self.worker_loops.items() if loop is not None}
        ended, _ = ray.wait(list(serving.values()), num_returns=len(serving), timeout=0)
        lost = {w for w, loop in serving.items() if loop in ended}
        silent: set[int] = set()
        unfinished = [b for b in range(len(work.block_ranges)) if b not in step.blocks]
        if time.monotonic() > step.deadline:
            if not unfinished:
                shard = min(k for k in range(len(self.shard_loops)) if k not in step.applied)
                return ShardLost(shard, f"silent past the deadline of step {work.step}")
            silent = {step.owners[b] for b in unfinished} - lost
            lost |= silent
            step.deadline = time.monotonic() + work.deadline_seconds
        if not lost:
            return None
        for worker in lost:
            self.worker_loops[worker] = None  # reported once; a replacement brings a new loop
        try:
            self._end_processes(lost)
        except CannotFence as error:
            return WorkerNotFenced(work.step, tuple(sorted(lost)), str(error))
        theirs = tuple(b for b in unfinished if step.owners[b] in lost)
        written = {b: step.owners[b] for b in theirs if self._count_if_written(step, b)}
        return WorkersLost(work.step, tuple(sorted(lost)), theirs,
                           tuple(sorted(silent))).with_delivered(written)

    def _record_processes(self, workers: Iterable[int]) -> None:
        """Record these slots' actor processes in the process table before their step loops
        start (worker_processes.py): then a worker lost at any time, even before its loop
        runs, is a recorded process that _end_processes ends. CannotFence when this process
        could not end one of them (no pidfds, another PID namespace)."""
        workers = list(workers)
        replicas = self.actors.replicas
        rows = ray.get([replicas[w].__ray_call__.remote(actor_process_identity)
                        for w in workers], timeout=self.timeout_seconds)
        for worker, row in zip(workers, rows):
            why_not = why_not_fenceable(row)
            if why_not is not None:
                raise CannotFence(f"cannot end worker {worker}'s process if it is lost: "
                                  f"{why_not}")
            self.worker_processes[worker] = row

    def _end_processes(self, workers: Iterable[int]) -> None:
        """End lost workers' processes (worker_processes.py): before their blocks are judged
        or handed to others, each can write nothing more. Their rows are cleared: the slot
        has no process until a replacement's is recorded. CannotFence when one cannot be
        made sure of."""
        for worker in sorted(workers):
            end_worker_process(self.worker_processes, worker, self.timeout_seconds)
            self.worker_processes[worker] = 0

    def _count_if_written(self, step: _StepInProgress, block: int) -> bool:
        """Whether `block`, unreported, is whole in shared memory (its owner, lost, stamped it
        before telling any shard): then it counts, with its report row's figures, and every
        shard is told it is written."""
        if self.written_at[block] != step.work.step:
            return False
        step.blocks[block] = _block_stats(BlockReport.unpack(self.block_reports[block].tobytes()))
        for blocks_written in self.shard_blocks:
            blocks_written.send(BlockWritten(step.work.step, block))
        return True


def _block_stats(report: BlockReport) -> BlockStats:
    return BlockStats(report.loss_sum, report.samples, report.correct, report.compute_seconds,
                      report.write_seconds, report.bytes_written)


# --- the actors' side ----------------------------------------------------------------------------


def serve_worker(replica: ModelReplica, spec: SharedStep, worker: int) -> None:
    """A replica's step loop: wait for a command, compute the block into its gradient block,
    tell every shard and the runner. Runs until a STOP command (or until Ray kills the actor)."""
    channels = spec.channels
    inbox = Channel(channels.worker(worker))
    runner = Channel(channels.runner())
    shards = [Channel(channels.shard_blocks(k)) for k in range(channels.shards)]
    indices, offsets = spec.plan.indices.attach(), spec.plan.offsets.attach()
    master = spec.plan.master_buffers.attach() if spec.plan.master_buffers else None
    per_micro_batch = (spec.plan.micro_batch_buffers.attach()
                       if spec.plan.micro_batch_buffers else None)
    blocks = [replica.layout.views(block.attach()) for block in spec.gradient_blocks]
    statistics = [block.attach() for block in spec.statistics_blocks]
    reports, written_at = spec.block_reports.attach(), spec.written_at.attach()
    while True:
        command = inbox.receive(WorkerCommand)
        if command.op == Op.STOP:
            return
        micro_batches = [(m, indices[offsets[m]:offsets[m + 1]])
                         for m in range(command.micro_lo, command.micro_hi)]
        try:
            result = replica.compute(blocks[command.block], micro_batches, command.step,
                                     command.samples, master,
                                     statistics=statistics[command.block] if statistics else None)
        except Exception as error:  # a job error (bad data, NaN...), not a lost worker
            replica.last_error = f"{type(error).__name__}: {error}"
            runner.send(BlockReport(ReportKind.BLOCK_FAILED, command.step, command.block))
            continue
        if per_micro_batch is not None and result.buffers is not None:  # both, or neither
            for (m, _), values in zip(micro_batches, result.buffers):
                per_micro_batch[m] = replica.flatten_buffers(values)
        report = BlockReport(ReportKind.BLOCK_DONE, command.step, command.block,
                             result.loss_sum, result.samples, result.correct, result.seconds,
                             result.bytes_written, result.write_seconds)
        reports[command.block] = np.frombuffer(report.pack(), np.uint8)
        # Last: with the stamp the block is whole, for the runner if this process dies now.
        written_at[command.block] = command.step
        for shard in shards:
            shard.send(BlockWritten(command.step, command.block))
        runner.send(report)


def serve_shard(shard: ParameterServerShard, spec: SharedStep) -> None:
    """A shard's step loop: take the runner's command, wait until every block of the step is
    written, reduce, apply (or report the norm and wait for the clipping coefficient), report.
    Per-parameter squared norms go to row `index` of the shared norms table. The blocks are
    only read: the sum goes into the shard's own accumulator, so a late or recomputed block
    write cannot change a sum in progress."""
    index = shard.setup.index
    commands = Channel(spec.channels.shard_commands(index))
    blocks_written = Channel(spec.channels.shard_blocks(index))
    runner = Channel(spec.channels.runner())
    blocks = [block.attach()[shard.lo:shard.hi] for block in spec.gradient_blocks]
    norm_row = spec.norms.attach()[index]
    slot_index = {slot.name: i for i, slot in enumerate(shard.setup.layout.slots)}
    kfac = shard.kfac
    statistics = ([kfac.statistics_section(block.attach()) for block in spec.statistics_blocks]
                  if kfac is not None else [])
    dots_row = spec.direction_dots.attach()[index] if spec.direction_dots else None
    layer_index = ({layer.name: i for i, layer in enumerate(kfac.kfac_layout.layers)}
                   if kfac is not None else {})
    keeper = (ShardStateWriter(spec.shard_state, index, shard.setup.bounds, shard.parameters,
                               shard.slice_state)
              if spec.shard_state is not None else None)
    while True:
        command = commands.receive(ShardCommand)
        if command.op == Op.STOP:
            return
        if command.op == Op.APPLY:
            applied = shard.apply(command.lr, command.coefficient, command.kl_coefficient)
            if keeper is not None:  # before the report: a step reported applied is kept
                keeper.keep(command.step, shard.steps_taken)
            runner.send(ShardReport(ReportKind.SHARD_APPLIED, command.step, index,
                                    apply_seconds=applied.seconds,
                                    bytes_updated=applied.bytes_updated))
            continue
        written: set[int] = set()
        while len(written) < command.blocks:
            message = blocks_written.receive(BlockWritten)
            if message.step == command.step:  # earlier steps' duplicates are stale
                written.add(message.block)
        step_statistics = statistics[:command.blocks] if shard.expects_statistics() else ()
        reduced = shard.reduce(blocks[:command.blocks], step_statistics)
        norm_row[:] = 0.0
        for name, value in reduced.parameter_squared_norms.items():
            norm_row[slot_index[name]] = value
        if dots_row is not None:
            dots_row[:] = 0.0
            for name, value in reduced.direction_dots.items():
                dots_row[layer_index[name]] = value
        if command.op == Op.REDUCE_THEN_WAIT:
            runner.send(ShardReport(ReportKind.SHARD_REDUCED, command.step, index,
                                    reduced.squared_norm, reduced.seconds))
            continue
        applied = shard.apply(command.lr)
        if keeper is not None:
            keeper.keep(command.step, shard.steps_taken)
        runner.send(ShardReport(ReportKind.SHARD_APPLIED, command.step, index,
                                reduced.squared_norm, reduced.seconds, applied.seconds,
                                applied.bytes_updated))
