"""Learning-rate schedules: the learning rate as a pure function of the step count.

A schedule is a small frozen dataclass with `lr_at(step)`, where `step` is the number of
optimizer steps already done (0 for the first step), which is how PyTorch's schedulers count
(`last_epoch` after `scheduler.step()` once per optimizer step). Being pure, a schedule gives
every PS shard, and a run replayed after a failure, the same learning rate for the same step
without any scheduler state to checkpoint. Values use PyTorch's closed forms
(`_get_closed_form_lr`), so they agree with torch.optim.lr_scheduler to round-off.

`LRScheduler(optimizer, schedule)` drives an optimizer class the PyTorch way: it sets
`optimizer.lr` on construction and after every `.step()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol


class Schedule(Protocol):
    def lr_at(self, step: int) -> float: ...


def _require(ok: bool, schedule: object, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{type(schedule).__name__}.{field} must be {expected}, got {value!r}")


def _check_base_lr(schedule: Any) -> None:
    _require(0.0 <= schedule.base_lr, schedule, "base_lr", schedule.base_lr, ">= 0")


def _check_fractions(schedule: Any, *fields: str) -> None:
    for field in fields:
        value = getattr(schedule, field)
        _require(0.0 <= value <= 1.0, schedule, field, value, "in [0, 1]")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    # PyTorch's LinearLR closed form with end_factor 1: start + (1 - start) * min(W, step) / W.
    if warmup_steps == 0:
        return 1.0
    return start_factor + (1.0 - start_factor) * min(warmup_steps, step) / warmup_steps


@dataclass(frozen=True)
class Constant:
    base_lr: float

    def __post_init__(self) -> None:
        _check_base_lr(self)

    def lr_at(self, step: int) -> float:
        _check_step(step)
        return self.base_lr


@dataclass(frozen=True)
class StepDecay:
    """lr = base_lr * gamma ** (step // step_size), as torch's StepLR."""

    base_lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_base_lr(self)
        _require(self.step_size >= 1, self, "step_size", self.step_size, ">= 1")
        _require(0.0 < self.gamma, self, "gamma", self.gamma, "> 0")

    def lr_at(self, step: int) -> float:
        _check_step(step)
        return self.base_lr * self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class Exponential:
    """lr = base_lr * gamma ** step, as torch's ExponentialLR."""

    base_lr: float
    gamma: float

    def __post_init__(self) -> None:
        _check_base_lr(self)
        _require(0.0 < self.gamma, self, "gamma", self.gamma, "> 0")

    def lr_at(self, step: int) -> float:
        _check_step(step)
        return self.base_lr * self.gamma**step


@dataclass(frozen=True)
class LinearWarmup:
    """Linear ramp from start_factor * base_lr to base_lr over warmup_steps, then constant.

    torch's LinearLR(start_factor, end_factor=1, total_iters=warmup_steps). start_factor 0
    (the default, as Hugging Face's warmups) gives lr 0 on the very first step.
    """

    base_lr: float
    warmup_steps: int
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_base_lr(self)
        _require(self.warmup_steps >= 0, self, "warmup_steps", self.warmup_steps, ">= 0")
        _check_fractions(self, "start_factor")

    def lr_at(self, step: int) -> float:
        _check_step(step)
        return self.base_lr * _warmup_factor(step, self.warmup_steps, self.start_factor)


@dataclass(frozen=True)
class CosineWithWarmup:
    """Linear warmup (as LinearWarmup), then cosine decay to min_lr_ratio * base_lr.

    The cosine runs from base_lr at step warmup_steps to the minimum at step total_steps and
    stays there afterwards (torch's CosineAnnealingLR would rise again past T_max).
    """

    base_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.0
    start_factor: float = 0.0

    def __post_init__(self) -> None:
        _check_base_lr(self)
        _require(self.warmup_steps >= 0, self, "warmup_steps", self.warmup_steps, ">= 0")
        _require(
            self.total_steps > self.warmup_steps,
            self,
            "total_steps",
            self.total_steps,
            f"> warmup_steps ({self.warmup_steps})",
        )
        _check_fractions(self, "min_lr_ratio", "start_factor")

    def lr_at(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_steps:
            return self.base_lr * _warmup_factor(step, self.warmup_steps, self.start_factor)
        # torch's CosineAnnealingLR closed form: eta_min + (base - eta_min) (1 + cos(pi k / T)) / 2
        eta_min = self.base_lr * self.min_lr_ratio
        decay_steps = self.total_steps - self.warmup_steps
        k = min(step - self.warmup_steps, decay_steps)
        return eta_min + (self.base_lr - eta_min) * (1 + math.cos(math.pi * k / decay_steps)) / 2


class HasLR(Protocol):
    lr: float


class LRScheduler:
    """Sets `optimizer.lr = schedule.lr_at(n)` where n counts the `.step()` calls so far.

    Call `.step()` after `optimizer.step()`, as in PyTorch.
    """

    def __init__(self, optimizer: HasLR, schedule: Schedule) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.last_step = 0
        self.optimizer.lr = schedule.lr_at(0)

    def step(self) -> None:
        self.last_step += 1
        self.optimizer.lr = self.schedule.lr_at(self.last_step)

    def get_last_lr(self) -> float:
        return self.schedule.lr_at(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_step"])
        self.optimizer.lr = self.schedule.lr_at(self.last_step)
