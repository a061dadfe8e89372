"""The op table: every differentiable primitive, its NumPy forward and its backward rules.

Each entry is `Op(name, forward, vjps)`: `vjps[i](g, ans, *inputs, **params)` is the
vector-Jacobian product for input i, the chain rule's local step (the formula is on the line
above it). A rule is written with operators, methods and the dual helpers below, which act on
ndarrays in an ordinary backward pass and on Tensors when `backward(create_graph=True)` asks for
a differentiable gradient (second order: Hessian-vector products).

The public functions at the bottom (`add`, `tanh`, `linear`, `cross_entropy`, ...) are what
Tensor methods, `nn` and users call.
"""

from __future__ import annotations

import builtins
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from worker.backprop import tensor as _tensor
from worker.backprop.parallel import blocks_of, run_blocks, thread_count
from worker.backprop.tensor import Node, Op, Tensor, unbroadcast

T = TypeVar("T")

# --- applying an op ------------------------------------------------------------------------


def apply(op: Op, *args: Any, **params: Any) -> Tensor:
    """Run `op` forward and, when any input requires gradients, record it for backward."""
    if op.variadic:
        (items,) = args
        parents = [x if isinstance(x, Tensor) else None for x in items]
        inputs = [x.data if isinstance(x, Tensor) else np.asarray(x) for x in items]
        ans = op.forward(inputs, **params)
    else:
        parents = [x if isinstance(x, Tensor) else None for x in args]
        inputs = [x.data if isinstance(x, Tensor) else x for x in args]
        ans = op.forward(*inputs, **params)
    out = Tensor.__new__(Tensor)
    out.data = ans
    out.grad = None
    out._node = None
    out._grad_hooks = None
    out.requires_grad = False
    if _tensor._grad_enabled:
        for parent in parents:
            if parent is not None and parent.requires_grad:
                out.requires_grad = True
                out._node = Node(op, parents, inputs, ans, params)
                break
    return out


def _is_tensor(x: Any) -> bool:
    return isinstance(x, Tensor)


# --- dual helpers: NumPy on arrays, recorded ops on Tensors ----------------------------------


def _exp(x):
    return exp(x) if _is_tensor(x) else np.exp(x)


def _log(x):
    return log(x) if _is_tensor(x) else np.log(x)


def _sign(x):
    return Tensor(np.sign(x.data)) if _is_tensor(x) else np.sign(x)


def _where(condition, x, y):
    return where(condition, x, y) if _is_tensor(x) or _is_tensor(y) else np.where(condition, x, y)


def _broadcast_to(x, shape):
    return broadcast_to(x, shape) if _is_tensor(x) else np.broadcast_to(x, shape)


def _swap_last_axes(x):
    if _is_tensor(x):
        axes = list(range(x.ndim))
        axes[-1], axes[-2] = axes[-2], axes[-1]
        return transpose(x, tuple(axes))
    return x.swapaxes(-1, -2)


def _mask(x) -> np.ndarray:
    """Constant data of x: masks (relu, max, clip) carry no gradient of their own."""
    return x.data if _is_tensor(x) else x


def _cast(x, dtype):
    return cast(x, dtype) if _is_tensor(x) else x.astype(dtype, copy=False)


def _normal_cdf(x):
    return normal_cdf(x) if _is_tensor(x) else _ndtr(x)


def _tanh(x):
    return tanh(x) if _is_tensor(x) else np.tanh(x)


def _sigmoid(x):
    return sigmoid(x) if _is_tensor(x) else _sigmoid_forward(x)


def _stack(xs, axis):
    return stack(xs, axis) if any(_is_tensor(x) for x in xs) else np.stack(xs, axis)


def _attention_weights(query, key, mask, scale):
    if _is_tensor(query) or _is_tensor(key):
        return apply(ATTENTION_WEIGHTS, query, key, mask=mask, scale=scale)
    return _attention_weights_forward(query, key, mask, scale)


def _softmax(x, axis):
    return softmax(x, axis) if _is_tensor(x) else _softmax_forward(x, axis)


def _axes(axis) -> tuple[int, ...]:
    """An axis argument (int, NumPy integer or sequence) as a tuple of ints."""
    if isinstance(axis, (int, np.integer)):
        return (int(axis),)
    return tuple(int(a) for a in axis)


def _to_keepdims(g, shape, axis, keepdims):
    """Reshape a reduction's gradient so it broadcasts against the reduced input."""
    if axis is None or keepdims:
        return g if keepdims or g.ndim == len(shape) else g.reshape((1,) * len(shape))
    axes = {a % len(shape) for a in _axes(axis)}
    return g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))


def _reduced_count(shape, axis) -> int:
    if axis is None:
        return math.prod(shape)
    return math.prod(shape[a] for a in _axes(axis))


# --- elementwise arithmetic ------------------------------------------------------------------

ADD = Op("add", np.add, (
    lambda g, ans, x, y: g,  # d(x+y)/dx = 1
    lambda g, ans, x, y: g,
), broadcasts=True)

SUB = Op("sub", np.subtract, (
    lambda g, ans, x, y: g,
    lambda g, ans, x, y: -g,  # d(x-y)/dy = -1
), broadcasts=True)

MUL = Op("mul", np.multiply, (
    lambda g, ans, x, y: g * y,  # d(xy)/dx = y
    lambda g, ans, x, y: g * x,
), broadcasts=True)

DIV = Op("div", np.true_divide, (
    lambda g, ans, x, y: g / y,  # d(x/y)/dx = 1/y
    lambda g, ans, x, y: -g * ans / y,  # d(x/y)/dy = -x/y^2 = -ans/y
), broadcasts=True)

def _power_vjp_exponent(g, ans, x, y):
    # d(x^y)/dy = x^y log x; where x = 0 (and y >= 0) x^y is flat in y, so 0, as torch says.
    if isinstance(x, (int, float)):
        return g * ans * math.log(x)  # a Python base keeps the gradient in g's dtype
    at_zero = (_mask(x) == 0) & (np.asarray(_mask(y)) >= 0)
    if not at_zero.any():
        return g * ans * _log(x)
    return g * ans * _log(_where(at_zero, 1.0, x))


POWER = Op("power", np.power, (
    lambda g, ans, x, y: g * y * x ** (y - 1),  # d(x^y)/dx = y x^(y-1)
    _power_vjp_exponent,
), broadcasts=True)

NEG = Op("neg", np.negative, (lambda g, ans, x: -g,))

def _share_of_maximum(x, y):
    # The larger input takes the gradient; a tie splits it in half, as torch.maximum does.
    return (_mask(x) > _mask(y)) + 0.5 * (_mask(x) == _mask(y))


MAXIMUM = Op("maximum", np.maximum, (
    lambda g, ans, x, y: g * _share_of_maximum(x, y).astype(_mask(g).dtype),
    lambda g, ans, x, y: g * _share_of_maximum(y, x).astype(_mask(g).dtype),
), broadcasts=True)

# --- matrix products -------------------------------------------------------------------------


def _matmul_vjp_a(g, ans, a, b):
    # C = A B  =>  dA = G B^T; a 1-D operand is treated as a row (A) or a column (B).
    if b.ndim == 1:
        ga = g.reshape(g.shape + (1,)) * b  # outer product over the last axis
        return ga if a.ndim > 1 else ga.reshape(ga.shape[:-2] + ga.shape[-1:])
    if a.ndim == 1:
        g = g.reshape(g.shape[:-1] + (1,) + g.shape[-1:])
        ga = g @ _swap_last_axes(b)
        return ga.reshape(ga.shape[:-2] + ga.shape[-1:])
    return g @ _swap_last_axes(b)


def _matmul_vjp_b(g, ans, a, b):
    # C = A B  =>  dB = A^T G
    if a.ndim == 1 and b.ndim == 1:
        return g * a  # a dot product
    if a.ndim == 1:
        return a.reshape(a.shape + (1,)) * g.reshape(g.shape[:-1] + (1,) + g.shape[-1:])
    if b.ndim == 1:
        gb = _swap_last_axes(a) @ g.reshape(g.shape + (1,))
        return gb.reshape(gb.shape[:-1])
    return _swap_last_axes(a) @ g


MATMUL = Op("matmul", np.matmul, (_matmul_vjp_a, _matmul_vjp_b), broadcasts=True)


def _linear_forward(x, weight, bias=None):
    if x.ndim > 2:  # (batch..., in): one GEMM over the flattened batch, not one per leading index
        return _linear_forward(x.reshape((-1, x.shape[-1])), weight, bias).reshape(
            x.shape[:-1] + (weight.shape[0],))
    out = x @ weight.T
    if bias is not None:
        out += bias  # in place: the product is a fresh array, no second allocation
    return out


def _linear_vjp_x(g, ans, x, weight, bias=None):
    if g.ndim > 2:  # as in the forward: one GEMM over the flattened batch
        return (g.reshape((-1, g.shape[-1])) @ weight).reshape(x.shape)
    return g @ weight  # y = x W^T + b  =>  dx = G W


def _linear_vjp_weight(g, ans, x, weight, bias=None):
    if g.ndim == 1:  # a single unbatched sample: dW is the outer product g x^T
        return g.reshape((g.shape[0], 1)) * x.reshape((1, x.shape[0]))
    if g.ndim > 2:  # (batch..., out): flatten the batch axes into one
        g = g.reshape((-1, g.shape[-1]))
        x = x.reshape((-1, x.shape[-1]))
    return _swap_last_axes(g) @ x  # dW = G^T x


def _linear_vjp_bias(g, ans, x, weight, bias=None):
    return g.sum(axis=tuple(range(g.ndim - 1)))  # db = sum of G over the batch


LINEAR = Op("linear", _linear_forward, (_linear_vjp_x, _linear_vjp_weight, _linear_vjp_bias))

# --- reductions --------------------------------------------------------------------------


def _sum_vjp(g, ans, x, axis=None, keepdims=False):
    return _broadcast_to(_to_keepdims(g, x.shape, axis, keepdims), x.shape)


def _mean_vjp(g, ans, x, axis=None, keepdims=False):
    return _sum_vjp(g / _reduced_count(x.shape, axis), ans, x, axis, keepdims)


