"""How a parameter-server shard applies K-FAC to the layers it owns.

The shard owns whole K-FAC layers (its bounds never cut one: worker/kfac_layout.py) and keeps,
for each, the running Kronecker factors and their damped inverses; its slice's SGD momentum is
the shard's own elementwise state (worker/parameter_server.py runs the SGD rule). One step:

1. `prepare`, right after the shard has summed the gradient blocks: on a factor-update step,
   sum the blocks' statistics sections in the same fixed tree (block order) and update each
   layer's running factors; on an inverse-update step, recompute the damped inverses; then
   precondition each layer's gradient, v = (G (x) A + lambda)^-1 g, and return v.g per layer.
   The runner adds those over all layers of all shards (math.fsum: the order of shards does not
   matter) into K-FAC's KL-clip coefficient nu, as it adds the shards' norms for clipping.
2. `write_directions`, in the shard's apply: each layer's slice of the (clipped) gradient is
   replaced by nu * c * v (c the global-norm clipping coefficient: v is linear in g, so
   preconditioning c g gives c v), then the shard's SGD-with-momentum rule steps on it; other
   parameters (LayerNorm, embeddings, grouped convolutions, ...) step on their plain gradient.

A layer no example has reached yet has no factors: its gradient is used as it is, and it adds
nothing to v.g. Everything the shard keeps is in `state`, under names that do not depend on the
shard count ("<layer>/kfac_factor_a", ...), so a checkpoint resumes, and a lost shard replays,
to the same bits with any number of shards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from worker.backprop.optim.functional import State
from worker.backprop.optim.kfac import (
    KFACHyper,
    KroneckerFactors,
    KroneckerInverse,
    invert_factors,
    precondition,
    update_factors,
    updates_inverses_at,
)
from worker.flat_parameters import ParameterLayout
from worker.kfac_layout import KFACLayout
from worker.tree_sum import TreeSum

# What a KroneckerInverse holds, by method, under the checkpoint's key suffixes.
_INVERSE_FIELDS = {"eigen": ("q_a", "q_g", "scale"), "factored": ("a_inverse", "g_inverse")}


class KFACShard:
    def __init__(self, kfac: KFACLayout, layout: ParameterLayout, bounds: tuple[int, int],
                 hyper: KFACHyper, block_count: int):
        self.kfac_layout, self.parameter_layout, self.hyper = kfac, layout, hyper
        self.lo, self.hi = bounds
        self.indices = kfac.owned(self.lo, self.hi)
        self.statistics_lo, self.statistics_hi = kfac.statistics_bounds(self.lo, self.hi)
        self.statistics_tree = TreeSum(block_count, self.statistics_hi - self.statistics_lo,
                                       "float64")
        self.factors: dict[str, KroneckerFactors] = {}
        self.inverses: dict[str, KroneckerInverse] = {}
        self.directions: dict[str, np.ndarray] = {}  # this step's v per layer
        self.seconds = 0.0  # the last prepare's time, reported as part of the optimizer step

    def expects_statistics(self, step: int) -> bool:
        """Whether step `step` (1-based) brings statistics blocks with the gradient blocks."""
        return self.kfac_layout.carries_statistics(self.hyper, step)

    def statistics_section(self, block: np.ndarray) -> np.ndarray:
        """This shard's section of a whole statistics block."""
        return block[self.statistics_lo:self.statistics_hi]

    # --- one step ------------------------------------------------------------------------------

    def prepare(self, gradient: np.ndarray, statistics: Sequence[np.ndarray],
                step: int) -> dict[str, float]:
        """Factors, inverses and directions of step `step` (1-based) from the reduced gradient
        of the shard's slice and the blocks' statistics sections (empty when the step carries
        none); returns v.g per owned layer."""
        start = time.perf_counter()
        hyper = self.hyper
        if self.expects_statistics(step):
            total = self.statistics_tree.sum(statistics)
            for index in self.indices:
                layer = self.kfac_layout.layers[index]
                sums = self.kfac_layout.unpack(total, index, self.statistics_lo)
                if sums.count > 0:
                    self.factors[layer.name] = update_factors(self.factors.get(layer.name),
                                                              sums, hyper.factor_decay)
        refresh = updates_inverses_at(step - 1, hyper)
        for name, factors in self.factors.items():
            if refresh or name not in self.inverses:
                self.inverses[name] = invert_factors(factors, hyper.damping,
                                                     hyper.damping_method)
        self.directions, dots = {}, {}
        for index in self.indices:
            layer = self.kfac_layout.layers[index]
            inverse = self.inverses.get(layer.name)
            if inverse is None:
                continue  # no curvature yet: the plain gradient steps
            lo, hi = (bound - self.lo for bound in self.kfac_layout.parameter_ranges[index])
            grad = gradient[lo:hi]
            direction = precondition(grad, layer, inverse)
            self.directions[layer.name] = direction
            dots[layer.name] = float(np.dot(direction.astype(np.float64),
                                            grad.astype(np.float64)))
        self.seconds = time.perf_counter() - start
        return dots

    def write_directions(self, gradient: np.ndarray, scale: float) -> None:
        """Replace each preconditioned layer's slice of `gradient` by scale * v."""
        for index in self.indices:
            direction = self.directions.get(self.kfac_layout.layers[index].name)
            if direction is None:
                continue
            lo, hi = (bound - self.lo for bound in self.kfac_layout.parameter_ranges[index])
            np.multiply(direction, scale, out=gradient[lo:hi], casting="same_kind")

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self, slice_state: State) -> dict[str, np.ndarray]:
        """Everything K-FAC keeps for this slice, by parameter and layer name: the momentum of
        each trainable parameter (from the shard's elementwise `slice_state`), each layer's
        factors and inverse."""
        named = {}
        for key, value in slice_state.items():
            for slot, lo, hi in self.parameter_layout.slots_within(self.lo, self.hi):
                if slot.trainable:
                    named[f"{slot.name}/{key}"] = np.array(value[lo - self.lo:hi - self.lo])
        for index in self.indices:
            name = self.kfac_layout.layers[index].name
            if name in self.factors:
                named[f"{name}/kfac_factor_a"] = np.array(self.factors[name].a)
                named[f"{name}/kfac_factor_g"] = np.array(self.factors[name].g)
            if name in self.inverses:
                inverse = self.inverses[name]
                for field in _INVERSE_FIELDS[inverse.method]:
                    named[f"{name}/kfac_inverse_{field}"] = np.array(getattr(inverse, field))
        return named

    def load_state(self, state: dict[str, np.ndarray], slice_state: State) -> None:
        """Take this slice's part of a whole-model K-FAC state (see `state`); a layer without
        factors in it has seen no statistics yet."""
        for key, value in slice_state.items():
            for slot, lo, hi in self.parameter_layout.slots_within(self.lo, self.hi):
                if slot.trainable:
                    np.copyto(value[lo - self.lo:hi - self.lo], state[f"{slot.name}/{key}"])
        self.factors, self.inverses, self.directions = {}, {}, {}
        method = self.hyper.damping_method
        for index in self.indices:
            name = self.kfac_layout.layers[index].name
            if f"{name}/kfac_factor_a" in state:
                self.factors[name] = KroneckerFactors(
                    np.array(state[f"{name}/kfac_factor_a"]),
                    np.array(state[f"{name}/kfac_factor_g"]))
            if f"{name}/kfac_inverse_{_INVERSE_FIELDS[method][0]}" in state:
                self.inverses[name] = KroneckerInverse(method, **{
                    field: np.array(state[f"{name}/kfac_inverse_{field}"])
                    for field in _INVERSE_FIELDS[method]})
