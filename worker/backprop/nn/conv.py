"""Convolution and pooling layers over NCHW images, with torch.nn's names, weight layouts and
state_dict keys: Conv1d, Conv2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d.

The arithmetic is in the op table (`ops.conv2d`, `ops.max_pool2d`, ...); these modules hold the
weights and the arguments, and initialise them as PyTorch does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from worker.backprop.nn import functional as F
from worker.backprop.nn import init
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor


def _tuple(value: Any, count: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * count


class _ConvNd(Module):
    """What Conv1d and Conv2d share: the weight (out_channels, in_channels / groups, *kernel),
    the optional bias, torch's argument checks and initialisation."""

    spatial_dims = 0  # set by each subclass

    # Set by nn.capture.capture_layers (a LayerCapture) while K-FAC records its statistics.
    capture: Any = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        name, n = type(self).__name__, self.spatial_dims
        if in_channels <= 0 or out_channels <= 0 or groups <= 0:
            raise ValueError(f"{name}: in_channels, out_channels and groups must be positive, "
                             f"got {in_channels}, {out_channels} and {groups}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels {in_channels} and out_channels "
                             f"{out_channels} must both be divisible by groups {groups}")
        if padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {padding_mode!r} is not supported; "
                             f"only 'zeros'")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be an int, ints, 'valid' or 'same', "
                                 f"got {padding!r}")
            if padding == "same" and any(s != 1 for s in _tuple(stride, n)):
                raise ValueError(f"{name}: padding='same' is not supported for strided "
                                 f"convolutions (stride {stride}), as in torch")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _tuple(kernel_size, n)
        self.stride, self.dilation = _tuple(stride, n), _tuple(dilation, n)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, n)
        self.groups, self.padding_mode = groups, padding_mode
        dtype = dtype or DEFAULT_DTYPE
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = Parameter(np.empty(shape, dtype=dtype))
        # torch's reset_parameters: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), ...),
        # and the bias is drawn from the same bound.
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), rng=rng)
        self.bias = None
        if bias:
            fan_in, _ = init.fan_in_and_fan_out(shape)
            bound = 1.0 / math.sqrt(fan_in)
            self.bias = Parameter(np.empty(out_channels, dtype=dtype))
            init.uniform_(self.bias, -bound, bound, rng)

    def _convolve(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self._convolve(x)
        if self.capture is not None:
            out = self.capture.record(x, out)
        return out

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0,) * self.spatial_dims:
            text += f", padding={self.padding!r}"
        if self.dilation != (1,) * self.spatial_dims:
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text + ("" if self.bias is not None else ", bias=False")


class Conv1d(_ConvNd):
    """1-D convolution over (N, C, L) or (C, L): torch.nn.Conv1d's arguments and weights."""

    spatial_dims = 1

    def _convolve(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class Conv2d(_ConvNd):
    """2-D convolution over (N, C, H, W) or (C, H, W): torch.nn.Conv2d's arguments, weight
    (out_channels, in_channels / groups, kh, kw) and bias (out_channels,)."""

    spatial_dims = 2

    def _convolve(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class MaxPool2d(Module):
    """The maximum of each window, as torch.nn.MaxPool2d (stride defaults to kernel_size)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 dilation: Any = 1, return_indices: bool = False, ceil_mode: bool = False):
        super().__init__()
        if return_indices:
            raise ValueError("MaxPool2d: return_indices=True is not supported")
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode
        self.return_indices = False

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """The mean of each window, as torch.nn.AvgPool2d (padding counted in the divisor unless
    count_include_pad=False)."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (ints, or None to keep that input size), with
    torch's windows: output i averages input floor(i H / Ho) .. ceil((i + 1) H / Ho) - 1."""

    def __init__(self, output_size: Any):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
