"""Every op gives PyTorch's value and PyTorch's gradient (float64, rtol 1e-10).

PyTorch is the reference the engine follows (see the design brief), so each op is run side by
side with its PyTorch counterpart on the same random float64 inputs, and the same random
upstream gradient is pushed back through both. `atol=1e-12` only absorbs round-off around
values that are zero up to cancellation; every value compared is of order one.

The second half pins the conventions at kinks and ties (relu at 0, clip at its bounds, ties in
maximum and max, ...) and at saturating inputs, where a formula that is right almost
everywhere can still disagree with PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worker.backprop import ops
from worker.backprop.tensor import Tensor

RTOL, ATOL = 1e-10, 1e-12


@dataclass(frozen=True)
class Pair:
    """The same computation in the engine and in PyTorch, and how to draw its inputs."""

    ours: Callable[..., Tensor]
    theirs: Callable[..., torch.Tensor]
    inputs: Callable[[np.random.Generator], list[np.ndarray]]


def normal(*shapes: tuple[int, ...], scale: float = 1.0):
    return lambda rng: [scale * rng.standard_normal(s) for s in shapes]


def positive(*shapes: tuple[int, ...], low: float = 0.2, high: float = 3.0):
    return lambda rng: [rng.uniform(low, high, s) for s in shapes]


def away_from_zero(*shapes: tuple[int, ...]):
    def draw(rng):
        values = [rng.standard_normal(s) for s in shapes]
        return [np.copysign(np.maximum(np.abs(v), 1e-2), v) for v in values]

    return draw


def torch_index(index):
    """NumPy index arrays as torch tensors (slices, ints, None and Ellipsis pass through)."""
    items = index if isinstance(index, tuple) else (index,)
    converted = tuple(torch.from_numpy(i) if isinstance(i, np.ndarray) else i for i in items)
    return converted if isinstance(index, tuple) else converted[0]


def torch_scatter_add(g: torch.Tensor, index, shape) -> torch.Tensor:
    """Scatter-add as PyTorch defines it: the (differentiable) adjoint of indexing."""
    x = torch.zeros(shape, dtype=g.dtype, requires_grad=True)
    (scattered,) = torch.autograd.grad(x[torch_index(index)], x, g, create_graph=True)
    return scattered


def torch_reduce(name: str, axis, keepdims: bool):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if name == "max":
            return torch.amax(t, dim=() if axis is None else axis, keepdim=keepdims)
        if name == "var":
            return torch.var(t, dim=axis, correction=0, keepdim=keepdims)
        return getattr(torch, name)(t, dim=axis, keepdim=keepdims)

    return reduce


def torch_feedback_linear(x, weight, bias, feedback):
    """Feedback alignment in PyTorch: x W^T + b in value, x's gradient through B."""
    through_feedback = F.linear(x, feedback)
    return F.linear(x.detach(), weight, bias) + (through_feedback - through_feedback.detach())