def _max_vjp(g, ans, x, axis=None, keepdims=False):
    # The gradient goes to the maximal entries, split evenly between ties (like torch.amax).
    top = _mask(x) == _to_keepdims(_mask(ans), x.shape, axis, keepdims)
    share = top / top.sum(axis=axis, keepdims=True)
    return _to_keepdims(g, x.shape, axis, keepdims) * share.astype(_mask(x).dtype)


SUM = Op("sum", lambda x, axis=None, keepdims=False: np.sum(x, axis=axis, keepdims=keepdims),
         (_sum_vjp,))
MEAN = Op("mean", lambda x, axis=None, keepdims=False: np.mean(x, axis=axis, keepdims=keepdims),
          (_mean_vjp,))
MAX = Op("max", lambda x, axis=None, keepdims=False: np.max(x, axis=axis, keepdims=keepdims),
         (_max_vjp,))

BROADCAST_TO = Op(
    "broadcast_to",
    lambda x, shape: np.broadcast_to(x, shape),
    (lambda g, ans, x, shape: unbroadcast(g, x.shape),),  # broadcasting's adjoint is a sum
)

# --- shape and indexing --------------------------------------------------------------------

RESHAPE = Op("reshape", lambda x, shape: np.reshape(x, shape),
             (lambda g, ans, x, shape: g.reshape(x.shape),))


def _inverse_axes(axes, ndim):
    return None if axes is None else tuple(np.argsort([a % ndim for a in axes]))


TRANSPOSE = Op(
    "transpose",
    lambda x, axes=None: np.transpose(x, axes),
    (lambda g, ans, x, axes=None: g.transpose(_inverse_axes(axes, x.ndim)),),
)


