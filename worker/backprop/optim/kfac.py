"""How K-FAC preconditions a layer's gradient: Kronecker factors, damping, inverses, on flat slices.

K-FAC (Martens & Grosse, 2015; Grosse & Martens, 2016 for convolutions) approximates the
Fisher block of one layer s = W a by a Kronecker product of two small matrices. With `a` the
layer's input (a 1 appended when it has a bias, so W = [weight | bias]) and Ds the gradient of
ONE example's loss with respect to the layer's output s,

    F = E[vec(DW) vec(DW)^T]  ~  G (x) A,      A = E[a a^T],   G = E[Ds Ds^T].

The flat parameter vector stores W row by row, and for that flattening
(G (x) A) vec(M) = vec(G M A); so the natural-gradient direction F^-1 vec(dW) is the product of
small matrices G^-1 dW A^-1, never the (out*in)^2 matrix F.

Positions (convolutions, Grosse & Martens 2016; a Linear applied to a sequence): a layer used at
T positions per example has DW = sum_t Ds_t a_t^T. Assuming position-independent, spatially
uncorrelated statistics gives A = E[sum_t a_t a_t^T] and G = E[(1/T) sum_t Ds_t Ds_t^T], which
reduces to the formulas above when T = 1. For a convolution, a_t is the input patch seen by
output pixel t, flattened in the weight's (in_channels, kh, kw) order.

The core is split into the two halves a distributed runtime needs:

1. On a worker, per micro-batch: `factor_statistics(layer, calls, grad_scale)` turns what a
   capture recorded (nn.capture) into SUMS: A_sum = sum a a^T, G_sum = sum (Ds Ds^T) / T and
   the number of examples. Sums add, so they are reduced over micro-batches in the same fixed
   tree as gradients (`add_statistics`, or `pack_statistics` into one float64 vector and
   `unpack_statistics` back), which keeps the same-bits-for-any-worker-count guarantee; an
   empty micro-batch contributes `empty_statistics(layer)`.
2. On the owner of a layer's slice of the flat parameter vector (a parameter-server shard that
   holds whole layers: K-FAC is not elementwise): `update_factors` (running average of
   A = A_sum / count, G = G_sum / count), `invert_factors` (damping) every
   `inverse_update_interval` steps, then `precondition(grad_slice, layer, inverse)` on the
   layer's [weight, bias] slice, `kl_clip_coefficient` over all layers, and the SGD-with-momentum
   rule of functional.py on the result.

Damping (Tikhonov, F + lambda I), two methods:
- "eigen" (default): the exact inverse of G (x) A + lambda I, from eigendecompositions of A and
  G: Q_G [(Q_G^T dW Q_A) / (d_G d_A^T + lambda)] Q_A^T (as in George et al. 2018 and the
  KFAC-PyTorch reference implementation).
- "factored": damping split between the factors with Martens & Grosse's pi correction,
  (A + pi sqrt(lambda) I)^-1 and (G + sqrt(lambda)/pi I)^-1, pi = sqrt((tr A / dim A) /
  (tr G / dim G)); an approximation of (G (x) A + lambda I)^-1 that needs two small inverses.

G is the empirical Fisher's: Ds comes from the training loss's own gradient (no sampled
targets), scaled by `grad_scale` to undo the loss's averaging over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .functional import SGDHyper, _require

DAMPING_METHODS = ("eigen", "factored")
LAYER_KINDS = ("linear", "conv2d")


# --- hyperparameters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KFACHyper:
    lr: float = 0.1
    momentum: float = 0.9  # on the preconditioned direction, PyTorch's SGD rule
    damping: float = 1e-2  # lambda of F + lambda I
    factor_decay: float = 0.95  # running average: F <- decay F + (1 - decay) F_new
    factor_update_interval: int = 1  # capture statistics every this many steps
    # Recompute the damped inverses every this many steps; 1 suits layers of a few hundred
    # units (on digits, 5 took 2-3x the steps); raise it when eigendecompositions dominate.
    inverse_update_interval: int = 1
    weight_decay: float = 0.0  # L2, added to the preconditioned direction (SGD's weight_decay)
    kl_clip: float | None = None  # None: no clipping; else nu = min(1, sqrt(kl_clip / (lr^2 v.g)))
    damping_method: str = "eigen"

    def __post_init__(self) -> None:
        for field in ("lr", "momentum", "weight_decay"):
            value = getattr(self, field)
            _require(0.0 <= value, self, field, value, ">= 0")
        _require(0.0 < self.damping, self, "damping", self.damping, "> 0")
        _require(0.0 <= self.factor_decay < 1.0, self, "factor_decay", self.factor_decay,
                 "in [0, 1)")
        for field in ("factor_update_interval", "inverse_update_interval"):
            value = getattr(self, field)
            ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                  and bool(value >= 1))
            _require(ok, self, field, value, "an integer >= 1")
        kl_clip = self.kl_clip
        _require(kl_clip is None or 0.0 < kl_clip, self, "kl_clip", kl_clip, "None or > 0")
        _require(self.damping_method in DAMPING_METHODS, self, "damping_method",
                 self.damping_method, f"one of {DAMPING_METHODS}")

    def base_rule(self) -> SGDHyper:
        """The SGD-with-momentum rule applied to preconditioned (and non-K-FAC) gradients."""
        return SGDHyper(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def updates_factors_at(step: int, hyper: KFACHyper) -> bool:
    """Whether step `step` (0-based) captures statistics and updates the running factors."""
    return step % hyper.factor_update_interval == 0


def updates_inverses_at(step: int, hyper: KFACHyper) -> bool:
    """Whether step `step` (0-based) recomputes the damped inverses (step 0 always does)."""
    return step % hyper.inverse_update_interval == 0


# --- which layers, and where their parameters are ------------------------------------------------


@dataclass(frozen=True)
class KFACLayer:
    """What the core knows of one layer: its weight shape and, for a convolution, its geometry.

    The layer's slice of the flat parameter vector is [weight.reshape(-1), bias], in that
    order (named_parameters order: weight then bias), `size` elements long.
    """

    name: str
    kind: str  # "linear" or "conv2d" (groups=1)
    weight_shape: tuple[int, ...]
    has_bias: bool
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))  # (top, bottom), (l, r)
    dilation: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"KFACLayer {self.name!r}: kind must be one of {LAYER_KINDS}, "
                             f"got {self.kind!r}")
        expected = 2 if self.kind == "linear" else 4
        if len(self.weight_shape) != expected:
            raise ValueError(f"KFACLayer {self.name!r}: a {self.kind} weight has {expected} "
                             f"axes, got shape {self.weight_shape}")

    @property
    def out_dim(self) -> int:
        """G's side: output features or channels."""
        return self.weight_shape[0]

    @property
    def in_dim(self) -> int:
        """A's side: input features (or patch size), plus one for the bias."""
        return math.prod(self.weight_shape[1:]) + int(self.has_bias)

    @property
    def size(self) -> int:
        """Elements of the layer's slice of the flat parameter vector."""
        return math.prod(self.weight_shape) + (self.out_dim if self.has_bias else 0)


