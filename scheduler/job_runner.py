"""How one job trains, step by step, on Ray actors: the runner owns the job from start to end.

Set-up: build the model from the seed, load `model.init_from`'s tensors into it when the job
has them (its flat parameter vector and buffers are the initial state), put the
training rows' source in the object store once (arrays whole; a Parquet file only as where
each replica reads its row groups: worker/training_rows.py), allocate in shared memory the
parameter vector, one gradient block per worker and the step plan, reserve a placement group,
start N replicas and K parameter-server shards, and start their step loops.

One optimizer step:
  1. the runner writes the step's plan (the sample indices of its M logical micro-batches, or
     M x A with gradient accumulation) and tells worker w to compute the contiguous block w
     of micro-batches; the worker writes the block's gradient sum into gradient block w and
     tells every shard (the reduce-scatter's first half);
  2. each shard sums its slice of the N blocks in the fixed tree order and applies the
     optimizer to its slice of the shared parameters; with norm clipping it first reports its
     norm and waits for the global clipping coefficient;
  3. the replicas see the updated parameters in shared memory (the all-gather).
The signals travel through named pipes (worker/transport/shared_memory.py), not Ray calls: a
Ray call costs milliseconds per hop, a pipe microseconds. Actors on other hosts exchange the
same sums over direct TCP connections between workers and shards (worker/transport/direct.py;
compressed jobs: compressed_direct.py), or through the Ray object store when it is asked for by
name (worker/transport/object_store.py, compressed.py); both give the same bits.

Mechanism and policy are apart: the worker group (worker_group.py) starts, kills and replaces
actors; a transport runs a step and returns its outcome or what went wrong; the failure policy
(failure_policy.py) decides what to do about it; the runner has it carried out (_on_failure).
A step or a stop can be checkpointed; a checkpoint resumes by deterministic replay. On shared
memory the shards also keep their state after every step (worker/shard_state_replica.py): a
lost shard's place is taken by the job's standby shard (a process started ahead, kept once
the policy says so) or, with none ready, by new shards for all; every shard goes back to that
state, the workers kept, and the step it was lost in runs again; no step is lost.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint, DataCursor
from scheduler.datasets import Dataset, ValidationSplit
from scheduler.failure_policy import Decision, FailurePolicy, JobFailed
from scheduler.parquet_dataset import ParquetDataset
from scheduler.placement import reserve
from scheduler.ray_cluster import alive_nodes
from scheduler.records import (
    EvaluationRecord,
    RecoveryRecord,
    StepRecord,
    StepTimings,
)
from scheduler.sampler import EpochSampler, StepSamples
from scheduler.step_deadline import StepDeadline
from scheduler.step_history import TrainingHistory
from scheduler.storage import read_tensors
from scheduler.worker_group import WorkerGroup
from worker.flat_parameters import ParameterLayout
from worker.model_builder import build_planned_model
from worker.parameter_server import ShardSetup
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import EarlyStoppingRule, ResolvedJob, resolve
from worker.shard_state_replica import state_keys_of
from worker.shared_memory import SharedArrayGroup, SharedMemoryFull, host_identity
from worker.transport.compressed import CompressedObjectStoreTransport
from worker.transport.compressed_direct import CompressedDirectTransport
from worker.transport.direct import DirectTransport
from worker.transport.object_store import ObjectStoreTransport
from worker.transport.shared_memory import SharedMemoryTransport, StepArraySizes
from worker.transport.step import (
    ActorFailure,
    ErrorFeedbackLost,
    LostBlockApplied,
    ShardLost,
    StepFailure,
    StepOutcome,
    StepTransport,
    StepWork,
    WorkerNotFenced,
    WorkersLost,
    describe,
)
from worker.transport.worker_processes import CannotFence, why_not_fenceable


@dataclass(frozen=True)
class TrainingResult:
    state_dict: dict[str, np.ndarray]  # PyTorch key names, parameters and buffers, copies
    history: TrainingHistory
    final_evaluation: EvaluationRecord | None
    steps: int
    stopped_early: bool  # should_stop() interrupted the job (cancel, shutdown): resumable
    actor_nodes: dict[str, list[str]]  # Ray node ids of the workers and of the shards
    early_stopping_triggered: bool = False  # the validation loss stopped improving
    # The standardisation fitted on the training split (None: none), which new inputs need.
    feature_mean: np.ndarray | None = None
    feature_std: np.ndarray | None = None
    # One sample's shape and dtype name as the model takes them (the model plan's): with the
    # spec, enough to rebuild the model without its data set.
    input_shape: tuple[int, ...] | None = None
    input_dtype: str = ""
    validation_split: ValidationSplit | None = None  # how the validation samples were chosen


@dataclass(frozen=True)
class RunSettings:
    """The numbers the step loop runs by: the resolved job's (nothing is derived from the spec
    here) and the runner's own deadline."""

    workers: int
    shards: int
    micro_batches: int
    accumulation: int
    batch_size: int
    epochs: int
    dtype: str
    evaluation_interval: int
    step_timeout_seconds: float

    @classmethod
    def of(cls, job: ResolvedJob, step_timeout_seconds: float) -> RunSettings:
        return cls(
            workers=job.workers,
            shards=job.parameter_servers,
            micro_batches=job.micro_batches,
            accumulation=job.accumulation_steps,
            batch_size=job.batch_size,
            epochs=job.epochs,
            dtype=job.dtype,
            evaluation_interval=job.evaluation_interval,
            step_timeout_seconds=step_timeout_seconds,
        )