def torch_hooked_identity(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    out.register_hook(lambda g: None)  # PyTorch's way to see a gradient pass
    return out


FEEDBACK = np.random.default_rng(11).standard_normal((5, 4))


def torch_adjoint(forward: Callable[[torch.Tensor], torch.Tensor], shape):
    """The input gradient of a linear map as a function of its upstream gradient: PyTorch's
    transposed operator, differentiable (the adjoint ops conv_transpose2d etc. match it)."""
    def adjoint(g: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(shape, dtype=g.dtype, requires_grad=True)
        (dx,) = torch.autograd.grad(forward(x), x, g, create_graph=True)
        return dx

    return adjoint


def torch_conv2d_weight_grad(x: torch.Tensor, g: torch.Tensor, weight_shape, **conv):
    w = torch.zeros(weight_shape, dtype=x.dtype, requires_grad=True)
    (dw,) = torch.autograd.grad(F.conv2d(x, w, **conv), w, g, create_graph=True)
    return dw


# conv2d's weight gradient and avg_pool2d's input gradient, with the geometry of these calls.
WEIGHT_GRAD_WINDOWS = ops.Windows((3, 2), (2, 1), ((1, 1), (0, 0)), (1, 2))
AVG_POOL_WINDOWS = ops.Windows((3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1))


def torch_attention_weights(mask: np.ndarray | None, scale: float | None = None):
    """softmax(scale q k^T + mask), written out in PyTorch (the rows tested keep a key)."""
    def weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        factor = q.shape[-1] ** -0.5 if scale is None else scale
        scores = factor * q @ k.transpose(-1, -2)
        return torch.softmax(scores if mask is None else scores + torch.from_numpy(mask), -1)

    return weights


CAUSAL_MASK = np.triu(np.full((4, 6), -np.inf), 1)
# Per batch item: item 0 may not look at the last two keys, item 1 only at keys 1..3.
PADDING_MASK = np.zeros((2, 1, 1, 6))
PADDING_MASK[0, ..., 4:] = -np.inf
PADDING_MASK[1, ..., [0, 4, 5]] = -np.inf


def torch_self_attention(heads: int, mask: np.ndarray | None):
    """Packed q | k | v cut into heads, attention written out, heads put side by side."""
    def attend(qkv: torch.Tensor) -> torch.Tensor:
        batch, length, width = qkv.shape
        q, k, v = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        weights = torch_attention_weights(mask)(q, k)
        return (weights @ v).transpose(1, 2).reshape(batch, length, width // 3)

    return attend


SELF_CAUSAL = np.triu(np.full((4, 4), -np.inf), 1)
SELF_PADDING = PADDING_MASK[..., :4]
LATE_PADDING = np.zeros((2, 1, 1, 4))  # padding at the end: with causal, every query keeps a key
LATE_PADDING[0, ..., 2:] = -np.inf
LATE_PADDING[1, ..., 3] = -np.inf


def distinct(shape: tuple[int, ...]):
    """Well-separated distinct values: no ties for max."""
    return lambda rng: [0.1 * (rng.permutation(int(np.prod(shape))) - 5.0).reshape(shape)]


INDEX_ARRAY = np.array([2, 0, 2, -1, 2])
MASK = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])
CONDITION = np.array([[True], [False], [True]])
TARGET = np.array([0, 3, 3, 1, 2])

# Keyed by op name; every op in ops.OPS must appear (checked below).
PAIRS: dict[str, dict[str, Pair]] = {
    "add": {"broadcast": Pair(ops.add, torch.add, normal((3, 1, 4), (2, 4)))},
    "sub": {"broadcast": Pair(ops.sub, torch.sub, normal((2, 4), (3, 1, 1)))},
    "mul": {"broadcast": Pair(ops.mul, torch.mul, normal((3, 1, 4), (2, 1)))},
    "div": {
        "broadcast": Pair(ops.div, torch.div,
                          lambda rng: [rng.standard_normal((3, 4)), rng.uniform(0.5, 2, (4,))]),
    },
    "power": {
        "tensor_exponent": Pair(ops.power, torch.pow,
                                lambda rng: [rng.uniform(0.3, 2, (3, 4)),
                                             rng.uniform(-2, 2, (4,))]),
        "constant_exponent": Pair(lambda x: x**2.5, lambda t: t**2.5, positive((3, 4))),
        "negative_base_integer_exponent": Pair(lambda x: x**3.0, lambda t: t**3.0,
                                               normal((5,))),
        "constant_base": Pair(lambda y: 1.7**y, lambda t: 1.7**t, normal((5,))),
    },
    "neg": {"plain": Pair(ops.neg, torch.neg, normal((2, 3)))},
    "maximum": {
        "broadcast": Pair(ops.maximum, torch.maximum,
                          lambda rng: [0.1 * rng.integers(-20, 20, (3, 4)),
                                       0.1 * rng.integers(-20, 20, (4,)) + 0.05]),
    },
    "matmul": {
        f"{a}@{b}": Pair(ops.matmul, torch.matmul, normal(a, b))
        for a, b in [((4,), (4,)), ((4,), (4, 3)), ((3, 4), (4,)), ((2, 3, 4), (4, 5)),
                     ((4,), (2, 4, 3)), ((2, 1, 3, 4), (5, 4, 2))]
    },
    "linear": {
        "3d_input_with_bias": Pair(ops.linear, F.linear, normal((2, 3, 4), (5, 4), (5,))),
        "2d_input_no_bias": Pair(ops.linear, F.linear, normal((3, 4), (5, 4))),
    },
    **{
        name: {
            f"axis={axis}-keepdims={keepdims}": Pair(
                partial(getattr(ops, name), axis=axis, keepdims=keepdims),
                torch_reduce(name, axis, keepdims),
                distinct((2, 3, 4)),
            )
            for axis in [None, 1, -1, (0, 2), (-1, -3)]
            for keepdims in [False, True]
        }
        for name in ["sum", "mean", "max"]
    },
    "broadcast_to": {
        "expand": Pair(lambda x: ops.broadcast_to(x, (2, 3, 4)),
                       lambda t: t.broadcast_to((2, 3, 4)), normal((3, 1))),
    },
    "reshape": {
        "inferred": Pair(lambda x: x.reshape(4, -1), lambda t: t.reshape(4, -1),
                         normal((2, 3, 2))),
    },
    "transpose": {
        "axes": Pair(lambda x: x.transpose(2, 0, 1), lambda t: t.permute(2, 0, 1),
                     normal((2, 3, 4))),
        "negative_axes": Pair(lambda x: ops.transpose(x, (-1, -3, -2)),
                              lambda t: t.permute(-1, -3, -2), normal((2, 3, 4))),
        "T": Pair(lambda x: x.T, lambda t: t.T, normal((2, 3))),
    },
    "getitem": {
        "slices": Pair(lambda x: x[1:, ::2], lambda t: t[1:, ::2], normal((3, 4))),
        "int_and_newaxis": Pair(lambda x: x[-1, None, 1:3], lambda t: t[-1, None, 1:3],
                                normal((3, 4))),
        "repeated_rows": Pair(lambda x: x[INDEX_ARRAY], lambda t: t[torch_index(INDEX_ARRAY)],
                              normal((3, 4))),
        "paired_arrays": Pair(lambda x: x[INDEX_ARRAY, INDEX_ARRAY],
                              lambda t: t[torch_index((INDEX_ARRAY, INDEX_ARRAY))],
                              normal((3, 4))),
        "mask": Pair(lambda x: x[MASK], lambda t: t[torch_index(MASK)], normal((3, 4))),
    },
    "scatter_add": {
        "repeated_rows": Pair(lambda g: ops.scatter_add(g, INDEX_ARRAY, (3, 4)),
                              lambda g: torch_scatter_add(g, INDEX_ARRAY, (3, 4)),
                              normal((5, 4))),
        "slices": Pair(lambda g: ops.scatter_add(g, (slice(1, None), slice(None, None, 2)),
                                                 (3, 4)),
                       lambda g: torch_scatter_add(g, (slice(1, None), slice(None, None, 2)),
                                                   (3, 4)),
                       normal((2, 2))),
    },
    "concatenate": {
        "negative_axis": Pair(lambda a, b: ops.concatenate([a, b], -2),
                              lambda a, b: torch.cat([a, b], -2), normal((2, 3, 4), (2, 1, 4))),
    },
    "stack": {
        "negative_axis": Pair(lambda a, b, c: ops.stack([a, b, c], -1),
                              lambda a, b, c: torch.stack([a, b, c], -1),
                              normal((2, 3), (2, 3), (2, 3))),
    },
    "cast": {
        "to_float32": Pair(lambda x: ops.cast(x, np.float32), lambda t: t.to(torch.float32),
                           normal((2, 3))),
    },
    "exp": {"plain": Pair(ops.exp, torch.exp, normal((2, 3)))},
    "log": {"plain": Pair(ops.log, torch.log, positive((2, 3)))},
    "log1p": {"plain": Pair(ops.log1p, torch.log1p, positive((2, 3), low=-0.8))},
    "sqrt": {"plain": Pair(ops.sqrt, torch.sqrt, positive((2, 3)))},
    "abs": {"plain": Pair(ops.abs, torch.abs, away_from_zero((2, 3)))},
    "clip": {
        "both": Pair(lambda x: ops.clip(x, -0.5, 0.7), lambda t: torch.clamp(t, -0.5, 0.7),
                     normal((3, 4))),
        "min_only": Pair(lambda x: ops.clip(x, min=-0.5), lambda t: torch.clamp(t, min=-0.5),
                         normal((3, 4))),
        "max_only": Pair(lambda x: ops.clip(x, max=0.2), lambda t: torch.clamp(t, max=0.2),
                         normal((3, 4))),
    },
    "where": {
        "broadcast": Pair(lambda x, y: ops.where(CONDITION, x, y),
                          lambda x, y: torch.where(torch.from_numpy(CONDITION), x, y),
                          normal((1, 4), (3, 1))),
    },
    "tanh": {"plain": Pair(ops.tanh, torch.tanh, normal((2, 3), scale=2.0))},
    "sigmoid": {"plain": Pair(ops.sigmoid, torch.sigmoid, normal((2, 3), scale=4.0))},
    "relu": {"plain": Pair(ops.relu, torch.relu, away_from_zero((2, 3)))},
    "leaky_relu": {
        f"slope={slope}": Pair(partial(ops.leaky_relu, negative_slope=slope),
                               partial(F.leaky_relu, negative_slope=slope),
                               away_from_zero((2, 3)))
        for slope in [0.01, 0.2]
    },
    "silu": {"plain": Pair(ops.silu, F.silu, normal((2, 3), scale=3.0))},
    "normal_cdf": {"plain": Pair(ops.normal_cdf, torch.special.ndtr, normal((2, 3), scale=2.0))},
    "gelu": {
        mode: Pair(partial(ops.gelu, approximate=mode), partial(F.gelu, approximate=mode),
                   normal((3, 4), scale=2.5))
        for mode in ["none", "tanh"]
    },
    "softmax": {
        f"axis={axis}": Pair(partial(ops.softmax, axis=axis), partial(torch.softmax, dim=axis),
                             normal((2, 3, 4), scale=2.0))
        for axis in [-1, 0, 1]
    },
    "log_softmax": {
        f"axis={axis}": Pair(partial(ops.log_softmax, axis=axis),
                             partial(torch.log_softmax, dim=axis), normal((2, 3, 4), scale=2.0))
        for axis in [-1, 0, 1]
    },
    "cross_entropy": {
        f"{reduction}-smoothing={smoothing}": Pair(
            partial(ops.cross_entropy, target=TARGET, reduction=reduction,
                    label_smoothing=smoothing),
            partial(F.cross_entropy, target=torch.from_numpy(TARGET), reduction=reduction,
                    label_smoothing=smoothing),
            normal((5, 4), scale=2.0),
        )
        for reduction in ["mean", "sum", "none"]
        for smoothing in [0.0, 0.1, 0.4]
    },
    "straight_through": {
        # PyTorch's idiom for the estimator: the step's value, the identity's gradient.
        "round": Pair(ops.straight_through, lambda t: t + (torch.round(t) - t).detach(),
                      normal((2, 3), scale=3.0)),
    },
    "attention_weights": {
        f"{name}-scale={scale}": Pair(
            lambda q, k, mask=mask, scale=scale: ops.attention_weights(q, k, mask, scale),
            torch_attention_weights(mask, scale), normal((2, 3, 4, 5), (2, 3, 6, 5)))
        for name, mask in [("no_mask", None), ("causal", CAUSAL_MASK), ("padding", PADDING_MASK),
                           ("float", np.linspace(-1, 1, 24).reshape(4, 6))]
        for scale in [None, 0.3]
    },
    "self_attention": {
        name: Pair(lambda qkv, mask=mask: ops.self_attention(qkv, 3, mask),
                   torch_self_attention(3, mask), normal((2, 4, 18)))
        for name, mask in [("no_mask", None), ("causal", SELF_CAUSAL), ("padding", SELF_PADDING),
                           ("per_head_float", np.linspace(-1, 1, 96).reshape(2, 3, 4, 4))]
    } | {
        f"causal_flag-{name}": Pair(
            lambda qkv, mask=mask: ops.self_attention(qkv, 3, mask, causal=True),
            torch_self_attention(3, SELF_CAUSAL if mask is None else mask + SELF_CAUSAL),
            normal((2, 4, 18)))
        for name, mask in [("alone", None), ("with_padding", LATE_PADDING)]
    },
    "linear_relu": {
        "3d_input_with_bias": Pair(ops.linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b)),
                                   normal((2, 3, 4), (5, 4), (5,))),
        "no_bias": Pair(ops.linear_relu, lambda x, w: F.relu(F.linear(x, w)),
                        normal((3, 4), (5, 4))),
    },
    "layer_norm": {
        "last_axis": Pair(lambda x, w, b: ops.layer_norm(x, 1, w, b),
                          lambda x, w, b: F.layer_norm(x, (5,), w, b),
                          normal((2, 3, 5), (5,), (5,))),
        "two_axes_weight_only": Pair(lambda x, w: ops.layer_norm(x, 2, w, eps=1e-3),
                                     lambda x, w: F.layer_norm(x, (3, 5), w, eps=1e-3),
                                     normal((2, 3, 5), (3, 5))),
        "no_affine": Pair(lambda x: ops.layer_norm(x, 1), lambda x: F.layer_norm(x, (4,)),
                          normal((6, 4), scale=3.0)),
    },
    "feedback_linear": {
        "3d_input_with_bias": Pair(
            lambda x, w, b: ops.feedback_linear(x, w, b, FEEDBACK),
            lambda x, w, b: torch_feedback_linear(x, w, b, torch.from_numpy(FEEDBACK)),
            normal((2, 3, 4), (5, 4), (5,))),
    },
    "conv2d": {
        "stride2-pad1-groups2-bias": Pair(
            lambda x, w, b: ops.conv2d(x, w, b, 2, 1, 1, 2),
            lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2),
            normal((2, 4, 6, 5), (6, 2, 3, 2), (6,))),
        "same-dilated-even-kernel": Pair(
            lambda x, w: ops.conv2d(x, w, None, 1, "same", (2, 1)),
            lambda x, w: F.conv2d(x, w, None, 1, "same", (2, 1)),
            normal((2, 3, 6, 5), (4, 3, 2, 4))),
    },
    "conv_transpose2d": {
        "stride2-output-padding-groups2": Pair(
            lambda x, w: ops.conv_transpose2d(x, w, None, 2, 1, 1, 2, 1),
            lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, 1, 2, 1),
            normal((2, 4, 3, 4), (4, 3, 3, 2))),
    },
    "conv2d_weight_grad": {
        "strided-dilated-groups2": Pair(
            lambda x, g: ops.apply(ops.CONV2D_WEIGHT_GRAD, x, g, windows=WEIGHT_GRAD_WINDOWS,
                                   groups=2),
            partial(torch_conv2d_weight_grad, weight_shape=(6, 2, 3, 2), stride=(2, 1),
                    padding=(1, 0), dilation=(1, 2), groups=2),
            normal((2, 4, 6, 7), (2, 6, 3, 5))),
    },
    "max_pool2d": {
        "3x3-stride2-pad1-ceil": Pair(lambda x: ops.max_pool2d(x, 3, 2, 1, 1, True),
                                      lambda t: F.max_pool2d(t, 3, 2, 1, 1, True),
                                      normal((2, 3, 7, 6))),
        "2x2-dilated": Pair(lambda x: ops.max_pool2d(x, 2, 1, 0, 2),
                            lambda t: F.max_pool2d(t, 2, 1, 0, 2), normal((2, 3, 5, 6))),
    },
    "avg_pool2d": {
        "3x3-stride2-pad1-ceil-without-pad": Pair(
            lambda x: ops.avg_pool2d(x, 3, 2, 1, True, False),
            lambda t: F.avg_pool2d(t, 3, 2, 1, True, False), normal((2, 3, 7, 6))),
    },
    "avg_pool2d_backward": {
        "3x3-stride2-pad1": Pair(
            lambda g: ops.apply(ops.AVG_POOL2D_BACKWARD, g, windows=AVG_POOL_WINDOWS,
                                divisor=9.0, input_size=(7, 6)),
            torch_adjoint(lambda x: F.avg_pool2d(x, 3, 2, 1), (2, 3, 7, 6)),
            normal((2, 3, 4, 3))),
    },
    "record_grad": {
        "identity": Pair(lambda x: ops.record_grad(x, lambda g: None), torch_hooked_identity,
                         normal((2, 3))),
    },
}


