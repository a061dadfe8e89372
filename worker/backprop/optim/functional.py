"""How a parameter-server shard applies an optimizer: update rules on flat 1-D arrays.

Every rule is a pair of plain functions over a flat float vector (a whole parameter, or the
contiguous slice of the model's flat parameter vector that one PS shard owns):

    state = init_state(params, hyper)                  # dict[str, ndarray], PyTorch's key names
    params, state = step(params, grads, state, hyper, t)

`params` and every state array are updated IN PLACE and returned (a shard's slice is a view into
the big vector, so the update must land there); `grads` is only read. `t` is the 1-based number
of steps this state has taken. `hyper` is a frozen dataclass with PyTorch's argument names and
defaults; it is validated once, when it is built. The formulas, and the order of floating-point
operations where cheap, follow PyTorch's single-tensor implementations (`torch/optim/*.py`), so
trajectories agree with PyTorch to round-off.

Elementwise rules (all but Adafactor) give bitwise the same result on a vector as on any cut of
it into slices, each with its own state: that is what lets K shards own any slices.

Adafactor is not elementwise: it factors the second moment of a matrix into row and column
means, and scales each update by the RMS of the whole parameter. Its functions take a keyword
`shape` (the parameter's shape; `params` is the flat view of it): `hyper` is configuration
shared by every parameter, the shape belongs to one parameter. Without `shape`, or for shapes
of fewer than 2 dimensions, it runs the unfactored variant, as PyTorch does for vectors; on a
PS slice that means per-slice RMS scaling, so Adafactor should be sharded on parameter
boundaries (`RULES["adafactor"].elementwise` is False).

`RULES` maps a name to its rule, so a shard can do:

    rule = RULES[name]
    state = rule.init_state(slice_, hyper)
    rule.step(slice_, grad_slice, state, hyper, t)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .clip import squared_norm

State = dict[str, np.ndarray]


# --- validation ----------------------------------------------------------------------------------


def _require(ok: bool, hyper: object, field: str, value: object, expected: str) -> None:
    # `not (0 <= x)` style checks in the callers reject NaN as well.
    if not ok:
        raise ValueError(f"{type(hyper).__name__}.{field} must be {expected}, got {value!r}")


def _check_nonnegative(hyper: object, *fields: str) -> None:
    for field in fields:
        value = getattr(hyper, field)
        _require(0.0 <= value, hyper, field, value, ">= 0")


def _check_betas(hyper: object, expected_len: int = 2) -> None:
    betas = tuple(hyper.betas)  # type: ignore[attr-defined]
    # Stored as a tuple so the dataclass stays hashable when betas came from JSON as a list.
    object.__setattr__(hyper, "betas", betas)
    _require(len(betas) == expected_len, hyper, "betas", betas, f"{expected_len} numbers")
    for i, beta in enumerate(betas):
        _require(0.0 <= beta < 1.0, hyper, f"betas[{i}]", beta, "in [0, 1)")


def _check_inputs(params: np.ndarray, grads: np.ndarray, t: int) -> None:
    if t < 1:
        raise ValueError(f"t is the 1-based step count, got {t}")
    if params.ndim != 1:
        raise ValueError(f"params must be a flat 1-D array, got shape {params.shape}")
    if grads.shape != params.shape:
        raise ValueError(f"grads shape {grads.shape} does not match params shape {params.shape}")


# --- hyperparameters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SGDHyper:
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "momentum", "weight_decay")
        if self.nesterov:
            # As PyTorch: Nesterov's look-ahead is defined for an undamped momentum buffer.
            ok = self.momentum > 0 and self.dampening == 0
            _require(ok, self, "nesterov", self.nesterov, "False unless momentum > 0, dampening 0")


@dataclass(frozen=True)
class RMSpropHyper:
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "alpha", "eps", "weight_decay", "momentum")


@dataclass(frozen=True)
class AdagradHyper:
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(
            self, "lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"
        )


@dataclass(frozen=True)
class AdamHyper:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # L2 penalty added to the gradient (coupled)
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "eps", "weight_decay")
        _check_betas(self)


@dataclass(frozen=True)
class AdamWHyper:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2  # decoupled: p *= 1 - lr * weight_decay
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "eps", "weight_decay")
        _check_betas(self)


@dataclass(frozen=True)
class LionHyper:
    lr: float = 1e-4  # the paper: 3-10x smaller than AdamW's, since every update is +-lr
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0  # decoupled, like AdamW

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "weight_decay")
        _check_betas(self)


@dataclass(frozen=True)
class AdafactorHyper:
    lr: float = 1e-2  # caps the relative step size rho_t = min(lr, 1/sqrt(t))
    beta2_decay: float = -0.8  # 1 - beta2_t = t ** beta2_decay
    eps: tuple[float | None, float] = (None, 1e-3)  # (eps1: None = dtype's eps, eps2)
    d: float = 1.0  # update clipping threshold on RMS(update)
    weight_decay: float = 0.0
    maximize: bool = False

    def __post_init__(self) -> None:
        _check_nonnegative(self, "lr", "weight_decay")
        _require(self.beta2_decay <= 0.0, self, "beta2_decay", self.beta2_decay, "<= 0")
        eps = tuple(self.eps)
        object.__setattr__(self, "eps", eps)
        _require(len(eps) == 2, self, "eps", eps, "a pair (eps1 or None, eps2)")
        eps1, eps2 = eps
        _require(eps1 is None or 0.0 <= eps1, self, "eps[0]", eps1, "None or >= 0")
        _require(eps2 is not None and 0.0 <= eps2, self, "eps[1]", eps2, ">= 0")
        _require(1.0 <= self.d, self, "d", self.d, ">= 1")


# --- shared pieces -------------------------------------------------------------------------------


def _effective_grad(
    params: np.ndarray, grads: np.ndarray, weight_decay: float, maximize: bool
) -> np.ndarray:
    """g' = (-g if maximize else g) + weight_decay * p, without ever writing into `grads`."""
    if weight_decay == 0:
        return np.negative(grads) if maximize else grads
    # wd * p + g is bitwise PyTorch's g + wd * p (IEEE addition commutes), in one allocation.
    out = np.multiply(params, weight_decay)
    if maximize:
        out -= grads
    else:
        out += grads
    return out


