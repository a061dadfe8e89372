"""Learning-rate schedules: torch.optim.lr_scheduler's values, as pure functions of the step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler

from worker.backprop import optim

STEPS = 100
BASE_LR = 0.1


def torch_lrs(make_scheduler, steps=STEPS):
    """The lr PyTorch uses for each of `steps` optimizer steps (scheduler.step() after each)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return np.array(lrs)


def our_lrs(schedule, steps=STEPS):
    """The same through our LRScheduler driving one of our optimizers."""
    param = type("P", (), {"data": np.zeros(1), "grad": None})()
    opt = optim.SGD([param], lr=123.0)  # overwritten by the scheduler on construction
    scheduler = optim.LRScheduler(opt, schedule)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.lr)
        opt.step()
        scheduler.step()
    return np.array(lrs)


def hf_cosine_with_min_lr(warmup, total, min_ratio):
    """Hugging Face's get_cosine_with_min_lr_schedule_with_warmup lambda (num_cycles 0.5)."""

    def factor(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cosine * (1 - min_ratio) + min_ratio

    return factor


CASES = [
    ("constant", optim.Constant(BASE_LR), lambda o: lr_scheduler.ConstantLR(o, factor=1.0)),
    ("step_decay", optim.StepDecay(BASE_LR, 7, 0.5), lambda o: lr_scheduler.StepLR(o, 7, 0.5)),
    (
        "exponential",
        optim.Exponential(BASE_LR, 0.97),
        lambda o: lr_scheduler.ExponentialLR(o, 0.97),
    ),
    (
        "linear_warmup",
        optim.LinearWarmup(BASE_LR, warmup_steps=10, start_factor=0.25),
        lambda o: lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=10),
    ),
    (
        "cosine_with_warmup_from_start_factor",
        optim.CosineWithWarmup(BASE_LR, 10, STEPS, min_lr_ratio=0.1, start_factor=0.2),
        lambda o: lr_scheduler.SequentialLR(
            o,
            [
                lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=10),
                lr_scheduler.CosineAnnealingLR(o, T_max=STEPS - 10, eta_min=0.1 * BASE_LR),
            ],
            milestones=[10],
        ),
    ),
    (
        "cosine_with_warmup_from_zero",
        optim.CosineWithWarmup(BASE_LR, 10, STEPS, min_lr_ratio=0.05),
        lambda o: lr_scheduler.LambdaLR(o, hf_cosine_with_min_lr(10, STEPS, 0.05)),
    ),
    (
        "cosine_without_warmup",
        optim.CosineWithWarmup(BASE_LR, 0, STEPS),
        lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    ),
]


@pytest.mark.parametrize("schedule, make_torch", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schedule_matches_pytorch_scheduler_over_100_steps(schedule, make_torch):
    expected = torch_lrs(make_torch)
    # PyTorch updates most schedules recursively (lr *= ...), we use the closed forms.
    np.testing.assert_allclose([schedule.lr_at(k) for k in range(STEPS)], expected, rtol=1e-12)
    np.testing.assert_allclose(our_lrs(schedule), expected, rtol=1e-12)


def test_cosine_stays_at_its_minimum_after_total_steps():
    schedule = optim.CosineWithWarmup(1.0, warmup_steps=5, total_steps=20, min_lr_ratio=0.1)
    assert schedule.lr_at(5) == 1.0
    assert [schedule.lr_at(k) for k in (20, 21, 1000)] == pytest.approx([0.1] * 3)


def test_linear_warmup_holds_base_lr_after_warmup_and_zero_warmup_is_constant():
    schedule = optim.LinearWarmup(2.0, warmup_steps=4)
    assert [schedule.lr_at(k) for k in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert optim.LinearWarmup(2.0, warmup_steps=0).lr_at(0) == 2.0


def test_scheduler_state_dict_resumes_at_the_same_step():
    schedule = optim.StepDecay(1.0, step_size=2, gamma=0.5)
    param = type("P", (), {"data": np.zeros(1), "grad": None})()
    scheduler = optim.LRScheduler(optim.SGD([param]), schedule)
    for _ in range(5):
        scheduler.step()
    resumed_opt = optim.SGD([param])
    resumed = optim.LRScheduler(resumed_opt, schedule)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed_opt.lr == scheduler.get_last_lr() == 0.25
    resumed.step()
    assert resumed_opt.lr == 0.125


BAD_SCHEDULES = [
    (optim.Constant, {"base_lr": -1.0}, "base_lr"),
    (optim.StepDecay, {"base_lr": 1.0, "step_size": 0}, "step_size"),
    (optim.Exponential, {"base_lr": 1.0, "gamma": 0.0}, "gamma"),
    (optim.LinearWarmup, {"base_lr": 1.0, "warmup_steps": -1}, "warmup_steps"),
    (optim.LinearWarmup, {"base_lr": 1.0, "warmup_steps": 5, "start_factor": 1.5}, "start_factor"),
    (
        optim.CosineWithWarmup,
        {"base_lr": 1.0, "warmup_steps": 10, "total_steps": 10},
        "total_steps",
    ),
    (
        optim.CosineWithWarmup,
        {"base_lr": 1.0, "warmup_steps": 0, "total_steps": 10, "min_lr_ratio": 2.0},
        "min_lr_ratio",
    ),
]


@pytest.mark.parametrize(
    "schedule_type, kwargs, field", BAD_SCHEDULES, ids=[b[2] for b in BAD_SCHEDULES]
)
def test_bad_schedule_arguments_raise_value_error_naming_the_field(schedule_type, kwargs, field):
    with pytest.raises(ValueError, match=rf"{schedule_type.__name__}\.{field} must be"):
        schedule_type(**kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step must be >= 0"):
        optim.Exponential(1.0, 0.9).lr_at(-1)
