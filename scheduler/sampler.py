"""Which samples each step uses: a seeded permutation per epoch, cut into batches and then
into M logical micro-batches.

Everything here depends on (seed, epoch, batch size, M) and never on the number of workers, so
any worker count computes the same gradients. Every sample of an epoch is used exactly once:
the last batch of an epoch is the remainder, not dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepSamples:
    """The samples of one optimizer step."""

    epoch: int
    step_in_epoch: int
    micro_batches: tuple[np.ndarray, ...]  # sample indices of each micro-batch, in order

    @property
    def size(self) -> int:
        return sum(len(shard) for shard in self.micro_batches)


class EpochSampler:
    def __init__(self, num_samples: int, batch_size: int, micro_batches: int, seed: int,
                 shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("the training split is empty")
        if batch_size < 1 or micro_batches < 1:
            raise ValueError(
                f"batch_size and micro_batches must be positive, got {batch_size}, {micro_batches}"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.micro_batches, self.seed, self.shuffle = micro_batches, seed, shuffle

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def epoch(self, epoch: int) -> list[StepSamples]:
        order = self.permutation(epoch)
        steps = []
        for step in range(self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            shards = tuple(np.array_split(batch, self.micro_batches))
            steps.append(StepSamples(epoch, step, shards))
        return steps
