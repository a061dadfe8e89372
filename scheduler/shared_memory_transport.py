"""A step over shared memory and pipes: every actor of the job on the runner's host.

Parameters, gradient blocks, the step plan and the per-parameter norms live in shared memory;
the replicas and shards run step loops that wake on fixed-size messages through named pipes
(worker/step_channel.py). A Ray call costs milliseconds per hop; a pipe, microseconds.

A worker that dies, or stays silent past the deadline, is killed and its block sent to a
survivor; the shards keep waiting for that block, so the step completes with the same bits.
"""

from __future__ import annotations

import math
import os
import select
import time

import ray

from scheduler.step_transport import (
    BlockStats,
    JobFailed,
    ShardLost,
    ShardStats,
    StepOutcome,
    StepWork,
    WorkerLost,
    WorkerPool,
)
from worker.backprop.optim.clip import clip_coefficient
from worker.replica import StepPlanSpec
from worker.shared_memory import SharedArrayGroup
from worker.step_channel import (
    APPLY,
    COMPUTE,
    REDUCE_AND_APPLY,
    REDUCE_THEN_WAIT,
    SHARD_APPLIED,
    SHARD_REDUCED,
    STOP,
    WORKER_REPORT,
    Channel,
    ChannelPaths,
    ChannelTimeout,
    Report,
    ShardCommand,
    WorkerCommand,
)

# How often the runner, waiting for a step's reports, checks whether a peer has died.
LIVENESS_CHECK_SECONDS = 0.5


