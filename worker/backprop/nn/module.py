"""Module and Parameter: how a model names, holds, converts, saves and loads its weights.

Names, weight shapes and state_dict keys follow PyTorch (`0.weight`, `running_mean`, ...), so a
state_dict moves between this engine and torch.nn without renaming.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from worker.backprop.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that is a model weight: it requires gradients and a Module registers it."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, dtype: Any = None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


class Module:
    """Base class of every layer and model.

    Parameters, buffers (non-trained state such as BatchNorm's running mean) and child modules
    assigned as attributes are registered in order, which fixes `named_parameters()` and
    `state_dict()` key order exactly as PyTorch does.
    """

    # Set in __init__ with object.__setattr__ (our __setattr__ needs them to exist first).
    _parameters: OrderedDict[str, Parameter]
    _buffers: OrderedDict[str, str]  # name -> name: the value lives on the attribute
    _modules: OrderedDict[str, Module]
    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__()")
        if isinstance(value, Parameter):
            self._forget(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif name not in self._buffers:  # assigning a buffer (count += 1) keeps it a buffer
            self._forget(name)
        object.__setattr__(self, name, value)

    def _forget(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)

    def register_buffer(self, name: str, array: np.ndarray) -> None:
        """State saved in state_dict but not trained (running statistics, step counters)."""
        object.__setattr__(self, name, array)
        self._buffers[name] = name  # the value lives on the attribute; updates replace it

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # --- walking the tree ------------------------------------------------------------------

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Each module once, under the first name it is reached by (as torch does)."""
        seen: set[int] = set()
        for name, module in self._walk(prefix):
            if id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def _walk(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """Every path to every module, a shared module once per path (state_dict's view)."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child._walk(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for module_name, module in self.named_modules(prefix):
            for name, parameter in module._parameters.items():
                if id(parameter) not in seen:  # a shared weight is listed once, like torch
                    seen.add(id(parameter))
                    yield (f"{module_name}.{name}" if module_name else name), parameter

    def parameters(self) -> Iterator[Parameter]:
        for _, parameter in self.named_parameters():
            yield parameter

    def named_buffers(self) -> Iterator[tuple[str, np.ndarray]]:
        for module_name, module in self.named_modules():
            for name in module._buffers:
                key = f"{module_name}.{name}" if module_name else name
                yield key, getattr(module, name)

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # --- modes and dtypes ------------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for parameter in self.parameters():
            parameter.grad = None

    def to(self, dtype: Any) -> Module:
        """Convert every floating-point parameter and buffer to `dtype`, in place."""
        dtype = np.dtype(dtype)
        for parameter in self.parameters():
            if parameter.dtype != dtype:  # same dtype: keep the array (and any view onto it)
                parameter.data = parameter.data.astype(dtype)
                parameter.grad = None
        for module in self.modules():
            for name in module._buffers:
                value = getattr(module, name)
                if value.dtype.kind == "f" and value.dtype != dtype:
                    object.__setattr__(module, name, value.astype(dtype))
        return self

    def double(self) -> Module:
        return self.to(np.float64)

    def float(self) -> Module:
        return self.to(np.float32)

    # --- saving and loading ----------------------------------------------------------------

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Parameters then buffers of each module, depth first, with PyTorch's key names.

        The arrays are the live ones (as torch returns tensors sharing storage): copy them
        before training on if a snapshot is wanted.
        """
        state: OrderedDict[str, np.ndarray] = OrderedDict()
        for module_name, module in self._walk():
            prefix = f"{module_name}." if module_name else ""
            for name, parameter in module._parameters.items():
                state[prefix + name] = parameter.data
            for name in module._buffers:
                state[prefix + name] = getattr(module, name)
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy values into the existing arrays (so views onto them stay valid).

        Every problem is reported at once, before anything is changed: a half-loaded model is
        worse than an error.
        """
        own = self.state_dict()
        incoming = {key: np.asarray(getattr(value, "numpy", lambda v=value: v)())
                    for key, value in state.items()}
        problems = []
        if strict:
            missing = [key for key in own if key not in incoming]
            unexpected = [key for key in incoming if key not in own]
            if missing:
                problems.append(f"missing keys: {', '.join(missing)}")
            if unexpected:
                problems.append(f"unexpected keys: {', '.join(unexpected)}")
        for key, value in incoming.items():
            if key in own and own[key].shape != value.shape:
                problems.append(f"{key}: shape {value.shape} does not match {own[key].shape}")
        if problems:
            raise ValueError("load_state_dict: " + "; ".join(problems))
        for key, value in incoming.items():
            if key in own:
                np.copyto(own[key], value, casting="unsafe")

    # --- printing ----------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"