def _lerp_(
    start: np.ndarray, end: np.ndarray, weight: float, scratch: np.ndarray | None = None
) -> None:
    """start <- start + weight * (end - start) in place, with torch.lerp's two-sided formula."""
    scratch = np.subtract(end, start, out=scratch)
    if abs(weight) < 0.5:
        scratch *= weight
        start += scratch
    else:
        # end + (w - 1) * (end - start): exact at w = 1, as in PyTorch's kernel.
        scratch *= weight - 1.0
        np.add(end, scratch, out=start)


# --- SGD -----------------------------------------------------------------------------------------


def sgd_init_state(params: np.ndarray, hyper: SGDHyper) -> State:
    if hyper.momentum == 0:
        return {}
    return {"momentum_buffer": np.zeros_like(params)}


def sgd_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: SGDHyper, t: int
) -> tuple[np.ndarray, State]:
    # b <- mu * b + (1 - dampening) * g;  p <- p - lr * (g + mu * b if nesterov else b)
    _check_inputs(params, grads, t)
    d_p = _effective_grad(params, grads, hyper.weight_decay, hyper.maximize)
    scratch = np.empty_like(params)
    if hyper.momentum != 0:
        buf = state["momentum_buffer"]
        if t == 1:
            buf[...] = d_p  # PyTorch seeds the buffer with the first gradient, undamped
        else:
            buf *= hyper.momentum
            if hyper.dampening == 0:
                buf += d_p
            else:
                buf += np.multiply(d_p, 1 - hyper.dampening, out=scratch)
        if hyper.nesterov:
            np.multiply(buf, hyper.momentum, out=scratch)
            scratch += d_p
            d_p = scratch
        else:
            d_p = buf
    params += np.multiply(d_p, -hyper.lr, out=scratch)
    return params, state