class JobRunner:
    # The current run's actors and transport: set up by _run_once, which also tears them down;
    # the step loop's methods use them only while that run lasts.
    worker_group: WorkerGroup
    transport: StepTransport

    def __init__(
        self,
        job: ResolvedJob,
        dataset: Dataset | ParquetDataset,
        *,
        step_timeout_seconds: float = 120.0,
        on_step: Callable[[StepRecord], None] | None = None,
        on_evaluation: Callable[[EvaluationRecord], None] | None = None,
        on_recovery: Callable[[RecoveryRecord], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
        resume_from: Checkpoint | None = None,
        cpus_per_worker: float | None = None,
        nodes: Sequence[str] | None = None,
        placement_timeout_seconds: float = 60.0,
        transport: str = "auto",
        failure_policy: FailurePolicy | None = None,
        job_id: str | None = None,
    ):
        """Train `job` on `dataset`, which must be its data set as prepared for it
        (scheduler.training.prepare_dataset). `cpus_per_worker` overrides the job's (the service
        divides the cluster between concurrent jobs); `nodes`: the node of each actor, workers
        first (the scheduling policy's choice; None: Ray's); `placement_timeout_seconds` bounds
        the wait for room on the cluster; `transport` is "shared_memory", "direct" (TCP
        connections between workers and shards), "object_store", or "auto": shared memory
        when every node of the cluster is on the runner's host, else direct.
        `failure_policy` decides what a failure costs (default: FailurePolicy()). `job_id`
        (the service's) names the job's shared-memory folder; never the spec's name, which a
        tenant chooses. `step_timeout_seconds` bounds the calls the job's step time does not
        predict (starting actors, a checkpoint's state) and a run's first steps; after those,
        a step's deadline follows the job's own pace (scheduler/step_deadline.py)."""
        if transport not in ("auto", "shared_memory", "direct", "object_store"):
            raise ValueError(f"transport must be auto, shared_memory, direct or object_store, "
                             f"got {transport!r}")
        _check_prepared_for(job, dataset)
        if job.compression is not None:
            # Compression works on the paths between hosts only (direct connections, or the
            # object store by name; the same bits); taking them on one host too keeps a
            # compressed job's result independent of where its actors land.
            if transport == "shared_memory":
                raise ValueError("a job with communication.compression runs on the direct "
                                 "or object-store transport, not shared_memory")
            if transport == "auto":
                transport = "direct"
        self.transport_name = transport
        self.job_id = job_id
        self.cpus_per_worker = (cpus_per_worker if cpus_per_worker is not None
                                else job.cpus_per_worker)
        self.nodes = None if nodes is None else tuple(nodes)
        self.placement_timeout_seconds = placement_timeout_seconds
        self.job, self.dataset = job, dataset
        self.on_checkpoint = on_checkpoint
        self.resume_from = resume_from
        self.settings = RunSettings.of(job, step_timeout_seconds)
        self.deadline = StepDeadline(job.step_deadline, step_timeout_seconds)
        self.on_step = on_step or (lambda record: None)
        self.on_evaluation = on_evaluation or (lambda record: None)
        self.on_recovery = on_recovery or (lambda record: None)
        self.current_step = 0  # the step being computed, or the last one done between steps
        self.completed_step = 0  # the last step whose update every shard applied
        self.should_stop = should_stop or (lambda: False)
        self.policy = failure_policy or FailurePolicy()  # for the whole job, across restarts
        self.history = TrainingHistory()
        self.rule_name, self.hyper = job.optimizer, job.hyperparameters
        self.sampler = EpochSampler(job.training_samples, job.batch_size, job.micro_batches,
                                    job.seed, job.shuffle, job.min_micro_batch_samples,
                                    dataset.training_row_groups)
        self.groups_per_epoch = job.steps_per_epoch
        self.total_steps = job.total_steps
        # Always kept in memory (a lost shard restarts from it) and handed to on_checkpoint
        # when one is given.
        self.checkpoint_interval = job.checkpoint_interval
        self.schedule = job.schedule
        self.max_norm = job.clipping.max_norm
        self.early_stopping = EarlyStopping.of(job.early_stopping)

    @classmethod
    def for_spec(cls, spec: job_pb2.JobSpec, dataset: Dataset, *, workers: int | None = None,
                 parameter_servers: int | None = None, **options) -> JobRunner:
        """A runner for `spec` on `dataset`, already split and standardised (tests, benchmarks):
        the spec resolved against that data set, `workers` and `parameter_servers` in place of
        its resources when given."""
        job = resolve(spec, dataset.shape, workers=workers, parameter_servers=parameter_servers)
        return cls(job, dataset, **options)

    # --- set-up and tear-down --------------------------------------------------------------

    def run(self) -> TrainingResult:
        """Train to the end (or until should_stop / early stopping). A shard lost in a step is
        replaced in place from the state the shards kept after the last step (shared memory,
        elementwise rules: worker/shard_state_replica.py); otherwise every actor restarts from
        that state or the last checkpoint and replays: the sampler and every seed are
        functions of the step, so the weights come out the same."""
        # Where a restart goes back to until the first checkpoint: the job's start.
        self.last_checkpoint: Checkpoint | None = self.resume_from
        self.early_stopping_at_checkpoint = copy.deepcopy(self.early_stopping)
        self.history_at_checkpoint = self.history.copy()
        while True:
            try:
                return self._run_once()
            except _RestartFromCheckpoint:
                self._rewind_to(self.last_checkpoint)
            except CannotFence as unfenced:  # found by the transport's start()
                if self.transport_name != "auto":  # shared memory was asked for by name
                    raise
                # Over shared memory a lost worker's process must be ended before its blocks
                # move; where the runner cannot, the steps go over direct connections.
                self.transport_name = "direct"
                self._recovered("fence_unavailable", self.current_step,
                                f"{unfenced}; the job's steps go over direct connections "
                                f"instead (same results)")
                self._rewind_to(self.last_checkpoint)
            except SharedMemoryFull as full:
                if self.transport_name != "auto":  # shared memory was asked for by name
                    raise
                # Too small a /dev/shm (Docker's default is 64 MiB) costs speed, not the job.
                self.transport_name = "object_store"
                self._recovered("shared_memory_full", self.current_step,
                                f"{full}; the job's steps go through the Ray object store "
                                f"instead (same results, slower)")
                self._rewind_to(self.last_checkpoint)

    def _rewind_to(self, checkpoint: Checkpoint | None) -> None:
        """Forget what happened after `checkpoint` (None: the job's start)."""
        self.resume_from = checkpoint
        # The steps and evaluations as they were then (the counts and recoveries go on).
        self.history.steps = self.history_at_checkpoint.steps.copy()
        self.history.evaluations = self.history_at_checkpoint.evaluations.copy()
        self.early_stopping = copy.deepcopy(self.early_stopping_at_checkpoint)
        self.history.shard_failures = self.policy.shard_restarts

    def _run_once(self) -> TrainingResult:
        settings = self.settings
        model = build_planned_model(self.job.model, settings.dtype, seed=self.job.seed)
        _load_initial_weights(model, self.job)
        self.layout = ParameterLayout.of(model)
        shared_memory = self.parameters_shared = _use_shared_memory(self.transport_name)
        # The job's shared arrays, every page reserved as it is created: no room is a
        # SharedMemoryFull now (run() then falls back to the object store), never a SIGBUS.
        self.shared = SharedArrayGroup(self.job_id) if shared_memory else None
        group: WorkerGroup | None = None  # what this run started, for the tear-down
        transport: StepTransport | None = None
        self.steps_started = False  # whether self.transport is this run's, stepping
        try:
            parameters = None
            if self.shared is not None:
                parameters = self.shared.create("parameters", (self.layout.size,),
                                                settings.dtype)
            replica_setup = ReplicaSetup(self.job, parameters)
            # The runner's own replica evaluates on the validation split and holds the master
            # copy of the parameters (shared, or gathered from the shards) and of the buffers
            # (BatchNorm statistics); it computes no training gradients.
            self.evaluator = ModelReplica(replica_setup, self.dataset.training_rows(),
                                          owns_process=False)
            self.parameters = self.evaluator.flat
            self.parameters[:] = self.layout.flatten(model)
            if self.job.init_weights is not None:  # the master buffers: BatchNorm statistics
                self.evaluator.load_buffers(dict(model.named_buffers()))
            if self.resume_from is not None:
                self._restore_locally(self.resume_from)
            if self.shared is not None:  # before any actor starts for nothing
                self.shared.check_room(self._step_array_sizes().arrays())
            group = self.worker_group = WorkerGroup(
                reserve(settings.workers, settings.shards, self.cpus_per_worker,
                        self.job.placement_strategy, self.placement_timeout_seconds,
                        worker_memory_bytes=self.job.memory_bytes_per_worker,
                        shard_memory_bytes=self.job.memory_bytes_per_shard, nodes=self.nodes),
                timeout_seconds=settings.step_timeout_seconds)
            self._start_actors(replica_setup, parameters, shared_memory)
            transport = self.transport
            if self.resume_from is not None:
                self._restore_shards(self.resume_from)
                if isinstance(transport, CompressedObjectStoreTransport):
                    transport.load_compression_state(self.resume_from.compression_state,
                                                     self._block_owners())
            transport.start()
            self.steps_started = True
            self.steps_started_at = time.monotonic()
            return self._train()
        except ActorFailure as found:  # outside a step: a shard dead at start or checkpoint
            self._on_failure(found.failure)  # raises: restart or fail
            raise
        finally:
            if transport is not None:
                transport.stop()
            if group is not None:
                group.stop()
            if self.shared is not None:
                self.shared.remove()

    def _start_actors(self, replica_setup: ReplicaSetup, parameters, shared_memory: bool) -> None:
        settings = self.settings
        group = self.worker_group
        worker_setup = dataclasses.replace(replica_setup,
                                           blas_threads=group.placement.blas_threads)
        # K-FAC's layers (None for other optimizers): a shard owns whole layers, and their
        # factor statistics travel beside the gradients (worker/kfac_layout.py).
        kfac = self.evaluator.kfac
        align = not _is_elementwise(self.rule_name)
        bounds = self.layout.shard_bounds(settings.shards, align_to_parameters=align,
                                          keep_together=kfac.parameter_ranges if kfac else ())
        clip_value = self.job.clipping.max_value
        shard_setups = [ShardSetup(k, bounds[k], self.layout, parameters, settings.workers,
                                   self.rule_name, self.hyper, clip_value, kfac,
                                   compression=self.job.compression)
                        for k in range(settings.shards)]
        locations = group.start(worker_setup, shard_setups, self.dataset.training_rows(),
                                self.dataset.x_val, self.dataset.y_val)
        self.actor_nodes = {"workers": [node for _, node in locations.workers],
                            "shards": [node for _, node in locations.shards]}
        hosts = {host for host, _ in locations.workers + locations.shards}
        if shared_memory and hosts != {host_identity()}:
            raise RuntimeError(
                "an actor landed on another host than the runner although every node looked "
                "local; run with transport='direct'"
            )
        if self.shared is not None:
            self.transport = SharedMemoryTransport(
                self.shared, group, self._step_array_sizes(),
                timeout_seconds=settings.step_timeout_seconds)
        elif self.job.compression is not None:
            # Its messages go over direct connections unless the object store was asked for
            # by name (both give the same bits).
            compressed = (CompressedObjectStoreTransport if self.transport_name == "object_store"
                          else CompressedDirectTransport)
            self.transport = compressed(
                group, self.parameters, bounds, list(self.layout.slots),
                self.evaluator.flatten_buffers, timeout_seconds=settings.step_timeout_seconds,
                compression=self.job.compression, liveness=group.liveness)
        else:
            # Across hosts the chunks and slices go over direct connections unless the object
            # store was asked for by name (both give the same bits).
            chosen: Callable[..., ObjectStoreTransport] = ObjectStoreTransport
            if self.transport_name != "object_store":  # its shards check a block's figures
                chosen = functools.partial(
                    DirectTransport,
                    buffer_size=self.evaluator.buffer_size() if self.evaluator.buffer_names else 0,
                    max_micro_batches=settings.micro_batches * settings.accumulation)
            self.transport = chosen(
                group, self.parameters, bounds, list(self.layout.slots),
                self.evaluator.flatten_buffers, timeout_seconds=settings.step_timeout_seconds,
                statistics_bounds=[kfac.statistics_bounds(lo, hi) for lo, hi in bounds]
                if kfac else [], liveness=group.liveness)

    def _step_array_sizes(self) -> StepArraySizes:
        settings, kfac = self.settings, self.evaluator.kfac
        return StepArraySizes(
            workers=settings.workers, shards=settings.shards, parameter_count=self.layout.size,
            slots=len(self.layout.slots), max_samples=settings.batch_size * settings.accumulation,
            max_micro_batches=settings.micro_batches * settings.accumulation,
            buffer_size=self.evaluator.buffer_size() if self.evaluator.buffer_names else 0,
            dtype=settings.dtype, statistics_size=kfac.statistics_size if kfac else 0,
            kfac_layers=len(kfac.layers) if kfac else 0,
            replicated_state=self._replicated_state_keys())

    def _replicated_state_keys(self) -> tuple[str, ...] | None:
        """The optimizer state's array names when the shards keep a replica of their state in
        shared memory (elementwise rules; worker/shard_state_replica.py), else None."""
        if not _is_elementwise(self.rule_name):
            return None
        from worker.backprop.optim import RULES

        return state_keys_of(RULES[self.rule_name], self.hyper)

    # --- the step loop ---------------------------------------------------------------------

    def _train(self) -> TrainingResult:
        settings = self.settings
        step = self._resume_step(self.resume_from) if self.resume_from is not None else 0
        self.completed_step = step
        # Where a lost shard restarts from when its state was not kept (worker/
        # shard_state_replica.py): the last checkpoint.
        self._take_checkpoint(step, notify=False)
        epoch, stopped = step // self.groups_per_epoch, False
        batches_of_epoch: tuple[int, list[StepSamples]] = (-1, [])
        while step < self.total_steps:
            epoch = step // self.groups_per_epoch
            if self.should_stop():
                stopped = True
                break
            if batches_of_epoch[0] != epoch:  # one permutation per epoch, not per step
                batches_of_epoch = (epoch, self.sampler.epoch(epoch))
            batches = batches_of_epoch[1]
            first = (step % self.groups_per_epoch) * settings.accumulation
            group = batches[first:first + settings.accumulation]
            step += 1
            record = self._step(step, epoch, group)
            self.completed_step = step
            self.history.steps.append(record)
            self.on_step(record)
            interval = settings.evaluation_interval
            if (step % interval == 0 and self._evaluate(step, epoch, during_training=True)
                    and self._converged()):
                break
            if step % self.checkpoint_interval == 0:
                self._take_checkpoint(step, notify=True)
        # A stop is checkpointed (resuming continues from it), and so is the end when its step
        # was not already: a SUCCEEDED job can then be continued for more epochs.
        last = self.last_checkpoint
        assert last is not None  # taken before the first step
        if self.on_checkpoint is not None and (stopped or last.step != step):
            self.on_checkpoint(self.checkpoint(step))
        stopping = self.early_stopping
        triggered = stopping is not None and stopping.triggered
        if stopping is not None and triggered and stopping.best_state is not None:
            self._restore_best(stopping.best_state)
        final = None
        if self.dataset.x_val is not None and not stopped:
            evaluations = self.history.evaluations
            already = evaluations and evaluations[-1].step == step and not triggered
            final = evaluations[-1] if already else self._evaluate(step, epoch)
        return TrainingResult(self._state_dict(), self.history, final, step, stopped,
                              self.actor_nodes, triggered, self.dataset.feature_mean,
                              self.dataset.feature_std, tuple(self.job.model.input_shape),
                              self.job.model.input_dtype, self.dataset.validation_split)

    # --- early stopping ------------------------------------------------------------------------

    def _converged(self) -> bool:
        """Whether early stopping ends the job after the evaluation just recorded."""
        if self.early_stopping is None:
            return False
        snapshot = None
        if self.early_stopping.restore_best:
            snapshot = (np.array(self.parameters), self.evaluator.buffer_values())
        return self.early_stopping.observe(self.history.evaluations[-1].loss, snapshot)

    def _restore_best(self, state: tuple) -> None:
        parameters, buffers = state
        self.parameters[:] = parameters
        if buffers:
            self.evaluator.load_buffers(buffers)
        self.transport.push_parameters()

    # --- checkpoints ---------------------------------------------------------------------------

    def _take_checkpoint(self, step: int, notify: bool) -> None:
        """Keep the state in memory for shard recovery; hand it to on_checkpoint too."""
        self.last_checkpoint = self.checkpoint(step)
        self.early_stopping_at_checkpoint = copy.deepcopy(self.early_stopping)
        self.history_at_checkpoint = self.history.copy()
        if notify and self.on_checkpoint is not None:
            self.on_checkpoint(self.last_checkpoint)

    def checkpoint(self, step: int) -> Checkpoint:
        """The job's state now (between steps): parameters, buffers, whole optimizer state."""
        self.transport.sync_parameters()
        compression_state = {}
        if isinstance(self.transport, CompressedObjectStoreTransport):
            # Its workers step the optimizer, each over the whole vector.
            optimizer_steps, state = self.transport.optimizer_state()
            compression_state = self.transport.compression_state(self._block_owners())
        else:
            shard_states = self.worker_group.shard_states(f"at the checkpoint of step {step}")
            optimizer_steps = shard_states[0][0]
            if _is_elementwise(self.rule_name):
                keys = shard_states[0][1].keys()
                state = {key: np.concatenate([part[key] for _, part in shard_states])
                         for key in keys}
            else:
                state = {key: value for _, part in shard_states for key, value in part.items()}
        return Checkpoint(step, np.array(self.parameters), optimizer_steps, state,
                          self.evaluator.buffer_values() if self.evaluator.buffer_names else {},
                          data_cursor=self._data_cursor(step),
                          compression_state=compression_state)

    def _data_cursor(self, step: int) -> DataCursor:
        """Where the data stands after `step` optimizer steps: an epoch's steps each use
        `accumulation` batches, and steps never span epochs."""
        epoch, steps_in_epoch = divmod(step, self.groups_per_epoch)
        return self.sampler.cursor(epoch, steps_in_epoch * self.settings.accumulation)

    def _resume_step(self, checkpoint: Checkpoint) -> int:
        """The step a resume from `checkpoint` continues after: its data cursor's place in
        this job's epochs, which must be the step it was taken at (ValueError otherwise, or
        when the cursor counts in another order than this job's data: sampler.position)."""
        if checkpoint.data_cursor is None:  # written before checkpoints kept the cursor
            return checkpoint.step
        epoch, batches = self.sampler.position(checkpoint.data_cursor)
        steps_in_epoch, inside_a_step = divmod(batches, self.settings.accumulation)
        if inside_a_step or epoch * self.groups_per_epoch + steps_in_epoch != checkpoint.step:
            raise ValueError(f"the checkpoint of step {checkpoint.step} has its data cursor at "
                             f"batch {batches} of epoch {epoch}, which is not where step "
                             f"{checkpoint.step} of this job ends")
        return checkpoint.step

    def _block_owners(self) -> dict[int, int]:
        """Gradient block -> the worker computing it (one block per worker slot)."""
        return {b: self.worker_group.owner_for(b) for b in range(self.settings.workers)}

    def _restore_locally(self, checkpoint: Checkpoint) -> None:
        self._resume_step(checkpoint)  # refuses a cursor in another order before any actor
        if checkpoint.parameters.shape != self.parameters.shape:
            raise ValueError(
                f"checkpoint has {checkpoint.parameters.size} parameters, the model "
                f"{self.parameters.size}: it belongs to another model"
            )
        self.parameters[:] = checkpoint.parameters
        if checkpoint.buffers:
            self.evaluator.load_buffers(checkpoint.buffers)

    def _restore_shards(self, checkpoint: Checkpoint) -> None:
        if isinstance(self.transport, CompressedObjectStoreTransport):  # the workers step it
            self.transport.load_optimizer_state(checkpoint.optimizer_steps,
                                                checkpoint.optimizer_state)
            return
        self.worker_group.load_shard_states(checkpoint.optimizer_steps,
                                            checkpoint.optimizer_state)

    def _step(self, step: int, epoch: int, group: list[StepSamples]) -> StepRecord:
        start = time.perf_counter()
        self.current_step = step
        micro_batches = _micro_batches_in_tree_order(group)
        blocks = _split_evenly(list(range(len(micro_batches))), self.settings.workers)
        master_buffers = None
        if self.evaluator.buffer_names:
            master_buffers = self.evaluator.flatten_buffers(self.evaluator.buffer_values())
        work = StepWork(
            step=step, micro_batches=micro_batches,
            block_ranges=[(b[0], b[-1] + 1) if b else (0, 0) for b in blocks],
            block_owners=[self.worker_group.owner_for(b) for b in range(len(blocks))],
            samples=sum(len(indices) for _, indices in micro_batches),
            lr=self.schedule.lr_at(step - 1), max_norm=self.max_norm,
            master_buffers=master_buffers,
            carries_statistics=self.evaluator.carries_statistics(step),
            kl_clip=self.hyper.kl_clip if self.evaluator.kfac is not None else None,
            deadline_seconds=self.deadline.seconds,
        )
        outcome = self.transport.run_step(work)
        while not isinstance(outcome, StepOutcome):
            owners = self._on_failure(outcome, in_step=True)
            # None: new shards took over from the state kept after the last step; the step
            # runs again on them.
            outcome = (self.transport.run_step(work) if owners is None
                       else self.transport.recompute(owners))
        self.history.worker_failures = self.policy.worker_failures
        self.history.shard_failures = self.policy.shard_restarts
        self._replace_lost_workers(step)
        self._keep_a_standby_shard()
        if outcome.micro_batch_buffers is not None:
            self._average_buffers(outcome.micro_batch_buffers)
        wall = time.perf_counter() - start
        self.deadline.observe(wall)
        return self._record(step, epoch, work, outcome, wall)

    def _on_failure(self, failure: StepFailure, in_step: bool = False) -> dict[int, int] | None:
        """Ask the failure policy about `failure` and have it carried out. RECOMPUTE: the group
        removes the lost workers, and the returned block -> survivor map goes to the transport.
        RESTART of a shard lost `in_step`: new shards from the state kept after the last
        step when there is one (None: the step runs again); otherwise RESTART and FAIL raise
        (the actors are torn down on the way out)."""
        group = self.worker_group
        lost = failure.workers if isinstance(failure, WorkersLost) else ()
        survivors = len([w for w in group.alive if w not in lost])
        decision = self.policy.decide(failure, survivors)
        if decision is Decision.RECOMPUTE and isinstance(failure, WorkersLost):
            group.remove(failure.workers)
            owners = {block: group.owner_for(i)
                      for i, block in enumerate(failure.unfinished_blocks)}
            by = ", ".join(str(w) for w in sorted(set(owners.values()))) or "none"
            for worker in failure.workers:
                why = _why_lost(worker, failure, self.deadline.seconds)
                # Blocks of it that had reached every shard (direct connections) are done.
                delivered = [b for b, owner in failure.delivered_blocks if owner == worker]
                if not in_step:
                    cost = "found between steps, no block of it to recompute"
                elif not delivered:
                    cost = f"its micro-batches recomputed in-step by worker(s) {by}"
                elif not failure.unfinished_blocks:
                    cost = f"its block(s) {delivered} had reached the shards: none recomputed"
                else:
                    cost = (f"its block(s) {delivered} had reached the shards; the step's other "
                            f"lost blocks recomputed in-step by worker(s) {by}")
                if (not_replaced := self.policy.why_not_replaced(worker)) is not None:
                    cost += f"; {not_replaced}"
                self._recovered("worker_lost", failure.step,
                                f"worker {worker} lost at step {failure.step} ({why}): {cost}")
            return owners
        if decision is Decision.RESTART:
            took_over = (self._replace_shards_from_kept_state(failure)
                         if in_step and isinstance(failure, ShardLost) else None)
            if took_over is not None:
                self._recovered("shard_lost", self.current_step,
                                f"{describe(failure)}: {took_over} took over from the state "
                                f"the shards kept after step {self.completed_step}, and step "
                                f"{self.current_step} ran again (no step is trained again; "
                                f"restart {self.policy.shard_restarts} of at most "
                                f"{self.policy.max_shard_restarts})")
                return None
            if self._restart_point_from_kept_state():
                where = (f"from step {self.completed_step}, the state its shards kept in "
                         f"shared memory (no step is trained again)")
            else:
                restart = self.last_checkpoint.step if self.last_checkpoint is not None else 0
                where = f"from the checkpoint of step {restart} and replays from there"
            kind = ("error_feedback_lost" if isinstance(failure, ErrorFeedbackLost)
                    else "lost_block_applied" if isinstance(failure, LostBlockApplied)
                    else "worker_not_fenced" if isinstance(failure, WorkerNotFenced)
                    else "shard_lost")
            self._recovered(kind, self.current_step,
                            f"{describe(failure)}: every actor restarts {where} (restart "
                            f"{self.policy.shard_restarts} of at most "
                            f"{self.policy.max_shard_restarts})")
            raise _RestartFromCheckpoint(failure)
        raise JobFailed(self.policy.why_failed(failure), failure)

    def _replace_shards_from_kept_state(self, failure: ShardLost) -> str | None:
        """Put the shards, the workers kept, back to the parameters and optimizer state the
        shards kept after the last completed step (worker/shard_state_replica.py), with a
        live shard in the lost one's place: the standby shard when one is ready (the others
        stop after the step in hand and keep their processes), else new shards for all of
        them, each in its bundle. Returns who took over, or None when that cannot be done
        (no state kept, a worker lost meanwhile, a new shard not starting): every actor then
        restarts."""
        transport, group = self.transport, self.worker_group
        if not (self.steps_started and isinstance(transport, SharedMemoryTransport)):
            return None
        kept = transport.kept_state(self.completed_step)
        if kept is None:
            return None
        # The shard the standby replaces (None: no standby ready, every shard is replaced).
        replaced = failure.shard if group.standby_shard_ready() else None
        if replaced is not None:
            group.kill_shard(replaced)
            transport.stop_shard_loops()
        else:
            group.kill_shards()
        if not transport.settle_after_lost_shards():
            return None
        self.parameters[:] = kept.parameters  # the shared vector, halfway through the step
        try:
            if replaced is not None:
                group.promote_standby_shard(replaced)
            else:
                group.start_shards()
            group.load_shard_states(kept.optimizer_steps, kept.optimizer_state)
        except ActorFailure:
            return None
        transport.shards_replaced()
        return "new shards" if replaced is None else "the standby shard"

    def _restart_point_from_kept_state(self) -> bool:
        """Make the state the shards kept after the last completed step (worker/
        shard_state_replica.py) the point a restart goes back to, when they kept it; False
        when they did not (another transport, a rule without a replica, nothing kept yet)."""
        if not self.steps_started:  # lost while starting: nothing of this run was kept
            return False
        kept = self.transport.kept_state(self.completed_step)
        if kept is None:
            return False
        # The runner's own state is at that step too: its buffers were averaged and its
        # history recorded at the end of the step, and the lost one never got there.
        buffers = self.evaluator.buffer_values() if self.evaluator.buffer_names else {}
        self.last_checkpoint = Checkpoint(kept.step, kept.parameters, kept.optimizer_steps,
                                          kept.optimizer_state, buffers,
                                          self._data_cursor(kept.step))
        self.early_stopping_at_checkpoint = copy.deepcopy(self.early_stopping)
        self.history_at_checkpoint = self.history.copy()
        return True

    def _recovered(self, kind: str, step: int, message: str) -> None:
        """Report a recovery as it is carried out (the service logs, stores, streams and
        counts it; `chainrule train` prints it)."""
        record = RecoveryRecord(step, kind, message)
        self.history.recoveries.append(record)
        self.on_recovery(record)

    def _replace_lost_workers(self, step: int) -> None:
        """Elasticity: a lost worker's placement bundle is free again, so a new replica starts
        there when the policy allows; it joins at the first step boundary after it is ready
        (the step loop never waits for it). Its blocks are the same blocks, so the weights do
        not change. `step` is the step just done."""
        for worker in self.worker_group.admit_ready():
            self.transport.worker_replaced(worker)
            self._recovered("worker_replaced", step + 1,
                            f"a replacement for worker {worker} joined at step {step + 1}")
        for worker in self.policy.workers_to_replace(self.worker_group.vacant_slots()):
            self.worker_group.replace(worker)

    def _keep_a_standby_shard(self) -> None:
        """Start a standby shard when the policy wants one and none is there (at the start of
        its time, and after one took a lost shard's place). Only where a lost shard's state is
        kept (shared memory, elementwise rules): elsewhere every shard restarts anyway."""
        transport, group = self.transport, self.worker_group
        if (group.standby is None and isinstance(transport, SharedMemoryTransport)
                and transport.keeps_shard_state
                and self.policy.wants_standby_shard(time.monotonic() - self.steps_started_at)):
            group.start_standby_shard(self.actor_nodes["shards"][0])

    def _record(self, step: int, epoch: int, work: StepWork, outcome: StepOutcome,
                wall: float) -> StepRecord:
        computes = [b.compute_seconds for b in outcome.blocks]
        compute = max(computes)
        # The reduce-scatter: the workers writing their blocks, then the shards summing them.
        reduce_ = (max(b.write_seconds for b in outcome.blocks)
                   + max(s.reduce_seconds for s in outcome.shards))
        # The optimizer step: on the shards, or on every worker of a compressed job.
        apply_ = max(max(s.apply_seconds for s in outcome.shards),
                     max(b.apply_seconds for b in outcome.blocks))
        busy = compute + reduce_ + apply_ + outcome.gather_seconds
        timings = StepTimings(compute=compute, reduce=reduce_, apply=apply_,
                              gather=outcome.gather_seconds, wait=max(0.0, wall - busy),
                              wall=wall, straggler_spread=compute - statistics.median(computes),
                              communication=outcome.communication_seconds,
                              hidden_communication=outcome.hidden_communication_seconds)
        return StepRecord(
            step=step, total_steps=self.total_steps, epoch=epoch, samples=work.samples,
            loss=sum(b.loss_sum for b in outcome.blocks) / max(work.samples, 1),
            train_correct=sum(b.correct for b in outcome.blocks),
            learning_rate=work.lr,
            gradient_norm=math.sqrt(sum(s.squared_norm for s in outcome.shards)),
            parameter_gradient_norms={
                slot.name: math.sqrt(value)
                for slot, value in zip(self.layout.slots, outcome.parameter_squared_norms)},
            timings=timings,
            bytes_sent_per_worker=max(b.bytes_sent for b in outcome.blocks),
            bytes_received_per_worker=sum(s.bytes_updated for s in outcome.shards),
            parameter_bytes=self.layout.nbytes,
            workers=len(self.worker_group.alive),
            worker_failures=self.policy.worker_failures,
            shard_failures=self.policy.shard_restarts,
        )

    def _average_buffers(self, rows: list[np.ndarray]) -> None:
        """Each micro-batch updated the running statistics from the step's starting values;
        the step's new values are their mean, summed in micro-batch order (so any worker count
        gives the same bits). With one micro-batch this is exactly PyTorch's update."""
        total = np.array(rows[0])
        for row in rows[1:]:
            total += row
        self.evaluator.load_buffers(self.evaluator.unflatten_buffers(total / len(rows)))
        self.evaluator.count_batch()

    # --- evaluation and results ----------------------------------------------------------------

    def _evaluate(self, step: int, epoch: int,
                  during_training: bool = False) -> EvaluationRecord | None:
        """`during_training`: steps follow, so a worker lost meanwhile goes to the failure
        policy now (at the end, the group stops anyway)."""
        if self.dataset.x_val is None or self.dataset.y_val is None:  # both or neither
            return None
        loss_sum, samples, correct = self._evaluate_on_workers(
            step, self.dataset.x_val, self.dataset.y_val,
            report_lost=during_training and step < self.total_steps)
        record = EvaluationRecord(
            step=step, epoch=epoch, loss=loss_sum / max(samples, 1),
            accuracy=self._accuracy(correct, samples),
            samples=samples,
        )
        self.history.evaluations.append(record)
        self.on_evaluation(record)
        return record

    def _evaluate_on_workers(self, step: int, x_val: np.ndarray, y_val: np.ndarray,
                             report_lost: bool) -> tuple[float, int, int]:
        """(summed loss, samples, correct) on the validation split, computed by the workers
        in batches of a micro-batch's samples (what the job's activation limit was checked
        against; a forward pass without gradients holds less), each batch's sum added in batch
        order, so any worker count gives the same figures. The batches of a worker lost
        meanwhile are computed here, one at a time; with `report_lost` the worker goes to the
        failure policy at once (found by its heartbeat: a host whose raylet died is found
        here, not only when a later step hangs on it)."""
        self.transport.sync_parameters()
        size = math.ceil(self.settings.batch_size / self.settings.micro_batches)
        batches = [(lo, min(lo + size, len(y_val))) for lo in range(0, len(y_val), size)]
        buffers = (self.evaluator.flatten_buffers(self.evaluator.buffer_values())
                   if self.evaluator.buffer_names else None)
        # Shared memory: the workers' parameters are the runner's vector already.
        parameters = None if self.parameters_shared else self.parameters
        timeout = self.settings.step_timeout_seconds * math.ceil(
            len(batches) / max(1, len(self.worker_group.alive)))
        evaluation = self.worker_group.evaluate(step, batches, parameters, buffers, timeout)
        if evaluation.lost is not None and report_lost:
            self._workers_lost_between_steps(evaluation.lost)
        loss_sum, samples, correct = 0.0, 0, 0
        for (lo, hi), result in zip(batches, evaluation.values):
            if result is None:
                result = self.evaluator.evaluate(x_val[lo:hi], y_val[lo:hi])
            loss_sum += result[0]
            samples += result[1]
            correct += result[2]
        return loss_sum, samples, correct

    def _workers_lost_between_steps(self, lost: WorkersLost) -> None:
        """Workers found lost outside a step (no block of theirs is pending): to the failure
        policy, as the transport counts them (a compressed job's error feedback died with
        them)."""
        transport = self.transport
        if isinstance(transport, CompressedObjectStoreTransport):
            self._on_failure(ErrorFeedbackLost(lost.step, lost.workers))
            return
        if isinstance(transport, SharedMemoryTransport):
            transport.workers_removed(lost.workers)
        self._on_failure(lost)

    def _accuracy(self, correct: int, samples: int) -> float | None:
        """Right predictions over predictions made: per class, next byte or binary label."""
        predictions = samples * self.job.predictions_per_sample
        return correct / predictions if predictions else None

    def _state_dict(self) -> dict[str, np.ndarray]:
        self.transport.sync_parameters()
        return {key: np.array(value) for key, value in self.evaluator.model.state_dict().items()}


class _RestartFromCheckpoint(Exception):
    """The failure policy chose RESTART: unwinds _run_once (tearing its actors down) to run()."""


@dataclass
class EarlyStopping:
    """Patience on the validation loss (the article's early stopping)."""

    patience: int
    min_delta: float
    restore_best: bool
    best: float = math.inf
    since_best: int = 0
    best_state: tuple | None = None
    triggered: bool = False

    @classmethod
    def of(cls, rule: EarlyStoppingRule | None) -> EarlyStopping | None:
        if rule is None:
            return None
        return cls(rule.patience, rule.min_delta, rule.restore_best)

    def observe(self, loss: float, snapshot: tuple | None) -> bool:
        """Record an evaluation's loss; True once `patience` of them brought no improvement."""
        if loss < self.best - self.min_delta:
            self.best, self.since_best = loss, 0
            if snapshot is not None:
                self.best_state = snapshot
        else:
            self.since_best += 1
        self.triggered = self.since_best >= self.patience
        return self.triggered


def _check_prepared_for(job: ResolvedJob, dataset: Dataset | ParquetDataset) -> None:
    """ValueError unless `dataset` is the one `job` was resolved for, split as it says: the
    sampler and the evaluation trust the job's sizes."""
    shape = dataset.shape
    found = (shape.samples, shape.validation_samples, shape.feature_shape)
    expected = (job.training_samples, job.validation_samples, job.model.input_shape)
    if found != expected:
        raise ValueError(f"the data set has (training samples, validation samples, feature "
                         f"shape) {found}, the job was resolved for {expected}: prepare it "
                         f"with scheduler.training.prepare_dataset")


def _load_initial_weights(model, job: ResolvedJob) -> None:
    """`model.init_from`'s tensors into the freshly seeded model, parameters and buffers: the
    runner's vector and master buffers start from them, and every replica and shard from those
    (shared memory, or pushed by the object-store transport before the first step). The keys
    were matched against the model when the job was resolved; the rest keep the seed's values."""
    init = job.init_weights
    if init is None:
        return
    own = model.state_dict()
    values = read_tensors(init.path, init.keys)
    # A scalar may come as one value of shape (1,) (initial_weights.fits): the model's shape.
    model.load_state_dict({key: value.reshape(own[key].shape) for key, value in values.items()},
                          strict=False)


def _why_lost(worker: int, failure: WorkersLost, deadline_seconds: float) -> str:
    if worker in failure.silent:
        return f"silent past the step's {deadline_seconds:.3g} s deadline"
    if worker in failure.raylet_gone:
        return "its raylet is gone, found by its heartbeat: the host's Ray is down"
    if worker in failure.unanswered:
        return "no answer to its heartbeat: its node or process is gone or stopped"
    if worker in failure.unconnected:
        return "it could not connect to the parameter-server shards in time"
    return "its process died"


def _micro_batches_in_tree_order(group: list[StepSamples]) -> list[tuple[int, np.ndarray]]:
    """(global index, sample indices) of every micro-batch of the step's batches, micro-batch
    major: block w then covers micro-batches [wM/N, (w+1)M/N) of every batch, a contiguous
    run of the tree's leaves."""
    accumulation = len(group)
    return [(m * accumulation + a, group[a].micro_batches[m])
            for m in range(len(group[0].micro_batches)) for a in range(accumulation)]


def _split_evenly(items: list, parts: int) -> list[list]:
    bounds = [round(len(items) * k / parts) for k in range(parts + 1)]
    return [items[bounds[k]:bounds[k + 1]] for k in range(parts)]


def _is_elementwise(rule_name: str) -> bool:
    """Whether any cut of the vector suits the rule and its state concatenates over shards;
    not K-FAC's (whole layers, state by layer), which is no rule of RULES."""
    from worker.backprop.optim import RULES

    return rule_name in RULES and RULES[rule_name].elementwise


def _use_shared_memory(transport: str) -> bool:
    """Shared memory needs every node on the runner's host (one machine, or several raylets
    on it as in ray.cluster_utils.Cluster) and a runner that can end a lost worker's process
    (pidfds: worker/transport/worker_processes.py); otherwise the step goes over direct
    connections ("auto", "direct") or the object store ("object_store"). A job that asks for
    "shared_memory" by name where pidfds do not work fails at its start, saying why."""
    if transport != "auto":
        return transport == "shared_memory"
    if why_not_fenceable() is not None:
        return False
    hostname = os.uname().nodename
    return all(node.get("NodeManagerHostname") == hostname for node in alive_nodes())
