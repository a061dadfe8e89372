"""Every op in the table agrees with central finite differences, first and second order.

One case per op name in `ops.OPS`: a hypothesis-driven recipe that draws shapes (broadcasting
included), non-differentiable arguments (axes, indices, bounds) and a seed for the values. The
values are kept away from kinks, poles and ties, where finite differences are meaningless:
relu/abs/leaky_relu inputs are at least 1e-2 from 0, clip inputs sit on a grid between the
bounds' grid, maximum's operands and max's entries never coincide, log/sqrt inputs are
positive, denominators are at least 0.5 in magnitude.

Shapes stay small (at most 3 axes, each side 1..4) so that the whole file, second order
included, runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from worker.backprop import ops
from worker.backprop.gradcheck import GradcheckError, gradcheck, gradgradcheck
from worker.backprop.tensor import Tensor, grad

# --- drawing cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big drawn shapes may get."""

    max_dims: int
    max_side: int


SMALL = Sizes(max_dims=3, max_side=4)


@dataclass
class Case:
    """A function of float64 leaves that exercises one op, and the leaves to probe it at."""

    fn: Callable[..., Tensor]
    inputs: list[Tensor]


def leaf(values) -> Tensor:
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


class Draw:
    """Shapes and arguments come from hypothesis (so failures shrink to small shapes); values
    come from a generator seeded by hypothesis, so they are continuous and never tie by chance
    the way hypothesis's favourite floats (0.0, 1.0, one value repeated) would."""

    def __init__(self, data: st.DataObject, sizes: Sizes):
        self.data = data
        self.sizes = sizes
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))

    def __call__(self, strategy: st.SearchStrategy, label: str | None = None):
        return self.data.draw(strategy, label=label)

    def shape(self, min_dims: int = 0) -> tuple[int, ...]:
        return self(hnp.array_shapes(min_dims=min_dims, max_dims=self.sizes.max_dims,
                                     min_side=1, max_side=self.sizes.max_side), label="shape")

    def broadcastable_shapes(self, count: int) -> tuple[tuple[int, ...], ...]:
        shapes = self(hnp.mutually_broadcastable_shapes(
            num_shapes=count, min_dims=0, max_dims=self.sizes.max_dims, min_side=1,
            max_side=self.sizes.max_side), label="shapes")
        return shapes.input_shapes

    def normal(self, shape, scale: float = 1.0) -> Tensor:
        return leaf(scale * self.rng.standard_normal(shape))

    def uniform(self, shape, low: float, high: float) -> Tensor:
        return leaf(self.rng.uniform(low, high, shape))

    def away_from_zero(self, shape, margin: float = 1e-2) -> Tensor:
        values = self.rng.standard_normal(shape)
        return leaf(np.copysign(np.maximum(np.abs(values), margin), values))

    def nonzero_magnitude(self, shape, low: float = 0.5, high: float = 2.0) -> Tensor:
        signs = self.rng.choice([-1.0, 1.0], size=shape)
        return leaf(signs * self.rng.uniform(low, high, shape))

    def axis(self, ndim: int) -> int:
        return self(st.integers(-ndim, ndim - 1), label="axis")

    def reduction_axis(self, ndim: int):
        """None, one axis (possibly negative) or a tuple of distinct axes."""
        options = [st.none()]
        if ndim:
            options += [st.integers(-ndim, ndim - 1), hnp.valid_tuple_axes(ndim, min_size=1)]
        return self(st.one_of(options), label="axis")


CASES: dict[str, Callable[[Draw], Case]] = {}


def case(name: str):
    def register(recipe: Callable[[Draw], Case]) -> Callable[[Draw], Case]:
        CASES[name] = recipe
        return recipe

    return register


# --- elementwise arithmetic ------------------------------------------------------------------


@case("add")
def _add(d: Draw) -> Case:
    a, b = d.broadcastable_shapes(2)
    return Case(ops.add, [d.normal(a), d.normal(b)])


@case("sub")
def _sub(d: Draw) -> Case:
    a, b = d.broadcastable_shapes(2)
    return Case(ops.sub, [d.normal(a), d.normal(b)])


@case("mul")
def _mul(d: Draw) -> Case:
    a = d.shape()
    b = d(hnp.broadcastable_shapes(a, max_dims=d.sizes.max_dims, max_side=d.sizes.max_side),
          label="other shape")
    return Case(ops.mul, [d.normal(a), d.normal(b)])


@case("div")
def _div(d: Draw) -> Case:
    a, b = d.broadcastable_shapes(2)
    return Case(ops.div, [d.normal(a), d.nonzero_magnitude(b)])


