"""optim.KFAC: the K-FAC core of kfac.py driven over one model, as a PyTorch-style optimizer.

    kfac = optim.KFAC(model, lr=0.1, damping=1e-2)
    for x, y in batches:
        kfac.zero_grad()
        with kfac.capture():                 # records inputs and output gradients
            loss = F.cross_entropy(model(Tensor(x)), y)
            loss.backward()
        kfac.step()                          # factors, inverses, preconditioned SGD step

Linear layers (FeedbackAlignmentLinear included) and Conv2d layers with groups=1 are
preconditioned, weight and bias together; every other trainable parameter (LayerNorm,
embeddings, grouped convolutions, ...) takes the same SGD-with-momentum rule on its plain
gradient. A layer whose weight does not require gradients (frozen) is left alone.

`capture()` records only on the steps that update the factors (every factor_update_interval
steps); on the others it does nothing, and the forward/backward costs what it normally does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

from worker.backprop.nn.capture import capture_layers
from worker.backprop.nn.conv import Conv2d
from worker.backprop.nn.layers import Linear
from worker.backprop.nn.module import Module, Parameter

from .functional import State, sgd_init_state, sgd_step
from .kfac import (
    FactorStatistics,
    KFACHyper,
    KFACLayer,
    KroneckerFactors,
    KroneckerInverse,
    factor_statistics,
    invert_factors,
    kl_clip_coefficient,
    precondition,
    update_factors,
    updates_factors_at,
    updates_inverses_at,
)

T = TypeVar("T")
# The modules K-FAC preconditions (describe_layer says which of them qualify).
Preconditioned = Linear | Conv2d


def kfac_layers(model: Module) -> list[tuple[KFACLayer, Preconditioned]]:
    """The layers K-FAC preconditions, in named_modules order, with their descriptions."""
    found: list[tuple[KFACLayer, Preconditioned]] = []
    for name, module in model.named_modules():
        layer = describe_layer(name, module)
        # describe_layer describes only these; the isinstance tells the type checker so.
        if layer is not None and isinstance(module, (Linear, Conv2d)) \
                and module.weight.requires_grad:
            found.append((layer, module))
    return found


def describe_layer(name: str, module: Module) -> KFACLayer | None:
    """A KFACLayer for a Linear or a groups=1 Conv2d; None for any other module."""
    if isinstance(module, Linear):
        return KFACLayer(name, "linear", tuple(module.weight.shape), module.bias is not None)
    if isinstance(module, Conv2d) and module.groups == 1:
        return KFACLayer(name, "conv2d", tuple(module.weight.shape), module.bias is not None,
                         kernel_size=_pair(module.kernel_size), stride=_pair(module.stride),
                         padding=_conv_padding(module), dilation=_pair(module.dilation))
    return None


def _conv_padding(conv: Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(top, bottom), (left, right) zeros, as the conv op pads: "same" puts an odd total's
    extra row or column after, as torch does."""
    if conv.padding == "valid":
        return ((0, 0), (0, 0))
    if isinstance(conv.padding, str):  # "same", the only other word Conv2d accepts
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        return _pair([(t // 2, t - t // 2) for t in totals])
    return _pair([(p, p) for p in conv.padding])


def _pair(values: Sequence[T]) -> tuple[T, T]:
    """A Conv2d's per-axis values (one per spatial axis) as the pair KFACLayer holds."""
    first, second = values
    return first, second


class KFAC:
    """K-FAC with SGD-with-momentum on the preconditioned direction (see kfac.py)."""

    def __init__(
        self,
        model: Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        damping: float = 1e-2,
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 1,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        damping_method: str = "eigen",
    ) -> None:
        self.hyper = KFACHyper(lr, momentum, damping, factor_decay, factor_update_interval,
                               inverse_update_interval, weight_decay, kl_clip, damping_method)
        self.layers = kfac_layers(model)
        preconditioned = {id(p) for _, module in self.layers for p in _layer_parameters(module)}
        self.params: list[Parameter] = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("KFAC: the model has no trainable parameters")
        self.other_params = [p for p in self.params if id(p) not in preconditioned]
        self.steps = 0  # completed steps; the next step is number `steps` (0-based)
        self.factors: dict[str, KroneckerFactors] = {}
        self.inverses: dict[str, KroneckerInverse] = {}
        self._pending: dict[str, FactorStatistics] = {}
        # SGD momentum state and step count per parameter, keyed by position in self.params.
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._state: dict[int, State] = {}
        self._param_steps: dict[int, int] = {}

    @property
    def lr(self) -> float:
        return self.hyper.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyper = dataclasses.replace(self.hyper, lr=float(value))

    # --- capture ---------------------------------------------------------------------------------

    @contextmanager
    def capture(self, grad_scale: float | None = None) -> Iterator[None]:
        """Record this step's statistics, when the step updates the factors.

        `grad_scale` is the number of examples the loss averages over (see
        kfac.factor_statistics); None means a mean over the captured batch, the usual case.
        """
        if not updates_factors_at(self.steps, self.hyper):
            yield
            return
        modules = [module for _, module in self.layers]
        with capture_layers(modules) as captures:
            yield
        self._pending = {}
        for (layer, _), captured in zip(self.layers, captures):
            calls = captured.calls()
            if calls:  # a layer the forward did not reach has nothing to add
                scale = grad_scale if grad_scale is not None else _batch_size(calls)
                self._pending[layer.name] = factor_statistics(layer, calls, scale)

    # --- step ------------------------------------------------------------------------------------

    def step(self) -> None:
        hyper = self.hyper
        for name, statistics in self._pending.items():
            self.factors[name] = update_factors(self.factors.get(name), statistics,
                                                hyper.factor_decay)
        self._pending = {}
        refresh = updates_inverses_at(self.steps, hyper)
        for name, factors in self.factors.items():
            if refresh or name not in self.inverses:
                self.inverses[name] = invert_factors(factors, hyper.damping, hyper.damping_method)

        directions: list[tuple[Preconditioned, np.ndarray]] = []
        direction_dot_grad = 0.0
        for layer, module in self.layers:
            grad_slice = _layer_gradient(module)
            if grad_slice is None:
                continue
            if layer.name not in self.inverses:
                raise RuntimeError(
                    f"KFAC.step(): layer {layer.name!r} has a gradient but no curvature factors "
                    f"yet; run the first step's forward and backward inside `with kfac.capture():`")
            direction = precondition(grad_slice, layer, self.inverses[layer.name])
            direction_dot_grad += float(np.dot(direction, grad_slice.astype(np.float64)))
            directions.append((module, direction))
        nu = kl_clip_coefficient(hyper.lr, hyper.kl_clip, direction_dot_grad)

        for module, direction in directions:
            if nu != 1.0:
                direction *= nu
            offset = 0
            for p in _layer_parameters(module):
                self._sgd(p, direction[offset:offset + p.size])
                offset += p.size
        for p in self.other_params:
            if p.grad is not None:
                self._sgd(p, p.grad.reshape(-1))
        self.steps += 1

    def _sgd(self, p: Parameter, direction: np.ndarray) -> None:
        index = self._index.get(id(p))
        if index is None:
            return  # a frozen bias of a trained weight
        contiguous = p.data.flags.c_contiguous
        flat = p.data.reshape(-1) if contiguous else np.ascontiguousarray(p.data).reshape(-1)
        rule = self.hyper.base_rule()
        if index not in self._state:
            self._state[index] = sgd_init_state(flat, rule)
            self._param_steps[index] = 0
        self._param_steps[index] += 1
        sgd_step(flat, direction, self._state[index], rule, self._param_steps[index])
        if not contiguous:
            p.data[...] = flat.reshape(p.data.shape)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def _layer_parameters(module: Preconditioned) -> list[Parameter]:
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def _layer_gradient(module: Preconditioned) -> np.ndarray | None:
    """The layer's [weight, bias] gradient as one flat vector; None when neither has one."""
    params = _layer_parameters(module)
    if all(p.grad is None for p in params):
        return None
    return np.concatenate([(p.grad if p.grad is not None else np.zeros_like(p.data)).reshape(-1)
                           for p in params])


def _batch_size(calls: list[tuple[np.ndarray, np.ndarray]]) -> int:
    x = calls[0][0]
    return x.shape[0] if x.ndim > 1 else 1
