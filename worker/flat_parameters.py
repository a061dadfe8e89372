"""The flat parameter vector: where each named parameter lives, and how it is cut into shards.

Every replica keeps its model's parameters as views into ONE contiguous vector, in
`named_parameters()` order. Parameter-server shard k owns the contiguous slice
`shard_bounds[k]` of that vector and of the gradient. Because a replica's weights are views, an
updated vector is visible to the model without any copy.

Frozen parameters (a spec layer with `trainable: false`) stay in the vector: every replica
needs their values, which come from the seed or from `model.init_from` like any other, and
keeping them there leaves offsets, shard bounds, transports and checkpoints as they are. Their
slots are marked `trainable=False` (from the model's requires_grad): the replicas compute no
gradient for them (their block holds zeros there), and a parameter-server shard runs its
optimizer only on the trainable runs of its slice (`trainable_runs`), so neither an update nor
weight decay nor momentum ever touches a frozen value, and no optimizer state moves for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.backprop import nn


@dataclass(frozen=True)
class ParameterSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    trainable: bool = True  # False: a frozen layer's parameter, never updated

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of a model's parameters in the flat vector."""

    slots: tuple[ParameterSlot, ...]
    dtype: str

    @property
    def size(self) -> int:
        return self.slots[-1].offset + self.slots[-1].size if self.slots else 0

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        slots, offset = [], 0
        dtype = None
        for name, parameter in model.named_parameters():
            slots.append(ParameterSlot(name, tuple(parameter.shape), offset,
                                       parameter.requires_grad))
            offset += parameter.size
            dtype = dtype or parameter.dtype.name
        return cls(tuple(slots), dtype or "float32")

    def flatten(self, model: nn.Module) -> np.ndarray:
        """A new flat vector holding the model's current parameter values."""
        flat = np.empty(self.size, dtype=self.dtype)
        for slot, (_, parameter) in zip(self.slots, model.named_parameters()):
            flat[slot.offset:slot.offset + slot.size] = parameter.data.reshape(-1)
        return flat

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each parameter as a shaped view into `flat`."""
        return {slot.name: flat[slot.offset:slot.offset + slot.size].reshape(slot.shape)
                for slot in self.slots}

    def bind(self, model: nn.Module, flat: np.ndarray) -> None:
        """Make the model's parameters views into `flat` (values are taken from `flat`)."""
        views = self.views(flat)
        for name, parameter in model.named_parameters():
            parameter.data = views[name]

    def shard_bounds(self, shards: int, align_to_parameters: bool = False,
                     keep_together: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """K contiguous slices of nearly equal size covering the vector.

        With align_to_parameters a cut never splits a parameter (needed by optimizers that look
        at a whole matrix, such as Adafactor's factored second moment); the slices are then as
        balanced as the parameter sizes allow. No cut falls inside a range of `keep_together`
        either (K-FAC's layers: a weight and its bias are preconditioned together).
        """
        if shards < 1:
            raise ValueError(f"shard count must be at least 1, got {shards}")
        if not align_to_parameters:
            cuts = [round(self.size * k / shards) for k in range(shards + 1)]
            return [(cuts[k], cuts[k + 1]) for k in range(shards)]
        ends = [slot.offset + slot.size for slot in self.slots
                if not any(lo < slot.offset + slot.size < hi for lo, hi in keep_together)]
        cuts = [0]
        for k in range(1, shards):
            target = self.size * k / shards
            best = min(ends, key=lambda end: abs(end - target))
            cuts.append(max(best, cuts[-1]))
        cuts.append(self.size)
        return [(cuts[k], cuts[k + 1]) for k in range(shards)]

    def trainable_runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The maximal runs [a, b) of trainable parameters within [lo, hi), in order: all of
        [lo, hi) when nothing there is frozen."""
        runs: list[tuple[int, int]] = []
        for slot, start, stop in self.slots_within(lo, hi):
            if not slot.trainable:
                continue
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        return runs

    def slots_within(self, lo: int, hi: int) -> list[tuple[ParameterSlot, int, int]]:
        """The parameters overlapping [lo, hi) with the overlap's bounds."""
        return [(slot, max(lo, slot.offset), min(hi, slot.offset + slot.size))
                for slot in self.slots
                if slot.offset < hi and slot.offset + slot.size > lo]
