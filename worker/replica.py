"""How a worker computes its part of a step: the gradient of its block of micro-shards.

A replica holds a model built from the job spec, with its parameters as views into the shared
parameter vector (so it always sees the latest all-gathered values, without a copy). For a step
it runs forward and backward on each of its micro-shards in order, adds their gradients in the
fixed tree order, and writes the block's sum into its gradient block in shared memory, where
the parameter-server shards read it (the reduce-scatter).

Each micro-shard's loss is summed over its samples and divided by the GLOBAL batch size, so the
micro-shards' gradients add up to exactly the gradient of the batch's mean loss, whichever
worker computed them. Dropout masks are seeded by (seed, step, micro-shard), never by worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from chainrule.v1 import job_pb2
from worker.backprop import nn
from worker.backprop.tensor import Tensor, no_grad
from worker.flat_parameters import ParameterLayout
from worker.model_builder import build_loss, build_model
from worker.shared_memory import SharedArraySpec, host_identity
from worker.tree_sum import TreeAccumulator


@dataclass(frozen=True)
class ReplicaSetup:
    spec: bytes  # a serialized JobSpec: declarative, nothing user-written is unpickled
    input_shape: tuple[int, ...]
    input_dtype: str  # the data's feature dtype (integers are tokens for an embedding)
    parameters: SharedArraySpec
    gradient_blocks: tuple[SharedArraySpec, ...]
    blas_threads: int = 1


@dataclass(frozen=True)
class BlockResult:
    block: int
    loss_sum: float  # the summed (not averaged) loss of the block's samples
    samples: int
    correct: int  # classification hits, for training accuracy (0 for regression)
    seconds: float
    bytes_written: int  # gradient bytes written into the shared block (this worker's "send")
    buffers: list[dict[str, np.ndarray]] | None  # per micro-shard (BatchNorm running stats)


def micro_shard_seed(seed: int, step: int, micro_shard: int) -> int:
    """The dropout seed of one micro-shard of one step: independent of who computes it."""
    return int(np.random.SeedSequence([seed, step, micro_shard]).generate_state(1)[0])


class ModelReplica:
    def __init__(self, setup: ReplicaSetup, x: np.ndarray, y: np.ndarray,
                 limit_threads: bool = True):
        if limit_threads:
            from threadpoolctl import threadpool_limits

            # Each worker gets its share of the cores; BLAS threads beyond it only fight.
            self._thread_limit = threadpool_limits(setup.blas_threads, user_api="blas")
        self.spec = job_pb2.JobSpec.FromString(setup.spec)
        dtype = np.float64 if self.spec.dtype == "float64" else np.float32
        self.model = build_model(self.spec.model, setup.input_shape, dtype, seed=self.spec.seed,
                                 input_dtype=setup.input_dtype)
        self.layout = ParameterLayout.of(self.model)
        self.layout.bind(self.model, setup.parameters.attach())
        self.parameters = list(self.model.parameters())
        self.blocks = [self.layout.views(spec.attach()) for spec in setup.gradient_blocks]
        self.loss = build_loss(self.spec, reduction="sum")
        self.x = x if x.dtype.kind != "f" or x.dtype == dtype else x.astype(dtype)
        self.classification = y.dtype.kind in "iu"
        # Regression targets in the model's dtype, or a float64 target would silently turn a
        # float32 model's whole backward pass into float64.
        self.y = y if self.classification or y.dtype == dtype else y.astype(dtype)
        self.buffer_names = [name for name, value in self.model.named_buffers()
                             if value.dtype.kind == "f"]

    def location(self) -> tuple[str, str]:
        """(host, Ray node id): replicas on the runner's host share its memory."""
        return host_identity(), _ray_node_id()

    def compute(self, block: int, micro_shards: list[tuple[int, np.ndarray]], global_step: int,
                batch_size: int, buffers: dict[str, np.ndarray] | None = None) -> BlockResult:
        """Gradient of this block's micro-shards (index, sample indices) into gradient block
        `block`; `batch_size` is the whole step's sample count (the loss's divisor)."""
        start = time.perf_counter()
        if buffers is not None:
            self.load_buffers(buffers)
        self.model.train()
        accumulator = TreeAccumulator()
        loss_sum, samples, correct = 0.0, 0, 0
        per_shard_buffers = [] if self.buffer_names else None
        start_buffers = self.buffer_values() if self.buffer_names else None
        for micro_shard, indices in micro_shards:
            if start_buffers is not None:
                self.load_buffers(start_buffers)  # each micro-shard starts from the step's stats
            nn.init.manual_seed(micro_shard_seed(self.spec.seed, global_step, micro_shard))
            gradients, shard_loss, shard_correct = self._micro_shard_gradient(indices, batch_size)
            accumulator.push(gradients)
            loss_sum += shard_loss
            samples += len(indices)
            correct += shard_correct
            if per_shard_buffers is not None:
                per_shard_buffers.append(self.buffer_values())
        total = accumulator.total()
        destination = self.blocks[block]
        written = 0
        for slot, gradient in zip(self.layout.slots, total):
            np.copyto(destination[slot.name], gradient)
            written += destination[slot.name].nbytes
        return BlockResult(block, loss_sum, samples, correct, time.perf_counter() - start,
                           written, per_shard_buffers)

    def _micro_shard_gradient(self, indices: np.ndarray, batch_size: int):
        for parameter in self.parameters:
            parameter.grad = None
        if len(indices) == 0:  # a short last batch can leave a micro-shard empty
            return [np.zeros_like(p.data) for p in self.parameters], 0.0, 0
        output = self.model(Tensor(self.x[indices]))
        target = self.y[indices]
        loss = self.loss(output, target)
        (loss * (1.0 / batch_size)).backward()
        gradients = [p.grad if p.grad is not None else np.zeros_like(p.data)
                     for p in self.parameters]
        correct = 0
        if self.classification:
            correct = int((output.data.argmax(axis=-1) == target).sum())
        return gradients, float(loss.data), correct

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

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int, int]:
        """(summed loss, samples, correct) of the current parameters on (x, y), eval mode."""
        self.model.eval()
        with no_grad():
            output = self.model(Tensor(x if x.dtype == self.x.dtype else x.astype(self.x.dtype)))
            loss = float(self.loss(output, y).data)
        correct = int((output.data.argmax(axis=-1) == y).sum()) if self.classification else 0
        return loss, len(y), correct


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (the runner's own evaluation replica)
        return ""
