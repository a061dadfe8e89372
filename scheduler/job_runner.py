"""How one job trains, step by step, on Ray actors: the runner owns the job from start to end.

Set-up: build the model from the seed (its flat parameter vector is the initial state), put the
training data in the object store once, allocate the shared parameter vector and one gradient
block per worker, reserve a placement group, start N replicas and K parameter-server shards.

One optimizer step:
  1. the global batch (or A batches, with gradient accumulation) is cut into logical
     micro-shards; worker w computes the contiguous block w of them and writes the block's
     gradient sum into gradient block w (reduce-scatter's first half);
  2. each shard sums its slice of the N blocks in the fixed tree order, and applies the
     optimizer to its slice of the shared parameters (started by Ray as soon as the workers'
     results exist: no round trip through the runner), or, with norm clipping, first reports
     its norm so the runner can compute the global clipping coefficient;
  3. the replicas see the updated parameters in shared memory (the all-gather).

A worker that dies or misses its deadline is dropped and its block recomputed by a survivor in
the same step: the parameters have not moved, so the result is bit for bit the same.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint
from scheduler.datasets import Dataset
from scheduler.placement import Placement, reserve
from scheduler.records import (
    EvaluationRecord,
    StepRecord,
    StepTimings,
    TrainingHistory,
)
from scheduler.sampler import EpochSampler, StepSamples
from worker.backprop.optim.clip import clip_coefficient
from worker.flat_parameters import ParameterLayout
from worker.model_builder import build_model, build_optimizer, build_schedule
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.replica import BlockResult, ModelReplica, ReplicaSetup
from worker.shared_memory import SharedArrayGroup, host_identity

DEFAULT_MICRO_SHARDS = 4  # fixed by the spec, never by the worker count (see BRIEF invariant 1)

# The actor classes are plain Python classes; this is the one place they become Ray actors.
RemoteReplica = ray.remote(ModelReplica)
RemoteShard = ray.remote(ParameterServerShard)


class WorkerLost(RuntimeError):
    """Every worker of the job failed."""


@dataclass(frozen=True)
class TrainingResult:
    state_dict: dict[str, np.ndarray]  # PyTorch key names, parameters and buffers, copies
    history: TrainingHistory
    final_evaluation: EvaluationRecord | None
    steps: int
    stopped_early: bool
    actor_nodes: dict[str, list[str]]  # Ray node ids of the workers and of the shards


@dataclass(frozen=True)
class RunSettings:
    """The numbers the step loop runs by, resolved from the spec and the runner's options."""

    workers: int
    shards: int
    micro_shards: int
    accumulation: int
    batch_size: int
    epochs: int
    dtype: str
    evaluation_interval: int
    step_timeout_seconds: float

    @classmethod
    def of(cls, spec: job_pb2.JobSpec, workers: int | None, shards: int | None,
           step_timeout_seconds: float) -> RunSettings:
        return cls(
            workers=workers or spec.resources.workers or 1,
            shards=shards or spec.resources.parameter_servers or 1,
            micro_shards=spec.data.micro_shards or DEFAULT_MICRO_SHARDS,
            accumulation=max(1, spec.gradient_accumulation_steps),
            batch_size=spec.data.batch_size,
            epochs=spec.data.epochs or 1,
            dtype="float64" if spec.dtype == "float64" else "float32",
            evaluation_interval=spec.eval_interval_steps,
            step_timeout_seconds=step_timeout_seconds,
        )


