"""Mixed precision: float16 forward and backward, float32 weights and updates, scaled losses.

float16 halves activation memory and bandwidth, but it has 10 mantissa bits and a narrow range:
values above 65504 overflow to inf, and gradients below about 6e-8 (2^-24) flush to zero. Two
techniques make training in it work (Micikevicius et al., 2018, "Mixed Precision Training"):

* Float32 master weights (`MasterWeights`): the optimizer updates float32 copies, because an
  update lr * grad is often smaller than float16's spacing at the weight's magnitude and would
  be lost; the float16 model is refreshed from them before each forward.
* Loss scaling (`GradScaler`): multiply the loss by a large S before backward, so small
  gradients stay representable in float16; divide the float32 gradients by S before the step.
  S is dynamic: when a gradient overflows (inf/nan) the step is skipped and S is halved; after
  `growth_interval` clean steps S is doubled. Same semantics, state and numbers as
  torch.amp.GradScaler.

    model = build_model()                        # float32
    master = MasterWeights(model)                # model is now float16, master float32
    opt = optim.Adam(master.params, lr=1e-3)
    scaler = GradScaler()
    for x, y in batches:
        loss = loss_fn(model(x.astype(np.float16)).astype(np.float32), y)
        scaler.scale(loss).backward()
        master.copy_grads_to_master()            # float16 grads -> float32 master .grad
        scaler.step(opt)                         # unscales, skips the step on inf/nan
        scaler.update()                          # adjusts S
        master.zero_grad(); master.copy_master_to_model()
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

import numpy as np

from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import Tensor


class _OptimizerState(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _parameters_of(optimizer: Any) -> list[Any]:
    """The parameters an optimizer updates: its `.params` list (optim.Optimizer), or the
    optimizer itself when it is an iterable of parameters."""
    params = getattr(optimizer, "params", None)
    if params is None:
        if not isinstance(optimizer, Iterable):
            raise TypeError(
                f"GradScaler: expected an optimizer with a .params list or an iterable of "
                f"parameters, got {type(optimizer).__name__}"
            )
        params = optimizer
    return list(params)


class GradScaler:
    """Dynamic loss scaling, with torch.amp.GradScaler's semantics and numbers.

    The scale is a float32, updated as torch does it (`scale * factor` in double precision,
    rounded to float32; growth is skipped if it would overflow float32).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True):
        if growth_factor <= 1.0:
            raise ValueError(f"GradScaler: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"GradScaler: backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"GradScaler: growth_interval must be >= 1, got {growth_interval}")
        if not init_scale > 0:
            raise ValueError(f"GradScaler: init_scale must be positive, got {init_scale}")
        self._enabled = enabled
        self._scale = np.float32(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0  # clean steps since the last change of scale
        self._per_optimizer: dict[int, dict[str, Any]] = {}

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return float(self._scale) if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    # --- the three calls of a step -----------------------------------------------------------

    def scale(self, outputs: Any) -> Any:
        """outputs * S (a Tensor, or a list/tuple of them), at least float32 so that S and
        S * loss do not overflow a float16 loss; backward then sends S * dL/dy into the model.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            return outputs * self._scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"GradScaler.scale: expected a Tensor or a sequence of Tensors, "
                        f"got {type(outputs).__name__}")

    def unscale_(self, optimizer: Any) -> None:
        """Divide the optimizer's gradients by S in place and note whether any is inf/nan.

        Call it before clipping gradients, so the clip threshold applies to true gradients;
        step() then does not unscale again. At most once per optimizer between update()s.
        """
        if not self._enabled:
            return
        record = self._record(optimizer)
        if record["stage"] is _OptimizerState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer "
                               "since the last update().")
        if record["stage"] is _OptimizerState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # 1/S in double, rounded to float32, as torch computes it.
        inv_scale = np.float32(1.0 / float(self._scale))
        found_inf = False
        for i, p in enumerate(_parameters_of(optimizer)):
            g = p.grad
            if g is None:
                continue
            if g.dtype == np.float16:
                raise ValueError(
                    f"GradScaler: parameter {i} has a float16 gradient; unscaling in float16 "
                    f"would underflow. Step float32 master weights (amp.MasterWeights)."
                )
            if not found_inf and not np.isfinite(g).all():
                found_inf = True
            np.multiply(g, inv_scale, out=g, casting="unsafe")
        record["found_inf"] = found_inf
        record["stage"] = _OptimizerState.UNSCALED

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """optimizer.step() unless a gradient is inf/nan (then nothing changes: the step is
        skipped and update() lowers S). Unscales first if unscale_() was not called."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        record = self._record(optimizer)
        if record["stage"] is _OptimizerState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if record["stage"] is _OptimizerState.READY:
            self.unscale_(optimizer)
        result = None
        if not record["found_inf"]:
            result = optimizer.step(*args, **kwargs)
        record["stage"] = _OptimizerState.STEPPED
        return result

    def update(self, new_scale: float | None = None) -> None:
        """Back off S after an overflow, grow it after growth_interval clean steps.

        Combines the checks of every optimizer stepped since the last update().
        """
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = np.float32(new_scale)
        else:
            checked = [r["found_inf"] for r in self._per_optimizer.values()
                       if r["found_inf"] is not None]
            if not checked:
                raise RuntimeError("No inf checks were recorded prior to update().")
            if any(checked):
                self._scale = np.float32(float(self._scale) * self._backoff_factor)
                self._growth_tracker = 0
            elif self._growth_tracker + 1 == self._growth_interval:
                grown = np.float32(float(self._scale) * self._growth_factor)
                if np.isfinite(grown):
                    self._scale = grown
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
        self._per_optimizer.clear()

    def _record(self, optimizer: Any) -> dict[str, Any]:
        # The record holds the optimizer, so its id cannot be reused before update().
        return self._per_optimizer.setdefault(
            id(optimizer),
            {"optimizer": optimizer, "stage": _OptimizerState.READY, "found_inf": None},
        )

    # --- saving and loading ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's keys: scale, growth_factor, backoff_factor, growth_interval, _growth_tracker."""
        if not self._enabled:
            return {}
        return {
            "scale": float(self._scale),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self._enabled:
            return
        if not state:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._scale = np.float32(state["scale"])
        self._growth_factor = float(state["growth_factor"])
        self._backoff_factor = float(state["backoff_factor"])
        self._growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["_growth_tracker"])


class MasterWeights:
    """Float32 master copies of a model's parameters, the model itself turned float16.

    The optimizer steps `params` (the masters); `copy_master_to_model()` rounds them into the
    float16 model before a forward, `copy_grads_to_master()` widens the float16 gradients into
    the masters' float32 `.grad` after backward (still scaled: GradScaler unscales them there,
    in float32, where small values survive).
    """

    def __init__(self, model: Module, dtype: Any = np.float16):
        self.model = model
        self.dtype = np.dtype(dtype)
        self.model_params: list[Parameter] = list(model.parameters())
        self.params: list[Parameter] = [
            Parameter(p.data.astype(np.float32), requires_grad=p.requires_grad)
            for p in self.model_params
        ]
        model.to(self.dtype)

    def copy_master_to_model(self) -> None:
        for half, master in zip(self.model_params, self.params):
            np.copyto(half.data, master.data, casting="unsafe")

    def copy_grads_to_master(self) -> None:
        for half, master in zip(self.model_params, self.params):
            master.grad = None if half.grad is None else half.grad.astype(np.float32)

    def zero_grad(self) -> None:
        """Clear the gradients of both copies."""
        for half, master in zip(self.model_params, self.params):
            half.grad = None
            master.grad = None

    def parameters(self) -> list[Parameter]:
        return list(self.params)