def test_every_op_in_the_table_is_compared_with_pytorch():
    missing = set(ops.OPS) - set(PAIRS)
    assert not missing, f"ops without a PyTorch comparison: {sorted(missing)}"


def run_side_by_side(pair: Pair, arrays: list[np.ndarray], seed: int = 0):
    """Forward both, backprop the same random upstream gradient, return both sides."""
    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = pair.ours(*ours), pair.theirs(*theirs)
    upstream = np.asarray(np.random.default_rng(seed).standard_normal(out.shape), out.dtype)
    out.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    return out, ref, ours, theirs


def assert_same(out: Tensor, ref: torch.Tensor, ours: list[Tensor], theirs: list[torch.Tensor]):
    assert out.shape == tuple(ref.shape)
    assert out.dtype == ref.detach().numpy().dtype
    np.testing.assert_allclose(out.data, ref.detach().numpy(), rtol=RTOL, atol=ATOL,
                               err_msg="forward value")
    for position, (x, t) in enumerate(zip(ours, theirs)):
        expected = np.zeros(x.shape) if t.grad is None else t.grad.numpy()
        assert x.grad is not None, f"input {position} got no gradient"
        assert x.grad.dtype == x.dtype
        np.testing.assert_allclose(x.grad, expected, rtol=RTOL, atol=ATOL,
                                   err_msg=f"gradient of input {position}")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "pair",
    [pytest.param(pair, id=f"{name}-{variant}")
     for name, variants in PAIRS.items() for variant, pair in variants.items()],
)
def test_value_and_gradient_equal_pytorch(pair, seed):
    arrays = pair.inputs(np.random.default_rng(seed))
    assert_same(*run_side_by_side(pair, arrays, seed))