# --- RMSprop -------------------------------------------------------------------------------------


def rmsprop_init_state(params: np.ndarray, hyper: RMSpropHyper) -> State:
    state = {"square_avg": np.zeros_like(params)}
    if hyper.momentum > 0:
        state["momentum_buffer"] = np.zeros_like(params)
    if hyper.centered:
        state["grad_avg"] = np.zeros_like(params)
    return state


def rmsprop_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: RMSpropHyper, t: int
) -> tuple[np.ndarray, State]:
    # v <- a * v + (1 - a) g^2;  p <- p - lr * g / (sqrt(v - mean(g)^2 if centered else v) + eps)
    _check_inputs(params, grads, t)
    g = _effective_grad(params, grads, hyper.weight_decay, hyper.maximize)
    scratch = np.empty_like(params)
    square_avg = state["square_avg"]
    square_avg *= hyper.alpha
    np.multiply(g, 1 - hyper.alpha, out=scratch)
    scratch *= g
    square_avg += scratch
    if hyper.centered:
        grad_avg = state["grad_avg"]
        _lerp_(grad_avg, g, 1 - hyper.alpha, scratch)
        np.multiply(grad_avg, grad_avg, out=scratch)
        np.subtract(square_avg, scratch, out=scratch)
        avg = np.sqrt(scratch, out=scratch)
    else:
        avg = np.sqrt(square_avg, out=scratch)
    avg += hyper.eps
    if hyper.momentum > 0:
        buf = state["momentum_buffer"]
        buf *= hyper.momentum
        buf += np.divide(g, avg, out=scratch)
        params += np.multiply(buf, -hyper.lr, out=scratch)
    else:
        np.divide(g, avg, out=scratch)
        scratch *= -hyper.lr
        params += scratch
    return params, state


# --- Adagrad -------------------------------------------------------------------------------------


def adagrad_init_state(params: np.ndarray, hyper: AdagradHyper) -> State:
    return {"sum": np.full_like(params, hyper.initial_accumulator_value)}


def adagrad_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: AdagradHyper, t: int
) -> tuple[np.ndarray, State]:
    # s <- s + g^2;  p <- p - lr / (1 + (t - 1) * lr_decay) * g / (sqrt(s) + eps)
    _check_inputs(params, grads, t)
    g = _effective_grad(params, grads, hyper.weight_decay, hyper.maximize)
    clr = hyper.lr / (1 + (t - 1) * hyper.lr_decay)
    scratch = np.multiply(g, g)
    state["sum"] += scratch
    std = np.sqrt(state["sum"], out=scratch)
    std += hyper.eps
    np.divide(g, std, out=scratch)
    scratch *= -clr
    params += scratch
    return params, state


# --- Adam and AdamW ------------------------------------------------------------------------------


def adam_init_state(params: np.ndarray, hyper: AdamHyper | AdamWHyper) -> State:
    state = {"exp_avg": np.zeros_like(params), "exp_avg_sq": np.zeros_like(params)}
    if hyper.amsgrad:
        state["max_exp_avg_sq"] = np.zeros_like(params)
    return state


