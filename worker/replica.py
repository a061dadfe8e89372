"""How a worker computes its part of a step: the gradient of its block of micro-batches.

A replica holds a model built from the job spec, with its parameters as views into the shared
parameter vector (so it always sees the latest all-gathered values, without a copy). For a step
it runs forward and backward on each of its micro-batches in order, adds their gradients in the
fixed tree order, and writes the block's sum where the step's transport says (a gradient
block in shared memory, or a fresh array returned through the object store: see
worker/transport/), for the parameter-server shards to sum (the reduce-scatter).

With K-FAC, on a factor-update step each micro-batch's forward and backward run inside a
capture of the K-FAC layers, and the micro-batch's factor statistics (worker/kfac_layout.py)
join its gradients as one more array of the same tree leaf: the block's statistics are summed
by exactly the tree of its gradients, and written beside them.

Each micro-batch's loss is summed over its samples and divided by the GLOBAL batch size, so the
micro-batches' gradients add up to exactly the gradient of the batch's mean loss, whichever
worker computed them. Dropout masks are seeded by (seed, step, micro-batch), never by worker.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from worker.backprop import allocator, nn
from worker.backprop.nn.capture import capture_layers
from worker.backprop.tensor import Tensor, no_grad
from worker.compression import ErrorFeedback, PowerSGDWorker
from worker.flat_parameters import ParameterLayout
from worker.kfac_layout import (
    KFAC,
    KFACLayout,
    empty_micro_batch_statistics,
    micro_batch_statistics,
)
from worker.model_builder import Loss, build_planned_model
from worker.resolved_job import ResolvedJob
from worker.shared_memory import SharedArraySpec, host_identity
from worker.training_rows import TrainingRows
from worker.transport import (
    compressed,
    compressed_direct,
    direct,
    object_store,
    shared_memory,
)
from worker.transport.raylet_watch import RayletWatch
from worker.tree_sum import TreeAccumulator

if TYPE_CHECKING:
    from worker.parameter_server import ParameterServerShard


@dataclass(frozen=True)
class ReplicaSetup:
    job: ResolvedJob  # plain data (numbers and the model spec's bytes): no user code travels
    # Shared memory (all actors on the runner's host), or None: the replica keeps its own
    # parameter vector and exchanges it through the object store.
    parameters: SharedArraySpec | None
    blas_threads: int = 1


@dataclass(frozen=True)
class BlockResult:
    loss_sum: float  # the summed (not averaged) loss of the block's samples
    samples: int
    correct: int  # right predictions (Loss.correct), for training accuracy (0 for regression)
    seconds: float  # forward, backward and the block's local tree sum
    bytes_written: int  # gradient bytes written into the shared block (this worker's "send")
    write_seconds: float  # writing them: the worker's half of the reduce-scatter
    buffers: list[dict[str, np.ndarray]] | None  # per micro-batch (BatchNorm running stats)
    # A compressed job's worker applying the last step's update before computing this block.
    apply_seconds: float = 0.0


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """The dropout seed of one micro-batch of one step: independent of who computes it."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1)[0])