def _is_basic_index(index) -> bool:
    """Slices, integers, None and Ellipsis never repeat an element, so a plain assignment
    scatters their gradient; arrays of indices may repeat, so they need np.add.at."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, np.integer, slice, type(None), type(Ellipsis))) for i in items)


def _scatter_add_forward(g, index, shape):
    out = np.zeros(shape, dtype=g.dtype)
    if _is_basic_index(index):
        out[index] = g
    elif isinstance(index, np.ndarray) and index.dtype.kind in "iu" and index.size:
        _scatter_add_rows(out, index, g)
    else:
        np.add.at(out, index, g)
    return out


def _scatter_add_rows(out, index, g):
    """out[index[i]] += g[i] for one integer array indexing rows (an embedding's backward):
    the entries sorted by row (stably: the same sums on every run) and each row's repeats
    summed by one reduceat, ~3x faster than np.add.at, equal to it up to round-off."""
    rows = index.reshape(-1) % out.shape[0]  # negative indices count from the end
    values = g.reshape((rows.size,) + out.shape[1:])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], rows[1:] != rows[:-1])))
    out[rows[starts]] = np.add.reduceat(values[order], starts, axis=0)


GETITEM = Op("getitem", lambda x, index: x[index],
             (lambda g, ans, x, index: scatter_add(g, index, x.shape) if _is_tensor(g)
              else _scatter_add_forward(g, index, x.shape),))

# The adjoint of indexing: the gradient of a scatter is a gather at the same places.
SCATTER_ADD = Op("scatter_add", _scatter_add_forward,
                 (lambda g, ans, x, index, shape: g[index],))


def _concatenate_vjp(g, ans, inputs, axis=0, index=0):
    axis = axis % ans.ndim
    start = builtins.sum(inputs[i].shape[axis] for i in range(index))
    where_ = (slice(None),) * axis + (slice(start, start + inputs[index].shape[axis]),)
    return g[where_]


def _stack_vjp(g, ans, inputs, axis=0, index=0):
    return g[(slice(None),) * (axis % ans.ndim) + (index,)]


CONCATENATE = Op("concatenate", lambda xs, axis=0: np.concatenate(xs, axis=axis),
                 (_concatenate_vjp,), variadic=True)
STACK = Op("stack", lambda xs, axis=0: np.stack(xs, axis=axis), (_stack_vjp,), variadic=True)

CAST = Op("cast", lambda x, dtype: x.astype(dtype),
          (lambda g, ans, x, dtype: _cast(g, x.dtype),))

# --- elementwise functions ----------------------------------------------------------------

EXP = Op("exp", np.exp, (lambda g, ans, x: g * ans,))  # d e^x = e^x
LOG = Op("log", np.log, (lambda g, ans, x: g / x,))  # d log x = 1/x
LOG1P = Op("log1p", np.log1p, (lambda g, ans, x: g / (1 + x),))
SQRT = Op("sqrt", np.sqrt, (lambda g, ans, x: g / (2 * ans),))  # d sqrt x = 1/(2 sqrt x)
ABS = Op("abs", np.abs, (lambda g, ans, x: g * _sign(x),))


def _clip_forward(x, lo=None, hi=None):
    return np.clip(x, lo, hi)


def _clip_vjp(g, ans, x, lo=None, hi=None):
    # The gradient passes where lo <= x <= hi (bounds included, as torch.clamp does).
    keep = np.ones(x.shape, dtype=bool)
    if lo is not None:
        keep &= _mask(x) >= lo
    if hi is not None:
        keep &= _mask(x) <= hi
    return g * keep


CLIP = Op("clip", _clip_forward, (_clip_vjp,))

WHERE = Op("where", np.where, (
    None,  # the condition is not differentiable
    lambda g, ans, c, x, y: _where(_mask(c), g, 0.0),
    lambda g, ans, c, x, y: _where(_mask(c), 0.0, g),
), broadcasts=True)

TANH = Op("tanh", np.tanh, (lambda g, ans, x: g * (1 - ans * ans),))  # tanh' = 1 - tanh^2


def _sigmoid_forward(x):
    # exp of a negative number only, so large |x| neither overflows nor loses the tail.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


SIGMOID = Op("sigmoid", _sigmoid_forward, (lambda g, ans, x: g * ans * (1 - ans),))


# relu' = [x > 0]. A boolean mask times g is one fast ufunc pass; np.where is ~10x slower here.
RELU = Op("relu", lambda x: np.maximum(x, 0), (lambda g, ans, x: g * (_mask(ans) > 0),))


def _leaky_relu_forward(x, negative_slope=0.01):
    return np.where(x > 0, x, x * negative_slope)


LEAKY_RELU = Op("leaky_relu", _leaky_relu_forward, (
    lambda g, ans, x, negative_slope=0.01: _where(_mask(x) > 0, g, g * negative_slope),
))


def _silu_forward(x):
    return x * _sigmoid_forward(x)


def _silu_vjp(g, ans, x):
    s = _sigmoid(x)
    return g * (s * (1 + x * (1 - s)))  # (x s)' = s + x s (1 - s)


SILU = Op("silu", _silu_forward, (_silu_vjp,))

# GELU. NumPy has no erf, and the engine imports nothing but NumPy, so the normal CDF is built
# from two expansions, each used where it has no cancellation:
#   |z| < 2: erf(z) = 2/sqrt(pi) e^{-z^2} sum_n (2z^2)^n z / (1*3*...*(2n+1)), all terms positive;
#   z >= 2:  erfc(z) = e^{-z^2} / (sqrt(pi) (z + (1/2)/(z + 1/(z + (3/2)/(z + ...))))),
#            a continued fraction, so the far left tail Phi(x) = erfc(-x/sqrt 2)/2 keeps its
#            relative precision instead of being 1 + erf(z) with erf(z) ~ -1.

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SERIES_LIMIT = 2.0


def _erf_series(z: np.ndarray) -> np.ndarray:
    two_z2 = 2.0 * z * z
    term, total = z.copy(), z.copy()
    for n in range(1, 80):  # |z| < 2: the terms fall below 1e-17 of the sum well before n = 80
        term *= two_z2 / (2 * n + 1)
        total += term
    return (2.0 / math.sqrt(math.pi)) * np.exp(-z * z) * total


def _erfc_continued_fraction(z: np.ndarray) -> np.ndarray:
    denominator = z.copy()
    for k in range(120, 0, -1):  # converged to round-off for z >= 2
        denominator = z + (k / 2) / denominator
    return np.exp(-z * z) / (math.sqrt(math.pi) * denominator)


def _ndtr(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, in the dtype of x, to float64 round-off (relative, in both tails)."""
    x = np.asarray(x)
    z = np.asarray(x, dtype=np.float64) / _SQRT_2
    out = np.empty_like(z)
    middle = np.abs(z) < _SERIES_LIMIT
    out[middle] = 0.5 * (1.0 + _erf_series(z[middle]))
    low, high = z <= -_SERIES_LIMIT, z >= _SERIES_LIMIT
    out[low] = 0.5 * _erfc_continued_fraction(-z[low])
    out[high] = 1.0 - 0.5 * _erfc_continued_fraction(z[high])
    return out.astype(x.dtype, copy=False)


NORMAL_CDF = Op("normal_cdf", _ndtr, (
    lambda g, ans, x: g * (_exp(-0.5 * x * x) * _INV_SQRT_2PI),  # Phi' = phi
))


def _gelu_forward(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    return x * _ndtr(x)


def _gelu_vjp(g, ans, x, approximate="none"):
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
        t = _tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * d_inner)
    # (x Phi(x))' = Phi(x) + x phi(x)
    return g * (_normal_cdf(x) + x * (_exp(-0.5 * x * x) * _INV_SQRT_2PI))


GELU = Op("gelu", _gelu_forward, (_gelu_vjp,))


def _softmax_forward(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _log_softmax_forward(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return shifted


SOFTMAX = Op("softmax", _softmax_forward, (
    # ds = s * (g - <g, s>)
    lambda g, ans, x, axis=-1: ans * (g - (g * ans).sum(axis=axis, keepdims=True)),
))
LOG_SOFTMAX = Op("log_softmax", _log_softmax_forward, (
    # d log_softmax = g - softmax * sum(g)
    lambda g, ans, x, axis=-1: g - _exp(ans) * g.sum(axis=axis, keepdims=True),
))

# --- losses fused for speed: one op instead of five, the same gradient ----------------------


def _cross_entropy_forward(logits, target, reduction="mean", label_smoothing=0.0):
    log_p = _log_softmax_forward(logits, axis=-1)
    rows = np.arange(len(target))
    picked = -log_p[rows, target]
    if label_smoothing:
        picked = (1 - label_smoothing) * picked - label_smoothing * log_p.mean(axis=-1)
    if reduction == "mean":
        return np.asarray(picked.mean(), dtype=logits.dtype)
    if reduction == "sum":
        return np.asarray(picked.sum(), dtype=logits.dtype)
    return picked


def _cross_entropy_vjp(g, ans, logits, target, reduction="mean", label_smoothing=0.0):
    # d/dz of -log softmax(z)[t] = softmax(z) - goal, goal = (1 - s) onehot(t) + s / classes
    n, classes = _mask(logits).shape
    if reduction == "mean":
        g = g / n
    if reduction == "none":
        g = g.reshape((n, 1))
    rows, target = np.arange(n), _mask(target)
    if _is_tensor(logits) or _is_tensor(g):
        goal = np.zeros((n, classes), dtype=_mask(logits).dtype)
        goal[rows, target] = 1 - label_smoothing
        if label_smoothing:
            goal += label_smoothing / classes
        return (_softmax(logits, -1) - goal) * g
    # In place on the one fresh softmax array: this rule runs first in backward, when every
    # activation is still alive, so it allocates no goal matrix and no second (n, classes) copy.
    grad = _softmax_forward(logits, -1)
    grad[rows, target] -= 1 - label_smoothing
    if label_smoothing:
        grad -= label_smoothing / classes
    grad *= g
    return grad


CROSS_ENTROPY = Op("cross_entropy", _cross_entropy_forward, (_cross_entropy_vjp, None))

# --- attention ---------------------------------------------------------------------------------

# The transformer block's ops, each fused so that it keeps only what its backward reads:
#   attention_weights  P = softmax(scale q k^T + mask), for need_weights, cross-attention and
#                      attention dropout (P V is then an ordinary matmul);
#   self_attention     softmax(scale q k^T + mask) v from the packed in-projection, keeping no P;
#   linear_relu        relu(x W^T + b), keeping no pre-activation;
#   layer_norm         (below).
# `mask` is additive and constant (0 where a query may look, -inf where it may not). A query
# whose keys are all masked gets weights 0, not NaN, as torch's scaled_dot_product_attention
# gives (a "safe" softmax).
#
# Several of their VJPs need the same intermediate (dS for q and k, relu's masked gradient for
# x, W and b, LayerNorm's x^ for x and w), and two forwards compute row statistics backward
# can reuse. An _OpContext passed as a parameter carries both, as torch.autograd.Function's ctx
# does. The rules run on arrays in an ordinary backward, in place where it saves passes; with
# create_graph=True (Tensors) they take the plain dual-helper formulas, which second-order
# tests check.


class _OpContext:
    """One recorded call's state shared by its forward and its VJPs.

    `saved` is what the forward computed that backward reuses. `gradient(index, compute_all)`
    hands out input gradients computed together: the sweep asks for a node's inputs in order,
    with the same g, so the first request runs compute_all(needs) for every input that
    requires gradients and the later ones take (and drop) what it left.
    """

    __slots__ = ("needs", "saved", "pending")

    def __init__(self, *inputs: Any):
        self.needs = tuple(_is_tensor(x) and x.requires_grad for x in inputs)
        self.saved: Any = None
        self.pending: dict[int, Any] = {}

    def gradient(self, index: int, compute_all) -> Any:
        if index not in self.pending:
            self.pending = dict(enumerate(compute_all(self.needs)))
        return self.pending.pop(index)


def _shared_gradient(context, index, compute_all):
    if context is None:  # applied without a context: this input's gradient alone
        return compute_all(tuple(i == index for i in range(3)))[index]
    return context.gradient(index, compute_all)


def _row_sums(x):
    """Sums over the last axis as a matrix-vector product: for rows as short as attention's or
    LayerNorm's (64 to 512 values) BLAS does it ~6x faster than NumPy's reduction."""
    return x @ np.ones(x.shape[-1], dtype=x.dtype)


def _softmax_rows(scores, masked):
    """softmax over the last axis of `scores`, in place, and the rows' log-sum-exp (+inf for a
    row whose entries are all -inf, which becomes 0s instead of NaNs when `masked`)."""
    top = scores.max(axis=-1, keepdims=True)
    if masked:
        top[np.isneginf(top)] = 0.0  # an all-masked row: exp(-inf - 0) = 0, not exp(nan)
    scores -= top
    np.exp(scores, out=scores)
    total = _row_sums(scores)[..., None]
    empty = total == 0.0  # only a row with every key masked sums to exactly 0
    if masked:
        total[empty] = 1.0
    scores /= total
    log_total = np.log(total)
    log_total[empty] = np.inf  # exp(s - inf) = 0 reproduces its zero weights
    return top + log_total


def _attention_scores(query, key, mask, scale):
    scores = np.matmul(query, np.swapaxes(key, -1, -2))
    scores *= scale
    if mask is None:
        return scores
    if np.broadcast_shapes(scores.shape, mask.shape) == scores.shape:
        scores += mask
        return scores
    return scores + mask


def _attention_weights_forward(query, key, mask=None, scale=1.0, context=None):
    weights = _attention_scores(query, key, mask, scale)
    _softmax_rows(weights, mask is not None)
    return weights


def _attention_scores_grad(g, weights):
    # Through the softmax: dS = P (G - <G, P>) row by row; masked entries have P = 0, so dS = 0.
    return weights * (g - (g * weights).sum(axis=-1, keepdims=True))


def _attention_weights_vjp(g, ans, query, key, mask=None, scale=1.0, context=None, *,
                           index=0):
    # S = scale q k^T  =>  dq = scale dS k,  dk = scale dS^T q
    def compute_all(needs):
        d_scores = _attention_scores_grad(g, ans) * scale
        return [d_scores @ key if needs[0] else None,
                _swap_last_axes(d_scores) @ query if needs[1] else None]

    return _shared_gradient(context, index, compute_all)


ATTENTION_WEIGHTS = Op("attention_weights", _attention_weights_forward, (
    lambda *args, **params: _attention_weights_vjp(*args, **params, index=0),
    lambda *args, **params: _attention_weights_vjp(*args, **params, index=1),
), broadcasts=True)

# Multi-head self-attention from packed projections, as one op: qkv (B, L, 3E) is the in-proj
# output [q | k | v], each E wide and cut into heads; the result (B, L, E) has the heads side by
# side, ready for the out-projection. It keeps only its input, its output and each row's
# log-sum-exp: P (B, h, L, L), the largest array of a transformer block, is recomputed in
# backward as exp(scale q k^T + mask - lse) (one more q k^T, as flash attention does), and
# q, k, v get their gradients written into one packed array, not one zero-filled (B, L, 3E)
# scatter each. With causal=True the queries go in tiles of _CAUSAL_TILE, each against the
# keys up to its last query only: the scores above the diagonal, half of them, are neither
# computed nor exponentiated. MultiheadAttention uses this op for self-attention when the
# weights are neither returned nor dropped out; otherwise attention_weights and a matmul.

_CAUSAL_TILE = 32  # queries per tile of a causal self-attention
_BACKWARD_BLOCK = 8  # batch items per block of its backward


def _split_heads(qkv, num_heads):
    """(B, L, 3E) -> q, k, v, each (B, h, L, E/h): views on arrays, recorded ops on Tensors."""
    batch, length, width = qkv.shape
    parts = qkv.reshape((batch, length, 3, num_heads, width // (3 * num_heads)))
    return [parts[:, :, i].transpose((0, 2, 1, 3)) for i in range(3)]


def _heads_of(x, num_heads):
    """(B, L, E) -> its (B, h, L, E/h) view."""
    batch, length, width = x.shape
    return x.reshape((batch, length, num_heads, width // num_heads)).transpose((0, 2, 1, 3))


def _mask_part(mask, rows, queries, keys):
    """The part of a mask broadcastable to (B, h, L, L) for batch items `rows`, queries
    `queries` and keys `keys` (slices), its broadcast axes left as they are."""
    if mask is None:
        return None
    index = [slice(None)] * mask.ndim
    for axis, part in ((-4, rows), (-2, queries), (-1, keys)):
        if mask.ndim >= -axis and mask.shape[axis] != 1:
            index[axis] = part
    return mask[tuple(index)]


def _query_tiles(length, causal):
    """(queries, keys) slice pairs: all against all, or causal tiles against keys up to their
    last query (the last tile first, so that it writes every key's gradient before the others
    add theirs)."""
    if not causal:
        return [(slice(0, length), slice(0, length))]
    stops = list(range(_CAUSAL_TILE, length, _CAUSAL_TILE)) + [length]
    starts = [0] + stops[:-1]
    return [(slice(a, b), slice(0, b)) for a, b in zip(starts, stops)][::-1]


@functools.lru_cache(maxsize=64)
def _causal_tile_mask(first_query: int, queries: int, keys: int, dtype: np.dtype) -> np.ndarray:
    """-inf where key j comes after query first_query + i (shared and read-only: cached)."""
    mask = np.triu(np.full((queries, keys), -np.inf, dtype=dtype), first_query + 1)
    mask.flags.writeable = False
    return mask


def _tile_scores(q, k, mask, causal, rows, queries, keys, scale):
    scores = _attention_scores(q[:, :, queries], k[:, :, keys],
                               _mask_part(mask, rows, queries, keys), scale)
    if causal:  # the tile's queries against keys 0..their last: -inf above the diagonal
        scores += _causal_tile_mask(queries.start, queries.stop - queries.start, keys.stop,
                                    scores.dtype)
    return scores


def _self_attention_forward(qkv, num_heads, mask=None, scale=1.0, causal=False, context=None):
    batch, length, width = qkv.shape
    out = np.empty((batch, length, width // 3), dtype=qkv.dtype)
    row_logsumexp = np.empty((batch, num_heads, length, 1), dtype=qkv.dtype)
    q, k, v = _split_heads(qkv, num_heads)
    out_heads, every_item = _heads_of(out, num_heads), slice(None)
    for queries, keys in _query_tiles(length, causal):
        weights = _tile_scores(q, k, mask, causal, every_item, queries, keys, scale)
        row_logsumexp[:, :, queries] = _softmax_rows(weights, mask is not None or causal)
        np.matmul(weights, v[:, :, keys], out=out_heads[:, :, queries])  # P V, heads merged
    if context is not None:
        context.saved = row_logsumexp
    return out


def _self_attention_vjp(g, ans, qkv, num_heads, mask=None, scale=1.0, causal=False,
                        context=None):
    # O = P v  =>  dv = P^T dO, dP = dO v^T;  P = softmax(S), S = scale q k^T + mask
    #   =>  dS = P (dP - <dP, P>), dq = scale dS k, dk = scale dS^T q
    if _is_tensor(g) or _is_tensor(qkv) or context is None or context.saved is None:
        q, k, v = _split_heads(qkv, num_heads)
        length = qkv.shape[1]
        if causal:
            causal_mask = np.triu(np.full((length, length), -np.inf, dtype=_mask(qkv).dtype), 1)
            mask = causal_mask if mask is None else mask + causal_mask
        weights = _attention_weights(q, k, mask, scale)
        g_heads = _heads_of(g, num_heads)
        d_scores = _attention_scores_grad(g_heads @ _swap_last_axes(v), weights) * scale
        grads = [d_scores @ k, _swap_last_axes(d_scores) @ q, _swap_last_axes(weights) @ g_heads]
        packed = _stack([d.transpose((0, 2, 1, 3)) for d in grads], axis=2)  # (B, L, 3, h, E/h)
        return packed.reshape(qkv.shape)
    # The same on arrays, in place, without softmax's max and sum passes (the saved
    # log-sum-exp gives P directly) and with <dP, P> = <dO, O> row by row (a sum over E/h, not
    # over L); by blocks of _BACKWARD_BLOCK batch items, so that one block's P, dP and dS stay
    # in cache (the benchmark's step: 9.7 -> 8.4 ms of attention backward). On one thread:
    # threads measured slower here, next to BLAS's workers spinning after the in-projection.
    batch, length, width = qkv.shape
    packed = np.empty((batch, length, 3, num_heads, width // (3 * num_heads)), dtype=g.dtype)
    for start in range(0, batch, _BACKWARD_BLOCK):
        rows = slice(start, min(start + _BACKWARD_BLOCK, batch))
        q, k, v = _split_heads(qkv[rows], num_heads)
        g_heads, out_heads = _heads_of(g[rows], num_heads), _heads_of(ans[rows], num_heads)
        dq, dk, dv = (packed[rows, :, i].transpose((0, 2, 1, 3)) for i in range(3))
        for tile, (queries, keys) in enumerate(_query_tiles(length, causal)):
            weights = _tile_scores(q, k, mask, causal, rows, queries, keys, scale)
            weights -= context.saved[rows, :, queries]
            np.exp(weights, out=weights)
            g_tile = g_heads[:, :, queries]
            d_scores = g_tile @ _swap_last_axes(v[:, :, keys])
            d_scores -= np.einsum("bhld,bhld->bhl", g_tile, out_heads[:, :, queries])[..., None]
            d_scores *= weights
            d_scores *= scale
            np.matmul(d_scores, k[:, :, keys], out=dq[:, :, queries])
            if tile == 0:  # the tile that reaches every key writes; the others add
                np.matmul(_swap_last_axes(d_scores), q[:, :, queries], out=dk[:, :, keys])
                np.matmul(_swap_last_axes(weights), g_tile, out=dv[:, :, keys])
            else:
                dk[:, :, keys] += _swap_last_axes(d_scores) @ q[:, :, queries]
                dv[:, :, keys] += _swap_last_axes(weights) @ g_tile

    return packed.reshape(qkv.shape)


SELF_ATTENTION = Op("self_attention", _self_attention_forward, (_self_attention_vjp,))

# A feed-forward block's first half, relu(x W^T + b), as one op: the pre-activation is never
# kept (the relu runs in place on the product), only the output, whose sign is relu's mask in
# backward. Unfused, the block would hold both, each (B, L, dim_feedforward).


def _linear_relu_forward(x, weight, bias=None, context=None):
    out = _linear_forward(x, weight, bias)
    np.maximum(out, 0, out=out)
    return out


def _linear_relu_vjp(g, ans, x, weight, bias=None, context=None, *, index=0):
    def compute_all(needs):
        g_before_relu = g * (_mask(ans) > 0)  # relu' = [out > 0]
        return [_linear_vjp_x(g_before_relu, ans, x, weight) if needs[0] else None,
                _linear_vjp_weight(g_before_relu, ans, x, weight) if needs[1] else None,
                _linear_vjp_bias(g_before_relu, ans, x, weight) if needs[2] else None]

    return _shared_gradient(context, index, compute_all)


LINEAR_RELU = Op("linear_relu", _linear_relu_forward, (
    lambda *args, **params: _linear_relu_vjp(*args, **params, index=0),
    lambda *args, **params: _linear_relu_vjp(*args, **params, index=1),
    lambda *args, **params: _linear_relu_vjp(*args, **params, index=2),
))

# --- layer normalisation -------------------------------------------------------------------

# LayerNorm as one op: y = (x - mean) / sqrt(var + eps) * w + b over the trailing `axes`.
# Composed from ten elementwise ops it would keep five full-size intermediates per call; a
# transformer block calls it twice, so the fused op is what keeps the block's memory near what
# backward needs (its input and output). Forward saves each row's mean and 1/sqrt(var + eps)
# (one value per row), from which backward rebuilds x^ in two passes.


def _layer_norm_statistics(x, axes, eps):
    """x^ = (x - mean) * rstd and rstd = 1 / sqrt(var + eps), on arrays or Tensors."""
    centered = x - x.mean(axis=axes, keepdims=True)
    rstd = ((centered * centered).mean(axis=axes, keepdims=True) + eps) ** -0.5
    return centered * rstd, rstd


def _as_rows(x, axes):
    """x as (rows, normalised values): a view when x is contiguous."""
    return x.reshape((-1, math.prod(x.shape[x.ndim - len(axes):])))


def _layer_norm_forward(x, weight=None, bias=None, axes=(-1,), eps=1e-5, context=None):
    rows = _as_rows(x, axes)
    width = rows.shape[1]
    mean = _row_sums(rows) / width
    normalized = rows - mean[:, None]
    rstd = (np.einsum("ij,ij->i", normalized, normalized) / width + eps) ** -0.5
    if context is not None:
        context.saved = mean, rstd
    normalized *= rstd[:, None]  # in place: normalized is a fresh array
    normalized = normalized.reshape(x.shape)
    if weight is not None:
        normalized *= weight
    if bias is not None:
        normalized += bias
    return normalized


def _layer_norm_vjp(g, ans, x, weight=None, bias=None, axes=(-1,), eps=1e-5, context=None, *,
                    index=0):
    # y = x^ w + b  =>  db = sum g,  dw = sum g x^,
    # dx = rstd (gx - mean(gx) - x^ mean(gx x^)) with gx = g w, the gradient at x^
    batch_axes = tuple(range(x.ndim - len(axes)))

    def compute_tensors(needs):
        normalized, rstd = _layer_norm_statistics(x, axes, eps)
        g_normalized = g if weight is None else g * weight
        dx = rstd * (g_normalized - g_normalized.mean(axis=axes, keepdims=True)
                     - normalized * (g_normalized * normalized).mean(axis=axes, keepdims=True))
        return [dx if needs[0] else None,
                (g * normalized).sum(axis=batch_axes) if needs[1] else None,
                g.sum(axis=batch_axes) if needs[2] else None]

    def compute_arrays(needs):
        mean, rstd = context.saved
        normalized = _as_rows(x, axes) - mean[:, None]
        normalized *= rstd[:, None]
        g_rows = _as_rows(g, axes)
        width = g_rows.shape[1]
        shape = x.shape[x.ndim - len(axes):]
        dw = np.einsum("ij,ij->j", g_rows, normalized).reshape(shape) if needs[1] else None
        db = g_rows.sum(axis=0).reshape(shape) if needs[2] else None
        dx = None
        if needs[0]:
            dx = g_rows * weight.reshape(-1) if weight is not None else g_rows.copy()
            along_normalized = np.einsum("ij,ij->i", dx, normalized) / width
            dx -= (_row_sums(dx) / width)[:, None]
            normalized *= along_normalized[:, None]
            dx -= normalized
            dx *= rstd[:, None]
            dx = dx.reshape(x.shape)
        return [dx, dw, db]

    tensors = _is_tensor(g) or _is_tensor(x) or context is None or context.saved is None
    return _shared_gradient(context, index, compute_tensors if tensors else compute_arrays)


LAYER_NORM = Op("layer_norm", _layer_norm_forward, (
    lambda *args, **params: _layer_norm_vjp(*args, **params, index=0),
    lambda *args, **params: _layer_norm_vjp(*args, **params, index=1),
    lambda *args, **params: _layer_norm_vjp(*args, **params, index=2),
))

# --- convolution and pooling -------------------------------------------------------------------

# NCHW throughout, with PyTorch's weight layout (out_channels, in_channels / groups, kh, kw).
# A kernel slides over the padded input; `_window_view` is a strided view of every window (no
# copy), and a convolution is an im2col copy of that view followed by a batched GEMM, done in
# chunks of samples so the im2col workspace stays small. The input gradient needs no im2col:
# one GEMM per kernel offset, added into the strided slice that offset read.
# Convolution is bilinear in (input, weight), so both of its gradients are convolutions too:
#   d input  = conv_transpose2d(G, W)     (conv2d's adjoint in its input)
#   d weight = conv2d_weight_grad(x, G)   (conv2d's adjoint in its weight)
# and the three ops' VJPs are written in terms of one another, so second order is exact.
# Pooling loops over the kh*kw kernel offsets, each step one strided slice of the whole batch:
# for the small kernels pooling uses (2x2, 3x3) that is a few passes over memory, faster than
# reducing a strided window view (measured in bench/models.py's profile).


@dataclass(frozen=True)
class Windows:
    """Where a sliding kernel reads its padded input: the geometry of conv and pooling alike.

    `padding` is ((top, bottom), (left, right)): "same" padding of an even kernel is uneven,
    and ceil_mode pooling pads the far side further.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]

    @staticmethod
    def of(kernel_size: Sequence[int], stride: Sequence[int],
           padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> Windows:
        """From per-axis values, which must cover exactly the two spatial axes."""
        return Windows(_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))

    def output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        return _pair([
            (n + before + after - d * (k - 1) - 1) // s + 1
            for n, k, s, (before, after), d in zip(
                input_size, self.kernel_size, self.stride, self.padding, self.dilation)
        ])

    def padded_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        return _pair([n + b + a for n, (b, a) in zip(input_size, self.padding)])

    def offsets(self, output_size: Sequence[int]):
        """Each kernel offset (i, j) with the strided slice of the padded input it reads."""
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho, wo = output_size
        for i in range(kh):
            for j in range(kw):
                yield (i, j), (Ellipsis, slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
                               slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))


def _pair(values: Sequence[T]) -> tuple[T, T]:
    """A 2-D op's per-axis values (one per spatial axis) as the pair its types promise."""
    first, second = values
    return first, second


def _pad_spatial(x: np.ndarray, padding, value: float = 0.0) -> np.ndarray:
    """x with its last two axes padded by `value` (x itself when there is no padding)."""
    (top, bottom), (left, right) = padding
    if not (top or bottom or left or right):
        return x
    h, w = x.shape[-2:]
    out = np.full(x.shape[:-2] + (top + h + bottom, left + w + right), value, dtype=x.dtype)
    out[..., top:top + h, left:left + w] = x
    return out


def _crop_spatial(xp: np.ndarray, padding, input_size: Sequence[int]) -> np.ndarray:
    """The inverse of _pad_spatial for a gradient: the unpadded region, contiguous."""
    (top, _), (left, _) = padding
    h, w = input_size
    if xp.shape[-2:] == (h, w):
        return xp
    return np.ascontiguousarray(xp[..., top:top + h, left:left + w])


def _window_view(xp: np.ndarray, windows: Windows, output_size) -> np.ndarray:
    """(N, C, kh, kw, Ho, Wo) view of every window of the padded input: strides, no copy."""
    (dh, dw), (sh, sw) = windows.dilation, windows.stride
    s_n, s_c, s_h, s_w = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, xp.shape[:2] + tuple(windows.kernel_size) + tuple(output_size),
        (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw), writeable=False)


# Each kernel below works on blocks of the batch (parallel.run_blocks: blocks fixed by the batch
# size, never by the thread count, so the bits are the same on any number of threads). Within
# a block the im2col workspace is cut into chunks of whole samples of at most this many bytes:
# the same GEMMs, but a buffer that stays in the L2 cache, and a step's peak memory grows by
# one such buffer per running thread, not by the whole im2col matrix (25x the input for a 5x5
# kernel).
_IM2COL_CHUNK_BYTES = 1 << 20


def _run_exact(work, count: int) -> None:
    """run_blocks for work whose every value is computed the same way however the batch is cut
    (elementwise work, one GEMM per sample): on one thread, one block, which spares the
    per-block loops; the bits are the same either way."""
    if thread_count() <= 1:
        work(slice(0, count))
    else:
        run_blocks(work, count)


def _im2col_chunks(x: np.ndarray, windows: Windows, groups: int, output_size, block: slice):
    """Consecutive slices of `block` of the batch, cut evenly, with their columns (n, G,
    C/G * kh * kw, Ho * Wo): each output position's receptive field, in the weight's (C, kh,
    kw) order, copied into one reused workspace (the im2col copy)."""
    count = block.stop - block.start
    rows = x.shape[1] // groups * windows.kernel_size[0] * windows.kernel_size[1]
    positions = output_size[0] * output_size[1]
    bytes_per_sample = groups * rows * positions * x.itemsize
    chunks = builtins.max(1, -(-count * bytes_per_sample // _IM2COL_CHUNK_BYTES))
    step = builtins.max(1, -(-count // chunks))
    workspace = np.empty((builtins.min(step, count), groups, rows, positions), dtype=x.dtype)
    for start in range(block.start, block.stop, step):
        part = slice(start, builtins.min(start + step, block.stop))
        view = _window_view(_pad_spatial(x[part], windows.padding), windows, output_size)
        cols = workspace[:view.shape[0]]
        np.copyto(cols.reshape(view.shape), view)
        yield part, cols


def _conv2d_forward(x, weight, bias=None, *, windows, groups):
    n, out_channels = x.shape[0], weight.shape[0]
    ho, wo = windows.output_size(x.shape[2:])
    kernels = weight.reshape(groups, out_channels // groups, -1)  # (G, O/G, K)
    out = np.empty((n, out_channels, ho, wo), dtype=np.result_type(x, weight))
    out_by_group = out.reshape(n, groups, out_channels // groups, ho * wo)

    def convolve(block: slice) -> None:
        for part, cols in _im2col_chunks(x, windows, groups, (ho, wo), block):
            # y[n, g] = W[g] @ cols[n, g]: a GEMM per (sample, group), written in place.
            np.matmul(kernels, cols, out=out_by_group[part])

    _run_exact(convolve, n)  # one GEMM per sample: the same bits however it is cut
    if bias is not None:
        out += bias.reshape(-1, 1, 1)
    return out


def _conv_transpose2d_forward(g, weight, *, windows, groups, input_size):
    """conv2d's adjoint in its input: each kernel offset (i, j) sends W[:, :, i, j]^T G back
    to the input positions it read, one GEMM per offset over a block of the batch, added into
    a channel-major (C, n, H, W) buffer so that every GEMM output is one contiguous block."""
    n, out_channels, ho, wo = g.shape
    per_group, channels = out_channels // groups, weight.shape[1] * groups
    # (kh, kw, G, C/G, O/G): W[:, :, i, j]^T per group, for each offset.
    kernels = np.ascontiguousarray(
        weight.reshape((groups, per_group) + weight.shape[1:]).transpose(3, 4, 0, 2, 1))
    dtype = np.result_type(g, weight)
    (top, _), (left, _) = windows.padding
    h, w = input_size
    out = np.empty((n, channels, h, w), dtype=dtype)

    def transpose_block(block: slice) -> None:
        count = block.stop - block.start
        # (G, O/G, n * Ho * Wo): the block's samples join the GEMM's long axis.
        g_rows = np.ascontiguousarray(g[block].transpose(1, 0, 2, 3)).reshape(
            groups, per_group, -1)
        dxp = np.zeros((channels, count) + windows.padded_size(input_size), dtype=dtype)
        contribution = np.empty((groups, weight.shape[1], count * ho * wo), dtype=dtype)
        for (i, j), where in windows.offsets((ho, wo)):
            np.matmul(kernels[i, j], g_rows, out=contribution)
            dxp[where] += contribution.reshape(channels, count, ho, wo)  # windows overlap: add
        out[block] = dxp[:, :, top:top + h, left:left + w].transpose(1, 0, 2, 3)

    run_blocks(transpose_block, n)
    return out


def _conv2d_weight_grad_forward(x, g, *, windows, groups):
    """conv2d's adjoint in its weight: dW[g] = sum over samples of G[n, g] @ cols[n, g]^T."""
    n, out_channels, ho, wo = g.shape
    g_cols = g.reshape(n, groups, out_channels // groups, ho * wo)  # (N, G, O/G, P)
    weight_shape = (out_channels, x.shape[1] // groups) + tuple(windows.kernel_size)
    blocks = blocks_of(n)
    # One partial sum per block, added in block order: the same bits on any thread count.
    partial = np.zeros((builtins.max(len(blocks), 1), groups, out_channels // groups,
                        math.prod(weight_shape[1:])), dtype=np.result_type(x, g))
    position = {block.start: index for index, block in enumerate(blocks)}

    def accumulate(block: slice) -> None:
        total = partial[position[block.start]]
        for part, cols in _im2col_chunks(x, windows, groups, (ho, wo), block):
            total += np.matmul(g_cols[part], _swap_last_axes(cols)).sum(axis=0)  # (G, O/G, K)

    run_blocks(accumulate, n)
    return partial.sum(axis=0).reshape(weight_shape)


# Dual helpers: the forward kernels on arrays, the recorded ops on Tensors (second order).

def _conv2d(x, weight, windows, groups):
    if _is_tensor(x) or _is_tensor(weight):
        return apply(CONV2D, x, weight, windows=windows, groups=groups)
    return _conv2d_forward(x, weight, windows=windows, groups=groups)


def _conv_transpose2d(g, weight, windows, groups, input_size):
    input_size = tuple(input_size)
    if _is_tensor(g) or _is_tensor(weight):
        return apply(CONV_TRANSPOSE2D, g, weight, windows=windows, groups=groups,
                     input_size=input_size)
    return _conv_transpose2d_forward(g, weight, windows=windows, groups=groups,
                                     input_size=input_size)


def _conv2d_weight_grad(x, g, windows, groups):
    if _is_tensor(x) or _is_tensor(g):
        return apply(CONV2D_WEIGHT_GRAD, x, g, windows=windows, groups=groups)
    return _conv2d_weight_grad_forward(x, g, windows=windows, groups=groups)


CONV2D = Op("conv2d", _conv2d_forward, (
    # y = conv(x, W) + b  =>  dx = conv_transpose(G, W)
    lambda g, ans, x, weight, bias=None, *, windows, groups:
        _conv_transpose2d(g, weight, windows, groups, x.shape[2:]),
    # dW = weight_grad(x, G): G against each window of x, summed over samples and positions
    lambda g, ans, x, weight, bias=None, *, windows, groups:
        _conv2d_weight_grad(x, g, windows, groups),
    # db = G summed over samples and positions
    lambda g, ans, x, weight, bias=None, *, windows, groups: g.sum(axis=(0, 2, 3)),
))

CONV_TRANSPOSE2D = Op("conv_transpose2d", _conv_transpose2d_forward, (
    # <conv_transpose(G, W), V> = <G, conv(V, W)>  =>  dG = conv(V, W), dW = weight_grad(V, G)
    lambda v, ans, g, weight, *, windows, groups, input_size: _conv2d(v, weight, windows, groups),
    lambda v, ans, g, weight, *, windows, groups, input_size:
        _conv2d_weight_grad(v, g, windows, groups),
))

CONV2D_WEIGHT_GRAD = Op("conv2d_weight_grad", _conv2d_weight_grad_forward, (
    # <weight_grad(x, G), V> = <conv(x, V), G>  =>  dx = conv_transpose(G, V), dG = conv(x, V)
    lambda v, ans, x, g, *, windows, groups: _conv_transpose2d(g, v, windows, groups, x.shape[2:]),
    lambda v, ans, x, g, *, windows, groups: _conv2d(x, v, windows, groups),
))


def _max_pool2d_forward(x, *, windows):
    n, channels = x.shape[:2]
    out = np.empty((n, channels) + windows.output_size(x.shape[2:]), dtype=x.dtype)

    def pool(block: slice) -> None:
        xp = _pad_spatial(x[block], windows.padding, -np.inf)  # padding never wins a max
        target = out[block]
        for index, (_, where) in enumerate(windows.offsets(out.shape[2:])):
            if index == 0:
                np.copyto(target, xp[where])
            else:
                np.maximum(target, xp[where], out=target)

    _run_exact(pool, n)
    return out


def _max_pool2d_winners(x: np.ndarray, ans: np.ndarray, windows: Windows):
    """For each kernel offset, where it holds its window's maximum and no earlier offset did
    (the first maximum in scan order takes the gradient, as in torch)."""
    xp = _pad_spatial(x, windows.padding, -np.inf)
    unclaimed = np.ones(ans.shape, dtype=bool)
    for offset, where in windows.offsets(ans.shape[2:]):
        hit = xp[where] == ans
        hit &= unclaimed
        unclaimed ^= hit
        yield offset, where, hit


def _max_pool2d_backward(g, x, ans, windows):
    dx = np.zeros(x.shape, dtype=g.dtype)
    padded = windows.padding != ((0, 0), (0, 0))
    # Windows that do not overlap (stride >= kernel reach, the usual 2x2/2) give each input at
    # most one gradient, written in place with no temporary; overlapping windows add.
    overlapping = builtins.any(s < d * (k - 1) + 1 for k, s, d in zip(
        windows.kernel_size, windows.stride, windows.dilation))

    def scatter(block: slice) -> None:
        shape = (block.stop - block.start, x.shape[1]) + windows.padded_size(x.shape[2:])
        dxp = np.zeros(shape, dtype=g.dtype) if padded else dx[block]
        for _, where, hit in _max_pool2d_winners(x[block], ans[block], windows):
            if overlapping:
                dxp[where] += g[block] * hit
            else:
                np.multiply(g[block], hit, out=dxp[where])
        if padded:
            dx[block] = _crop_spatial(dxp, windows.padding, x.shape[2:])

    _run_exact(scatter, x.shape[0])
    return dx


def _max_pool2d_argmax_index(x, ans, windows):
    """Index arrays (n, c, row, col) of each output's maximum in the unpadded input."""
    n, c, ho, wo = ans.shape
    (sh, sw), (dh, dw), ((top, _), (left, _)) = windows.stride, windows.dilation, windows.padding
    rows = np.zeros(ans.shape, dtype=np.intp)
    cols = np.zeros(ans.shape, dtype=np.intp)
    for (i, j), _, hit in _max_pool2d_winners(x, ans, windows):
        rows[hit] = i * dh - top
        cols[hit] = j * dw - left
    rows += (np.arange(ho) * sh).reshape(-1, 1)
    cols += np.arange(wo) * sw
    return (np.arange(n).reshape(-1, 1, 1, 1), np.arange(c).reshape(-1, 1, 1), rows, cols)


def _max_pool2d_vjp(g, ans, x, *, windows):
    # The gradient goes to each window's maximum; overlapping windows add.
    if _is_tensor(g):  # second order: a scatter the op table can differentiate
        index = _max_pool2d_argmax_index(_mask(x), _mask(ans), windows)
        return scatter_add(g, index, x.shape)
    return _max_pool2d_backward(g, x, ans, windows)


MAX_POOL2D = Op("max_pool2d", _max_pool2d_forward, (_max_pool2d_vjp,))


def _avg_pool2d_forward(x, *, windows, divisor):
    xp = _pad_spatial(x, windows.padding)
    out = None
    for _, where in windows.offsets(windows.output_size(x.shape[2:])):
        if out is None:
            out = xp[where].copy()
        else:
            out += xp[where]
    out /= divisor
    return out


def _avg_pool2d_backward_forward(g, *, windows, divisor, input_size):
    """avg_pool2d's adjoint: each output's gradient, divided, spread over its window."""
    share = np.divide(g, divisor, dtype=g.dtype)
    dxp = np.zeros(g.shape[:2] + windows.padded_size(input_size), dtype=g.dtype)
    for _, where in windows.offsets(g.shape[2:]):
        dxp[where] += share
    return _crop_spatial(dxp, windows.padding, input_size)


def _avg_pool2d(x, windows, divisor):
    if _is_tensor(x):
        return apply(AVG_POOL2D, x, windows=windows, divisor=divisor)
    return _avg_pool2d_forward(x, windows=windows, divisor=divisor)


def _avg_pool2d_backward(g, windows, divisor, input_size):
    input_size = tuple(input_size)
    if _is_tensor(g):
        return apply(AVG_POOL2D_BACKWARD, g, windows=windows, divisor=divisor,
                     input_size=input_size)
    return _avg_pool2d_backward_forward(g, windows=windows, divisor=divisor,
                                        input_size=input_size)


# Average pooling is linear, and so is its adjoint; each one's VJP is the other.
AVG_POOL2D = Op("avg_pool2d", _avg_pool2d_forward, (
    lambda g, ans, x, *, windows, divisor: _avg_pool2d_backward(g, windows, divisor, x.shape[2:]),
))
AVG_POOL2D_BACKWARD = Op("avg_pool2d_backward", _avg_pool2d_backward_forward, (
    lambda v, ans, g, *, windows, divisor, input_size: _avg_pool2d(v, windows, divisor),
))

# --- non-differentiable functions given a surrogate gradient -------------------------------

# The straight-through estimator (Bengio et al., 2013): the forward applies a step function
# (round, sign, quantise), whose true derivative is zero almost everywhere; the backward
# pretends it was the identity so that training can pass through it.
STRAIGHT_THROUGH = Op("straight_through", lambda x, fn: fn(x), (lambda g, ans, x, fn: g,))

# --- feedback alignment (Lillicrap et al., 2016) -------------------------------------------

# A linear layer whose backward sends the error to its input through a fixed random matrix B
# (W's shape, never trained) instead of W^T: no weight transport, the article's biologically
# plausible alternative. The weight and bias gradients are backprop's, from the error the layer
# is sent; the forward weights come to align with B, so B's error signal becomes useful.


def _feedback_linear_vjp_x(g, ans, x, weight, bias=None, feedback=None):
    return g @ feedback  # dx = G B, where backprop would use G W


def _feedback_linear_vjp_weight(g, ans, x, weight, bias=None, feedback=None):
    return _linear_vjp_weight(g, ans, x, weight)  # dW = G^T x, as backprop


def _feedback_linear_vjp_bias(g, ans, x, weight, bias=None, feedback=None):
    return _linear_vjp_bias(g, ans, x, weight)


FEEDBACK_LINEAR = Op(
    "feedback_linear",
    lambda x, weight, bias=None, feedback=None: _linear_forward(x, weight, bias),
    (_feedback_linear_vjp_x, _feedback_linear_vjp_weight, _feedback_linear_vjp_bias),
)

# --- recording the gradient at a layer's output (K-FAC's curvature statistics) -------------

# The identity, whose backward hands the gradient arriving at its input to `record` and passes
# it on unchanged. nn.capture puts it after a Linear or Conv2d output while K-FAC collects the
# statistics of its output-gradient factor G = E[g g^T].


def _record_grad_vjp(g, ans, x, record):
    record(_mask(g))  # the values only: a create_graph gradient is recorded as its data
    return g


RECORD_GRAD = Op("record_grad", lambda x, record: x, (_record_grad_vjp,))

# --- the public functions --------------------------------------------------------------------

Operand = Tensor | np.ndarray | float | int


def add(x: Operand, y: Operand) -> Tensor:
    return apply(ADD, x, y)


def sub(x: Operand, y: Operand) -> Tensor:
    return apply(SUB, x, y)


def mul(x: Operand, y: Operand) -> Tensor:
    return apply(MUL, x, y)


def div(x: Operand, y: Operand) -> Tensor:
    return apply(DIV, x, y)


def power(x: Operand, y: Operand) -> Tensor:
    return apply(POWER, x, y)


def neg(x: Tensor) -> Tensor:
    return apply(NEG, x)


def maximum(x: Operand, y: Operand) -> Tensor:
    return apply(MAXIMUM, x, y)


def matmul(a: Operand, b: Operand) -> Tensor:
    a_shape, b_shape = np.shape(_mask(a)), np.shape(_mask(b))
    aligned = bool(a_shape) and bool(b_shape) and (
        a_shape[-1] == b_shape[-2 if len(b_shape) > 1 else 0])
    if aligned:
        try:
            np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
        except ValueError:
            aligned = False
    if not aligned:
        raise ValueError(f"matmul: shapes {a_shape} and {b_shape} do not align")
    return apply(MATMUL, a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b, with PyTorch's weight layout (out_features, in_features)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features (shape {x.shape}) but the weight expects "
            f"{weight.shape[1]} (weight shape {weight.shape})"
        )
    return apply(LINEAR, x, weight, bias)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - NumPy's name
    return apply(SUM, x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    return apply(MEAN, x, axis=axis, keepdims=keepdims)


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return apply(MAX, x, axis=axis, keepdims=keepdims)


def var(x: Tensor, axis=None, keepdims: bool = False, correction: int = 0) -> Tensor:
    """Variance; correction=0 is the biased estimate the norm layers use."""
    centered = x - mean(x, axis, keepdims=True)
    count = _reduced_count(x.shape, axis) - correction
    return sum(centered * centered, axis, keepdims) / count


def broadcast_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    return apply(BROADCAST_TO, x, shape=tuple(shape))


def reshape(x: Tensor, shape: Any) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    known = math.prod(n for n in shape if n != -1)
    fits = x.size % known == 0 if -1 in shape and known else known == x.size
    if not fits or shape.count(-1) > 1:
        raise ValueError(f"reshape: cannot reshape {x.shape} ({x.size} values) into {shape}")
    return apply(RESHAPE, x, shape=shape)


def transpose(x: Tensor, axes: Sequence[int] | None = None) -> Tensor:
    return apply(TRANSPOSE, x, axes=None if axes is None else tuple(axes))


def getitem(x: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    elif isinstance(index, list):
        index = np.asarray(index)
    return apply(GETITEM, x, index=index)


def scatter_add(g: Tensor, index: Any, shape: Sequence[int]) -> Tensor:
    return apply(SCATTER_ADD, g, index=index, shape=tuple(shape))


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    _check_same_shapes("concatenate", tensors, skip_axis=axis)
    return apply(CONCATENATE, list(tensors), axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    _check_same_shapes("stack", tensors, skip_axis=None)
    return apply(STACK, list(tensors), axis=axis)


def _check_same_shapes(name: str, tensors: Sequence[Any], skip_axis: int | None) -> None:
    shapes = [np.shape(_mask(t)) for t in tensors]
    if not shapes:
        raise ValueError(f"{name}: needs at least one tensor")
    first = shapes[0]
    for shape in shapes[1:]:
        same = len(shape) == len(first) and all(
            a == b for i, (a, b) in enumerate(zip(shape, first))
            if skip_axis is None or i != skip_axis % len(first)
        )
        if not same:
            raise ValueError(f"{name}: shapes {first} and {shape} do not match")


def cast(x: Tensor, dtype: Any) -> Tensor:
    return apply(CAST, x, dtype=np.dtype(dtype))


def exp(x: Tensor) -> Tensor:
    return apply(EXP, x)


def log(x: Tensor) -> Tensor:
    return apply(LOG, x)


def log1p(x: Tensor) -> Tensor:
    return apply(LOG1P, x)


def sqrt(x: Tensor) -> Tensor:
    return apply(SQRT, x)


def abs(x: Tensor) -> Tensor:  # noqa: A001
    return apply(ABS, x)


def clip(x: Tensor, min: float | None = None, max: float | None = None) -> Tensor:  # noqa: A002
    return apply(CLIP, x, lo=min, hi=max)


def where(condition: Any, x: Operand, y: Operand) -> Tensor:
    return apply(WHERE, np.asarray(_mask(condition), dtype=bool), x, y)


def tanh(x: Tensor) -> Tensor:
    return apply(TANH, x)


def sigmoid(x: Tensor) -> Tensor:
    return apply(SIGMOID, x)


def relu(x: Tensor) -> Tensor:
    return apply(RELU, x)


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    return apply(LEAKY_RELU, x, negative_slope=negative_slope)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return apply(GELU, x, approximate=approximate)


def normal_cdf(x: Tensor) -> Tensor:
    return apply(NORMAL_CDF, x)


def silu(x: Tensor) -> Tensor:
    return apply(SILU, x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return apply(SOFTMAX, x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return apply(LOG_SOFTMAX, x, axis=axis)


def layer_norm(x: Tensor, normalized_ndim: int = 1, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise x over its last `normalized_ndim` axes, then scale by weight and shift by bias
    (each None or of shape x.shape[-normalized_ndim:]); one op, as torch's layer_norm."""
    if not 1 <= normalized_ndim <= x.ndim:
        raise ValueError(f"layer_norm: cannot normalise the last {normalized_ndim} axes of an "
                         f"input of shape {x.shape}")
    normalized_shape = x.shape[x.ndim - normalized_ndim:]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != normalized_shape:
            raise ValueError(f"layer_norm: {name} has shape {p.shape}, the normalised axes "
                             f"{normalized_shape}")
    axes = tuple(range(-normalized_ndim, 0))
    return apply(LAYER_NORM, x, weight, bias, axes=axes, eps=float(eps),
                 context=_OpContext(x, weight, bias))


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """relu(x W^T + b) as one op, which keeps its output but not the pre-activation."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_relu: input has {x.shape[-1]} features (shape {x.shape}) but the weight "
            f"expects {weight.shape[1]} (weight shape {weight.shape})"
        )
    return apply(LINEAR_RELU, x, weight, bias, context=_OpContext(x, weight, bias))


def attention_weights(query: Tensor, key: Tensor, mask: Any = None,
                      scale: float | None = None) -> Tensor:
    """softmax(scale q k^T + mask) over the keys: query (..., L, E), key (..., S, E) ->
    (..., L, S). `mask` is an additive constant broadcastable to (..., L, S) (-inf: may not
    look); scale defaults to 1/sqrt(E). A row with every key masked gets weights 0."""
    if query.ndim < 2 or key.ndim < 2 or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"attention_weights: query (..., L, E) and key (..., S, E) must share E, got "
            f"shapes {query.shape} and {key.shape}"
        )
    mask = _attention_mask(mask, np.result_type(query.dtype, key.dtype), "attention_weights")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return apply(ATTENTION_WEIGHTS, query, key, mask=mask, scale=scale,
                 context=_OpContext(query, key))


def self_attention(qkv: Tensor, num_heads: int, mask: Any = None,
                   scale: float | None = None, causal: bool = False) -> Tensor:
    """Multi-head self-attention from packed projections: qkv (B, L, 3E) holds [q | k | v],
    each split into num_heads heads; returns (B, L, E), the heads side by side. `mask` is
    additive, broadcastable to (B, num_heads, L, L); causal=True also masks every key after
    its query (and skips computing those scores); scale defaults to 1/sqrt(E / num_heads).
    One op that keeps no attention weights (they are recomputed in backward)."""
    if qkv.ndim != 3 or num_heads <= 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"self_attention: qkv must be (batch, L, 3 * num_heads * head_dim) "
                         f"with num_heads={num_heads}, got shape {qkv.shape}")
    mask = _attention_mask(mask, qkv.dtype, "self_attention")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return apply(SELF_ATTENTION, qkv, num_heads=num_heads, mask=mask, scale=scale,
                 causal=bool(causal), context=_OpContext(qkv))


def _attention_mask(mask: Any, dtype: Any, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(_mask(mask))
    if mask.dtype.kind != "f":
        raise ValueError(f"{name}: mask must be additive floats, got {mask.dtype}")
    return mask.astype(dtype, copy=False)


def cross_entropy(
    logits: Tensor, target: Any, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """Softmax cross-entropy from raw scores and integer class targets, numerically stable."""
    target = np.asarray(_mask(target))
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got {logits.shape}")
    if target.shape != (logits.shape[0],) or target.dtype.kind not in "iu":
        raise ValueError(
            f"cross_entropy: target must be integer class indices of shape ({logits.shape[0]},), "
            f"got {target.dtype} {target.shape}"
        )
    if target.size and (target.min() < 0 or target.max() >= logits.shape[1]):
        raise ValueError(
            f"cross_entropy: target classes must lie in [0, {logits.shape[1]}), "
            f"got {target.min()}..{target.max()}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be mean, sum or none, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    return apply(CROSS_ENTROPY, logits, target, reduction=reduction,
                 label_smoothing=label_smoothing)


def straight_through(x: Tensor, fn: Any = np.round) -> Tensor:
    """fn(x) forward (any NumPy function of one array), identity gradient backward."""
    return apply(STRAIGHT_THROUGH, x, fn=fn)


def feedback_linear(x: Tensor, weight: Tensor, bias: Tensor | None, feedback: np.ndarray) -> Tensor:
    """y = x W^T + b, whose backward sends the error to x through `feedback` (B, W's shape,
    a constant) instead of W: dx = G B; dW and db are backprop's (feedback alignment)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"feedback_linear: input has {x.shape[-1]} features (shape {x.shape}) but the weight "
            f"expects {weight.shape[1]} (weight shape {weight.shape})"
        )
    feedback = np.asarray(_mask(feedback))
    if feedback.shape != weight.shape:
        raise ValueError(f"feedback_linear: feedback matrix has shape {feedback.shape}, "
                         f"the weight {weight.shape}; they must be equal")
    feedback = feedback.astype(weight.dtype, copy=False)
    return apply(FEEDBACK_LINEAR, x, weight, bias, feedback=feedback)


def record_grad(x: Tensor, record: Any) -> Tensor:
    """x unchanged; in backward, `record(g)` receives the gradient arriving at x."""
    return apply(RECORD_GRAD, x, record=record)


# Convolution and pooling (their ops are in the section of that name above).


def _ints(value: Any, count: int, name: str, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of `count` ints (torch's `int | tuple` arguments), checked."""
    items = (value,) * count if isinstance(value, (int, np.integer)) else value
    valid = (isinstance(items, (tuple, list)) and len(items) == count
             and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items))
    if not valid:
        raise ValueError(f"{name} must be an int or {count} ints, got {value!r}")
    if builtins.min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def _conv_padding(padding: Any, kernel: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...], name: str) -> tuple[tuple[int, int], ...]:
    """(before, after) per spatial axis from an int, ints, "valid" or "same"."""
    if isinstance(padding, str):
        if padding == "valid":
            return tuple((0, 0) for _ in kernel)
        if padding != "same":
            raise ValueError(f"{name}: padding must be an int, ints, 'valid' or 'same', "
                             f"got {padding!r}")
        if builtins.max(stride) != 1:
            raise ValueError(f"{name}: padding='same' is not supported for strided "
                             f"convolutions (stride {stride}), as in torch")
        # Total d (k - 1); an odd total puts the extra row or column after, as torch does.
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _ints(padding, len(kernel), f"{name}: padding", 0))


def _convolution(name: str, input: Tensor, weight: Tensor, bias: Tensor | None, stride: Any,
                 padding: Any, dilation: Any, groups: int, spatial: int) -> Tensor:
    """conv1d and conv2d: checks, then the conv2d op (a 1-D input is an image of height 1)."""
    if weight.ndim != spatial + 2:
        raise ValueError(f"{name}: weight must be (out_channels, in_channels / groups, "
                         f"{'kw' if spatial == 1 else 'kh, kw'}), got shape {weight.shape}")
    if input.ndim not in (spatial + 1, spatial + 2):
        layout = "(N, C, L) or (C, L)" if spatial == 1 else "(N, C, H, W) or (C, H, W)"
        raise ValueError(f"{name}: input must be {layout}, got shape {input.shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"{name}: groups must be a positive int, got {groups!r}")
    unbatched = input.ndim == spatial + 1
    x = reshape(input, (1,) + input.shape) if unbatched else input
    out_channels, channels = weight.shape[0], x.shape[1]
    if out_channels % groups or channels != weight.shape[1] * groups:
        raise ValueError(
            f"{name}: input has {channels} channels and the weight {weight.shape} expects "
            f"{weight.shape[1]} per group x {groups} groups = {weight.shape[1] * groups}, with "
            f"out_channels {out_channels} divisible by groups"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"{name}: bias must have shape ({out_channels},), got {bias.shape}")
    kernel = tuple(weight.shape[2:])
    stride = _ints(stride, spatial, f"{name}: stride", 1)
    dilation = _ints(dilation, spatial, f"{name}: dilation", 1)
    pads = _conv_padding(padding, kernel, stride, dilation, name)
    if spatial == 1:  # (N, C, L) as (N, C, 1, L): the conv2d op with a kernel of height 1
        x = reshape(x, x.shape[:2] + (1,) + x.shape[2:])
        weight = reshape(weight, weight.shape[:2] + (1,) + weight.shape[2:])
        kernel, stride, dilation, pads = (1,) + kernel, (1,) + stride, (1,) + dilation, (
            (0, 0),) + pads
    windows = Windows.of(kernel, stride, pads, dilation)
    output_size = windows.output_size(x.shape[2:])
    if builtins.min(output_size) < 1:
        reach = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        raise ValueError(
            f"{name}: the input's spatial size {x.shape[2 + 2 - spatial:]} padded by "
            f"{pads[2 - spatial:]} is smaller than the kernel's reach {reach[2 - spatial:]} "
            f"(kernel {kernel[2 - spatial:]}, dilation {dilation[2 - spatial:]})"
        )
    out = apply(CONV2D, x, weight, bias, windows=windows, groups=int(groups))
    if spatial == 1:
        out = reshape(out, out.shape[:2] + out.shape[3:])
    return reshape(out, out.shape[1:]) if unbatched else out


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """2-D convolution (cross-correlation, as torch.nn.functional.conv2d) of NCHW input.

    input (N, C, H, W) or unbatched (C, H, W); weight (O, C / groups, kh, kw); bias (O,).
    padding: an int, a pair, "valid" (none) or "same" (output size = input size, stride 1
    only; an uneven total puts the extra row or column at the bottom or right, as torch does).
    """
    return _convolution("conv2d", input, weight, bias, stride, padding, dilation, groups, 2)


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """1-D convolution of (N, C, L) or (C, L) input; weight (O, C / groups, k). As conv2d."""
    return _convolution("conv1d", input, weight, bias, stride, padding, dilation, groups, 1)


def _pool_windows(name: str, input: Tensor, kernel_size: Any, stride: Any, padding: Any,
                  dilation: Any, ceil_mode: bool) -> Windows:
    if input.ndim not in (3, 4):
        raise ValueError(f"{name}: input must be (N, C, H, W) or (C, H, W), got {input.shape}")
    kernel = _ints(kernel_size, 2, f"{name}: kernel_size", 1)
    # torch: stride defaults to the kernel size (None, or an empty list in old code).
    stride = kernel if stride is None or stride == [] else _ints(stride, 2, f"{name}: stride", 1)
    pad = _ints(padding, 2, f"{name}: padding", 0)
    dilation = _ints(dilation, 2, f"{name}: dilation", 1)
    if builtins.any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ValueError(f"{name}: padding {pad} must be at most half the kernel size {kernel}")
    pads, output_size = [], []
    for n, k, s, p, d in zip(input.shape[-2:], kernel, stride, pad, dilation):
        reach = d * (k - 1) + 1
        # torch's pooling_output_shape: ceil_mode rounds up, but the last window must start
        # inside the input or its left padding.
        out = (n + 2 * p - reach + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= n + p:
            out -= 1
        if out < 1:
            raise ValueError(
                f"{name}: input {input.shape} is too small for kernel {kernel} with padding "
                f"{pad} and dilation {dilation}"
            )
        output_size.append(out)
        pads.append((p, builtins.max(p, (out - 1) * s + reach - n - p)))  # ceil_mode: further
    return Windows.of(kernel, stride, pads, dilation)


def _batched(input: Tensor) -> Tensor:
    return reshape(input, (1,) + input.shape) if input.ndim == 3 else input


def _unbatched_like(out: Tensor, input: Tensor) -> Tensor:
    return reshape(out, out.shape[1:]) if input.ndim == 3 else out


def max_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Tensor:
    """The maximum of each window, as torch.nn.functional.max_pool2d (padding is -inf; the
    gradient goes to the first maximum of each window). return_indices is not supported."""
    if return_indices:
        raise ValueError("max_pool2d: return_indices=True is not supported")
    windows = _pool_windows("max_pool2d", input, kernel_size, stride, padding, dilation,
                            ceil_mode)
    return _unbatched_like(apply(MAX_POOL2D, _batched(input), windows=windows), input)


def avg_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """The mean of each window, as torch.nn.functional.avg_pool2d: zero padding, counted in
    the divisor when count_include_pad (torch's default)."""
    if divisor_override is not None and (
            isinstance(divisor_override, bool) or not isinstance(divisor_override, int)
            or divisor_override < 1):
        raise ValueError(f"avg_pool2d: divisor_override must be a positive int, "
                         f"got {divisor_override!r}")
    windows = _pool_windows("avg_pool2d", input, kernel_size, stride, padding, 1, ceil_mode)
    divisor = _avg_pool2d_divisor(windows, input.shape[-2:], padding, count_include_pad,
                                  divisor_override)
    return _unbatched_like(apply(AVG_POOL2D, _batched(input), windows=windows, divisor=divisor),
                           input)


def _avg_pool2d_divisor(windows: Windows, input_size: Sequence[int], padding: Any,
                        count_include_pad: bool, divisor_override: int | None):
    """Each window's divisor, as torch's avg_pool2d counts it: the window clipped to the padded
    input (count_include_pad) or to the input itself. A scalar when they are all equal."""
    if divisor_override is not None:
        return float(divisor_override)
    pad = _ints(padding, 2, "avg_pool2d: padding", 0)
    counts = []
    for n, k, s, p, o in zip(input_size, windows.kernel_size, windows.stride, pad,
                             windows.output_size(input_size)):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, n)
        counts.append(end - start)
    divisor = np.outer(counts[0], counts[1]).astype(np.float64)
    return float(divisor.flat[0]) if (divisor == divisor.flat[0]).all() else divisor



def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                     padding: Any = 0, output_padding: Any = 0, groups: int = 1,
                     dilation: Any = 1) -> Tensor:
    """The adjoint of conv2d in its input, as torch.nn.functional.conv_transpose2d.

    input (N, C_in, H, W); weight (C_in, C_out / groups, kh, kw), conv2d's weight read the
    other way; output size (H - 1) s - 2 p + d (kh - 1) + output_padding + 1 per axis.
    """
    if input.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"conv_transpose2d: input (N, C, H, W) and weight (C_in, C_out / "
                         f"groups, kh, kw), got shapes {input.shape} and {weight.shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"conv_transpose2d: groups must be a positive int, got {groups!r}")
    if input.shape[1] != weight.shape[0] or weight.shape[0] % groups:
        raise ValueError(f"conv_transpose2d: input has {input.shape[1]} channels, the weight "
                         f"{weight.shape} expects {weight.shape[0]} (divisible by groups {groups})")
    kernel = tuple(weight.shape[2:])
    stride = _ints(stride, 2, "conv_transpose2d: stride", 1)
    dilation = _ints(dilation, 2, "conv_transpose2d: dilation", 1)
    pad = _ints(padding, 2, "conv_transpose2d: padding", 0)
    extra = _ints(output_padding, 2, "conv_transpose2d: output_padding", 0)
    if builtins.any(e >= s for e, s in zip(extra, stride)):
        # torch also allows output_padding < dilation; here the output must be an input
        # conv2d maps back onto this input's size, so it must stay below the stride.
        raise ValueError(f"conv_transpose2d: output_padding {extra} must be smaller than "
                         f"the stride {stride}")
    input_size = tuple((n - 1) * s - 2 * p + d * (k - 1) + e + 1
                       for n, s, p, d, k, e in zip(input.shape[2:], stride, pad, dilation,
                                                   kernel, extra))
    if builtins.min(input_size) < 1:
        raise ValueError(f"conv_transpose2d: the output size {input_size} is not positive")
    windows = Windows.of(kernel, stride, [(p, p) for p in pad], dilation)
    out = apply(CONV_TRANSPOSE2D, input, weight, windows=windows, groups=int(groups),
                input_size=input_size)
    return out if bias is None else out + reshape(bias, (-1, 1, 1))


# Every op, by name: the table the gradient tests walk.
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        ADD, SUB, MUL, DIV, POWER, NEG, MAXIMUM, MATMUL, LINEAR, SUM, MEAN, MAX, BROADCAST_TO,
        RESHAPE, TRANSPOSE, GETITEM, SCATTER_ADD, CONCATENATE, STACK, CAST, EXP, LOG, LOG1P,
        SQRT, ABS, CLIP, WHERE, TANH, SIGMOID, RELU, LEAKY_RELU, SILU, NORMAL_CDF, GELU, SOFTMAX,
        LOG_SOFTMAX, CROSS_ENTROPY, STRAIGHT_THROUGH,
        FEEDBACK_LINEAR, RECORD_GRAD,
        ATTENTION_WEIGHTS, SELF_ATTENTION, LINEAR_RELU, LAYER_NORM,
        CONV2D, CONV_TRANSPOSE2D, CONV2D_WEIGHT_GRAD, MAX_POOL2D, AVG_POOL2D, AVG_POOL2D_BACKWARD,
    )
}
