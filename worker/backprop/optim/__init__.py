"""Optimizers for the NumPy engine: functional cores for parameter-server shards, PyTorch-style
classes around them, learning-rate schedules and gradient clipping.

    from worker.backprop import optim
    opt = optim.AdamW(params, lr=3e-4)
    sched = optim.LRScheduler(opt, optim.CosineWithWarmup(3e-4, warmup_steps=100, total_steps=5000))

A PS shard uses the registry instead: `rule = optim.RULES["adamw"]`, then
`rule.init_state(slice_, hyper)` and `rule.step(slice_, grad_slice, state, hyper, t)`.

K-FAC is not elementwise: `optim.KFAC(model, ...)` is the class, `optim.kfac` the core a
runtime calls (statistics sums per micro-batch, then factors, inverses, `precondition`).
"""

from .clip import (
    clip_coefficient,
    clip_grad_norm_,
    clip_grad_value_,
    get_total_norm,
    squared_norm,
)
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
    adafactor_init_state,
    adafactor_step,
    adagrad_init_state,
    adagrad_step,
    adam_init_state,
    adam_step,
    adamw_step,
    lion_init_state,
    lion_step,
    rmsprop_init_state,
    rmsprop_step,
    sgd_init_state,
    sgd_step,
)
from .kfac import KFACHyper
from .kfac_optimizer import KFAC
from .optimizers import SGD, Adafactor, Adagrad, Adam, AdamW, Lion, Optimizer, Parameter, RMSprop
from .schedules import (
    Constant,
    CosineWithWarmup,
    Exponential,
    LinearWarmup,
    LRScheduler,
    Schedule,
    StepDecay,
)

__all__ = [
    "RULES",
    "SGD",
    "Adafactor",
    "AdafactorHyper",
    "Adagrad",
    "AdagradHyper",
    "Adam",
    "AdamHyper",
    "AdamW",
    "AdamWHyper",
    "Constant",
    "CosineWithWarmup",
    "Exponential",
    "LRScheduler",
    "LinearWarmup",
    "Lion",
    "LionHyper",
    "Optimizer",
    "OptimizerRule",
    "Parameter",
    "RMSprop",
    "RMSpropHyper",
    "SGDHyper",
    "Schedule",
    "State",
    "StepDecay",
    "adafactor_init_state",
    "adafactor_step",
    "adagrad_init_state",
    "adagrad_step",
    "adam_init_state",
    "adam_step",
    "adamw_step",
    "clip_coefficient",
    "clip_grad_norm_",
    "clip_grad_value_",
    "get_total_norm",
    "KFAC",
    "KFACHyper",
    "lion_init_state",
    "lion_step",
    "rmsprop_init_state",
    "rmsprop_step",
    "sgd_init_state",
    "sgd_step",
    "squared_norm",
]