def _adam_update(
    params: np.ndarray,
    grads: np.ndarray,
    state: State,
    hyper: AdamHyper | AdamWHyper,
    t: int,
    decoupled_weight_decay: bool,
) -> tuple[np.ndarray, State]:
    # m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2;
    # p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    _check_inputs(params, grads, t)
    # Both hypers have the same fields: catch AdamW's passed to Adam (or back) by type.
    expected = AdamWHyper if decoupled_weight_decay else AdamHyper
    if not isinstance(hyper, expected):
        raise TypeError(f"expected {expected.__name__}, got {type(hyper).__name__}")
    beta1, beta2 = hyper.betas
    if decoupled_weight_decay:
        if hyper.weight_decay != 0:
            params *= 1 - hyper.lr * hyper.weight_decay
        g = np.negative(grads) if hyper.maximize else grads
    else:
        g = _effective_grad(params, grads, hyper.weight_decay, hyper.maximize)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    scratch = np.empty_like(params)
    _lerp_(exp_avg, g, 1 - beta1, scratch)
    exp_avg_sq *= beta2
    np.multiply(g, 1 - beta2, out=scratch)
    scratch *= g
    exp_avg_sq += scratch

    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = hyper.lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if hyper.amsgrad:
        # AMSGrad normalises by the largest second moment seen so far.
        second_moment = np.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
    else:
        second_moment = exp_avg_sq
    # PyTorch's order: sqrt(v) / sqrt(bc2) + eps, not sqrt(v / bc2) + eps.
    denom = np.sqrt(second_moment, out=scratch)
    denom /= bias_correction2_sqrt
    denom += hyper.eps
    update = np.divide(exp_avg, denom, out=scratch)
    update *= -step_size
    params += update
    return params, state


def adam_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: AdamHyper, t: int
) -> tuple[np.ndarray, State]:
    # Adam with L2 weight decay: g <- g + wd * p before the moments.
    return _adam_update(params, grads, state, hyper, t, decoupled_weight_decay=False)


def adamw_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: AdamWHyper, t: int
) -> tuple[np.ndarray, State]:
    # AdamW: p <- p * (1 - lr * wd), then the Adam step; decay never enters the moments.
    return _adam_update(params, grads, state, hyper, t, decoupled_weight_decay=True)


# --- Lion ----------------------------------------------------------------------------------------


def lion_init_state(params: np.ndarray, hyper: LionHyper) -> State:
    return {"exp_avg": np.zeros_like(params)}


def lion_step(
    params: np.ndarray, grads: np.ndarray, state: State, hyper: LionHyper, t: int
) -> tuple[np.ndarray, State]:
    # Chen et al. 2023 (as lucidrains/lion-pytorch): p <- p (1 - lr wd) - lr sign(b1 m + (1-b1) g);
    # m <- b2 m + (1 - b2) g
    _check_inputs(params, grads, t)
    beta1, beta2 = hyper.betas
    exp_avg = state["exp_avg"]
    if hyper.weight_decay != 0:
        params *= 1 - hyper.lr * hyper.weight_decay
    interpolation = np.multiply(exp_avg, beta1)
    update = np.multiply(grads, 1 - beta1)
    interpolation += update
    # Not in place: NumPy's vectorised sign is skipped when input and output overlap (10x).
    np.sign(interpolation, out=update)
    update *= -hyper.lr
    params += update
    exp_avg *= beta2
    exp_avg += np.multiply(grads, 1 - beta2, out=update)
    return params, state


# --- Adafactor -----------------------------------------------------------------------------------


