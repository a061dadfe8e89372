"""Gradient checking: compare backpropagation with central finite differences.

The article's advice, made a tool: (f(x + eps) - f(x - eps)) / 2 eps for every input element,
in float64, against the analytic gradient. A non-scalar output is projected on a fixed random
direction v, so one backward pass checks the whole vector-Jacobian product v^T J.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np

from worker.backprop.tensor import Tensor, grad, no_grad


class GradcheckError(AssertionError):
    """The analytic and numeric gradients disagree."""


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    seed: int = 0,
    record_graph: bool = False,
) -> bool:
    """True when backprop matches central differences for every input that requires grad.

    Raises GradcheckError naming the input, the index and both values of the worst mismatch.
    `record_graph` keeps graph recording on while `fn` is probed, for an `fn` that itself
    differentiates (gradgradcheck).
    """
    inputs = [_as_float64(x) for x in inputs]
    direction = _projection(fn, inputs, seed, record_graph)

    def projected(*xs: Tensor) -> Tensor:
        return (fn(*xs) * direction).sum()

    targets = [x for x in inputs if x.requires_grad]
    analytic = grad(projected(*inputs), targets)
    for x, g in zip(targets, analytic):
        numeric = _central_differences(projected, inputs, x, eps, record_graph)
        name = f"input {_position(inputs, x)}" if len(inputs) > 1 else "input"
        _compare(name, g, numeric, rtol, atol)
    return True


def _position(inputs: list[Tensor], x: Tensor) -> int:
    return next(i for i, item in enumerate(inputs) if item is x)


def gradgradcheck(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    eps: float = 1e-6,
    rtol: float = 1e-4,
    atol: float = 1e-7,
    seed: int = 0,
) -> bool:
    """Check second derivatives: the gradient computed with create_graph=True is itself
    checked against finite differences (so Hessian-vector products are right)."""
    inputs = [_as_float64(x) for x in inputs]
    direction = _projection(fn, inputs, seed)
    targets = [x for x in inputs if x.requires_grad]
    rng = np.random.default_rng(seed + 1)
    tangents = [rng.standard_normal(x.shape) for x in targets]

    def gradient_along_tangents(*xs: Tensor) -> Tensor:
        xs_targets = [x for x in xs if x.requires_grad]
        gs = grad((fn(*xs) * direction).sum(), xs_targets, create_graph=True)
        # A function linear in x has a gradient that does not depend on x; the zero terms
        # keep a graph so that its (zero) second derivative is checked like any other.
        total = builtins.sum((x * 0.0).sum() for x in xs_targets)
        for g, v in zip(gs, tangents):
            total = total + (g * v).sum()
        return total

    return gradcheck(gradient_along_tangents, inputs, eps, rtol, atol, seed, record_graph=True)


def _as_float64(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        return Tensor(np.asarray(x, dtype=np.float64))
    if x.dtype.kind == "f" and x.dtype != np.float64:
        return Tensor(x.data.astype(np.float64), requires_grad=x.requires_grad)
    return x


def _projection(
    fn: Callable[..., Tensor], inputs: list[Tensor], seed: int, record_graph: bool = False
) -> np.ndarray:
    with nullcontext() if record_graph else no_grad():
        out = fn(*inputs)
    return np.random.default_rng(seed).standard_normal(out.shape)


def _central_differences(
    projected, inputs: list[Tensor], x: Tensor, eps: float, record_graph: bool
) -> np.ndarray:
    numeric = np.zeros(x.shape, dtype=np.float64)
    flat, out = x.data.reshape(-1), numeric.reshape(-1)
    with nullcontext() if record_graph else no_grad():
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            plus = float(projected(*inputs).data)
            flat[i] = saved - eps
            minus = float(projected(*inputs).data)
            flat[i] = saved
            out[i] = (plus - minus) / (2 * eps)
    return numeric


def _compare(name: str, analytic, numeric: np.ndarray, rtol: float, atol: float) -> None:
    analytic = np.asarray(analytic.data if isinstance(analytic, Tensor) else analytic)
    error = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    if error.size and error.max() > 0:
        worst = np.unravel_index(int(np.argmax(error)), error.shape)
        raise GradcheckError(
            f"gradient mismatch for {name} at index {tuple(int(i) for i in worst)}: "
            f"backprop {analytic[worst]!r}, finite differences {numeric[worst]!r} "
            f"(rtol={rtol}, atol={atol})"
        )