class JobRunner:
    def __init__(
        self,
        spec: job_pb2.JobSpec,
        dataset: Dataset,
        *,
        workers: int | None = None,
        parameter_servers: int | None = None,
        step_timeout_seconds: float = 120.0,
        on_step: Callable[[StepRecord], None] | None = None,
        on_evaluation: Callable[[EvaluationRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
        resume_from: Checkpoint | None = None,
        cpus_per_worker: float | None = None,
        placement_timeout_seconds: float = 60.0,
    ):
        """`cpus_per_worker` overrides the spec's (the service divides the cluster between
        concurrent jobs); `placement_timeout_seconds` bounds the wait for room on the cluster."""
        self.cpus_per_worker = (cpus_per_worker if cpus_per_worker is not None
                                else spec.resources.cpus_per_worker)
        self.placement_timeout_seconds = placement_timeout_seconds
        self.spec, self.dataset = spec, dataset
        self.on_checkpoint = on_checkpoint
        self.resume_from = resume_from
        self.settings = RunSettings.of(spec, workers, parameter_servers, step_timeout_seconds)
        self.on_step = on_step or (lambda record: None)
        self.on_evaluation = on_evaluation or (lambda record: None)
        self.should_stop = should_stop or (lambda: False)
        self.history = TrainingHistory()
        self.rule_name, self.hyper = build_optimizer(spec)
        self.sampler = EpochSampler(len(dataset.x), self.settings.batch_size,
                                    self.settings.micro_shards, spec.seed, spec.data.shuffle
                                    if spec.data.HasField("shuffle") else True)
        self.groups_per_epoch = math.ceil(self.sampler.steps_per_epoch
                                          / self.settings.accumulation)
        self.total_steps = self.groups_per_epoch * self.settings.epochs
        # 0: a checkpoint at the end of each epoch (only when someone takes checkpoints)
        self.checkpoint_interval = spec.checkpoint.interval_steps or self.groups_per_epoch
        self.schedule = build_schedule(spec, self.total_steps)
        self.max_norm = spec.clipping.max_norm if spec.clipping.HasField("max_norm") else None

    # --- set-up and tear-down --------------------------------------------------------------

    def run(self) -> TrainingResult:
        settings = self.settings
        model = build_model(self.spec.model, self.dataset.feature_shape, settings.dtype,
                            seed=self.spec.seed, input_dtype=self.dataset.x.dtype)
        self.layout = ParameterLayout.of(model)
        self.shared = SharedArrayGroup(self.spec.name or "job")
        placement = None
        self.replicas, self.shards = [], []
        try:
            parameters = self.shared.create("parameters", (self.layout.size,), settings.dtype)
            blocks = tuple(self.shared.create(f"gradient-block-{b}", (self.layout.size,),
                                              settings.dtype)
                           for b in range(settings.workers))
            self.parameters = parameters.attach()
            self.parameters[:] = self.layout.flatten(model)
            replica_setup = ReplicaSetup(self.spec.SerializeToString(),
                                         tuple(self.dataset.feature_shape),
                                         self.dataset.x.dtype.name, parameters, blocks)
            # The runner's own replica evaluates on the validation split and holds the master
            # copy of the buffers (BatchNorm statistics); it computes no training gradients.
            self.evaluator = ModelReplica(replica_setup, self.dataset.x[:1], self.dataset.y[:1],
                                          limit_threads=False)
            placement = reserve(settings.workers, settings.shards, self.cpus_per_worker,
                                self.spec.resources.placement_strategy,
                                self.placement_timeout_seconds)
            self._start_actors(placement, replica_setup, parameters, blocks)
            if self.resume_from is not None:
                self._restore(self.resume_from)
            return self._train()
        finally:
            for actor in self.replicas + self.shards:
                ray.kill(actor)
            if placement is not None:
                placement.release()
            self.shared.remove()

    def _start_actors(self, placement: Placement, replica_setup: ReplicaSetup, parameters,
                      blocks) -> None:
        settings = self.settings
        x_ref, y_ref = ray.put(self.dataset.x), ray.put(self.dataset.y)
        worker_setup = dataclasses.replace(replica_setup, blas_threads=placement.blas_threads)
        self.replicas = [RemoteReplica.options(**placement.worker_options(w))
                         .remote(worker_setup, x_ref, y_ref) for w in range(settings.workers)]
        align = not _is_elementwise(self.rule_name)
        bounds = self.layout.shard_bounds(settings.shards, align_to_parameters=align)
        clip_value = (self.spec.clipping.max_value
                      if self.spec.clipping.HasField("max_value") else None)
        self.shards = [
            RemoteShard.options(**placement.shard_options(k)).remote(ShardSetup(
                k, bounds[k], self.layout, parameters, blocks, self.rule_name, self.hyper,
                clip_value))
            for k in range(settings.shards)
        ]
        locations = ray.get([a.location.remote() for a in self.replicas + self.shards],
                            timeout=settings.step_timeout_seconds)
        self.actor_nodes = {"workers": [node for _, node in locations[:settings.workers]],
                            "shards": [node for _, node in locations[settings.workers:]]}
        if {host for host, _ in locations} != {host_identity()}:
            raise NotImplementedError(
                "workers on other hosts than the runner: the shared-memory transport needs "
                "every actor of a job on the runner's host"
            )
        self.alive = list(range(settings.workers))

    # --- the step loop ---------------------------------------------------------------------

    def _train(self) -> TrainingResult:
        settings = self.settings
        step = self.resume_from.step if self.resume_from is not None else 0
        epoch, stopped = step // self.groups_per_epoch, False
        while step < self.total_steps:
            epoch = step // self.groups_per_epoch
            if self.should_stop():
                stopped = True
                break
            batches = self.sampler.epoch(epoch)  # cheap: a permutation of the sample indices
            first = (step % self.groups_per_epoch) * settings.accumulation
            group = batches[first:first + settings.accumulation]
            step += 1
            record = self._step(step, epoch, group)
            self.history.steps.append(record)
            self.on_step(record)
            if settings.evaluation_interval and step % settings.evaluation_interval == 0:
                self._evaluate(step, epoch)
            if self.on_checkpoint is not None and step % self.checkpoint_interval == 0:
                self.on_checkpoint(self.checkpoint(step))
        if stopped and self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint(step))
        final = None
        if self.dataset.x_val is not None and not stopped:
            final = self._evaluate(step, epoch)
        return TrainingResult(self._state_dict(), self.history, final, step, stopped,
                              self.actor_nodes)

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, step: int) -> Checkpoint:
        """The job's state now (between steps): parameters, buffers, whole optimizer state."""
        timeout = self.settings.step_timeout_seconds
        shard_states = ray.get([shard.state.remote() for shard in self.shards], timeout=timeout)
        optimizer_steps = shard_states[0][0]
        if _is_elementwise(self.rule_name):
            keys = shard_states[0][1].keys()
            state = {key: np.concatenate([part[key] for _, part in shard_states])
                     for key in keys}
        else:
            state = {key: value for _, part in shard_states for key, value in part.items()}
        return Checkpoint(step, np.array(self.parameters), optimizer_steps, state,
                          self.evaluator.buffer_values() if self.evaluator.buffer_names else {})

    def _restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.parameters.shape != self.parameters.shape:
            raise ValueError(
                f"checkpoint has {checkpoint.parameters.size} parameters, the model "
                f"{self.parameters.size}: it belongs to another model"
            )
        self.parameters[:] = checkpoint.parameters
        ray.get([shard.load_state.remote(checkpoint.optimizer_steps, checkpoint.optimizer_state)
                 for shard in self.shards], timeout=self.settings.step_timeout_seconds)
        if checkpoint.buffers:
            self.evaluator.load_buffers(checkpoint.buffers)

    def _step(self, step: int, epoch: int, group: list[StepSamples]) -> StepRecord:
        start = time.perf_counter()
        settings = self.settings
        micro_shards = _micro_shards_in_tree_order(group)
        samples = sum(len(indices) for _, indices in micro_shards)
        blocks = [list(block) for block in _split_evenly(micro_shards, settings.workers)]
        lr = self.schedule.lr_at(step - 1)
        buffers = self._master_buffers()
        outcomes = None
        if self.max_norm is None and len(self.alive) == len(blocks):
            results, outcomes = self._chained_step(step, blocks, samples, buffers, lr)
        else:
            results = self._compute_blocks(step, blocks, samples, buffers)
        if outcomes is None and self.max_norm is None:
            outcomes = ray.get([shard.reduce_and_apply.remote(settings.workers, lr)
                                for shard in self.shards], timeout=settings.step_timeout_seconds)
        if outcomes is not None:
            reduced = [r for r, _ in outcomes]
            applied = [a for _, a in outcomes]
        else:
            reduced = ray.get([shard.reduce.remote(settings.workers) for shard in self.shards],
                              timeout=settings.step_timeout_seconds)
            total_norm = math.sqrt(sum(r.squared_norm for r in reduced))
            coefficient = clip_coefficient(total_norm, self.max_norm)
            applied = ray.get([shard.apply.remote(lr, coefficient) for shard in self.shards],
                              timeout=settings.step_timeout_seconds)
        self._average_buffers(results)
        wall = time.perf_counter() - start
        computes = [r.seconds for r in results]
        timings = StepTimings(
            compute=max(computes),
            reduce=max(r.seconds for r in reduced),
            apply=max(a.seconds for a in applied),
            gather=0.0,  # the replicas read the updated parameters in place
            wait=0.0,
            wall=wall,
            straggler_spread=max(computes) - statistics.median(computes),
        )
        busy = timings.compute + timings.reduce + timings.apply
        timings = StepTimings(**{**timings.__dict__, "wait": max(0.0, wall - busy)})
        per_parameter: dict[str, float] = {}
        for r in reduced:
            for name, value in r.parameter_squared_norms.items():
                per_parameter[name] = per_parameter.get(name, 0.0) + value
        return StepRecord(
            step=step, total_steps=self.total_steps, epoch=epoch, samples=samples,
            loss=sum(r.loss_sum for r in results) / max(samples, 1),
            train_correct=sum(r.correct for r in results),
            learning_rate=lr,
            gradient_norm=math.sqrt(sum(r.squared_norm for r in reduced)),
            parameter_gradient_norms={k: math.sqrt(v) for k, v in per_parameter.items()},
            timings=timings,
            bytes_sent_per_worker=max(r.bytes_written for r in results),
            bytes_received_per_worker=sum(a.bytes_updated for a in applied),
            parameter_bytes=self.layout.nbytes,
            workers=len(self.alive),
            worker_failures=self.history.worker_failures,
        )

    def _chained_step(self, step: int, blocks: list[list], samples: int, buffers: dict | None,
                      lr: float) -> tuple[list[BlockResult], list | None]:
        """The fast path: workers and shards submitted together, the shards waiting on the
        workers' refs inside Ray. If a worker fails, the shards' calls fail on the missing
        result before touching anything; the missing blocks are then recomputed by survivors
        and the caller runs the shards again."""
        timeout = self.settings.step_timeout_seconds
        owners = list(self.alive)
        calls = [self.replicas[w].compute.remote(b, blocks[b], step, samples, buffers)
                 for b, w in enumerate(owners)]
        shard_calls = [shard.reduce_and_apply.remote(self.settings.workers, lr, *calls)
                       for shard in self.shards]
        done, failed = self._collect(calls, owners, timeout)
        if not failed:
            return [done[b] for b in range(len(blocks))], ray.get(shard_calls, timeout=timeout)
        self._drop_workers(failed)
        # The shard calls now fail on the missing result; wait for that before going on, so
        # none of them can run later.
        ray.wait(shard_calls, num_returns=len(shard_calls), timeout=timeout)
        return self._compute_blocks(step, blocks, samples, buffers, done), None

    def _compute_blocks(self, step: int, blocks: list[list], samples: int,
                        buffers: dict | None,
                        done: dict[int, BlockResult] | None = None) -> list[BlockResult]:
        """Every block's gradient (those not `done` yet), recomputing the blocks of workers
        that fail or miss the deadline on the survivors."""
        results = dict(done or {})
        while len(results) < len(blocks):
            if not self.alive:
                raise WorkerLost("every worker of the job failed")
            missing = [b for b in range(len(blocks)) if b not in results]
            owners = [self.alive[i % len(self.alive)] for i in range(len(missing))]
            calls = [self.replicas[w].compute.remote(b, blocks[b], step, samples, buffers)
                     for b, w in zip(missing, owners)]
            finished, failed = self._collect(calls, owners, self.settings.step_timeout_seconds,
                                             blocks=missing)
            results.update(finished)
            self._drop_workers(failed)
        return [results[b] for b in range(len(blocks))]

    def _collect(self, calls: list, owners: list[int], timeout: float,
                 blocks: list[int] | None = None) -> tuple[dict[int, BlockResult], set[int]]:
        """The block results that arrived by the deadline, and the workers that failed."""
        blocks = blocks if blocks is not None else list(range(len(calls)))
        ready, _ = ray.wait(calls, num_returns=len(calls), timeout=timeout)
        ready = set(ready)
        done, failed = {}, set()
        for block, owner, call in zip(blocks, owners, calls):
            if call not in ready:
                failed.add(owner)  # silent past the deadline: a failed peer (no hang)
                continue
            try:
                done[block] = ray.get(call)
            except ray.exceptions.RayActorError:
                failed.add(owner)
        return done, failed

    def _drop_workers(self, workers: set[int]) -> None:
        for worker in workers:
            ray.kill(self.replicas[worker])  # a late worker must not write its block later
            if worker in self.alive:
                self.alive.remove(worker)
                self.history.worker_failures += 1

    # --- buffers (BatchNorm running statistics) ----------------------------------------------

    def _master_buffers(self) -> dict[str, np.ndarray] | None:
        return self.evaluator.buffer_values() if self.evaluator.buffer_names else None

    def _average_buffers(self, results: list[BlockResult]) -> None:
        """Each micro-shard updated the running statistics from the step's starting values;
        the step's new values are their mean, taken in micro-shard order (so any worker count
        gives the same bits). With one micro-shard this is exactly PyTorch's update."""
        if not self.evaluator.buffer_names:
            return
        per_shard = [values for r in results for values in r.buffers]
        averaged = {}
        for name in self.evaluator.buffer_names:
            total = per_shard[0][name].copy()
            for values in per_shard[1:]:
                total += values[name]
            averaged[name] = total / len(per_shard)
        self.evaluator.load_buffers(averaged)
        self.evaluator.count_batch()

    # --- evaluation and results ----------------------------------------------------------------

    def _evaluate(self, step: int, epoch: int) -> EvaluationRecord | None:
        if self.dataset.x_val is None:
            return None
        loss_sum, samples, correct = self.evaluator.evaluate(self.dataset.x_val,
                                                             self.dataset.y_val)
        record = EvaluationRecord(
            step=step, epoch=epoch, loss=loss_sum / max(samples, 1),
            accuracy=correct / samples if self.evaluator.classification and samples else None,
            samples=samples,
        )
        self.history.evaluations.append(record)
        self.on_evaluation(record)
        return record

    def _state_dict(self) -> dict[str, np.ndarray]:
        return {key: np.array(value) for key, value in self.evaluator.model.state_dict().items()}


def _micro_shards_in_tree_order(group: list[StepSamples]) -> list[tuple[int, np.ndarray]]:
    """(global index, sample indices) of every micro-shard of the step's batches, micro-shard
    major: block w then covers micro-shards [wM/N, (w+1)M/N) of every batch, a contiguous
    run of the tree's leaves."""
    accumulation = len(group)
    return [(m * accumulation + a, group[a].micro_shards[m])
            for m in range(len(group[0].micro_shards)) for a in range(accumulation)]


def _split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(len(items) * k / parts) for k in range(parts + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(parts)]


def _is_elementwise(rule_name: str) -> bool:
    from worker.backprop.optim import RULES

    return RULES[rule_name].elementwise
