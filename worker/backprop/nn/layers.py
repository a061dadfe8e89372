"""The layers: Linear (and its feedback-alignment variant), Sequential, Residual, Dropout,
Embedding and the activations."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop.nn import functional as F
from worker.backprop.nn import init
from worker.backprop.nn.capture import LayerCapture
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor


class Linear(Module):
    """y = x W^T + b, W of shape (out_features, in_features) as in torch.nn.Linear.

    Initialised as PyTorch does: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    """

    # Set by nn.capture.capture_layers while K-FAC records its curvature statistics.
    capture: LayerCapture | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = None, rng: np.random.Generator | None = None):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"Linear: in_features and out_features must be positive, "
                f"got {in_features} and {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or DEFAULT_DTYPE
        bound = 1.0 / math.sqrt(in_features)
        self.weight = Parameter(np.empty((out_features, in_features), dtype=dtype))
        init.uniform_(self.weight, -bound, bound, rng)
        self.bias = None
        if bias:
            self.bias = Parameter(np.empty(out_features, dtype=dtype))
            init.uniform_(self.bias, -bound, bound, rng)

    def forward(self, x: Tensor) -> Tensor:
        out = ops.linear(x, self.weight, self.bias)
        if self.capture is not None:
            out = self.capture.record(x, out)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class FeedbackAlignmentLinear(Linear):
    """A Linear that learns by feedback alignment (Lillicrap et al., 2016): its backward sends
    the error to its input through a fixed random matrix B instead of W^T. dW = G^T x and
    db = sum G stay backprop's.

    B has the weight's shape and initial distribution, U(-1/sqrt(in), 1/sqrt(in)), drawn once
    from `feedback_seed` (None: a seed drawn from the engine's generator, after the weights)
    and never trained. It is not part of state_dict, whose keys stay torch.nn.Linear's
    (`weight`, `bias`) so weights load strictly both ways; the seed rebuilds it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: Any = None, rng: np.random.Generator | None = None,
                 feedback_seed: int | None = None):
        super().__init__(in_features, out_features, bias, dtype, rng)
        if feedback_seed is None:
            feedback_seed = int((rng or init.default_generator()).integers(2**63))
        self.feedback_seed = feedback_seed
        bound = 1.0 / math.sqrt(in_features)
        feedback = np.random.default_rng(feedback_seed).uniform(
            -bound, bound, (out_features, in_features))
        self.feedback = feedback.astype(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = ops.feedback_linear(x, self.weight, self.bias, self.feedback)
        if self.capture is not None:
            out = self.capture.record(x, out)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedback_seed={self.feedback_seed}"


class Sequential(Module):
    """Layers applied in order; children are named "0", "1", ... as in torch.nn.Sequential."""

    def __init__(self, *layers: Module):
        super().__init__()
        for index, layer in enumerate(layers):
            setattr(self, str(index), layer)

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():
            x = layer(x)
        return x

    def append(self, layer: Module) -> Sequential:
        setattr(self, str(len(self._modules)), layer)
        return self

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class Residual(Module):
    """x + block(x): the skip path carries the gradient past the block unchanged, which is what
    lets very deep networks train (He et al., 2016)."""

    def __init__(self, block: Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class _DropoutNd(Module):
    """What Dropout and Dropout2d share: p, and the generator (None: the engine's, reseeded by
    nn.init.manual_seed). Neither is a subclass of the other, as in torch."""

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = p
        self.rng = rng

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout(_DropoutNd):
    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.rng)


class Dropout2d(_DropoutNd):
    """Zero whole channels of (N, C, H, W) input with probability p (each feature map kept or
    dropped as one), scaling the kept ones by 1/(1-p), as torch.nn.Dropout2d."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training, self.rng)


class Embedding(Module):
    """A lookup table of num_embeddings vectors, initialised N(0, 1) as in PyTorch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(np.empty((num_embeddings, embedding_dim),
                                         dtype=dtype or DEFAULT_DTYPE))
        init.normal_(self.weight, 0.0, 1.0, rng)

    def forward(self, indices: Any) -> Tensor:
        return F.embedding(indices, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Flatten(Module):
    """Merge axes start_dim..end_dim (inclusive, negatives count from the end) into one, as
    torch.nn.Flatten: by default everything but the batch axis."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        start, end = self.start_dim % max(x.ndim, 1), self.end_dim % max(x.ndim, 1)
        if start > end:
            raise ValueError(f"Flatten: start_dim {self.start_dim} comes after end_dim "
                             f"{self.end_dim} for an input of shape {x.shape}")
        merged = math.prod(x.shape[start:end + 1])
        return ops.reshape(x, x.shape[:start] + (merged,) + x.shape[end + 1:])

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Identity(Module):
    def forward(self, x: Any) -> Any:
        return x


# --- activations as modules --------------------------------------------------------------------


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class SiLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.silu(x)


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu(x, self.approximate)


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.negative_slope)


class Softmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return ops.softmax(x, self.dim)


class LogSoftmax(Module):
    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return ops.log_softmax(x, self.dim)