class SharedMemoryTransport:
    def __init__(self, shared: SharedArrayGroup, replicas: list, shards: list, pool: WorkerPool,
                 *, slots: int, max_samples: int, max_micro_shards: int, buffer_size: int,
                 dtype: str, timeout_seconds: float):
        self.replicas, self.shards, self.pool = replicas, shards, pool
        self.timeout_seconds = timeout_seconds
        create = shared.create
        self.plan = StepPlanSpec(
            create("plan-indices", (max_samples,), "int64"),
            create("plan-offsets", (max_micro_shards + 1,), "int64"),
            create("master-buffers", (buffer_size,), dtype) if buffer_size else None,
            create("micro-shard-buffers", (max_micro_shards, buffer_size), dtype)
            if buffer_size else None,
        )
        self.norms = create("parameter-norms", (len(shards), slots), "float64")
        self.channels = ChannelPaths(str(shared.directory), len(replicas), len(shards))

    def start(self) -> None:
        plan = self.plan
        self.plan_indices, self.plan_offsets = plan.indices.attach(), plan.offsets.attach()
        self.master_buffers = plan.master_buffers.attach() if plan.master_buffers else None
        self.micro_buffers = (plan.micro_shard_buffers.attach()
                              if plan.micro_shard_buffers else None)
        self.norm_table = self.norms.attach()
        self.channels.create_all()
        self.inbox = Channel(self.channels.runner())
        self.worker_inboxes = [Channel(self.channels.worker(w)) for w in range(len(self.replicas))]
        self.shard_inboxes = [Channel(self.channels.shard_commands(k))
                              for k in range(len(self.shards))]
        self.worker_loops = [replica.serve.remote(self.channels, w, self.plan)
                             for w, replica in enumerate(self.replicas)]
        self.shard_loops = [shard.serve.remote(self.channels, self.norms) for shard in self.shards]

    def sync_parameters(self) -> None:
        pass  # the runner's vector is the shared one

    def push_parameters(self) -> None:
        pass

    def worker_replaced(self, worker: int) -> None:
        """Start the new replica's step loop on the slot's inbox, emptied first: commands sent
        to the dead replica must not reach its successor."""
        inbox = self.worker_inboxes[worker]
        while select.select([inbox.fd], [], [], 0)[0]:
            os.read(inbox.fd, WorkerCommand.layout.size)
        self.worker_loops[worker] = self.replicas[worker].serve.remote(self.channels, worker,
                                                                       self.plan)

    def stop(self) -> None:
        for inbox in getattr(self, "worker_inboxes", []):
            inbox.send(WorkerCommand(STOP, 0, 0, 0, 0, 0))
        for inbox in getattr(self, "shard_inboxes", []):
            inbox.send(ShardCommand(STOP, 0, 0, 0.0, 0.0))

    # --- one step ------------------------------------------------------------------------

    def run_step(self, work: StepWork) -> StepOutcome:
        self._write_plan(work)
        self.ranges = work.block_ranges
        for block in range(len(work.block_ranges)):
            self._send_block(work, block, self.pool.owner_for(block))
        clipping = work.max_norm is not None
        for inbox in self.shard_inboxes:
            inbox.send(ShardCommand(REDUCE_THEN_WAIT if clipping else REDUCE_AND_APPLY,
                                    work.step, len(work.block_ranges), work.lr, 1.0))
        blocks, shards = self._await_reports(work)
        buffers = None
        if self.micro_buffers is not None:
            buffers = [self.micro_buffers[m] for m in range(len(work.micro_shards))]
        return StepOutcome(blocks, shards, self.norm_table.sum(axis=0), buffers)

    def _write_plan(self, work: StepWork) -> None:
        offset = 0
        self.plan_offsets[0] = 0
        for m, (_, indices) in enumerate(work.micro_shards):
            self.plan_indices[offset:offset + len(indices)] = indices
            offset += len(indices)
            self.plan_offsets[m + 1] = offset
        if self.master_buffers is not None:
            self.master_buffers[:] = work.master_buffers

    def _send_block(self, work: StepWork, block: int, worker: int) -> None:
        lo, hi = work.block_ranges[block]
        self.pool.owners[block] = worker
        self.worker_inboxes[worker].send(
            WorkerCommand(COMPUTE, work.step, block, lo, hi, work.samples))

    def _await_reports(self, work: StepWork) -> tuple[list[BlockStats], list[ShardStats]]:
        block_count, shard_count = len(work.block_ranges), len(self.shards)
        blocks: dict[int, BlockStats] = {}
        reduced: dict[int, Report] = {}
        applied: dict[int, ShardStats] = {}
        deadline = time.monotonic() + self.timeout_seconds
        while len(blocks) < block_count or len(applied) < shard_count:
            try:
                report = self.inbox.receive(Report, timeout=LIVENESS_CHECK_SECONDS)
            except ChannelTimeout:
                deadline = self._handle_silence(work, blocks, deadline)
                continue
            if report.step != work.step:
                continue  # a late duplicate from a recomputed block of an earlier step
            if report.kind == WORKER_REPORT:
                if not report.ok:
                    self._raise_worker_error(work.step, self.pool.owners[report.index])
                blocks[report.index] = BlockStats(report.a, int(report.b), int(report.c),
                                                  report.d, report.f, int(report.e))
            elif report.kind == SHARD_REDUCED:
                reduced[report.index] = report
                if len(reduced) == shard_count:
                    norm = math.sqrt(sum(r.a for r in reduced.values()))
                    coefficient = clip_coefficient(norm, work.max_norm)
                    for inbox in self.shard_inboxes:
                        inbox.send(ShardCommand(APPLY, work.step, block_count, work.lr,
                                                coefficient))
            elif report.kind == SHARD_APPLIED:
                first = reduced.get(report.index, report)  # with clipping, the norm came first
                applied[report.index] = ShardStats(first.a, first.b, report.c, int(report.d))
        return [blocks[b] for b in range(block_count)], [applied[k] for k in range(shard_count)]

    def _raise_worker_error(self, step: int, worker: int) -> None:
        message = ray.get(self.replicas[worker].last_error_message.remote(),
                          timeout=self.timeout_seconds)
        raise JobFailed(f"worker {worker} failed on step {step}: {message}")

    def _handle_silence(self, work: StepWork, blocks: dict, deadline: float) -> float:
        """No report for a while: find dead (or, past the deadline, silent) peers."""
        finished, _ = ray.wait(self.shard_loops, num_returns=len(self.shard_loops), timeout=0)
        if finished:
            raise ShardLost(f"parameter-server shard {self.shard_loops.index(finished[0])} "
                            f"stopped during step {work.step}")
        loops = [self.worker_loops[w] for w in self.pool.alive]
        dead, _ = ray.wait(loops, num_returns=len(loops), timeout=0)
        lost = {w for w in self.pool.alive if self.worker_loops[w] in dead}
        if time.monotonic() > deadline:
            lost |= {self.pool.owners[b] for b in range(len(work.block_ranges))
                     if b not in blocks}
            deadline = time.monotonic() + self.timeout_seconds
        if not lost:
            return deadline
        for worker in lost:
            ray.kill(self.replicas[worker])  # a late worker must not write its block later
            self.pool.drop(worker)
        if not self.pool.alive:
            raise WorkerLost("every worker of the job failed")
        missing = [b for b in range(len(work.block_ranges))
                   if b not in blocks and self.pool.owners[b] in lost]
        for i, block in enumerate(missing):
            self._send_block(work, block, self.pool.owner_for(i))
        return deadline
