"""Where K-FAC's layers and their factor statistics live in a distributed step.

K-FAC (worker/backprop/optim/kfac.py) preconditions each Linear and Conv2d layer's gradient by
Kronecker factors A = E[a a^T] and G = E[Ds Ds^T] made from statistics of every example. In the
runtime those statistics travel WITH the gradients and are summed by the SAME fixed tree:

- On a factor-update step, each worker computes per micro-batch the sums A_sum, G_sum and the
  example count of every K-FAC layer (`micro_batch_statistics`), packs them into one float64
  vector, the *statistics vector*, and adds the micro-batches' vectors in the same
  TreeAccumulator as their gradients (one more array of the same leaf). The block's sum goes
  beside its gradient block: a float64 statistics block per worker in shared memory, or one
  more chunk per shard through the object store.
- The statistics vector is laid out layer by layer in the order of the layers' parameters in
  the flat vector, so the layers a shard owns (shards are cut on layer boundaries: K-FAC is not
  elementwise) have one contiguous section of it (`statistics_bounds`). The shard sums the
  blocks' sections with its own TreeSum, in block order, exactly as it sums their gradient
  slices. Worker count and shard count therefore never change a factor's bits.

Why a statistics vector of its own rather than more of the gradient block: the gradient block
has the model's dtype (float32 by default), the statistics are float64 sums; and a step that
does not update the factors (factor_update_interval > 1) moves no statistics bytes at all.

Bytes: A and G are symmetric, so only their upper triangles travel (half of a full matrix),
and the shard rebuilds the symmetric matrices. Per K-FAC layer that is in(in+1)/2 + out(out+1)/2
+ 1 float64 values, against in*out parameters: for a Linear(64, 32) 1.3 times its parameters'
values, 2.6 times their float32 bytes; a convolution's A is (C*kh*kw + 1)^2, so small conv nets
pay more (a 3-conv digits CNN: 4.6 times its gradient bytes). Each worker sends one block of
them per factor-update step (factor_update_interval divides the cost), whatever the number of
micro-batches; the shards send nothing more back.

A frozen layer (trainable: false) has no gradient and takes no update: it is not a K-FAC layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.backprop.nn.capture import LayerCapture
from worker.backprop.nn.module import Module
from worker.backprop.optim.kfac import (
    FactorStatistics,
    KFACHyper,
    KFACLayer,
    empty_statistics,
    factor_statistics,
    updates_factors_at,
)
from worker.backprop.optim.kfac_optimizer import kfac_layers
from worker.flat_parameters import ParameterLayout

KFAC = "kfac"  # the optimizer's name in a resolved job


def _triangle_size(n: int) -> int:
    return n * (n + 1) // 2


def _statistics_length(layer: KFACLayer) -> int:
    return _triangle_size(layer.in_dim) + _triangle_size(layer.out_dim) + 1


@dataclass(frozen=True)
class KFACLayout:
    """The K-FAC layers of a model, where their [weight, bias] slices are in the flat parameter
    vector, and where their statistics are in the statistics vector. Plain data: the runner
    hands it to the shards; every replica builds the same from its own model."""

    layers: tuple[KFACLayer, ...]  # in the order of their parameters in the flat vector
    parameter_ranges: tuple[tuple[int, int], ...]  # [weight, bias] in the flat vector
    statistics_ranges: tuple[tuple[int, int], ...]  # in the statistics vector

    @classmethod
    def of(cls, model: Module, layout: ParameterLayout) -> KFACLayout:
        """The K-FAC layers of `model` (bound to `layout`): Linear and groups=1 Conv2d whose
        weight and bias are trainable and lie side by side in the flat vector."""
        slots = {slot.name: slot for slot in layout.slots}
        found = []
        for layer, _ in kfac_layers(model):
            prefix = f"{layer.name}." if layer.name else ""
            names = [f"{prefix}weight"] + ([f"{prefix}bias"] if layer.has_bias else [])
            own = [slots[name] for name in names if name in slots]
            if len(own) != len(names) or not all(slot.trainable for slot in own):
                continue  # frozen (or not in the vector): no gradient, no update
            lo = own[0].offset
            if any(a.offset + a.size != b.offset for a, b in zip(own, own[1:])):
                raise ValueError(f"K-FAC layer {layer.name!r}: its weight and bias are not side "
                                 f"by side in the flat parameter vector")
            found.append((lo, layer))
        found.sort(key=lambda item: item[0])
        parameter_ranges, statistics_ranges, offset = [], [], 0
        for lo, layer in found:
            parameter_ranges.append((lo, lo + layer.size))
            statistics_ranges.append((offset, offset + _statistics_length(layer)))
            offset += _statistics_length(layer)
        return cls(tuple(layer for _, layer in found), tuple(parameter_ranges),
                   tuple(statistics_ranges))

    def carries_statistics(self, hyper: KFACHyper, step: int) -> bool:
        """Whether optimizer step `step` (1-based, as the runner counts) moves factor
        statistics: K-FAC's factor-update steps, when the model has K-FAC layers. Workers,
        shards and the runner all ask this one method."""
        return bool(self.layers) and updates_factors_at(step - 1, hyper)

    @property
    def statistics_size(self) -> int:
        """Values of the whole statistics vector (float64)."""
        return self.statistics_ranges[-1][1] if self.statistics_ranges else 0

    def owned(self, lo: int, hi: int) -> list[int]:
        """Indices of the layers whose parameters lie in the shard slice [lo, hi); ValueError if
        the slice cuts a layer (shard bounds must keep K-FAC layers whole)."""
        indices = []
        for index, (start, stop) in enumerate(self.parameter_ranges):
            if lo <= start and stop <= hi:
                indices.append(index)
            elif start < hi and stop > lo:
                raise ValueError(f"the shard slice [{lo}, {hi}) cuts K-FAC layer "
                                 f"{self.layers[index].name!r} at [{start}, {stop})")
        return indices

    def statistics_bounds(self, lo: int, hi: int) -> tuple[int, int]:
        """The contiguous section of the statistics vector that the shard owning [lo, hi)
        reads: its layers' statistics ((0, 0) when it owns none)."""
        indices = self.owned(lo, hi)
        if not indices:
            return 0, 0
        return self.statistics_ranges[indices[0]][0], self.statistics_ranges[indices[-1]][1]

    def pack(self, statistics: Sequence[FactorStatistics]) -> np.ndarray:
        """One statistics vector: per layer the upper triangles of A_sum and G_sum (row-major)
        and the example count."""
        out = np.empty(self.statistics_size)
        for layer, (lo, hi), stats in zip(self.layers, self.statistics_ranges, statistics):
            a_end = lo + _triangle_size(layer.in_dim)
            out[lo:a_end] = stats.a_sum[np.triu_indices(layer.in_dim)]
            out[a_end:hi - 1] = stats.g_sum[np.triu_indices(layer.out_dim)]
            out[hi - 1] = stats.count
        return out

    def unpack(self, section: np.ndarray, index: int, section_start: int) -> FactorStatistics:
        """Layer `index`'s statistics from a section of the statistics vector that starts at
        `section_start`, as full symmetric matrices."""
        layer = self.layers[index]
        lo, hi = (bound - section_start for bound in self.statistics_ranges[index])
        a_end = lo + _triangle_size(layer.in_dim)
        return FactorStatistics(_symmetric(section[lo:a_end], layer.in_dim),
                                _symmetric(section[a_end:hi - 1], layer.out_dim),
                                float(section[hi - 1]))


def _symmetric(triangle: np.ndarray, n: int) -> np.ndarray:
    matrix = np.empty((n, n))
    upper = np.triu_indices(n)
    matrix[upper] = triangle
    matrix.T[upper] = triangle  # the lower triangle, mirrored
    return matrix


def micro_batch_statistics(layout: KFACLayout, captures: Sequence[LayerCapture],
                           grad_scale: float) -> np.ndarray:
    """The statistics vector of one micro-batch from its captures (one per layer, in layout
    order); `grad_scale` is the step's sample count, the loss's divisor. A layer the forward
    did not reach adds the statistics of no examples."""
    statistics = []
    for layer, capture in zip(layout.layers, captures):
        calls = capture.calls()
        statistics.append(factor_statistics(layer, calls, grad_scale) if calls
                          else empty_statistics(layer))
    return layout.pack(statistics)


def empty_micro_batch_statistics(layout: KFACLayout) -> np.ndarray:
    """The statistics vector of an empty micro-batch: zeros (no examples)."""
    return np.zeros(layout.statistics_size)
