"""chainrule's backpropagation engine: reverse-mode automatic differentiation on NumPy.

Usable on its own, like a small PyTorch:

    from worker.backprop import Tensor, nn, optim

It imports nothing but NumPy (no Ray, gRPC or protobuf), so it runs anywhere a model replica or
a parameter-server shard does.

A process that trains should keep freed memory for reuse (`allocator.keep_freed_memory()`,
called by the worker and shard actors and the benchmarks): NumPy's temporaries would otherwise
be returned to the OS and page-faulted back at every step. Importing the engine changes no
process-wide setting.
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
