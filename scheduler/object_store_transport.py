"""A step through the Ray object store: for actors on other hosts than the runner.

Each worker receives the shards' updated slices (the all-gather), computes its block and
returns it cut into one chunk per shard (the reduce-scatter); shard k sums the N chunks it is
given in the fixed tree order, applies the optimizer and returns its updated slice. Every
worker still sends and receives about one model's worth of bytes per step, but through
object-store copies and actor calls, which cost milliseconds each: on one host the shared-
memory transport is used instead.

A worker that dies is dropped and its block recomputed by a survivor; the shard calls that
depended on the lost chunks fail before running, so the step is redone with the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import ray

from scheduler.step_transport import (
    BlockStats,
    ShardLost,
    ShardStats,
    StepOutcome,
    StepWork,
    WorkerLost,
    WorkerPool,
)
from worker.backprop.optim.clip import clip_coefficient


class ObjectStoreTransport:
    def __init__(self, replicas: list, shards: list, pool: WorkerPool, parameters: np.ndarray,
                 bounds: list[tuple[int, int]], slots: list, flatten_buffers,
                 *, timeout_seconds: float):
        self.replicas, self.shards, self.pool = replicas, shards, pool
        self.parameters, self.bounds, self.slots = parameters, bounds, slots
        self.flatten_buffers = flatten_buffers
        self.timeout_seconds = timeout_seconds
        self.slices: list = []

    def start(self) -> None:
        self.push_parameters()

    def push_parameters(self) -> None:
        """The runner's vector to every shard, and as the slices the workers start from."""
        ray.get([shard.load_parameters.remote(self.parameters[lo:hi])
                 for shard, (lo, hi) in zip(self.shards, self.bounds)],
                timeout=self.timeout_seconds)
        self.slices = [ray.put(np.array(self.parameters[lo:hi])) for lo, hi in self.bounds]

    def sync_parameters(self) -> None:
        for (lo, hi), values in zip(self.bounds,
                                    ray.get(self.slices, timeout=self.timeout_seconds)):
            self.parameters[lo:hi] = values

    def worker_replaced(self, worker: int) -> None:
        pass  # a replica is stateless here: each call brings the parameters it needs

    def stop(self) -> None:
        pass

    def run_step(self, work: StepWork) -> StepOutcome:
        chunk_refs, results = self._compute_blocks(work)
        try:
            return self._reduce_and_apply(work, chunk_refs, results)
        except ray.exceptions.RayActorError as error:
            raise ShardLost(f"a parameter-server shard died during step {work.step}") from error

    def _reduce_and_apply(self, work: StepWork, chunk_refs: dict, results: list) -> StepOutcome:
        chunks_of_shard = [[chunk_refs[b][k] for b in range(len(work.block_ranges))]
                           for k in range(len(self.shards))]
        if work.max_norm is None:
            calls = [shard.reduce_apply_chunks.options(num_returns=3).remote(work.lr, *chunks)
                     for shard, chunks in zip(self.shards, chunks_of_shard)]
            reduced = ray.get([c[0] for c in calls], timeout=self.timeout_seconds)
            applied = ray.get([c[1] for c in calls], timeout=self.timeout_seconds)
            self.slices = [c[2] for c in calls]
        else:
            reduced = ray.get([shard.reduce_chunks.remote(*chunks)
                               for shard, chunks in zip(self.shards, chunks_of_shard)],
                              timeout=self.timeout_seconds)
            coefficient = clip_coefficient(math.sqrt(sum(r.squared_norm for r in reduced)),
                                           work.max_norm)
            calls = [shard.apply_and_return.options(num_returns=2).remote(work.lr, coefficient)
                     for shard in self.shards]
            applied = ray.get([c[0] for c in calls], timeout=self.timeout_seconds)
            self.slices = [c[1] for c in calls]
        norms = np.zeros(len(self.slots))
        index = {slot.name: i for i, slot in enumerate(self.slots)}
        for r in reduced:
            for name, value in r.parameter_squared_norms.items():
                norms[index[name]] += value
        blocks = [BlockStats(r.loss_sum, r.samples, r.correct, r.seconds, r.write_seconds,
                             sum(hi - lo for lo, hi in self.bounds) * self.parameters.itemsize)
                  for r in results]
        shards = [ShardStats(r.squared_norm, r.seconds, a.seconds, a.bytes_updated)
                  for r, a in zip(reduced, applied)]
        micro = None
        if results[0].buffers is not None:
            micro = [self.flatten_buffers(values) for r in results for values in r.buffers]
        return StepOutcome(blocks, shards, norms, micro)

    def _compute_blocks(self, work: StepWork) -> tuple[dict, list]:
        """Every block's chunks and statistics, recomputing lost workers' blocks."""
        buffers = None if work.master_buffers is None else ray.put(work.master_buffers)
        done_chunks: dict[int, list] = {}
        done: dict[int, object] = {}
        todo = list(range(len(work.block_ranges)))
        while todo:
            if not self.pool.alive:
                raise WorkerLost("every worker of the job failed")
            calls = {}
            for i, block in enumerate(todo):
                worker = self.pool.owner_for(i)
                self.pool.owners[block] = worker
                lo, hi = work.block_ranges[block]
                calls[block] = self.replicas[worker].compute_chunks.options(
                    num_returns=len(self.shards) + 1).remote(
                    work.micro_shards[lo:hi], work.step, work.samples, buffers,
                    self.bounds, *self.slices)
            stats = {block: refs[-1] for block, refs in calls.items()}
            ready, _ = ray.wait(list(stats.values()), num_returns=len(stats),
                                timeout=self.timeout_seconds)
            lost = set()
            for block, ref in stats.items():
                try:
                    if ref not in ready:
                        raise TimeoutError
                    done[block] = ray.get(ref)
                    done_chunks[block] = calls[block][:-1]
                except (ray.exceptions.RayActorError, TimeoutError):
                    lost.add(self.pool.owners[block])
            for worker in lost:
                ray.kill(self.replicas[worker])
                self.pool.drop(worker)
            todo = [b for b in todo if b not in done]
        return done_chunks, [done[b] for b in range(len(work.block_ranges))]