# --- 1. statistics of one micro-batch -------------------------------------------------------------


@dataclass
class FactorStatistics:
    """Sums over the examples of one or more micro-batches, float64.

    a_sum = sum over examples and positions of a a^T          (in_dim x in_dim)
    g_sum = sum over examples of (1/T) sum over positions Ds Ds^T   (out_dim x out_dim)
    count = number of examples
    """

    a_sum: np.ndarray
    g_sum: np.ndarray
    count: float


def factor_statistics(
    layer: KFACLayer, calls: Sequence[tuple[np.ndarray, np.ndarray]], grad_scale: float
) -> FactorStatistics:
    """Statistics sums of one micro-batch from a capture's (input, output gradient) calls.

    `grad_scale` turns a recorded output gradient into the gradient of one example's loss: the
    number of examples the loss was averaged over (the batch size for a mean loss; the global
    batch size when micro-batch sums are divided by it, as the runtime does; 1 for a sum).
    Several calls of the same layer (a shared layer) add positions to each example.
    """
    if not calls:
        raise ValueError(f"factor_statistics: layer {layer.name!r} recorded no call with a "
                         f"gradient; was its forward and backward run inside the capture?")
    examples = None
    positions = 0
    a_sum = np.zeros((layer.in_dim, layer.in_dim))
    g_sum = np.zeros((layer.out_dim, layer.out_dim))
    for x, g in calls:
        a_rows, g_rows, call_examples, call_positions = _rows(layer, x, g)
        if examples is not None and call_examples != examples:
            raise ValueError(f"factor_statistics: layer {layer.name!r} was called on batches of "
                             f"{examples} and {call_examples} examples in one capture")
        examples = call_examples
        positions += call_positions
        a_sum += a_rows.T @ a_rows  # sum of a a^T over the rows
        g_sum += g_rows.T @ g_rows
    g_sum *= grad_scale * grad_scale / positions
    assert examples is not None  # set by the first of the calls, which are not empty
    return FactorStatistics(a_sum, g_sum, float(examples))


