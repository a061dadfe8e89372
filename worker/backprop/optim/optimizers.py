"""PyTorch-style optimizer classes: per-parameter loops over the flat functional cores.

    opt = Adam(model.parameters(), lr=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()

A parameter is any object with `.data` (an ndarray, updated in place) and `.grad` (an ndarray
of the same shape, or None: the parameter is then skipped, and its state not even created, as
in PyTorch). Each parameter keeps its own state and step count; the update itself is the
functional core of `functional.py` applied to `p.data.reshape(-1)`, so a class and a PS shard
running the same rule compute the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from worker.backprop.nn.module import Parameter

from .functional import (
    RULES,
    AdafactorHyper,
    AdagradHyper,
    AdamHyper,
    AdamWHyper,
    LionHyper,
    OptimizerRule,
    RMSpropHyper,
    SGDHyper,
    State,
)


class Optimizer:
    """The shared loop; a subclass names its rule and builds its hyperparameters."""

    rule: ClassVar[OptimizerRule]

    def __init__(self, params: Iterable[Parameter], hyper: Any) -> None:
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if len({id(p) for p in self.params}) != len(self.params):
            # Stepping one parameter twice per step() would silently double its update.
            raise ValueError("optimizer got the same parameter more than once")
        for i, p in enumerate(self.params):
            if not isinstance(p.data, np.ndarray) or p.data.dtype.kind != "f":
                raise TypeError(f"parameter {i}: .data must be a floating-point ndarray")
        self.hyper = hyper
        # Filled lazily, on a parameter's first step with a gradient, keyed by its index.
        self.state: dict[int, State] = {}
        self.steps: dict[int, int] = {}

    @property
    def lr(self) -> float:
        return self.hyper.lr

    @lr.setter
    def lr(self, value: float) -> None:
        # replace() re-runs the hyperparameter validation.
        self.hyper = dataclasses.replace(self.hyper, lr=float(value))

    # --- the two hooks a non-elementwise rule overrides -------------------------------------------

    def _init_param_state(self, flat: np.ndarray, p: Parameter) -> State:
        return self.rule.init_state(flat, self.hyper)

    def _update_param(
        self, flat: np.ndarray, grad: np.ndarray, state: State, t: int, p: Parameter
    ) -> None:
        self.rule.step(flat, grad, state, self.hyper, t)

    # --- public API -------------------------------------------------------------------------------

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            data = p.data
            if p.grad.shape != data.shape:
                raise ValueError(
                    f"parameter {i}: grad shape {p.grad.shape} != data shape {data.shape}"
                )
            # reshape(-1) of a C-contiguous array is a view, so the core writes into p.data;
            # other layouts are updated in a contiguous copy and written back.
            contiguous = data.flags.c_contiguous
            flat = data.reshape(-1) if contiguous else np.ascontiguousarray(data).reshape(-1)
            if i not in self.state:
                self.state[i] = self._init_param_state(flat, p)
                self.steps[i] = 0
            self.steps[i] += 1
            self._update_param(flat, p.grad.reshape(-1), self.state[i], self.steps[i], p)
            if not contiguous:
                data[...] = flat.reshape(data.shape)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """A snapshot in PyTorch's layout: {"state": {index: {...}}, "param_groups": [{...}]}.

        Plain dicts, lists, numbers and copied ndarrays (per-element state in the parameter's
        shape, as PyTorch stores it), so it can be written without pickle.
        """
        state: dict[int, dict[str, Any]] = {}
        for i, param_state in self.state.items():
            shape = self.params[i].data.shape
            entry: dict[str, Any] = {"step": self.steps[i]}
            for key, array in param_state.items():
                per_element = array.ndim == 1 and array.size == self.params[i].data.size
                entry[key] = (array.reshape(shape) if per_element else array).copy()
            state[i] = entry
        group = dataclasses.asdict(self.hyper)
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict()` output; arrays are copied, shapes and keys checked."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or list(groups[0]["params"]) != list(range(len(self.params))):
            raise ValueError(
                f"state_dict is for a different parameter list: expected one group with "
                f"params 0..{len(self.params) - 1}"
            )
        fields = {f.name for f in dataclasses.fields(self.hyper)}
        group = {k: v for k, v in groups[0].items() if k != "params"}
        if set(group) != fields:
            raise ValueError(
                f"state_dict hyperparameters {sorted(group)} do not match "
                f"{type(self.hyper).__name__} fields {sorted(fields)}"
            )
        hyper = type(self.hyper)(**group)

        # Build into fresh arrays first, so a bad entry leaves this optimizer untouched.
        previous_hyper, self.hyper = self.hyper, hyper
        try:
            states, steps = {}, {}
            for key, entry in state_dict["state"].items():
                i = int(key)
                if not 0 <= i < len(self.params):
                    raise ValueError(f"state_dict has state for unknown parameter {key!r}")
                data = self.params[i].data
                fresh = self._init_param_state(np.zeros(data.size, data.dtype), self.params[i])
                arrays = {k: v for k, v in entry.items() if k != "step"}
                if set(arrays) != set(fresh):
                    raise ValueError(
                        f"parameter {i}: state keys {sorted(arrays)} != expected {sorted(fresh)}"
                    )
                for name, target in fresh.items():
                    source = np.asarray(arrays[name])
                    if source.size != target.size:
                        raise ValueError(
                            f"parameter {i}: state {name!r} has {source.size} elements, "
                            f"expected {target.size}"
                        )
                    target[...] = source.reshape(target.shape)
                states[i], steps[i] = fresh, int(entry["step"])
        except Exception:
            self.hyper = previous_hyper
            raise
        self.state, self.steps = states, steps


# --- the optimizers ------------------------------------------------------------------------------


class SGD(Optimizer):
    rule = RULES["sgd"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        hyper = SGDHyper(lr, momentum, dampening, weight_decay, nesterov, maximize)
        super().__init__(params, hyper)


class RMSprop(Optimizer):
    rule = RULES["rmsprop"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        hyper = RMSpropHyper(lr, alpha, eps, weight_decay, momentum, centered, maximize)
        super().__init__(params, hyper)


class Adagrad(Optimizer):
    rule = RULES["adagrad"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
    ) -> None:
        hyper = AdagradHyper(lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize)
        super().__init__(params, hyper)


class Adam(Optimizer):
    rule = RULES["adam"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, AdamHyper(lr, betas, eps, weight_decay, amsgrad, maximize))


class AdamW(Optimizer):
    rule = RULES["adamw"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, AdamWHyper(lr, betas, eps, weight_decay, amsgrad, maximize))


class Lion(Optimizer):
    rule = RULES["lion"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, LionHyper(lr, betas, weight_decay))


class Adafactor(Optimizer):
    """Factored second moments for parameters of 2 or more dimensions, as torch.optim.Adafactor.

    The core needs the parameter's shape for that, so the two hooks pass it along.
    """

    rule = RULES["adafactor"]

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        hyper = AdafactorHyper(lr, beta2_decay, eps, d, weight_decay, maximize)
        super().__init__(params, hyper)

    def _init_param_state(self, flat: np.ndarray, p: Parameter) -> State:
        return self.rule.init_state(flat, self.hyper, shape=p.data.shape)

    def _update_param(
        self, flat: np.ndarray, grad: np.ndarray, state: State, t: int, p: Parameter
    ) -> None:
        self.rule.step(flat, grad, state, self.hyper, t, shape=p.data.shape)
