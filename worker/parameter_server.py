"""How a parameter-server shard turns the workers' gradient blocks into updated parameters.

Shard k owns the contiguous slice [lo, hi) of the flat parameter vector and the optimizer state
of that slice (ZeRO-1 / BytePS style: optimizer memory is spread over the shards). One step:

1. `reduce`: add the N gradient blocks' slices in the fixed tree order (worker count never
   changes the sum's bits) into the shard's own accumulator, and report the slice's squared
   norm, overall and per parameter.
2. `apply`: scale for global-norm clipping (the coefficient comes from all shards' norms),
   clip by value, and run the optimizer's functional core on the slice, in place.

Frozen parameters (trainable: false) are left out of step 2 altogether: the rule runs on the
trainable runs of the slice only (ParameterLayout.trainable_runs), so a frozen value never
changes, not even by weight decay, and its optimizer state stays at its initial value.

On one host, blocks and parameters live in shared memory, so the reduce reads the workers'
gradients where they wrote them, and the updated slice is visible to every replica without a
copy: the all-gather costs nothing. How the blocks arrive and who is told is the transports'
business (worker/transport/): the step-loop methods below only hand over to them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backprop import allocator
from worker.backprop.optim import RULES
from worker.backprop.optim.clip import squared_norm
from worker.backprop.optim.kfac import KFACHyper
from worker.compression import Compression
from worker.flat_parameters import ParameterLayout
from worker.kfac_layout import KFAC, KFACLayout
from worker.kfac_shard import KFACShard
from worker.shared_memory import SharedArraySpec, host_identity
from worker.transport import (
    compressed,
    compressed_direct,
    direct,
    object_store,
    shared_memory,
)
from worker.transport.raylet_watch import RayletWatch
from worker.tree_sum import TreeSum


@dataclass(frozen=True)
class ShardSetup:
    index: int
    bounds: tuple[int, int]
    layout: ParameterLayout
    # Shared memory, or None for the object-store transport: the shard then keeps its own
    # slice (set by load_parameters) and receives gradient chunks as call arguments.
    parameters: SharedArraySpec | None
    block_count: int  # gradient blocks summed per step (one per worker slot)
    optimizer: str  # a key of worker.backprop.optim.RULES, or "kfac"
    hyper: object  # the rule's hyperparameter dataclass
    clip_value: float | None = None
    kfac: KFACLayout | None = None  # K-FAC's layers, for optimizer "kfac"
    compression: Compression | None = None  # the workers' gradient compression


@dataclass(frozen=True)
class ReduceResult:
    squared_norm: float
    parameter_squared_norms: dict[str, float]  # the parts of named parameters in this slice
    seconds: float
    # K-FAC: v.g of each layer of the slice (v its preconditioned gradient), for the KL clip.
    direction_dots: dict[str, float] = dataclasses.field(default_factory=dict)
    # Object-store transport: block -> when (time.time()) its chunk reached this shard.
    chunk_arrivals: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class ApplyResult:
    seconds: float
    bytes_updated: int  # parameter bytes written, which every replica then reads


class ParameterServerShard:
    def __init__(self, setup: ShardSetup, owns_process: bool = True,
                 parameters: np.ndarray | None = None):
        """`owns_process`: as for `ModelReplica`. `parameters`: an array to step in place
        instead of the shard's own (a compressed job's worker applying the whole vector's
        update itself: worker/transport/compressed.py)."""
        if owns_process:
            from threadpoolctl import threadpool_limits

            allocator.keep_freed_memory()

            # One BLAS thread: the shard works while the workers wait, and its norms are then
            # the same in every run.
            self._thread_limit = threadpool_limits(1, user_api="blas")
        # Whether the raylet that started this actor still lives (its heartbeat says so).
        self.raylet = RayletWatch() if owns_process else None
        self._set_up(setup, parameters)

    def take_over(self, setup: ShardSetup) -> None:
        """A standby shard (started with another shard's setup, its process and imports ready:
        scheduler/worker_group.py) becomes shard `setup.index`, in the state of a new one;
        its optimizer state is loaded next. Connections of the direct transport it had are
        closed: they were for the shard it stood in for."""
        if self.worker_links is not None:
            self.worker_links.close()
        self._set_up(setup, None)

    def _set_up(self, setup: ShardSetup, parameters: np.ndarray | None) -> None:
        self.setup = setup
        self.lo, self.hi = setup.bounds
        if parameters is not None:
            self.parameters = parameters[self.lo:self.hi]
        elif setup.parameters is not None:
            self.parameters = setup.parameters.attach()[self.lo:self.hi]
        else:
            self.parameters = np.zeros(self.hi - self.lo, dtype=setup.layout.dtype)
        # The shard's own accumulator, allocated once: the blocks are only read.
        self.tree = TreeSum(setup.block_count, self.hi - self.lo, setup.layout.dtype)
        self.gradient = self.tree.total
        # K-FAC preconditions whole layers (worker/kfac_shard.py), then the SGD rule steps.
        self.kfac: KFACShard | None = None
        if setup.optimizer == KFAC:
            if setup.kfac is None or not isinstance(setup.hyper, KFACHyper):
                raise ValueError("a K-FAC shard needs the job's KFACLayout and KFACHyper")
            self.kfac = KFACShard(setup.kfac, setup.layout, setup.bounds, setup.hyper,
                                  setup.block_count)
        # What the compressed step keeps between its rounds (worker/transport/compressed.py).
        self.compressed = compressed.shard_compression(setup.compression, setup.layout,
                                                       setup.bounds, setup.block_count)
        self.rule = RULES["sgd"] if self.kfac is not None else RULES[setup.optimizer]
        self.steps_taken = 0
        # The workers' chunks (object-store and direct transports).
        self.inbox = object_store.ChunkInbox()
        self.worker_links: direct.ShardEnd | None = None  # the direct transport's connections
        # Non-elementwise rules (Adafactor) see whole parameters, one state per parameter;
        # the shard's bounds are then aligned to parameter boundaries by the runner.
        self.pieces = self._pieces()
        self.slice_state: dict[str, np.ndarray] = {}
        if setup.compression is not None:
            # A compressed job's workers step the optimizer, each over the whole vector
            # (worker/transport/compressed.py): its shards only sum, and keep no state.
            self.pieces, self.states = [], []
        elif self.rule.elementwise:
            # One state for the whole slice (what a checkpoint holds, however the slice is
            # cut), each trainable run stepping on its views of it: rules update state in place.
            self.slice_state = self._init_state(self.parameters, None)
            self.states = [{key: value[local] for key, value in self.slice_state.items()}
                           for _, local, _ in self.pieces]
        else:
            self.states = [self._init_state(view, shape) for view, _, shape in self.pieces]

    def _pieces(self) -> list[tuple[np.ndarray, slice, tuple[int, ...] | None]]:
        """What the optimizer steps on: elementwise rules on each maximal run of trainable
        parameters (the whole slice when nothing is frozen), others on each trainable
        parameter's part of the slice."""
        if self.rule.elementwise:
            return [(self.parameters[lo - self.lo:hi - self.lo], slice(lo - self.lo, hi - self.lo),
                     None) for lo, hi in self.setup.layout.trainable_runs(self.lo, self.hi)]
        pieces = []
        for slot, lo, hi in self.setup.layout.slots_within(self.lo, self.hi):
            if not slot.trainable:
                continue
            whole = lo == slot.offset and hi == slot.offset + slot.size
            local = slice(lo - self.lo, hi - self.lo)
            pieces.append((self.parameters[local], local, slot.shape if whole else None))
        return pieces

    def _init_state(self, view: np.ndarray, shape: tuple[int, ...] | None) -> dict:
        if shape is None:
            return self.rule.init_state(view, self._rule_hyper())
        return self.rule.init_state(view, self._rule_hyper(), shape=shape)

    def _rule_hyper(self, lr: float | None = None) -> Any:
        """The hyperparameters self.rule runs with (K-FAC's SGD-with-momentum part for K-FAC),
        at learning rate `lr` when given."""
        hyper: Any = self.setup.hyper  # one of the rules' hyperparameter dataclasses
        if lr is not None:
            hyper = dataclasses.replace(hyper, lr=lr)
        return hyper.base_rule() if isinstance(hyper, KFACHyper) else hyper

    def location(self) -> tuple[str, str]:
        from worker.replica import _ray_node_id

        return host_identity(), _ray_node_id()

    def heartbeat(self) -> None:
        """Answered in its own thread while the shard sums and applies: the runner's liveness
        check (worker/transport/liveness.py). Raises RayletGone once this actor's raylet died
        (raylet_watch.py)."""
        if self.raylet is not None:
            self.raylet.check()

    # --- one step ------------------------------------------------------------------------

    def reduce(self, parts: list[np.ndarray],
               statistics: list[np.ndarray] | tuple = ()) -> ReduceResult:
        """Sum the blocks' slices (in block order, by the fixed tree) into self.gradient.
        K-FAC: `statistics` are the blocks' statistics sections on a factor-update step (see
        expects_statistics); they are summed by the same tree, and the layers preconditioned."""
        start = time.perf_counter()
        gradient = self.tree.sum(parts)
        per_parameter = {
            slot.name: squared_norm(gradient[lo - self.lo:hi - self.lo])
            for slot, lo, hi in self.setup.layout.slots_within(self.lo, self.hi)
        }
        total = sum(per_parameter.values())
        seconds = time.perf_counter() - start
        dots = {}
        if self.kfac is not None:  # timed as part of the optimizer step (apply)
            dots = self.kfac.prepare(gradient, statistics, self.steps_taken + 1)
        return ReduceResult(total, per_parameter, seconds, dots)

    def expects_statistics(self) -> bool:
        """Whether the next step's blocks come with K-FAC statistics (a factor-update step)."""
        return self.kfac is not None and self.kfac.expects_statistics(self.steps_taken + 1)

    def apply(self, lr: float, clip_coefficient: float = 1.0,
              kl_coefficient: float = 1.0) -> ApplyResult:
        """One optimizer step on the slice with the reduced gradient (self.gradient);
        `kl_coefficient` is K-FAC's nu, which scales only preconditioned directions."""
        start = time.perf_counter()
        gradient = self.gradient
        if clip_coefficient < 1.0:
            gradient *= clip_coefficient
        if self.setup.clip_value is not None:
            np.clip(gradient, -self.setup.clip_value, self.setup.clip_value, out=gradient)
        if self.kfac is not None:
            self.kfac.write_directions(gradient, min(clip_coefficient, 1.0) * kl_coefficient)
            start -= self.kfac.seconds  # factors, inverses and preconditioning, from reduce
        self.steps_taken += 1
        hyper = self._rule_hyper(lr)
        for (view, local, shape), state in zip(self.pieces, self.states):
            kwargs = {} if shape is None else {"shape": shape}
            self.rule.step(view, gradient[local], state, hyper, self.steps_taken, **kwargs)
        return ApplyResult(time.perf_counter() - start, self.parameters.nbytes)

    def load_parameters(self, values: np.ndarray) -> None:
        self.parameters[:] = values

    # --- the transports' actor ends (worker/transport/): Ray calls reach them here ----------

    def serve(self, step: shared_memory.SharedStep) -> None:
        shared_memory.serve_shard(self, step)

    def accept_chunk(self, step: int, block: int, gradient: np.ndarray,
                     statistics: np.ndarray | None = None) -> None:
        self.inbox.accept(step, block, gradient, statistics)

    def reduce_pushed(self, step: int, blocks: int, timeout_seconds: float) -> ReduceResult:
        return object_store.reduce_pushed(self, step, blocks, timeout_seconds)

    def apply_and_return(self, lr: float, coefficient: float = 1.0,
                         kl_coefficient: float = 1.0) -> tuple:
        return object_store.apply_and_return(self, lr, coefficient, kl_coefficient)

    def reduce_apply_pushed(self, step: int, blocks: int, timeout_seconds: float,
                            lr: float) -> tuple:
        return object_store.reduce_apply_pushed(self, step, blocks, timeout_seconds, lr)

    def listen_for_workers(self, token: bytes, worker_count: int,
                           figures_size: direct.FiguresSize | None = None) -> tuple[str, int]:
        end = compressed_direct.CompressedShardEnd if self.compressed is not None else None
        return direct.listen_for_workers(self, token, worker_count, end, figures_size)

    def load_and_send_parameters(self, values: np.ndarray, version: int) -> None:
        direct.load_and_send_parameters(self, values, version)

    def settle_lost_blocks(self, step: int, owners: dict[int, int], died: list[int],
                           drain_seconds: float) -> dict[int, np.ndarray]:
        return direct.settle_lost_blocks(self, step, owners, died, drain_seconds)

    def count_delivered_blocks(self, step: int, owners: dict[int, int]) -> None:
        direct.count_delivered_blocks(self, step, owners)

    def reduce_apply_direct(self, step: int, blocks: int, timeout_seconds: float, lr: float,
                            version: int) -> tuple:
        return direct.reduce_apply_direct(self, step, blocks, timeout_seconds, lr, version)

    def apply_and_send(self, lr: float, coefficient: float, kl_coefficient: float,
                       version: int) -> ApplyResult:
        return direct.apply_and_send(self, lr, coefficient, kl_coefficient, version)

    def parameter_slice(self) -> np.ndarray:
        return self.parameters

    def reduce_compressed_direct(self, step: int, blocks: int,
                                 timeout_seconds: float) -> tuple[ReduceResult, int]:
        return compressed_direct.reduce_compressed_direct(self, step, blocks, timeout_seconds)

    def reduce_topk(self, *messages) -> tuple:
        return compressed.reduce_topk(self, *messages)

    def reduce_powersgd_first(self, *messages: np.ndarray) -> tuple:
        return compressed.reduce_powersgd_first(self, *messages)

    def reduce_powersgd_second(self, *messages: np.ndarray) -> tuple:
        return compressed.reduce_powersgd_second(self, *messages)

    # --- checkpoints ---------------------------------------------------------------------

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """(optimizer steps, state) with keys that do not depend on how the vector is sharded:
        elementwise rules give their slice of each state array under the array's name (the
        runner concatenates the shards' slices); others give "parameter/key" per parameter, and
        K-FAC also "layer/kfac_..." per layer (worker/kfac_shard.py)."""
        if self.kfac is not None:
            return self.steps_taken, self.kfac.state(self.slice_state)
        if self.rule.elementwise:
            return self.steps_taken, {key: np.array(value)
                                      for key, value in self.slice_state.items()}
        named = {}
        for (_, local, _), state in zip(self.pieces, self.states):
            (slot, _, _), = self.setup.layout.slots_within(self.lo + local.start,
                                                          self.lo + local.stop)
            named.update({f"{slot.name}/{key}": np.array(value) for key, value in state.items()})
        return self.steps_taken, named

    def load_state(self, steps_taken: int, state: dict[str, np.ndarray]) -> None:
        """Take this shard's part of a whole-model optimizer state (see `state`)."""
        self.steps_taken = steps_taken
        if self.kfac is not None:
            self.kfac.load_state(state, self.slice_state)
            return
        if self.rule.elementwise:
            for key, value in self.slice_state.items():
                np.copyto(value, state[key][self.lo:self.hi])
            return
        for (_, local, _), own in zip(self.pieces, self.states):
            (slot, _, _), = self.setup.layout.slots_within(self.lo + local.start,
                                                          self.lo + local.stop)
            for key, value in own.items():
                np.copyto(value, state[f"{slot.name}/{key}"])
