"""chainrule's backpropagation engine: reverse-mode automatic differentiation on NumPy.

Usable on its own, like a small PyTorch:

    from worker.backprop import Tensor, nn, optim

It imports nothing but NumPy (no Ray, gRPC or protobuf), so it runs anywhere a model replica or
a parameter-server shard does.
"""

from worker.backprop import nn, ops, optim
from worker.backprop.gradcheck import GradcheckError, gradcheck, gradgradcheck
from worker.backprop.ops import (
    concatenate,
    exp,
    log,
    sqrt,
    stack,
    straight_through,
    tanh,
    where,
)
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor, grad, is_grad_enabled, no_grad

__all__ = [
    "DEFAULT_DTYPE", "GradcheckError", "Tensor", "concatenate", "exp", "grad", "gradcheck",
    "gradgradcheck", "is_grad_enabled", "log", "nn", "no_grad", "ops", "optim", "sqrt", "stack",
    "straight_through", "tanh", "where",
]