def test_var_with_and_without_correction_equals_pytorch():
    for axis, keepdims, correction in [(None, False, 0), (1, True, 0), ((0, 2), False, 1),
                                       (-1, False, 1)]:
        pair = Pair(partial(ops.var, axis=axis, keepdims=keepdims, correction=correction),
                    partial(torch.var, dim=axis, keepdim=keepdims, correction=correction),
                    normal((2, 3, 4)))
        assert_same(*run_side_by_side(pair, pair.inputs(np.random.default_rng(3))))


# --- kinks, ties and saturation: where conventions differ -------------------------------------

AT_KINKS: dict[str, tuple[Pair, list[list[float]]]] = {
    "relu_at_zero": (Pair(ops.relu, torch.relu, None), [[-1.0, 0.0, 2.0]]),
    "leaky_relu_at_zero": (Pair(lambda x: ops.leaky_relu(x, 0.1),
                                lambda t: F.leaky_relu(t, 0.1), None), [[-1.0, 0.0, 2.0]]),
    "abs_at_zero": (Pair(ops.abs, torch.abs, None), [[-1.0, 0.0, 2.0]]),
    "clip_at_both_bounds": (Pair(lambda x: ops.clip(x, -0.5, 0.5),
                                 lambda t: torch.clamp(t, -0.5, 0.5), None),
                            [[-1.0, -0.5, 0.0, 0.5, 1.0]]),
    "max_ties_along_an_axis": (Pair(lambda x: ops.max(x, 1), lambda t: torch.amax(t, 1), None),
                               [[[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]]),
    "max_ties_overall": (Pair(lambda x: ops.max(x), lambda t: torch.amax(t), None),
                         [[[1.0, 3.0], [3.0, 0.0]]]),
    "maximum_ties": (Pair(ops.maximum, torch.maximum, None), [[1.0, 2.0, 5.0], [1.0, 3.0, 5.0]]),
    "power_zero_base_constant_exponent": (Pair(lambda x: x**2.0, lambda t: t**2.0, None),
                                          [[0.0, 1.5]]),
    "power_zero_base_tensor_exponent": (Pair(ops.power, torch.pow, None),
                                        [[0.0, 1.5, 2.0], [2.0, 2.0, 0.5]]),
}


@pytest.mark.parametrize("case", list(AT_KINKS), ids=str)
def test_gradient_at_kinks_and_ties_follows_pytorch(case):
    pair, values = AT_KINKS[case]
    assert_same(*run_side_by_side(pair, [np.asarray(v, dtype=np.float64) for v in values]))


SATURATING = np.array([-800.0, -100.0, -30.0, -8.0, 8.0, 30.0, 100.0, 800.0])

SATURATION: dict[str, Pair] = {
    "sigmoid": Pair(ops.sigmoid, torch.sigmoid, None),
    "tanh": Pair(ops.tanh, torch.tanh, None),
    "silu": Pair(ops.silu, F.silu, None),
    "normal_cdf": Pair(ops.normal_cdf, torch.special.ndtr, None),
    "gelu": Pair(ops.gelu, F.gelu, None),
    "gelu_tanh": Pair(lambda x: ops.gelu(x, "tanh"), lambda t: F.gelu(t, approximate="tanh"),
                      None),
    "softmax": Pair(lambda x: ops.softmax(x.reshape(2, 4)),
                    lambda t: torch.softmax(t.reshape(2, 4), -1), None),
    "log_softmax": Pair(lambda x: ops.log_softmax(x.reshape(2, 4)),
                        lambda t: torch.log_softmax(t.reshape(2, 4), -1), None),
    "cross_entropy": Pair(lambda x: ops.cross_entropy(x.reshape(2, 4), np.array([0, 3])),
                          lambda t: F.cross_entropy(t.reshape(2, 4), torch.tensor([0, 3])),
                          None),
}


@pytest.mark.parametrize("name", list(SATURATION))
def test_saturating_inputs_stay_finite_and_follow_pytorch(name):
    out, ref, ours, theirs = run_side_by_side(SATURATION[name], [SATURATING])
    assert np.isfinite(out.data).all() and np.isfinite(ours[0].grad).all()
    assert_same(out, ref, ours, theirs)