@case("power")
def _power(d: Draw) -> Case:
    a, b = d.broadcastable_shapes(2)
    base, exponent = d.uniform(a, 0.5, 2.0), d.uniform(b, -2.0, 2.0)
    which = d(st.sampled_from(["both", "tensor_base", "tensor_exponent"]), label="which")
    if which == "both":
        return Case(ops.power, [base, exponent])
    if which == "tensor_base":
        constant = d(st.sampled_from([2.0, 3.0, 0.5, -1.5]), label="exponent")
        return Case(lambda x: x**constant, [base])
    constant = d(st.sampled_from([0.5, 2.0, 3.0]), label="base")
    return Case(lambda y: constant**y, [exponent])


@case("neg")
def _neg(d: Draw) -> Case:
    return Case(ops.neg, [d.normal(d.shape())])


@case("maximum")
def _maximum(d: Draw) -> Case:
    # Values on two interleaved grids (multiples of 0.1, offset by 0.05): never a tie.
    a, b = d.broadcastable_shapes(2)
    x = leaf(0.1 * d.rng.integers(-20, 20, a))
    y = leaf(0.1 * d.rng.integers(-20, 20, b) + 0.05)
    return Case(ops.maximum, [x, y] if d(st.booleans(), label="swap") else [y, x])


# --- matrix products -------------------------------------------------------------------------


@case("matmul")
def _matmul(d: Draw) -> Case:
    # numpy's gufunc signature (n?,k),(k,m?): 1-D operands and broadcast batch axes included.
    shapes = d(hnp.mutually_broadcastable_shapes(
        signature=np.matmul.signature, max_dims=d.sizes.max_dims - 1,
        max_side=d.sizes.max_side), label="shapes")
    a, b = shapes.input_shapes
    return Case(ops.matmul, [d.normal(a), d.normal(b)])


@case("linear")
def _linear(d: Draw) -> Case:
    batch = d(hnp.array_shapes(min_dims=1, max_dims=d.sizes.max_dims - 1,
                               max_side=d.sizes.max_side), label="batch")
    features_in, features_out = d(st.integers(1, d.sizes.max_side)), d(
        st.integers(1, d.sizes.max_side))
    x, weight = d.normal(batch + (features_in,)), d.normal((features_out, features_in))
    if d(st.booleans(), label="bias"):
        return Case(ops.linear, [x, weight, d.normal((features_out,))])
    return Case(ops.linear, [x, weight])


# --- reductions -----------------------------------------------------------------------------


def _reduction_case(d: Draw, reduce: Callable[..., Tensor]) -> Case:
    shape = d.shape()
    axis, keepdims = d.reduction_axis(len(shape)), d(st.booleans(), label="keepdims")
    return Case(lambda x: reduce(x, axis, keepdims), [d.normal(shape)])


@case("sum")
def _sum(d: Draw) -> Case:
    return _reduction_case(d, ops.sum)


@case("mean")
def _mean(d: Draw) -> Case:
    return _reduction_case(d, ops.mean)


@case("max")
def _max(d: Draw) -> Case:
    # Distinct values at least 0.05 apart: no ties, so max is differentiable everywhere here.
    shape = d.shape()
    axis, keepdims = d.reduction_axis(len(shape)), d(st.booleans(), label="keepdims")
    size = int(np.prod(shape))
    x = leaf(0.05 * (d.rng.permutation(size) - size / 2).reshape(shape))
    return Case(lambda x: ops.max(x, axis, keepdims), [x])


@case("broadcast_to")
def _broadcast_to(d: Draw) -> Case:
    shapes = d(hnp.mutually_broadcastable_shapes(
        num_shapes=2, max_dims=d.sizes.max_dims, max_side=d.sizes.max_side), label="shapes")
    target = shapes.result_shape
    return Case(lambda x: ops.broadcast_to(x, target), [d.normal(shapes.input_shapes[0])])


# --- shape and indexing ---------------------------------------------------------------------


@case("reshape")
def _reshape(d: Draw) -> Case:
    shape = d.shape()
    targets = {
        "flat": (-1,),
        "reversed": tuple(reversed(shape)),
        "leading_one": (1,) + shape,
        "inferred_last": shape[:-1] + (-1,) if shape else (1,),
    }
    target = targets[d(st.sampled_from(sorted(targets)), label="target")]
    return Case(lambda x: ops.reshape(x, target), [d.normal(shape)])


@case("transpose")
def _transpose(d: Draw) -> Case:
    shape = d.shape()
    axes = d(st.one_of(st.none(), st.permutations(range(len(shape)))), label="axes")
    if axes is not None and axes and d(st.booleans(), label="negative"):
        axes = [a - len(shape) for a in axes]
    return Case(lambda x: ops.transpose(x, axes), [d.normal(shape)])