def _rows(layer: KFACLayer, x: np.ndarray, g: np.ndarray):
    """(a rows with the bias column, Ds rows before scaling, examples, positions per example)."""
    if layer.kind == "linear":
        examples = x.shape[0] if x.ndim > 1 else 1
        a = x.reshape(-1, x.shape[-1])
        g_rows = g.reshape(-1, g.shape[-1])
    else:
        if x.ndim == 3:  # one unbatched (C, H, W) image
            x, g = x[None], g[None]
        examples = x.shape[0]
        a = _patches(layer, x)  # (N * Ho * Wo, C * kh * kw)
        g_rows = np.moveaxis(g, 1, -1).reshape(-1, g.shape[1])  # (N * Ho * Wo, out)
    a = a.astype(np.float64)
    if layer.has_bias:
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    return a, g_rows.astype(np.float64), examples, len(a) // max(examples, 1)


def _patches(layer: KFACLayer, x: np.ndarray) -> np.ndarray:
    """Each output pixel's input patch, flattened in the weight's (C, kh, kw) order."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if any(layer.padding[0] + layer.padding[1]):
        x = np.pad(x, ((0, 0), (0, 0)) + tuple(layer.padding))
    n, c, h, w = x.shape
    out_h = (h - dh * (kh - 1) - 1) // sh + 1
    out_w = (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.strides
    # A strided view (N, Ho, Wo, C, kh, kw) onto x: no copy until the final reshape.
    view = np.lib.stride_tricks.as_strided(
        x, (n, out_h, out_w, c, kh, kw),
        (s_n, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw), writeable=False)
    return view.reshape(n * out_h * out_w, c * kh * kw)


def empty_statistics(layer: KFACLayer) -> FactorStatistics:
    """The statistics of no examples: what an empty micro-batch (a short last batch) or a layer
    its forward did not reach contributes to the reduction, so the tree keeps its shape."""
    return FactorStatistics(np.zeros((layer.in_dim, layer.in_dim)),
                            np.zeros((layer.out_dim, layer.out_dim)), 0.0)


def add_statistics(first: FactorStatistics, second: FactorStatistics) -> FactorStatistics:
    """first + second, a new record (the reduction tree's addition, in the order given)."""
    return FactorStatistics(first.a_sum + second.a_sum, first.g_sum + second.g_sum,
                            first.count + second.count)


def statistics_size(layers: Sequence[KFACLayer]) -> int:
    """Length of the flat vector `pack_statistics` makes for these layers."""
    return sum(layer.in_dim**2 + layer.out_dim**2 + 1 for layer in layers)


def pack_statistics(statistics: Sequence[FactorStatistics]) -> np.ndarray:
    """One float64 vector [a_sum, g_sum, count] per layer, concatenated: what a runtime reduces
    (elementwise adds of packed vectors are adds of the statistics)."""
    parts = []
    for stats in statistics:
        parts += [stats.a_sum.reshape(-1), stats.g_sum.reshape(-1), np.array([stats.count])]
    return np.concatenate(parts).astype(np.float64, copy=False)


def unpack_statistics(flat: np.ndarray, layers: Sequence[KFACLayer]) -> list[FactorStatistics]:
    """The inverse of pack_statistics (views into `flat`)."""
    if flat.shape != (statistics_size(layers),):
        raise ValueError(f"unpack_statistics: expected a vector of {statistics_size(layers)} "
                         f"values for {len(layers)} layers, got shape {flat.shape}")
    out, offset = [], 0
    for layer in layers:
        a_end = offset + layer.in_dim**2
        g_end = a_end + layer.out_dim**2
        out.append(FactorStatistics(
            flat[offset:a_end].reshape(layer.in_dim, layer.in_dim),
            flat[a_end:g_end].reshape(layer.out_dim, layer.out_dim),
            float(flat[g_end])))
        offset = g_end + 1
    return out


# --- 2. factors, inverses and the preconditioned gradient -----------------------------------------


@dataclass
class KroneckerFactors:
    """Running averages of A = E[a a^T] and G = E[Ds Ds^T] for one layer, float64."""

    a: np.ndarray
    g: np.ndarray


def update_factors(
    running: KroneckerFactors | None, statistics: FactorStatistics, decay: float
) -> KroneckerFactors:
    """running <- decay * running + (1 - decay) * (sums / count), in place; the first update
    takes the new factors as they are (no bias towards an arbitrary start)."""
    if statistics.count <= 0:
        raise ValueError("update_factors: statistics of zero examples")
    a_new = statistics.a_sum / statistics.count
    g_new = statistics.g_sum / statistics.count
    if running is None:
        return KroneckerFactors(a_new, g_new)
    for current, new in ((running.a, a_new), (running.g, g_new)):
        current *= decay
        new *= 1.0 - decay
        current += new
    return running


@dataclass
class KroneckerInverse:
    """What `precondition` applies, for one layer.

    eigen:    bases q_a, q_g and scale = 1 / (d_g d_a^T + lambda)
    factored: a_inverse = (A + pi sqrt(lambda) I)^-1, g_inverse = (G + sqrt(lambda)/pi I)^-1
    """

    method: str
    q_a: np.ndarray | None = None
    q_g: np.ndarray | None = None
    scale: np.ndarray | None = None
    a_inverse: np.ndarray | None = None
    g_inverse: np.ndarray | None = None


def invert_factors(
    factors: KroneckerFactors, damping: float, method: str = "eigen"
) -> KroneckerInverse:
    """The damped inverse of G (x) A (see the module docstring for the two methods)."""
    if method == "eigen":
        d_a, q_a = np.linalg.eigh(factors.a)
        d_g, q_g = np.linalg.eigh(factors.g)
        # Both factors are positive semi-definite; round-off can make a zero eigenvalue -1e-17.
        d_a, d_g = np.maximum(d_a, 0.0), np.maximum(d_g, 0.0)
        return KroneckerInverse(method, q_a=q_a, q_g=q_g,
                                scale=1.0 / (np.outer(d_g, d_a) + damping))
    if method == "factored":
        a_gamma, g_gamma = factored_damping(factors, damping)
        a_inverse = np.linalg.inv(factors.a + a_gamma * np.eye(len(factors.a)))
        g_inverse = np.linalg.inv(factors.g + g_gamma * np.eye(len(factors.g)))
        return KroneckerInverse(method, a_inverse=a_inverse, g_inverse=g_inverse)
    raise ValueError(f"invert_factors: method must be one of {DAMPING_METHODS}, got {method!r}")


def factored_damping(factors: KroneckerFactors, damping: float) -> tuple[float, float]:
    """(damping added to A, damping added to G): pi sqrt(lambda) and sqrt(lambda) / pi, where
    pi = sqrt((tr A / dim A) / (tr G / dim G)) balances the factors' scales (Martens & Grosse
    2015, section 6.3); pi = 1 when either trace is zero."""
    mean_a = np.trace(factors.a) / len(factors.a)
    mean_g = np.trace(factors.g) / len(factors.g)
    pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def precondition(
    grad_slice: np.ndarray, layer: KFACLayer, inverse: KroneckerInverse
) -> np.ndarray:
    """(G (x) A + damping)^-1 applied to one layer's [weight, bias] gradient slice.

    `grad_slice` is flat, `layer.size` long (weight row-major, then bias); the result has the
    same layout and dtype, in a new array.
    """
    if grad_slice.shape != (layer.size,):
        raise ValueError(f"precondition: layer {layer.name!r} has {layer.size} parameters, got "
                         f"a gradient slice of shape {grad_slice.shape}")
    m = _as_matrix(grad_slice, layer)  # [dW | db], (out_dim, in_dim)
    if inverse.method == "eigen":
        assert inverse.q_a is not None and inverse.q_g is not None  # set by the eigen method
        v = inverse.q_g.T @ m @ inverse.q_a
        v *= inverse.scale
        result = inverse.q_g @ v @ inverse.q_a.T
    else:
        result = inverse.g_inverse @ m @ inverse.a_inverse
    return _as_slice(result, layer).astype(grad_slice.dtype, copy=False)


def _as_matrix(grad_slice: np.ndarray, layer: KFACLayer) -> np.ndarray:
    weights = math.prod(layer.weight_shape)
    m = grad_slice[:weights].astype(np.float64).reshape(layer.out_dim, -1)
    if layer.has_bias:
        m = np.concatenate([m, grad_slice[weights:].astype(np.float64)[:, None]], axis=1)
    return m


def _as_slice(m: np.ndarray, layer: KFACLayer) -> np.ndarray:
    if not layer.has_bias:
        return m.reshape(-1)
    return np.concatenate([m[:, :-1].reshape(-1), m[:, -1]])


def kl_clip_coefficient(lr: float, kl_clip: float | None, direction_dot_grad: float) -> float:
    """nu = min(1, sqrt(kl_clip / (lr^2 sum_layers <v, g>))), the factor every preconditioned
    direction v is multiplied by (Ba et al. 2017): it bounds the step's predicted change of the
    model's output distribution. `direction_dot_grad` is summed over all K-FAC layers (over all
    shards, like a gradient norm); 1 when clipping is off or the sum is not positive."""
    if kl_clip is None or direction_dot_grad <= 0 or lr == 0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / (lr * lr * direction_dot_grad)))
