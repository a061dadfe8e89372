"""Which samples each step uses: a seeded permutation per epoch, cut into batches and then
into M logical micro-batches.

Everything here depends on (seed, epoch, batch size, M) and never on the number of workers, so
any worker count computes the same gradients. Every sample of an epoch is used exactly once:
the last batch of an epoch is the remainder, not dropped. A checkpoint records where an epoch
stands (`cursor`: the samples of its order used so far) and a resume starts there
(`position`), whatever the worker count before and after.

A model with a batch norm that sees one value per channel of a sample cannot train on a
micro-batch of 1 sample (no variance). Its jobs cut a batch too short for M micro-batches of 2
into fewer, of at least 2 samples each, and leave the rest empty (`cut_batch`); every other
cut is the same as any other job's. worker/resolved_job.py refuses the one case no cut can
serve: a batch of a single sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scheduler.checkpoint import DataCursor
from worker.parquet_rows import ROW_GROUP_LANES, lane_order


@dataclass(frozen=True)
class StepSamples:
    """The samples of one optimizer step."""

    epoch: int
    step_in_epoch: int
    micro_batches: tuple[np.ndarray, ...]  # sample indices of each micro-batch, in order

    @property
    def size(self) -> int:
        return sum(len(shard) for shard in self.micro_batches)


def filled_micro_batches(batch_size: int, micro_batches: int, min_samples: int = 1) -> int:
    """How many of a batch's `micro_batches` slices `cut_batch` fills (1 at the least)."""
    if min_samples > 1 and batch_size < micro_batches * min_samples:
        return max(1, batch_size // min_samples)
    return micro_batches


def cut_batch(batch: np.ndarray, micro_batches: int,
              min_samples: int = 1) -> tuple[np.ndarray, ...]:
    """`batch` cut into `micro_batches` slices in order, differing by at most one sample, of
    at least `min_samples` samples each where the batch allows: a short batch fills the first
    len(batch) // min_samples slices and leaves the others empty."""
    filled = filled_micro_batches(len(batch), micro_batches, min_samples)
    shards = np.array_split(batch, filled)
    return tuple(shards) + tuple(batch[:0] for _ in range(micro_batches - filled))


class EpochSampler:
    def __init__(self, num_samples: int, batch_size: int, micro_batches: int, seed: int,
                 shuffle: bool = True, min_micro_batch_samples: int = 1,
                 row_groups: tuple[int, ...] = ()):
        """`row_groups`: the training samples of each row group of a Parquet data set, whose
        batches draw from lanes of row groups, a lane per contiguous part of the micro-batches
        (worker/parquet_rows.py); () for arrays."""
        if num_samples < 1:
            raise ValueError("the training split is empty")
        if batch_size < 1 or micro_batches < 1:
            raise ValueError(
                f"batch_size and micro_batches must be positive, got {batch_size}, {micro_batches}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.micro_batches, self.seed, self.shuffle = micro_batches, seed, shuffle
        self.min_micro_batch_samples = min_micro_batch_samples
        self.row_groups = row_groups

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self.row_groups:
            return lane_order(self.row_groups, self.seed, epoch, self._micro_batch_sizes())
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    @property
    def order_name(self) -> str:
        """How an epoch's order is drawn, as a data cursor names it."""
        if not self.shuffle:
            return "file_order"
        if self.row_groups:
            return f"row_group_lanes({ROW_GROUP_LANES})"
        return "permutation"

    def _micro_batch_sizes(self) -> list[list[int]]:
        """Each batch's micro-batch sizes, as `epoch` cuts the batches."""
        cuts: dict[int, list[int]] = {}  # by batch length: every batch but the last is full
        sizes = []
        for step in range(self.steps_per_epoch):
            length = min(self.batch_size, self.num_samples - step * self.batch_size)
            if length not in cuts:
                cuts[length] = [len(shard) for shard in cut_batch(
                    np.arange(length), self.micro_batches, self.min_micro_batch_samples)]
            sizes.append(cuts[length])
        return sizes

    def cursor(self, epoch: int, batches_used: int) -> DataCursor:
        """The data cursor after the first `batches_used` batches of epoch `epoch`."""
        samples = min(batches_used * self.batch_size, self.num_samples)
        return DataCursor(epoch, samples, self.num_samples, self.seed, self.order_name)

    def position(self, cursor: DataCursor) -> tuple[int, int]:
        """(epoch, batches used in it) where `cursor` stands in this sampler's orders, or
        ValueError when it counts in another order (other data, seed or shuffle), which would
        use some samples twice and others never, or stands inside a batch."""
        own = (self.num_samples, self.seed, self.order_name)
        theirs = (cursor.training_samples, cursor.seed, cursor.order)
        if theirs != own:
            raise ValueError(
                f"the checkpoint's data cursor counts in the order of {cursor.training_samples} "
                f"training samples drawn by {cursor.order} with seed {cursor.seed}; this job's "
                f"data has {self.num_samples}, drawn by {self.order_name} with seed "
                f"{self.seed}: the data set changed since, so resuming would use samples twice "
                f"or never"
            )
        batches = math.ceil(cursor.samples_used / self.batch_size)
        if (not 0 <= cursor.samples_used <= self.num_samples or cursor.epoch < 0
                or min(batches * self.batch_size, self.num_samples) != cursor.samples_used):
            raise ValueError(f"the checkpoint's data cursor stands at sample "
                             f"{cursor.samples_used} of epoch {cursor.epoch}, not at the end of "
                             f"a batch of {self.batch_size}")
        return cursor.epoch, batches

    def epoch(self, epoch: int) -> list[StepSamples]:
        order = self.permutation(epoch)
        steps = []
        for step in range(self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            shards = cut_batch(batch, self.micro_batches, self.min_micro_batch_samples)
            steps.append(StepSamples(epoch, step, shards))
        return steps