def _index(d: Draw, shape: tuple[int, ...]):
    """Basic indices (slices, ints, None, ...), integer arrays (repeats included), masks."""
    kind = d(st.sampled_from(["basic", "integer_arrays", "first_axis_repeats", "mask",
                              "row_mask_and_slice"]), label="index kind")
    if kind == "basic":
        return d(hnp.basic_indices(shape, allow_newaxis=True), label="index")
    if kind == "integer_arrays":
        return d(hnp.integer_array_indices(
            shape, result_shape=hnp.array_shapes(max_dims=2, max_side=4)), label="index")
    if kind == "first_axis_repeats":
        count = d(st.integers(1, 6), label="count")
        return d.rng.integers(-shape[0], shape[0], count)
    if kind == "mask":
        return d.rng.random(shape) < 0.5
    return (d.rng.random(shape[0]) < 0.5,) + (slice(None, None, -1),) * (len(shape) > 1)


@case("getitem")
def _getitem(d: Draw) -> Case:
    shape = d.shape(min_dims=1)
    index = _index(d, shape)
    return Case(lambda x: x[index], [d.normal(shape)])


@case("scatter_add")
def _scatter_add(d: Draw) -> Case:
    shape = d.shape(min_dims=1)
    index = _index(d, shape)
    picked = np.zeros(shape)[index].shape
    return Case(lambda g: ops.scatter_add(g, index, shape), [d.normal(picked)])


@case("concatenate")
def _concatenate(d: Draw) -> Case:
    shape = d.shape(min_dims=1)
    axis = d.axis(len(shape))
    sides = d(st.lists(st.integers(1, d.sizes.max_side), min_size=1, max_size=3), label="sides")
    parts = [d.normal(shape[: axis % len(shape)] + (n,) + shape[axis % len(shape) + 1:])
             for n in sides]
    return Case(lambda *xs: ops.concatenate(xs, axis), parts)


@case("stack")
def _stack(d: Draw) -> Case:
    shape = d.shape()
    axis = d.axis(len(shape) + 1)
    count = d(st.integers(1, 3), label="count")
    return Case(lambda *xs: ops.stack(xs, axis), [d.normal(shape) for _ in range(count)])


@case("cast")
def _cast(d: Draw) -> Case:
    # Through a wider type and back: float32 would drown finite differences in round-off.
    wide = d(st.sampled_from([np.float64, np.longdouble]), label="dtype")
    return Case(lambda x: ops.cast(ops.cast(x, wide), np.float64), [d.normal(d.shape())])


# --- elementwise functions ------------------------------------------------------------------


@case("exp")
def _exp(d: Draw) -> Case:
    return Case(ops.exp, [d.normal(d.shape())])


@case("log")
def _log(d: Draw) -> Case:
    return Case(ops.log, [d.uniform(d.shape(), 0.2, 3.0)])


@case("log1p")
def _log1p(d: Draw) -> Case:
    return Case(ops.log1p, [d.uniform(d.shape(), -0.8, 3.0)])


@case("sqrt")
def _sqrt(d: Draw) -> Case:
    return Case(ops.sqrt, [d.uniform(d.shape(), 0.2, 3.0)])


@case("abs")
def _abs(d: Draw) -> Case:
    return Case(ops.abs, [d.away_from_zero(d.shape())])


@case("clip")
def _clip(d: Draw) -> Case:
    # Inputs on the grid 0.1 k + 0.05, bounds on the grid 0.1 k: never within 0.05 of a bound.
    shape = d.shape()
    low, high = sorted(d(st.lists(st.integers(-10, 10), min_size=2, max_size=2, unique=True)))
    low = d(st.sampled_from([0.1 * low, None]), label="min")
    high = d(st.sampled_from([0.1 * high, None]), label="max")
    x = leaf(0.1 * d.rng.integers(-15, 15, shape) + 0.05)
    return Case(lambda x: ops.clip(x, low, high), [x])


@case("where")
def _where(d: Draw) -> Case:
    c, a, b = d.broadcastable_shapes(3)
    condition = d.rng.random(c) < 0.5
    return Case(lambda x, y: ops.where(condition, x, y), [d.normal(a), d.normal(b)])


@case("tanh")
def _tanh(d: Draw) -> Case:
    return Case(ops.tanh, [d.normal(d.shape(), scale=1.5)])


@case("sigmoid")
def _sigmoid(d: Draw) -> Case:
    return Case(ops.sigmoid, [d.normal(d.shape(), scale=3.0)])


@case("relu")
def _relu(d: Draw) -> Case:
    return Case(ops.relu, [d.away_from_zero(d.shape())])


@case("leaky_relu")
def _leaky_relu(d: Draw) -> Case:
    slope = d(st.sampled_from([0.01, 0.2, 0.5]), label="negative_slope")
    return Case(lambda x: ops.leaky_relu(x, slope), [d.away_from_zero(d.shape())])


@case("silu")
def _silu(d: Draw) -> Case:
    return Case(ops.silu, [d.normal(d.shape(), scale=2.0)])


@case("normal_cdf")
def _normal_cdf(d: Draw) -> Case:
    return Case(ops.normal_cdf, [d.normal(d.shape(), scale=2.0)])


