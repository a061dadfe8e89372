"""Which samples each step uses: a seeded permutation per epoch, cut into batches and then
into M logical micro-batches.

Everything here depends on (seed, epoch, batch size, M) and never on the number of workers, so
any worker count computes the same gradients. Every sample of an epoch is used exactly once:
the last batch of an epoch is the remainder, not dropped.

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

from worker.parquet_rows import windowed_order


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
        order is shuffled in windows of row groups (worker/parquet_rows.py); () for arrays."""
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
            return windowed_order(self.row_groups, self.seed, epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def epoch(self, epoch: int) -> list[StepSamples]:
        order = self.permutation(epoch)
        steps = []
        for step in range(self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            shards = cut_batch(batch, self.micro_batches, self.min_micro_batch_samples)
            steps.append(StepSamples(epoch, step, shards))
        return steps
