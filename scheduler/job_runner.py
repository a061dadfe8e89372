"""How one job trains, step by step, on Ray actors: the runner owns the job from start to end.

Set-up: build the model from the seed (its flat parameter vector is the initial state), put the
training data in the object store once, allocate in shared memory the parameter vector, one
gradient block per worker and the step plan, reserve a placement group, start N replicas and K
parameter-server shards, and start their step loops.

One optimizer step:
  1. the runner writes the step's plan (the sample indices of its M logical micro-shards, or
     M x A with gradient accumulation) and tells worker w to compute the contiguous block w
     of micro-shards; the worker writes the block's gradient sum into gradient block w and
     tells every shard (the reduce-scatter's first half);
  2. each shard sums its slice of the N blocks in the fixed tree order and applies the
     optimizer to its slice of the shared parameters; with norm clipping it first reports its
     norm and waits for the global clipping coefficient;
  3. the replicas see the updated parameters in shared memory (the all-gather).
The signals travel through named pipes (worker/step_channel.py), not Ray calls: a Ray call
costs milliseconds per hop, a pipe microseconds.

A worker that dies or misses its deadline is dropped and its block recomputed by a survivor in
the same step: the parameters have not moved, so the result is bit for bit the same. A step
or a stop can be checkpointed; a checkpoint resumes by deterministic replay.
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
from worker.replica import ModelReplica, ReplicaSetup, StepPlanSpec
from worker.shared_memory import SharedArrayGroup, host_identity
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

DEFAULT_MICRO_SHARDS = 4  # fixed by the spec, never by the worker count (see BRIEF invariant 1)

# The actor classes are plain Python classes; this is the one place they become Ray actors.
RemoteReplica = ray.remote(ModelReplica)
RemoteShard = ray.remote(ParameterServerShard)


class WorkerLost(RuntimeError):
    """Every worker of the job failed."""


class JobFailed(RuntimeError):
    """The job cannot go on: an error in its computation, or a lost parameter-server shard."""


# How often the runner, waiting for a step's reports, checks whether a peer has died.
LIVENESS_CHECK_SECONDS = 0.5


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
            self._start_step_loops()
            return self._train()
        finally:
            self._stop_step_loops()
            for actor in self.replicas + self.shards:
                ray.kill(actor)
            if placement is not None:
                placement.release()
            self.shared.remove()

    def _start_step_loops(self) -> None:
        """Shared step plan, norm table and pipes; then every actor's step loop."""
        settings = self.settings
        micro_count = settings.micro_shards * settings.accumulation
        create = self.shared.create
        buffer_size = self.evaluator.buffer_size() if self.evaluator.buffer_names else 0
        plan = StepPlanSpec(
            create("plan-indices", (settings.batch_size * settings.accumulation,), "int64"),
            create("plan-offsets", (micro_count + 1,), "int64"),
            create("master-buffers", (buffer_size,), settings.dtype) if buffer_size else None,
            create("micro-shard-buffers", (micro_count, buffer_size), settings.dtype)
            if buffer_size else None,
        )
        norms = create("parameter-norms", (settings.shards, len(self.layout.slots)), "float64")
        self.plan_indices, self.plan_offsets = plan.indices.attach(), plan.offsets.attach()
        self.master_buffers = plan.master_buffers.attach() if buffer_size else None
        self.micro_shard_buffers = plan.micro_shard_buffers.attach() if buffer_size else None
        self.norm_table = norms.attach()
        self.channels = ChannelPaths(str(self.shared.directory), settings.workers,
                                     settings.shards)
        self.channels.create_all()
        self.inbox = Channel(self.channels.runner())
        self.worker_inboxes = [Channel(self.channels.worker(w)) for w in range(settings.workers)]
        self.shard_inboxes = [Channel(self.channels.shard_commands(k))
                              for k in range(settings.shards)]
        self.worker_loops = [replica.serve.remote(self.channels, w, plan)
                             for w, replica in enumerate(self.replicas)]
        self.shard_loops = [shard.serve.remote(self.channels, norms) for shard in self.shards]

    def _stop_step_loops(self) -> None:
        for inbox in getattr(self, "worker_inboxes", []):
            inbox.send(WorkerCommand(STOP, 0, 0, 0, 0, 0))
        for inbox in getattr(self, "shard_inboxes", []):
            inbox.send(ShardCommand(STOP, 0, 0, 0.0, 0.0))

    def _start_actors(self, placement: Placement, replica_setup: ReplicaSetup, parameters,
                      blocks) -> None:
        settings = self.settings
        x_ref, y_ref = ray.put(self.dataset.x), ray.put(self.dataset.y)
        worker_setup = dataclasses.replace(replica_setup, blas_threads=placement.blas_threads)
        # max_concurrency 2: the step loop runs in one thread, the runner's occasional calls
        # (location, checkpoint state, last error) in the other, between steps.
        self.replicas = [RemoteReplica.options(**placement.worker_options(w), max_concurrency=2)
                         .remote(worker_setup, x_ref, y_ref) for w in range(settings.workers)]
        align = not _is_elementwise(self.rule_name)
        bounds = self.layout.shard_bounds(settings.shards, align_to_parameters=align)
        clip_value = (self.spec.clipping.max_value
                      if self.spec.clipping.HasField("max_value") else None)
        self.shards = [
            RemoteShard.options(**placement.shard_options(k), max_concurrency=2).remote(ShardSetup(
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
        samples = self._write_plan(micro_shards)
        lr = self.schedule.lr_at(step - 1)
        if self.master_buffers is not None:
            self.master_buffers[:] = self.evaluator.flatten_buffers(
                self.evaluator.buffer_values())
        blocks = _split_evenly(list(range(len(micro_shards))), settings.workers)
        self.block_ranges = [(b[0], b[-1] + 1) if b else (0, 0) for b in blocks]
        self.owners = {}
        for block in range(settings.workers):
            self._send_block(step, block, self.alive[block % len(self.alive)], samples)
        clipping = self.max_norm is not None
        for inbox in self.shard_inboxes:
            inbox.send(ShardCommand(REDUCE_THEN_WAIT if clipping else REDUCE_AND_APPLY, step,
                                    settings.workers, lr, 1.0))
        block_reports, applied = self._await_step(step, samples, lr)
        if self.micro_shard_buffers is not None:
            self._average_buffers(len(micro_shards))
        wall = time.perf_counter() - start
        computes = [r.d for r in block_reports]
        compute, apply_ = max(computes), max(r.c for r in applied)
        # The reduce-scatter: the workers writing their blocks, then the shards summing them.
        reduce_ = max(r.f for r in block_reports) + max(r.b for r in applied)
        timings = StepTimings(
            compute=compute, reduce=reduce_, apply=apply_,
            gather=0.0,  # the replicas read the updated parameters in place
            wait=max(0.0, wall - compute - reduce_ - apply_), wall=wall,
            straggler_spread=compute - statistics.median(computes),
        )
        squared_norms = self.norm_table.sum(axis=0)
        return StepRecord(
            step=step, total_steps=self.total_steps, epoch=epoch, samples=samples,
            loss=sum(r.a for r in block_reports) / max(samples, 1),
            train_correct=int(sum(r.c for r in block_reports)),
            learning_rate=lr,
            gradient_norm=math.sqrt(sum(r.a for r in applied)),
            parameter_gradient_norms={slot.name: math.sqrt(value)
                                      for slot, value in zip(self.layout.slots, squared_norms)},
            timings=timings,
            bytes_sent_per_worker=int(max(r.e for r in block_reports)),
            bytes_received_per_worker=int(sum(r.d for r in applied)),
            parameter_bytes=self.layout.nbytes,
            workers=len(self.alive),
            worker_failures=self.history.worker_failures,
        )

    def _write_plan(self, micro_shards: list[tuple[int, np.ndarray]]) -> int:
        offset = 0
        self.plan_offsets[0] = 0
        for m, (_, indices) in enumerate(micro_shards):
            self.plan_indices[offset:offset + len(indices)] = indices
            offset += len(indices)
            self.plan_offsets[m + 1] = offset
        return offset

    def _send_block(self, step: int, block: int, worker: int, samples: int) -> None:
        lo, hi = self.block_ranges[block]
        self.owners[block] = worker
        self.worker_inboxes[worker].send(WorkerCommand(COMPUTE, step, block, lo, hi, samples))

    def _await_step(self, step: int, samples: int, lr: float) -> tuple[list, list]:
        """Collect every block's and every shard's report for `step`. A worker that dies or
        misses the deadline is dropped and its block sent to a survivor; the shards keep
        waiting for that block, so the step completes with the same bits."""
        settings = self.settings
        blocks: dict[int, Report] = {}
        reduced: dict[int, Report] = {}
        applied: dict[int, Report] = {}
        deadline = time.monotonic() + settings.step_timeout_seconds
        while len(blocks) < settings.workers or len(applied) < settings.shards:
            try:
                report = self.inbox.receive(Report, timeout=LIVENESS_CHECK_SECONDS)
            except ChannelTimeout:
                deadline = self._handle_silence(step, samples, blocks, deadline)
                continue
            if report.step != step:
                continue  # a late duplicate from a recomputed block of an earlier step
            if report.kind == WORKER_REPORT:
                if not report.ok:
                    worker = self.owners[report.index]
                    message = ray.get(self.replicas[worker].last_error_message.remote(),
                                      timeout=settings.step_timeout_seconds)
                    raise JobFailed(f"worker {worker} failed on step {step}: {message}")
                blocks[report.index] = report
            elif report.kind == SHARD_REDUCED:
                reduced[report.index] = report
                if len(reduced) == settings.shards:
                    total_norm = math.sqrt(sum(r.a for r in reduced.values()))
                    coefficient = clip_coefficient(total_norm, self.max_norm)
                    for inbox in self.shard_inboxes:
                        inbox.send(ShardCommand(APPLY, step, settings.workers, lr, coefficient))
            elif report.kind == SHARD_APPLIED:
                if report.index in reduced:  # clipping: the norm came with SHARD_REDUCED
                    first = reduced[report.index]
                    report = Report(SHARD_APPLIED, report.index, step, 1, first.a, first.b,
                                    report.c, report.d)
                applied[report.index] = report
        return [blocks[b] for b in range(settings.workers)], list(applied.values())

    def _handle_silence(self, step: int, samples: int, blocks: dict, deadline: float) -> float:
        """No report for a while: find dead (or, past the deadline, silent) peers."""
        finished, _ = ray.wait(self.shard_loops, num_returns=len(self.shard_loops), timeout=0)
        if finished:
            ray.get(finished)  # raises the shard's death as an error: the job fails
            raise JobFailed("a parameter-server shard stopped; resume from the last checkpoint")
        loops = [self.worker_loops[w] for w in self.alive]
        dead, _ = ray.wait(loops, num_returns=len(loops), timeout=0)
        lost = {w for w in self.alive if self.worker_loops[w] in dead}
        if time.monotonic() > deadline:
            lost |= {self.owners[b] for b in range(self.settings.workers) if b not in blocks}
            deadline = time.monotonic() + self.settings.step_timeout_seconds
        if not lost:
            return deadline
        for worker in lost:
            ray.kill(self.replicas[worker])  # a late worker must not write its block later
            self.alive.remove(worker)
            self.history.worker_failures += 1
        if not self.alive:
            raise WorkerLost("every worker of the job failed")
        missing = [b for b in range(self.settings.workers)
                   if b not in blocks and self.owners[b] in lost]
        for i, block in enumerate(missing):
            self._send_block(step, block, self.alive[i % len(self.alive)], samples)
        return deadline

    # --- buffers (BatchNorm running statistics) ----------------------------------------------

    def _average_buffers(self, micro_count: int) -> None:
        """Each micro-shard updated the running statistics from the step's starting values;
        the step's new values are their mean, summed in micro-shard order (so any worker count
        gives the same bits). With one micro-shard this is exactly PyTorch's update."""
        rows = self.micro_shard_buffers
        total = rows[0].copy()
        for m in range(1, micro_count):
            total += rows[m]
        self.evaluator.load_buffers(self.evaluator.unflatten_buffers(total / micro_count))
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