class ModelReplica:
    def __init__(self, setup: ReplicaSetup, rows: TrainingRows,
                 x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 owns_process: bool = True):
        """`rows`: the training split's samples by index (worker/training_rows.py); `x_val`,
        `y_val`: the validation split, read in batches by `evaluate_batches` (None: the job
        has none).
        `owns_process`: this replica is its process's only tenant (a Ray actor), so it sets
        the process's BLAS threads and malloc thresholds for training; False in a process that
        does other work too (the runner's evaluator, tests)."""
        if owns_process:
            from threadpoolctl import threadpool_limits

            allocator.keep_freed_memory()

            # Each worker gets its share of the cores; BLAS threads beyond it only fight.
            self._thread_limit = threadpool_limits(setup.blas_threads, user_api="blas")
        # Whether the raylet that started this actor still lives (its heartbeat says so).
        self.raylet = RayletWatch() if owns_process else None
        self.job = setup.job
        dtype = np.dtype(self.job.dtype)
        self.model = build_planned_model(self.job.model, dtype, seed=self.job.seed)
        self.layout = ParameterLayout.of(self.model)
        if setup.parameters is not None:
            self.flat = setup.parameters.attach()
        else:  # object-store transport: the same seed gives the runner's initial values
            self.flat = self.layout.flatten(self.model)
        self.layout.bind(self.model, self.flat)
        self.parameters = list(self.model.parameters())
        self.kfac = KFACLayout.of(self.model, self.layout) if self.job.optimizer == KFAC else None
        modules = dict(self.model.named_modules())
        self.kfac_modules = [modules[layer.name] for layer in self.kfac.layers] if self.kfac else []
        self.loss = Loss(self.job.loss, "sum", self.job.label_smoothing)
        self.rows = rows
        self.dtype = dtype
        self.scores_accuracy = self.job.predictions_per_sample > 0
        self.x_val, self.y_val = x_val, y_val
        self.buffer_names = [name for name, value in self.model.named_buffers()
                             if value.dtype.kind == "f"]
        # The actor runs two threads (calls beside the step loop), but one model computes one
        # block at a time: the engine's graph-recording switch is process-wide.
        self._compute_lock = threading.Lock()
        # The reduce-scatter overlapped with backward (object-store transport): while the
        # block's last micro-batch runs backward, each parameter's block sum goes to the
        # sender as soon as the parameter's gradient is final.
        self._chunk_sender: object_store.ChunkSender | None = None
        self._block_sums: TreeAccumulator | None = None
        if setup.parameters is None:
            for index, parameter in enumerate(self.parameters):
                parameter.register_post_accumulate_grad_hook(
                    functools.partial(self._gradient_ready, index))
        self.last_error = ""  # the job error of the last block that raised, for the runner
        # Gradient compression (job.compression): each block's error feedback, and PowerSGD's
        # messages in progress; made at the first compressed block (worker/transport/compressed.py).
        self.error_feedback_memory: ErrorFeedback | None = None
        self.powersgd: PowerSGDWorker | None = None
        # ... and the optimizer over the whole vector, which each worker of a compressed job
        # steps itself with the same step gradient (a ParameterServerShard over [0, size)).
        self.replicated_optimizer: ParameterServerShard | None = None
        # The step whose update it applied last (None: none since its parameters were loaded).
        self.applied_update_step: int | None = None
        # The direct transport's connections to the shards (worker/transport/direct.py).
        self.shard_links: direct.WorkerEnd | None = None

    def location(self) -> tuple[str, str]:
        """(host, Ray node id): replicas on the runner's host share its memory."""
        return host_identity(), _ray_node_id()

    def heartbeat(self) -> None:
        """Answered in its own thread while blocks compute: the runner's liveness check
        (worker/transport/liveness.py). Raises RayletGone once this actor's raylet died
        (raylet_watch.py)."""
        if self.raylet is not None:
            self.raylet.check()

    # --- the transports' actor ends (worker/transport/): Ray calls reach them here ----------

    def serve(self, step: shared_memory.SharedStep, worker: int) -> None:
        shared_memory.serve_worker(self, step, worker)

    def compute_and_send(self, micro_batches: list[tuple[int, np.ndarray]], global_step: int,
                         batch_size: int, master_buffers: np.ndarray | None,
                         bounds: list[tuple[int, int]], block_index: int, shards: list,
                         *slices: np.ndarray) -> tuple:
        return object_store.compute_and_send(self, micro_batches, global_step, batch_size,
                                             master_buffers, bounds, block_index, shards,
                                             *slices)

    def connect_to_shards(self, worker: int, addresses: list[tuple[str, int]],
                          bounds: list[tuple[int, int]], token: bytes,
                          timeout_seconds: float) -> None:
        end = (compressed_direct.CompressedWorkerEnd if self.job.compression is not None
               else None)
        direct.connect_to_shards(self, worker, addresses, bounds, token, timeout_seconds, end)

    def compute_direct(self, micro_batches: list[tuple[int, np.ndarray]], global_step: int,
                       batch_size: int, master_buffers: np.ndarray | None, block: int,
                       version: int, timeout_seconds: float) -> tuple:
        return direct.compute_direct(self, micro_batches, global_step, batch_size,
                                     master_buffers, block, version, timeout_seconds)

    def compress_block(self, block: int, micro_batches: list[tuple[int, np.ndarray]],
                       global_step: int, batch_size: int, master_buffers: np.ndarray | None,
                       bounds: list[tuple[int, int]], update: compressed.StepUpdate | None,
                       *replies) -> tuple:
        return compressed.compress_block(self, block, micro_batches, global_step, batch_size,
                                         master_buffers, bounds, update, *replies)

    def powersgd_second(self, block: int, bounds: list[tuple[int, int]], *p_hats) -> tuple:
        return compressed.powersgd_second(self, block, bounds, *p_hats)

    def apply_step_update(self, bounds: list[tuple[int, int]],
                          update: compressed.StepUpdate, *replies) -> str:
        return compressed.apply_step_update(self, bounds, update, *replies)

    def compress_direct(self, block: int, micro_batches: list[tuple[int, np.ndarray]],
                        global_step: int, batch_size: int, master_buffers: np.ndarray | None,
                        update: compressed.StepUpdate | None, timeout_seconds: float) -> tuple:
        return compressed_direct.compress_direct(self, block, micro_batches, global_step,
                                                 batch_size, master_buffers, update,
                                                 timeout_seconds)

    def apply_received_update(self, update: compressed.StepUpdate,
                              timeout_seconds: float) -> str:
        return compressed_direct.apply_received_update(self, update, timeout_seconds)

    def parameter_vector(self) -> np.ndarray:
        return self.flat

    def load_parameter_vector(self, values: np.ndarray) -> None:
        with self._compute_lock:
            self.flat[:] = values
            self.applied_update_step = None

    def compression_state(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        return compressed.compression_state(self)

    def load_compression_state(self, errors: dict[int, np.ndarray],
                               warm_q: dict[int, np.ndarray]) -> None:
        compressed.load_compression_state(self, errors, warm_q)

    def optimizer_state(self) -> tuple[int, dict[str, np.ndarray]]:
        return compressed.replicated_optimizer(self).state()

    def load_optimizer_state(self, steps_taken: int, state: dict[str, np.ndarray]) -> None:
        compressed.replicated_optimizer(self).load_state(steps_taken, state)

    def last_error_message(self) -> str:
        return self.last_error

    def buffer_size(self) -> int:
        values = self.buffer_values()
        return sum(v.size for v in values.values())

    def flatten_buffers(self, values: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([values[name].reshape(-1) for name in self.buffer_names])

    def unflatten_buffers(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        own = dict(self.model.named_buffers())
        values, offset = {}, 0
        for name in self.buffer_names:
            size = own[name].size
            values[name] = flat[offset:offset + size].reshape(own[name].shape)
            offset += size
        return values

    def compute(self, destination: dict[str, np.ndarray],
                micro_batches: list[tuple[int, np.ndarray]], global_step: int, batch_size: int,
                master_buffers: np.ndarray | None = None,
                parameter_slices: Sequence[tuple[tuple[int, int], np.ndarray]] = (),
                statistics: np.ndarray | None = None,
                chunk_sender: object_store.ChunkSender | None = None) -> BlockResult:
        """Gradient of this block's micro-batches (index, sample indices) into `destination`
        (a view per parameter name); `batch_size` is the whole step's sample count (the loss's
        divisor). `master_buffers` (flat) are the step's starting buffers; `parameter_slices`
        ((lo, hi), values) are written into the parameter vector first. On a K-FAC
        factor-update step (carries_statistics) the block's statistics go into `statistics`.
        `chunk_sender` (object-store transport) is given each parameter's block sum during the
        last micro-batch's backward, as soon as it is known."""
        with self._compute_lock:
            for (lo, hi), values in parameter_slices:
                self.flat[lo:hi] = values
            buffers = None if master_buffers is None else self.unflatten_buffers(master_buffers)
            try:
                result = self._compute(destination, micro_batches, global_step, batch_size,
                                       buffers, statistics, chunk_sender)
            finally:
                self._chunk_sender = self._block_sums = None
        # A source that reads ahead (Parquet) starts now, while this worker waits for the
        # shards: beside the compute, its decoding would slow the step on a busy machine.
        read_ahead = getattr(self.rows, "read_ahead", None)
        if read_ahead is not None:
            read_ahead()
        return result

    def _gradient_ready(self, index: int, parameter: Tensor) -> None:
        """A parameter's gradient of the block's last micro-batch is final: its block sum,
        by the tree's additions, goes to the sender (the accumulator is not changed)."""
        if self._chunk_sender is None or self._block_sums is None or parameter.grad is None:
            return
        self._chunk_sender.parameter_ready(
            index, self._block_sums.total_if_pushed_last(index, parameter.grad))

    def carries_statistics(self, step: int) -> bool:
        """Whether step `step` computes K-FAC factor statistics beside the gradients."""
        return self.kfac is not None and self.kfac.carries_statistics(self.job.hyperparameters,
                                                                      step)

    def _compute(self, destination: dict[str, np.ndarray],
                 micro_batches: list[tuple[int, np.ndarray]], global_step: int, batch_size: int,
                 buffers: dict[str, np.ndarray] | None,
                 statistics: np.ndarray | None = None,
                 chunk_sender: object_store.ChunkSender | None = None) -> BlockResult:
        start = time.perf_counter()
        if buffers is not None:
            self.load_buffers(buffers)
        self.model.train()
        accumulator = TreeAccumulator()
        loss_sum, samples, correct = 0.0, 0, 0
        per_batch_buffers: list[dict[str, np.ndarray]] | None = [] if self.buffer_names else None
        start_buffers = self.buffer_values() if self.buffer_names else None
        captures = self.carries_statistics(global_step)
        if captures and statistics is None:
            raise ValueError(f"step {global_step} computes K-FAC statistics but was given no "
                             f"statistics block to write them to")
        for position, (micro_batch, indices) in enumerate(micro_batches):
            if position == len(micro_batches) - 1 and not captures:
                self._chunk_sender, self._block_sums = chunk_sender, accumulator
            if start_buffers is not None:
                self.load_buffers(start_buffers)  # each micro-batch starts from the step's stats
            nn.init.manual_seed(micro_batch_seed(self.job.seed, global_step, micro_batch))
            gradients, batch_loss, batch_correct = self._micro_batch_gradient(
                indices, batch_size, self.kfac if captures else None,
                epoch=(global_step - 1) // self.job.steps_per_epoch)
            accumulator.push(gradients)  # with K-FAC statistics: the leaf's last array
            loss_sum += batch_loss
            samples += len(indices)
            correct += batch_correct
            if per_batch_buffers is not None:
                per_batch_buffers.append(self.buffer_values())
        total = accumulator.total()
        computed = time.perf_counter()
        written = 0
        for index, slot in enumerate(self.layout.slots):
            if total is None:  # more workers than micro-batches: this block adds nothing
                destination[slot.name][...] = 0
            else:
                np.copyto(destination[slot.name], total[index])
            written += destination[slot.name].nbytes
        if captures and statistics is not None:
            if total is None:
                statistics[...] = 0
            else:
                np.copyto(statistics, total[-1])
            written += statistics.nbytes
        return BlockResult(loss_sum, samples, correct, computed - start, written,
                           time.perf_counter() - computed, per_batch_buffers)

    def _micro_batch_gradient(self, indices: np.ndarray, batch_size: int,
                              kfac: KFACLayout | None = None, epoch: int = 0):
        """(gradients, and last the K-FAC statistics of `kfac`'s layers when given; loss sum;
        correct)."""
        for parameter in self.parameters:
            parameter.grad = None
        if len(indices) == 0:  # a short last batch can leave a micro-batch empty
            empty = [np.zeros_like(p.data) for p in self.parameters]
            if kfac is not None:
                empty.append(empty_micro_batch_statistics(kfac))
            return empty, 0.0, 0
        features, target = self._samples(indices, epoch)
        with capture_layers(self.kfac_modules if kfac is not None else []) as recorded:
            output = self.model(Tensor(features))
            loss = self.loss(output, target)
            (loss * (1.0 / batch_size)).backward()
        gradients = [p.grad if p.grad is not None else np.zeros_like(p.data)
                     for p in self.parameters]
        if kfac is not None:  # output gradients of the step's mean loss: grad_scale undoes it
            gradients.append(micro_batch_statistics(kfac, recorded, batch_size))
        correct = self.loss.correct(output.data, target) if self.scores_accuracy else 0
        return gradients, float(loss.data), correct

    def _samples(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The micro-batch's features and targets, floats in the model's dtype: a float64
        regression target would silently turn a float32 model's backward pass into float64."""
        x, y = self.rows.take(indices, epoch)
        if x.dtype.kind == "f" and x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if y.dtype.kind == "f" and y.dtype != self.dtype:
            y = y.astype(self.dtype)
        return x, y

    def buffer_values(self) -> dict[str, np.ndarray]:
        buffers = dict(self.model.named_buffers())
        return {name: buffers[name].copy() for name in self.buffer_names}

    def count_batch(self) -> None:
        """One more step of running statistics (BatchNorm's num_batches_tracked)."""
        for name, value in self.model.named_buffers():
            if name.endswith("num_batches_tracked"):
                value += 1

    def load_buffers(self, values: dict[str, np.ndarray]) -> None:
        own = dict(self.model.named_buffers())
        for name, value in values.items():
            np.copyto(own[name], value)

    def evaluate_batches(self, batches: Sequence[tuple[int, int]],
                         parameters: np.ndarray | None,
                         master_buffers: np.ndarray | None) -> list[tuple[float, int, int]]:
        """(summed loss, samples, correct) of each batch [lo, hi) of the validation split, in
        order, one forward pass per batch: memory is bounded by the batch, not the split.
        `parameters` (the whole vector; None when this replica's are the shared ones) and
        `master_buffers` (flat; None without buffers) are the runner's, the model's state
        after the step just done; the next step brings its own."""
        if self.x_val is None or self.y_val is None:
            raise ValueError("this replica was started without a validation split")
        with self._compute_lock:
            if parameters is not None:
                self.flat[:] = parameters
            if master_buffers is not None:
                self.load_buffers(self.unflatten_buffers(master_buffers))
            return [self.evaluate(self.x_val[lo:hi], self.y_val[lo:hi]) for lo, hi in batches]

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int, int]:
        """(summed loss, samples, correct) of the current parameters on (x, y), eval mode."""
        self.model.eval()
        with no_grad():
            dtype = self.rows.feature_dtype
            output = self.model(Tensor(x if x.dtype == dtype else x.astype(dtype)))
            loss = float(self.loss(output, y).data)
        correct = self.loss.correct(output.data, y) if self.scores_accuracy else 0
        return loss, len(y), correct


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (the runner's own evaluation replica)
        return ""
