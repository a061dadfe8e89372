"""Normalisation layers: BatchNorm1d and BatchNorm2d (batch statistics, running averages)
and LayerNorm."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.backprop.nn import functional as F
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor


class _BatchNorm(Module):
    """Normalise each channel (axis 1) over the batch and the axes after it; state_dict keys as
    torch.nn's batch norms (weight, bias, running_mean, running_var, num_batches_tracked).
    BatchNorm1d and BatchNorm2d differ only in the input shapes they accept."""

    input_layouts: dict[int, str] = {}  # accepted ndim -> layout, for the error message
    # Buffers (register_buffer), present when track_running_stats.
    running_mean: np.ndarray
    running_var: np.ndarray
    num_batches_tracked: np.ndarray

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, dtype: Any = None):
        super().__init__()
        dtype = dtype or DEFAULT_DTYPE
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = Parameter(np.ones(num_features, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype=dtype)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", np.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if x.ndim not in self.input_layouts:
            raise ValueError(f"{name}: expected {' or '.join(self.input_layouts.values())} "
                             f"input, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {self.num_features} features on axis 1, got shape {x.shape}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
        running = self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if running else None,
            self.running_var if running else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch norm over features (N, C) or sequences (N, C, L), as torch.nn.BatchNorm1d."""

    input_layouts = {2: "(N, C)", 3: "(N, C, L)"}


class BatchNorm2d(_BatchNorm):
    """Batch norm over images (N, C, H, W): each channel's statistics span the batch and every
    pixel, as torch.nn.BatchNorm2d."""

    input_layouts = {4: "(N, C, H, W)"}


class LayerNorm(Module):
    """Normalise each sample over its last axes (Ba et al., 2016); torch.nn.LayerNorm's keys."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, dtype: Any = None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        dtype = dtype or DEFAULT_DTYPE
        self.weight = (Parameter(np.ones(self.normalized_shape, dtype=dtype))
                       if elementwise_affine else None)
        self.bias = (Parameter(np.zeros(self.normalized_shape, dtype=dtype))
                     if elementwise_affine and bias else None)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