@case("gelu")
def _gelu(d: Draw) -> Case:
    approximate = d(st.sampled_from(["none", "tanh"]), label="approximate")
    return Case(lambda x: ops.gelu(x, approximate), [d.normal(d.shape(), scale=2.0)])


@case("softmax")
def _softmax(d: Draw) -> Case:
    shape = d.shape(min_dims=1)
    axis = d.axis(len(shape))
    return Case(lambda x: ops.softmax(x, axis), [d.normal(shape, scale=2.0)])


@case("log_softmax")
def _log_softmax(d: Draw) -> Case:
    shape = d.shape(min_dims=1)
    axis = d.axis(len(shape))
    return Case(lambda x: ops.log_softmax(x, axis), [d.normal(shape, scale=2.0)])


@case("cross_entropy")
def _cross_entropy(d: Draw) -> Case:
    batch, classes = d(st.integers(1, 4), label="batch"), d(st.integers(1, 4), label="classes")
    target = d.rng.integers(0, classes, batch)
    reduction = d(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    smoothing = d(st.sampled_from([0.0, 0.1, 0.3]), label="label_smoothing")
    return Case(
        lambda z: ops.cross_entropy(z, target, reduction=reduction, label_smoothing=smoothing),
        [d.normal((batch, classes), scale=2.0)],
    )


@case("straight_through")
def _straight_through(d: Draw) -> Case:
    # The backward is the identity whatever the forward; finite differences can only agree
    # with it for a forward of slope one, so the case shifts (rounding is tested below).
    shift = d(st.sampled_from([0.0, 0.5, -3.0]), label="shift")
    return Case(lambda x: ops.straight_through(x, lambda a: a + shift), [d.normal(d.shape())])


# --- feedback alignment and gradient recording ----------------------------------------------


@case("feedback_linear")
def _feedback_linear(d: Draw) -> Case:
    # The backward sends the error to x through B, not W; finite differences can only agree
    # with it when B holds W's values. B stays a constant, so the weight is probed alone (and
    # the second-order check sees dx = G B not depend on W, as the rule says).
    batch = d(hnp.array_shapes(min_dims=1, max_dims=d.sizes.max_dims - 1,
                               max_side=d.sizes.max_side), label="batch")
    features_in, features_out = d(st.integers(1, d.sizes.max_side)), d(
        st.integers(1, d.sizes.max_side))
    x, weight = d.normal(batch + (features_in,)), d.normal((features_out, features_in))
    feedback = weight.data.copy()
    if d(st.booleans(), label="bias"):
        return Case(lambda x, w, b: ops.feedback_linear(x, w, b, feedback),
                    [x, weight, d.normal((features_out,))])
    return Case(lambda x, w: ops.feedback_linear(x, w, None, feedback), [x, weight])


@case("record_grad")
def _record_grad(d: Draw) -> Case:
    received = []  # the gradients handed over (checked in tests/worker/backprop/nn)
    return Case(lambda x: ops.record_grad(x, received.append), [d.normal(d.shape())])


# --- convolution and pooling ----------------------------------------------------------------


def _conv_setting(d: Draw):
    """Channels, kernel, stride, dilation and an input just big enough: kept tiny, because
    second order probes every input element through a double backward."""
    groups = d(st.sampled_from([1, 2]), label="groups")
    channels = groups * d(st.integers(1, 2), label="channels per group")
    out_channels = groups * d(st.integers(1, 2), label="out channels per group")
    kernel = d(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="kernel")
    stride = d(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="stride")
    dilation = d(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="dilation")
    extra = d(st.tuples(st.integers(0, 2), st.integers(0, 2)), label="extra size")
    size = tuple(dl * (k - 1) + 1 + e for k, dl, e in zip(kernel, dilation, extra))
    batch = d(st.integers(1, 2), label="batch")
    return groups, channels, out_channels, kernel, stride, dilation, size, batch


@case("conv2d")
def _conv2d(d: Draw) -> Case:
    groups, channels, out_channels, kernel, stride, dilation, size, batch = _conv_setting(d)
    padding = d(st.sampled_from([0, 1, (1, 0), "valid"] + ["same"] * (stride == (1, 1))),
                label="padding")
    x = d.normal((batch, channels) + size)
    weight = d.normal((out_channels, channels // groups) + kernel)

    def conv(x, weight, bias=None):
        return ops.conv2d(x, weight, bias, stride, padding, dilation, groups)

    if d(st.booleans(), label="bias"):
        return Case(conv, [x, weight, d.normal((out_channels,))])
    return Case(conv, [x, weight])


@case("conv_transpose2d")
def _conv_transpose2d(d: Draw) -> Case:
    groups, channels, out_channels, kernel, stride, dilation, size, batch = _conv_setting(d)
    padding = d(st.sampled_from([0, 1]), label="padding")
    if any((n - 1) * s - 2 * padding + dl * (k - 1) + 1 < 1
           for n, s, dl, k in zip(size, stride, dilation, kernel)):
        padding = 0  # padding would leave no output at all
    output_padding = tuple(d(st.integers(0, s - 1), label="output_padding") for s in stride)
    g = d.normal((batch, channels) + size)
    weight = d.normal((channels, out_channels // groups) + kernel)
    return Case(lambda g, weight: ops.conv_transpose2d(
        g, weight, None, stride, padding, output_padding, groups, dilation), [g, weight])


@case("conv2d_weight_grad")
def _conv2d_weight_grad(d: Draw) -> Case:
    # Not a user-facing function: the op conv2d's weight gradient records under create_graph.
    groups, channels, out_channels, kernel, stride, dilation, size, batch = _conv_setting(d)
    windows = ops.Windows(kernel, stride, ((1, 0), (0, 1)), dilation)
    x = d.normal((batch, channels) + size)
    g = d.normal((batch, out_channels) + windows.output_size(size))
    return Case(lambda x, g: ops.apply(ops.CONV2D_WEIGHT_GRAD, x, g, windows=windows,
                                       groups=groups), [x, g])


def _pool_setting(d: Draw):
    kernel = d(st.tuples(st.integers(1, 3), st.integers(1, 3)), label="kernel")
    stride = d(st.one_of(st.none(), st.tuples(st.integers(1, 2), st.integers(1, 2))),
               label="stride")
    padding = tuple(d(st.integers(0, k // 2), label="padding") for k in kernel)
    ceil_mode = d(st.booleans(), label="ceil_mode")
    extra = d(st.tuples(st.integers(0, 3), st.integers(0, 3)), label="extra size")
    shape = (d(st.integers(1, 2)), d(st.integers(1, 2))) + tuple(k + e for k, e in
                                                                   zip(kernel, extra))
    return kernel, stride, padding, ceil_mode, shape


@case("max_pool2d")
def _max_pool2d(d: Draw) -> Case:
    # Distinct values 0.05 apart: each window has one maximum, finite differences cannot
    # move it.
    kernel, stride, padding, ceil_mode, shape = _pool_setting(d)
    dilation = d(st.tuples(st.integers(1, 2), st.integers(1, 2)), label="dilation")
    shape = shape[:2] + tuple(n + (dl - 1) * (k - 1) for n, k, dl in
                              zip(shape[2:], kernel, dilation))
    size = int(np.prod(shape))
    x = leaf(0.05 * (d.rng.permutation(size) - size / 2).reshape(shape))
    return Case(lambda x: ops.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode), [x])


@case("avg_pool2d")
def _avg_pool2d(d: Draw) -> Case:
    kernel, stride, padding, ceil_mode, shape = _pool_setting(d)
    count_include_pad = d(st.booleans(), label="count_include_pad")
    divisor_override = d(st.sampled_from([None, 3]), label="divisor_override")
    return Case(lambda x: ops.avg_pool2d(x, kernel, stride, padding, ceil_mode,
                                         count_include_pad, divisor_override),
                [d.normal(shape)])


@case("avg_pool2d_backward")
def _avg_pool2d_backward(d: Draw) -> Case:
    # Not a user-facing function: avg_pool2d's adjoint, recorded under create_graph. It is
    # linear for any divisor, so a random positive one serves.
    kernel, stride, padding, _, shape = _pool_setting(d)
    windows = ops.Windows(kernel, stride or kernel, tuple((p, p) for p in padding), (1, 1))
    output_size = windows.output_size(shape[2:])
    divisor = d.rng.uniform(1.0, 4.0, output_size)
    return Case(lambda g: ops.apply(ops.AVG_POOL2D_BACKWARD, g, windows=windows,
                                    divisor=divisor, input_size=shape[2:]),
                [d.normal(shape[:2] + output_size)])


# --- attention and layer normalisation -------------------------------------------------------


def additive_mask(d: Draw, shape: tuple[int, ...]) -> np.ndarray | None:
    """None, a causal mask, or random -inf entries (whole rows masked included)."""
    kind = d(st.sampled_from(["none", "causal", "random"]), label="mask")
    if kind == "none":
        return None
    if kind == "causal":
        return np.triu(np.full(shape[-2:], -np.inf), 1)
    return np.where(d.rng.random(shape) < 0.3, -np.inf, d.rng.standard_normal(shape))


@case("attention_weights")
def _attention_weights(d: Draw) -> Case:
    batch = d(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3), label="batch")
    queries, keys, features = (d(st.integers(1, 4), label=n) for n in ("L", "S", "E"))
    mask = additive_mask(d, batch + (queries, keys))
    scale = d(st.sampled_from([None, 0.7]), label="scale")
    return Case(lambda q, k: ops.attention_weights(q, k, mask, scale),
                [d.normal(batch + (queries, features)), d.normal(batch + (keys, features))])


@case("self_attention")
def _self_attention(d: Draw) -> Case:
    batch, length, heads, head_dim = (d(st.integers(1, 3), label=n)
                                      for n in ("batch", "L", "heads", "head_dim"))
    mask = additive_mask(d, (batch, heads, length, length))
    scale = d(st.sampled_from([None, 0.7]), label="scale")
    causal = d(st.booleans(), label="causal")
    return Case(lambda qkv: ops.self_attention(qkv, heads, mask, scale, causal),
                [d.normal((batch, length, 3 * heads * head_dim))])


@case("linear_relu")
def _linear_relu(d: Draw) -> Case:
    batch = d(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=3), label="batch")
    features_in, features_out = (d(st.integers(1, 4), label=n) for n in ("in", "out"))
    weight, bias = d.normal((features_out, features_in)), d.normal((features_out,))
    for _ in range(100):  # finite differences need every pre-activation away from relu's kink
        x = d.normal(batch + (features_in,))
        if np.abs(x.data @ weight.data.T + bias.data).min() > 1e-2:
            break
    if d(st.booleans(), label="bias"):
        return Case(ops.linear_relu, [x, weight, bias])
    return Case(lambda x, w: ops.linear_relu(x, w, bias.data), [x, weight])


@case("layer_norm")
def _layer_norm(d: Draw) -> Case:
    shape = d(hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=4), label="shape")
    normalized_ndim = d(st.integers(1, len(shape)), label="normalized_ndim")
    affine = d(st.sampled_from(["none", "weight", "both"]), label="affine")
    normalized_shape = shape[len(shape) - normalized_ndim:]
    inputs = [d.normal(shape)]
    if affine != "none":
        inputs.append(d.normal(normalized_shape))
    if affine == "both":
        inputs.append(d.normal(normalized_shape))
    return Case(lambda x, *affine_: ops.layer_norm(x, normalized_ndim, *affine_), inputs)


# --- the table is covered -------------------------------------------------------------------


def recorded_op_names(out: Tensor) -> set[str]:
    """Names of every op recorded in the graph behind `out`."""
    names: set[str] = set()
    stack, seen = [out], set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen or tensor._node is None:
            continue
        seen.add(id(tensor))
        names.add(tensor._node.op.name)
        stack.extend(p for p in tensor._node.parents if p is not None)
    return names


def test_every_op_in_the_table_has_a_gradient_case():
    missing, unknown = set(ops.OPS) - set(CASES), set(CASES) - set(ops.OPS)
    assert not missing, f"ops without a gradient test: {sorted(missing)}"
    assert not unknown, f"gradient cases for ops not in the table: {sorted(unknown)}"


QUICK = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIRST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECOND = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("op_name", sorted(CASES))
@QUICK
@given(data=st.data())
def test_each_case_records_the_op_it_is_named_after(op_name, data):
    case_ = CASES[op_name](Draw(data, SMALL))
    assert op_name in recorded_op_names(case_.fn(*case_.inputs))


# --- first and second order ---------------------------------------------------------------


@pytest.mark.parametrize("op_name", sorted(CASES))
@FIRST
@given(data=st.data())
def test_first_order_gradient_matches_finite_differences(op_name, data):
    case_ = CASES[op_name](Draw(data, SMALL))
    gradcheck(case_.fn, case_.inputs)


@pytest.mark.parametrize("op_name", sorted(CASES))
@SECOND
@given(data=st.data())
def test_second_order_gradient_matches_finite_differences(op_name, data):
    """Hessian-vector products through each rule; piecewise-linear ops (relu, abs, clip,
    maximum, max, getitem, ...) must give their zero second derivative, not garbage."""
    case_ = CASES[op_name](Draw(data, SMALL))
    gradgradcheck(case_.fn, case_.inputs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op_name", sorted(CASES))
@DTYPES
@given(data=st.data())
def test_op_keeps_the_input_dtype_in_its_output_and_its_gradients(op_name, dtype, data):
    """float32 training must not silently run in float64 (nor float64 lose precision):
    `grad()` returns the propagated gradients uncast, so a promoting rule shows up here."""
    case_ = CASES[op_name](Draw(data, SMALL))
    inputs = [Tensor(x.data.astype(dtype), requires_grad=True) for x in case_.inputs]
    out = case_.fn(*inputs)
    if op_name != "cast":  # the cast case returns float64 on purpose
        assert out.dtype == dtype
    grads = grad(out, inputs, grad_output=np.ones(out.shape, dtype=out.dtype))
    assert [g.dtype for g in grads] == [dtype] * len(inputs)


def test_power_with_a_constant_base_keeps_a_float32_exponent_gradient_float32():
    # d(c^y)/dy = c^y log c: log of the Python constant must not promote the gradient.
    y = Tensor(np.array([0.5, -1.0], dtype=np.float32), requires_grad=True)
    out = 0.5**y
    assert out.dtype == np.float32
    (gy,) = grad(out, [y], grad_output=np.ones(2, dtype=np.float32))
    assert gy.dtype == np.float32
    np.testing.assert_allclose(gy, 0.5**y.data * np.log(0.5), rtol=1e-6)


# --- named shapes and arguments the hypothesis cases might reach only rarely ---------------

MATMUL_SHAPES = [
    ((4,), (4,)),  # dot product
    ((4,), (4, 3)),  # vector times matrix
    ((3, 4), (4,)),  # matrix times vector
    ((4,), (2, 4, 3)),  # vector times a batch of matrices
    ((2, 3, 4), (4,)),  # a batch of matrices times a vector
    ((2, 1, 3, 4), (5, 4, 2)),  # batch axes broadcast both ways
    ((3, 4), (2, 4, 5)),  # a single matrix against a batch
]


@pytest.mark.parametrize(("a_shape", "b_shape"), MATMUL_SHAPES)
def test_matmul_gradients_with_vectors_and_broadcast_batches(a_shape, b_shape):
    rng = np.random.default_rng(0)
    a, b = leaf(rng.standard_normal(a_shape)), leaf(rng.standard_normal(b_shape))
    assert ops.matmul(a, b).shape == np.matmul(a.data, b.data).shape
    gradcheck(ops.matmul, [a, b])
    gradgradcheck(ops.matmul, [a, b])


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_gradients_with_a_three_dimensional_input(with_bias):
    rng = np.random.default_rng(1)
    x, weight, bias = (leaf(rng.standard_normal(s)) for s in [(2, 3, 4), (5, 4), (5,)])
    inputs = [x, weight, bias] if with_bias else [x, weight]
    assert ops.linear(*inputs).shape == (2, 3, 5)
    gradcheck(ops.linear, inputs)
    gradgradcheck(ops.linear, inputs)


def test_linear_accepts_a_single_unbatched_sample():
    """torch.nn.functional.linear takes a 1-D input (one sample, no batch axis)."""
    rng = np.random.default_rng(2)
    x, weight, bias = (leaf(rng.standard_normal(s)) for s in [(4,), (3, 4), (3,)])
    assert ops.linear(x, weight, bias).shape == (3,)
    gradcheck(ops.linear, [x, weight, bias])


REDUCTION_AXES = [None, 0, 1, -1, -2, (0, 2), (-1, 0), (0, 1, 2)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", REDUCTION_AXES, ids=str)
@pytest.mark.parametrize("reduce", [ops.sum, ops.mean, ops.max, ops.var],
                         ids=["sum", "mean", "max", "var"])
def test_reduction_gradients_for_every_kind_of_axis(reduce, axis, keepdims):
    rng = np.random.default_rng(3)
    x = leaf(0.05 * rng.permutation(24).reshape(2, 3, 4))  # distinct entries: max has no ties
    expected_shape = np.sum(x.data, axis=axis, keepdims=keepdims).shape
    assert reduce(x, axis, keepdims).shape == expected_shape
    gradcheck(lambda x: reduce(x, axis, keepdims), [x])
    gradgradcheck(lambda x: reduce(x, axis, keepdims), [x])


@pytest.mark.parametrize("correction", [0, 1])
@FIRST
@given(data=st.data())
def test_var_gradient_matches_finite_differences(correction, data):
    d = Draw(data, SMALL)
    shape = d.shape(min_dims=1)
    axis, keepdims = d.reduction_axis(len(shape)), d(st.booleans())
    x = d.normal(shape)
    axes = range(len(shape)) if axis is None else np.atleast_1d(axis)
    if np.prod([shape[a] for a in axes]) <= correction:
        return  # one entry has no variance with Bessel's correction (0/0)
    gradcheck(lambda x: ops.var(x, axis, keepdims, correction), [x])


@pytest.mark.parametrize("reduce", [ops.sum, ops.mean, ops.max, ops.var],
                         ids=["sum", "mean", "max", "var"])
def test_reductions_accept_a_numpy_integer_axis(reduce):
    """Axes computed with NumPy (np.argmax, np.arange, x.ndim - 1 on arrays) are np.int64."""
    x = leaf(0.05 * np.random.default_rng(9).permutation(6).reshape(2, 3))
    axis = np.int64(-1)
    expected = reduce(x, int(axis))
    out = reduce(x, axis)
    np.testing.assert_array_equal(out.data, expected.data)
    gradcheck(lambda x: reduce(x, axis), [x])


def test_max_splits_the_gradient_evenly_between_tied_entries():
    x = leaf([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    ops.max(x, axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


BASIC_INDICES = [
    (slice(1, 3),),
    (slice(None, None, -1), 2),
    (Ellipsis, slice(0, 4, 2)),
    (1, None, slice(None, -1)),
    (-1,),
]


@pytest.mark.parametrize("index", BASIC_INDICES, ids=str)
def test_getitem_gradient_with_basic_slices(index):
    x = leaf(np.random.default_rng(4).standard_normal((3, 4)))
    gradcheck(lambda x: x[index], [x])
    gradgradcheck(lambda x: x[index], [x])


def test_getitem_with_repeated_integer_indices_accumulates_the_gradient():
    x = leaf(np.arange(12.0).reshape(4, 3))
    x[np.array([0, 2, 0, 0, -1])].sum().backward()
    # Row 0 is picked three times, row 2 once, row 3 (as -1) once, row 1 never.
    np.testing.assert_array_equal(x.grad, np.array([[3.0] * 3, [0.0] * 3, [1.0] * 3, [1.0] * 3]))


def test_getitem_with_a_two_dimensional_index_array_sums_repeats_like_np_add_at():
    # An embedding's lookup: a (batch, time) array of row indices, many repeated.
    rng = np.random.default_rng(4)
    table = leaf(rng.standard_normal((6, 3)))
    tokens = rng.integers(-6, 6, (5, 7))
    upstream = rng.standard_normal((5, 7, 3))
    expected = np.zeros((6, 3))
    np.add.at(expected, tokens, upstream)

    table[tokens].backward(upstream)

    np.testing.assert_allclose(table.grad, expected, rtol=1e-14, atol=1e-14)


def test_getitem_with_repeated_pairs_of_integer_arrays_accumulates_the_gradient():
    x = leaf(np.zeros((2, 3)))
    rows, cols = np.array([1, 1, 0, 1]), np.array([2, 2, 0, -1])
    x[rows, cols].sum().backward()
    np.testing.assert_array_equal(x.grad, [[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    gradcheck(lambda x: x[rows, cols] * x[rows, cols], [leaf([[1.0, 2, 3], [4, 5, 6]])])


def test_getitem_with_a_boolean_mask_sends_gradient_only_to_selected_entries():
    x = leaf(np.random.default_rng(5).standard_normal((3, 4)))
    mask = x.data > 0
    upstream = np.arange(1.0, mask.sum() + 1)
    x[mask].backward(upstream)
    expected = np.zeros((3, 4))
    expected[mask] = upstream
    np.testing.assert_array_equal(x.grad, expected)
    gradcheck(lambda x: x[mask], [x])
    gradcheck(lambda x: x[mask[:, 0], 1:], [x])


@pytest.mark.parametrize("axis", [-1, -2, -3])
def test_concatenate_along_a_negative_axis(axis):
    rng = np.random.default_rng(6)
    shapes = [[2, 3, 4], [2, 3, 4]]
    for extra, shape in enumerate(shapes):
        shape[axis] += extra  # differ along the joined axis only
    parts = [leaf(rng.standard_normal(s)) for s in shapes]
    out = ops.concatenate(parts, axis)
    np.testing.assert_array_equal(out.data, np.concatenate([p.data for p in parts], axis))
    gradcheck(lambda *xs: ops.concatenate(xs, axis), parts)


@pytest.mark.parametrize("axis", [-1, -2, -3])
def test_stack_along_a_negative_axis(axis):
    rng = np.random.default_rng(7)
    parts = [leaf(rng.standard_normal((2, 3))) for _ in range(3)]
    out = ops.stack(parts, axis)
    np.testing.assert_array_equal(out.data, np.stack([p.data for p in parts], axis))
    gradcheck(lambda *xs: ops.stack(xs, axis), parts)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradients_for_each_reduction_and_label_smoothing(
    reduction, label_smoothing
):
    logits = leaf(np.random.default_rng(8).standard_normal((5, 4)))
    target = np.array([0, 3, 3, 1, 2])

    def loss(z):
        return ops.cross_entropy(z, target, reduction=reduction, label_smoothing=label_smoothing)

    assert loss(logits).shape == ((5,) if reduction == "none" else ())
    gradcheck(loss, [logits])
    gradgradcheck(loss, [logits])


def test_straight_through_rounds_forward_and_passes_the_gradient_unchanged():
    x = leaf([0.2, 0.7, -1.6])
    upstream = np.array([1.0, -2.0, 3.0])
    out = ops.straight_through(x)
    np.testing.assert_array_equal(out.data, [0.0, 1.0, -2.0])
    out.backward(upstream)
    np.testing.assert_array_equal(x.grad, upstream)


def test_gradcheck_itself_catches_a_wrong_gradient():
    """The harness is not vacuous: x * stop_gradient(x) has the value x^2 but the gradient x."""
    x = leaf([0.3, -0.7])
    with pytest.raises(GradcheckError, match="gradient mismatch"):
        gradcheck(lambda x: x * x.detach(), [x])