def _factored_shape(params: np.ndarray, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The parameter's shape if its second moment is factored (2 or more axes), else None."""
    if shape is None:
        return None
    shape = tuple(shape)
    if math.prod(shape) != params.size:
        raise ValueError(f"shape {shape} does not hold {params.size} elements")
    return shape if len(shape) > 1 else None


def adafactor_init_state(
    params: np.ndarray, hyper: AdafactorHyper, *, shape: tuple[int, ...] | None = None
) -> State:
    shape = _factored_shape(params, shape)
    if shape is None:
        return {"variance": np.zeros_like(params)}
    # Row and column means of g^2 over the last two axes: O(n + m) memory for an n x m matrix.
    return {
        "row_var": np.zeros(shape[:-1] + (1,), dtype=params.dtype),
        "col_var": np.zeros(shape[:-2] + (1,) + shape[-1:], dtype=params.dtype),
    }


def adafactor_step(
    params: np.ndarray,
    grads: np.ndarray,
    state: State,
    hyper: AdafactorHyper,
    t: int,
    *,
    shape: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, State]:
    # V <- R C / mean(R) (factored) or lerp(V, g^2, t^decay);  U = g / max(sqrt(V), eps1);
    # p <- p (1 - lr wd) - max(eps2, RMS(p)) min(lr, 1/sqrt(t)) U / max(1, RMS(U) / d)
    _check_inputs(params, grads, t)
    eps1, eps2 = hyper.eps
    if eps1 is None:
        eps1 = float(np.finfo(params.dtype).eps)
    g = np.negative(grads) if hyper.maximize else grads
    one_minus_beta2_t = t**hyper.beta2_decay
    rho_t = min(hyper.lr, 1 / (t**0.5))
    # Relative step size: scaled by the parameter's RMS, measured before weight decay.
    alpha = max(eps2, math.sqrt(squared_norm(params)) / (params.size**0.5)) * rho_t
    if hyper.weight_decay != 0:
        params *= 1 - hyper.lr * hyper.weight_decay

    shape = _factored_shape(params, shape)
    if shape is not None:
        grad = g.reshape(shape)
        row_var, col_var = state["row_var"], state["col_var"]
        # Means of g^2 along a row / a column, without materialising g^2.
        row_mean = np.einsum("...ij,...ij->...i", grad, grad)[..., None] / shape[-1]
        _lerp_(row_var, row_mean, one_minus_beta2_t)
        col_mean = np.einsum("...ij,...ij->...j", grad, grad)[..., None, :] / shape[-2]
        _lerp_(col_var, col_mean, one_minus_beta2_t)
        var_estimate = np.matmul(row_var, col_var)
        var_estimate /= np.maximum(row_var.mean(axis=-2, keepdims=True), eps1)
        var_estimate = var_estimate.reshape(-1)
    else:
        variance = state["variance"]
        grad_sq = np.multiply(g, g)
        _lerp_(variance, grad_sq, one_minus_beta2_t)
        # Reuse the g^2 buffer for the estimate: the update must not write into `variance`.
        np.copyto(grad_sq, variance)
        var_estimate = grad_sq

    # Clamp at eps1^2 because the square root follows; rsqrt is 1 / sqrt, as in PyTorch.
    update = np.maximum(var_estimate, eps1 * eps1, out=var_estimate)
    np.sqrt(update, out=update)
    np.divide(1.0, update, out=update)
    update *= g
    denom = max(1.0, math.sqrt(squared_norm(update)) / ((update.size**0.5) * hyper.d))
    update *= -alpha / denom
    params += update
    return params, state


# --- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerRule:
    """What a PS shard needs to run one optimizer on its slice."""

    name: str
    hyper_type: type
    init_state: Callable[..., State]
    step: Callable[..., tuple[np.ndarray, State]]
    # True when stepping any cut of a vector into slices equals stepping the whole vector.
    elementwise: bool = True


RULES: dict[str, OptimizerRule] = {
    rule.name: rule
    for rule in (
        OptimizerRule("sgd", SGDHyper, sgd_init_state, sgd_step),
        OptimizerRule("rmsprop", RMSpropHyper, rmsprop_init_state, rmsprop_step),
        OptimizerRule("adagrad", AdagradHyper, adagrad_init_state, adagrad_step),
        OptimizerRule("adam", AdamHyper, adam_init_state, adam_step),
        OptimizerRule("adamw", AdamWHyper, adam_init_state, adamw_step),
        OptimizerRule("lion", LionHyper, lion_init_state, lion_step),
        OptimizerRule(
            "adafactor", AdafactorHyper, adafactor_init_state, adafactor_step, elementwise=False
        ),
    )
}
