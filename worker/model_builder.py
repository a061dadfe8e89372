"""How a job spec becomes engine objects: the model, the loss, the optimizer rule with its
hyperparameters, the learning-rate schedule and the clipping settings.

The model spec lists layers by their output sizes only; every input size is inferred from the
previous layer's output, starting from the data's per-sample feature shape (as PyTorch's Lazy
modules do). One walk over the layers does that inference, checks each layer against what
flows into it, and counts parameters; building the modules is an optional last step of the
same walk, so validating or counting a 20M-parameter spec allocates nothing.

Every inconsistency is a `SpecError` whose path names the field as the user wrote it
("model.layers[2].residual", "optimizer.adamw.lr"); the service returns it as INVALID_ARGUMENT
before anything is scheduled.

Shapes here are per sample, without the batch axis: (features,) for a vector, (time, features)
for a sequence, (time,) for a sequence of integer tokens.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from chainrule.v1 import job_pb2
from worker.backprop import nn
from worker.backprop.nn import functional as F
from worker.backprop.nn.recurrent import GRU, LSTM, RNN, _Recurrent
from worker.backprop.optim import (
    RULES,
    AdamHyper,
    Constant,
    CosineWithWarmup,
    Exponential,
    LinearWarmup,
    Schedule,
    StepDecay,
)
from worker.backprop.optim.kfac import KFACHyper
from worker.backprop.tensor import Tensor
from worker.kfac_layout import KFAC
from worker.spec_error import SpecError

LOSSES = ("cross_entropy", "mse", "l1", "binary_cross_entropy_with_logits",
          "next_token_cross_entropy")
DTYPES = {"": np.float32, "float32": np.float32, "float64": np.float64}


# --- modules that only a spec needs -----------------------------------------------------------


class _OutputSequence(_Recurrent):
    """A recurrent layer that returns only its output sequence (every time step), dropping the
    final state, so it can sit in a Sequential. Parameter names stay torch's (weight_ih_l0)."""

    # Returns what a Sequential's next layer takes, not the (output, state) pair: on purpose.
    def forward(self, input: Tensor, hx: Any = None) -> Tensor:  # type: ignore[override]
        output, _ = super().forward(input, hx)
        return output


class SequenceLSTM(_OutputSequence, LSTM):
    pass


class SequenceGRU(_OutputSequence, GRU):
    pass


class SequenceRNN(_OutputSequence, RNN):
    pass


class LastStep(nn.Module):
    """(batch, time, features) -> (batch, features): the last time step of a sequence."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, -1]


# --- shape inference and construction, one walk --------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """One layer of the model, checked against what flows into it."""

    path: str  # as the user wrote it: "model.layers[2].linear"
    output_shape: tuple[int, ...]  # per sample
    parameters: int  # its learned parameters, those of the layers nested in it included
    trainable: bool = True  # false: the spec froze it (Layer.trainable), nested layers too
    frozen_parameters: int = 0  # of `parameters`, those that do not train


@dataclass(frozen=True)
class ModelPlan:
    """The model a spec describes on a given data set, resolved without building it."""

    spec: bytes  # the ModelSpec, serialized (and so immutable): the replicas build from it
    input_shape: tuple[int, ...]  # one sample's features
    input_dtype: str  # the features' type: an integer type means tokens (for an embedding)
    layers: tuple[LayerPlan, ...]  # the top-level layers, in order
    output_shape: tuple[int, ...]
    parameters: int
    # Parameters of frozen layers (trainable: false): they keep their initial values. The
    # built model has them with requires_grad False, and ParameterLayout marks their slots.
    frozen_parameters: int = 0
    # The batch norms (their paths) that see one value per channel of a sample: in training
    # they need a micro-batch of at least 2 samples for a variance, so the job's batches are
    # cut with that minimum (scheduler/sampler.py).
    per_sample_batch_norms: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Signal:
    """What flows from one layer into the next, per sample."""

    shape: tuple[int, ...]
    integer: bool | None  # integer tokens; None when the caller did not say (input_dtype)

    def describe(self) -> str:
        kind = {True: "integer ", False: "float ", None: ""}[self.integer]
        return f"{kind}input of shape {self.shape}"


@dataclass(frozen=True)
class _Context:
    dtype: Any
    rng: np.random.Generator | None
    build: bool
    # Paths of the batch norms that see one value per channel of a sample (ModelPlan's
    # `per_sample_batch_norms`), found as the walk meets them, nested layers included.
    per_sample_batch_norms: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True)
class _Planned:
    """One layer checked against its input: its output, parameter count and how to build it."""

    output: _Signal
    parameters: int
    make: Callable[[], nn.Module]
    frozen: int = 0  # of `parameters`, those in frozen layers nested in this one


def _positive(value: int, path: str) -> int:
    if value < 1:
        raise SpecError(path, f"must be >= 1, got {value}")
    return value


def _in_range(value: float, path: str, low: float, high: float, *, high_open: bool) -> float:
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise SpecError(path, f"must be in [{low:g}, {high:g}{')' if high_open else ']'}, "
                              f"got {value:g}")
    return value


def _require_float(signal: _Signal, path: str, kind: str) -> None:
    if signal.integer:
        raise SpecError(path, f"{kind} needs float features, but its input is integer tokens "
                              f"of shape {signal.shape}; start with an embedding layer")


def _require_features(signal: _Signal, path: str, kind: str) -> int:
    if not signal.shape:
        raise SpecError(path, f"{kind} needs a feature axis, got {signal.describe()}")
    return signal.shape[-1]


def _plan_linear(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "linear")
    fan_in = _require_features(signal, path, "linear")
    out = _positive(cfg.out_features, f"{path}.out_features")
    bias = cfg.bias if cfg.HasField("bias") else True
    if cfg.feedback not in ("", "alignment"):
        raise SpecError(f"{path}.feedback", f"must be '' (backpropagation) or 'alignment', got "
                                            f"{cfg.feedback!r}")
    # Feedback alignment's fixed matrix is drawn from the same generator, after the weights:
    # every replica building from the spec's seed gets the same one.
    linear = nn.FeedbackAlignmentLinear if cfg.feedback == "alignment" else nn.Linear
    return _Planned(_Signal(signal.shape[:-1] + (out,), False), out * fan_in + (out if bias else 0),
                    lambda: linear(fan_in, out, bias, dtype=ctx.dtype, rng=ctx.rng))


def _activation(module: type[nn.Module], kind: str) -> Callable[..., _Planned]:
    def plan(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
        _require_float(signal, path, kind)
        return _Planned(signal, 0, module)

    return plan


def _plan_gelu(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "gelu")
    approximate = cfg.approximate or "none"
    if approximate not in ("none", "tanh"):
        raise SpecError(f"{path}.approximate", f"must be 'none' or 'tanh', got {approximate!r}")
    return _Planned(signal, 0, lambda: nn.GELU(approximate))


def _plan_leaky_relu(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "leaky_relu")
    slope = cfg.negative_slope if cfg.HasField("negative_slope") else 0.01
    return _Planned(signal, 0, lambda: nn.LeakyReLU(slope))


def _plan_dropout(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "dropout")
    p = _in_range(cfg.p if cfg.HasField("p") else 0.5, f"{path}.p", 0.0, 1.0, high_open=True)
    # No generator of its own: masks come from the engine's generator, which the runtime
    # seeds per (step, micro-batch), so they do not depend on which worker runs them.
    return _Planned(signal, 0, lambda: nn.Dropout(p))


def _plan_batch_norm(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "batch_norm")
    if len(signal.shape) != 1:
        raise SpecError(path, f"batch_norm needs (features,) inputs, got {signal.describe()}; "
                              f"for sequences use layer_norm")
    features = signal.shape[0]
    eps, momentum = _norm_settings(cfg, path)
    ctx.per_sample_batch_norms.append(path)
    return _Planned(signal, 2 * features,
                    lambda: nn.BatchNorm1d(features, eps, momentum, dtype=ctx.dtype))


def _plan_layer_norm(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _require_float(signal, path, "layer_norm")
    features = _require_features(signal, path, "layer_norm")
    eps = cfg.eps if cfg.HasField("eps") else 1e-5
    if not eps > 0:
        raise SpecError(f"{path}.eps", f"must be > 0, got {eps:g}")
    return _Planned(signal, 2 * features, lambda: nn.LayerNorm(features, eps, dtype=ctx.dtype))


def _plan_embedding(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    if signal.integer is False:
        raise SpecError(path, f"embedding looks up integer tokens, but its input is "
                              f"{signal.describe()}")
    count = _positive(cfg.num_embeddings, f"{path}.num_embeddings")
    dim = _positive(cfg.embedding_dim, f"{path}.embedding_dim")
    return _Planned(_Signal(signal.shape + (dim,), False), count * dim,
                    lambda: nn.Embedding(count, dim, dtype=ctx.dtype, rng=ctx.rng))


def _plan_residual(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    if not cfg.layers:
        raise SpecError(f"{path}.layers", "a residual block needs at least one layer")
    output, parameters, frozen, modules = _walk(cfg.layers, signal, f"{path}.layers", ctx)
    changed_type = signal.integer is not None and output.integer != signal.integer
    if output.shape != signal.shape or changed_type:
        raise SpecError(path, f"a residual block must keep its input's shape: it maps "
                              f"{_width(signal)} to {_width(output)}")
    return _Planned(signal, parameters, lambda: nn.Residual(nn.Sequential(*modules)), frozen)


def _width(signal: _Signal) -> str:
    if len(signal.shape) == 1 and not signal.integer:
        return f"width {signal.shape[0]}"
    return signal.describe()


def _recurrent(kind: str, module: Callable[..., nn.Module], gates: int
               ) -> Callable[..., _Planned]:
    def plan(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
        _require_float(signal, path, kind)
        if len(signal.shape) != 2:
            raise SpecError(path, f"{kind} needs a sequence (time, features), got "
                                  f"{signal.describe()}")
        steps, features = signal.shape
        hidden = _positive(cfg.hidden_size, f"{path}.hidden_size")
        layers = max(cfg.num_layers, 1)
        dropout = cfg.dropout if cfg.HasField("dropout") else 0.0
        _in_range(dropout, f"{path}.dropout", 0.0, 1.0, high_open=True)
        if dropout and layers == 1:
            raise SpecError(f"{path}.dropout", "dropout applies between stacked layers; with "
                                               "num_layers 1 there is none (add num_layers)")
        options: dict[str, Any] = {}
        if kind == "rnn":
            options["nonlinearity"] = cfg.nonlinearity or "tanh"
            if options["nonlinearity"] not in ("tanh", "relu"):
                raise SpecError(f"{path}.nonlinearity",
                                f"must be 'tanh' or 'relu', got {cfg.nonlinearity!r}")
        elif cfg.nonlinearity:
            raise SpecError(f"{path}.nonlinearity", f"only rnn has a nonlinearity; {kind} "
                                                    f"uses its own gates")
        directions = 2 if cfg.bidirectional else 1
        rows = gates * hidden
        parameters = 0
        for layer in range(layers):
            layer_input = features if layer == 0 else hidden * directions
            parameters += directions * (rows * (layer_input + hidden) + 2 * rows)

        def make() -> nn.Module:
            recurrent = module(features, hidden, layers, batch_first=True, dropout=dropout,
                               bidirectional=bool(cfg.bidirectional), dtype=ctx.dtype,
                               rng=ctx.rng, **options)
            # The init generator must not drive the dropout between layers: that comes from
            # the engine's generator, seeded per (step, micro-batch) by the runtime.
            recurrent.rng = None
            return recurrent

        return _Planned(_Signal((steps, hidden * directions), False), parameters, make)

    return plan


def _plan_last_step(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    if len(signal.shape) < 2:
        raise SpecError(path, f"last_step takes the last step of a sequence (time, features), "
                              f"got {signal.describe()}")
    return _Planned(_Signal(signal.shape[1:], signal.integer), 0, LastStep)


def _plan_flatten(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    return _Planned(_Signal((math.prod(signal.shape),), signal.integer), 0, nn.Flatten)


# --- images: convolution and pooling, NCHW -------------------------------------------------------


def _shape_argument(value: Any, path: str, dims: int, default: tuple[int, ...] | None, *,
                    minimum: int, words: tuple[str, ...] = ()) -> tuple[int, ...] | str:
    """A PyTorch-style size argument (a google.protobuf.Value): one number for every spatial
    axis, a list with one per axis, or one of `words` ("same"); `default` when unset."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        if default is None:
            raise SpecError(path, "required: a number or a list of numbers")
        return default
    if kind == "string_value":
        if value.string_value in words:
            return value.string_value
        allowed = f"a number, a list of {dims} numbers" + "".join(f" or {w!r}" for w in words)
        raise SpecError(path, f"must be {allowed}, got {value.string_value!r}")
    numbers = ([v.number_value if v.WhichOneof("kind") == "number_value" else None
                for v in value.list_value.values] if kind == "list_value"
               else [value.number_value] * dims if kind == "number_value" else [])
    given = [n for n in numbers if n is not None]
    if len(numbers) != dims or len(given) != dims:
        raise SpecError(path, f"must be one number or a list of {dims} numbers")
    if any(not float(n).is_integer() or n < minimum for n in given):
        raise SpecError(path, f"must be integers >= {minimum}, got {given}")
    return tuple(int(n) for n in given)


def _spatial_input(signal: _Signal, path: str, kind: str, dims: int) -> tuple[int, ...]:
    """(channels, *spatial) of an image-like input, or a SpecError saying what fits."""
    _require_float(signal, path, kind)
    if len(signal.shape) != dims + 1:
        expected = "(channels, height, width)" if dims == 2 else "(channels, length)"
        hint = (" (a conv after a flatten? flatten once the convolutions are done)"
                if len(signal.shape) == 1 else "")
        raise SpecError(path, f"{kind} needs {expected} inputs, got {signal.describe()}{hint}")
    return signal.shape


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                 path: str, axis: str) -> int:
    """PyTorch's output length of a convolution or pooling window over one axis."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * padding - span) // stride + 1
    if out < 1:
        raise SpecError(path, f"the kernel spans {span} along {axis} but the input is only "
                              f"{size} (+{2 * padding} padding); use a smaller kernel_size or "
                              f"dilation, or add padding")
    return out


_AXES = {1: ("length",), 2: ("height", "width")}


def _conv(kind: str, dims: int, module: Callable[..., nn.Module]) -> Callable[..., _Planned]:
    def plan(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
        channels, *sizes = _spatial_input(signal, path, kind, dims)
        out_channels = _positive(cfg.out_channels, f"{path}.out_channels")
        kernel = _shape_argument(cfg.kernel_size, f"{path}.kernel_size", dims, None, minimum=1)
        stride = _shape_argument(cfg.stride, f"{path}.stride", dims, (1,) * dims, minimum=1)
        dilation = _shape_argument(cfg.dilation, f"{path}.dilation", dims, (1,) * dims,
                                   minimum=1)
        padding = _shape_argument(cfg.padding, f"{path}.padding", dims, (0,) * dims, minimum=0,
                                  words=("same", "valid"))
        groups = cfg.groups or 1  # 0 means 1: one group, every input channel to every output
        if channels % groups or out_channels % groups:
            raise SpecError(f"{path}.groups", f"in_channels {channels} (the input's) and "
                                              f"out_channels {out_channels} must both be "
                                              f"divisible by groups {groups}")
        if padding == "same" and stride != (1,) * dims:
            raise SpecError(f"{path}.padding", f"'same' needs stride 1 (as in PyTorch), got "
                                               f"stride {list(stride)}")
        assert isinstance(kernel, tuple) and isinstance(stride, tuple)
        assert isinstance(dilation, tuple)
        if padding == "same":  # padded by dilation * (kernel - 1) in all: the input's size
            out_sizes = tuple(sizes)
        else:
            pads = (0,) * dims if padding == "valid" else padding
            out_sizes = tuple(_output_size(size, k, s, p, d, f"{path}.kernel_size", axis)
                              for axis, size, k, s, p, d
                              in zip(_AXES[dims], sizes, kernel, stride, pads, dilation))
        bias = cfg.bias if cfg.HasField("bias") else True
        weights = out_channels * (channels // groups) * math.prod(kernel)
        return _Planned(_Signal((out_channels, *out_sizes), False),
                        weights + (out_channels if bias else 0),
                        lambda: module(channels, out_channels, kernel, stride, padding, dilation,
                                       groups, bias, dtype=ctx.dtype, rng=ctx.rng))

    return plan


def _plan_max_pool2d(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    channels, *sizes = _spatial_input(signal, path, "max_pool2d", 2)
    kernel = _shape_argument(cfg.kernel_size, f"{path}.kernel_size", 2, None, minimum=1)
    assert isinstance(kernel, tuple)
    stride = _shape_argument(cfg.stride, f"{path}.stride", 2, kernel, minimum=1)
    padding = _shape_argument(cfg.padding, f"{path}.padding", 2, (0, 0), minimum=0)
    dilation = _shape_argument(cfg.dilation, f"{path}.dilation", 2, (1, 1), minimum=1)
    assert isinstance(stride, tuple) and isinstance(padding, tuple)
    assert isinstance(dilation, tuple)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise SpecError(f"{path}.padding", f"must be at most half the kernel ({list(kernel)}), "
                                           f"got {list(padding)}")
    out = tuple(_output_size(n, k, s, p, d, f"{path}.kernel_size", axis)
                for axis, n, k, s, p, d in zip(_AXES[2], sizes, kernel, stride, padding,
                                               dilation))
    return _Planned(_Signal((channels, *out), False), 0,
                    lambda: nn.MaxPool2d(kernel, stride, padding, dilation))


def _plan_avg_pool2d(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    channels, *sizes = _spatial_input(signal, path, "avg_pool2d", 2)
    kernel = _shape_argument(cfg.kernel_size, f"{path}.kernel_size", 2, None, minimum=1)
    assert isinstance(kernel, tuple)
    stride = _shape_argument(cfg.stride, f"{path}.stride", 2, kernel, minimum=1)
    padding = _shape_argument(cfg.padding, f"{path}.padding", 2, (0, 0), minimum=0)
    assert isinstance(stride, tuple) and isinstance(padding, tuple)
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise SpecError(f"{path}.padding", f"must be at most half the kernel ({list(kernel)}), "
                                           f"got {list(padding)}")
    out = tuple(_output_size(n, k, s, p, 1, f"{path}.kernel_size", axis)
                for axis, n, k, s, p in zip(_AXES[2], sizes, kernel, stride, padding))
    include = cfg.count_include_pad if cfg.HasField("count_include_pad") else True
    return _Planned(_Signal((channels, *out), False), 0,
                    lambda: nn.AvgPool2d(kernel, stride, padding, count_include_pad=include))


def _plan_adaptive_avg_pool2d(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    channels, *sizes = _spatial_input(signal, path, "adaptive_avg_pool2d", 2)
    out = _shape_argument(cfg.output_size, f"{path}.output_size", 2, None, minimum=1)
    assert isinstance(out, tuple)
    if any(o > n for o, n in zip(out, sizes)):
        raise SpecError(f"{path}.output_size", f"must be at most the input's {list(sizes)}, got "
                                               f"{list(out)}")
    return _Planned(_Signal((channels, *out), False), 0, lambda: nn.AdaptiveAvgPool2d(out))


def _norm_settings(cfg: Any, path: str) -> tuple[float, float]:
    eps = cfg.eps if cfg.HasField("eps") else 1e-5
    if not eps > 0:
        raise SpecError(f"{path}.eps", f"must be > 0, got {eps:g}")
    momentum = _in_range(cfg.momentum if cfg.HasField("momentum") else 0.1, f"{path}.momentum",
                         0.0, 1.0, high_open=False)
    return eps, momentum


def _plan_batch_norm2d(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    channels, *_ = _spatial_input(signal, path, "batch_norm2d", 2)
    eps, momentum = _norm_settings(cfg, path)
    if math.prod(signal.shape[1:]) == 1:  # a 1x1 map: one value per channel, as batch_norm
        ctx.per_sample_batch_norms.append(path)
    return _Planned(signal, 2 * channels,
                    lambda: nn.BatchNorm2d(channels, eps, momentum, dtype=ctx.dtype))


def _plan_dropout2d(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _spatial_input(signal, path, "dropout2d", 2)
    p = _in_range(cfg.p if cfg.HasField("p") else 0.5, f"{path}.p", 0.0, 1.0, high_open=True)
    return _Planned(signal, 0, lambda: nn.Dropout2d(p))


# --- sequences: attention and transformers ----------------------------------------------------


class SelfAttention(nn.MultiheadAttention):
    """MultiheadAttention as one layer of a Sequential: attends a (batch, time, embed_dim)
    sequence to itself. Keys stay torch's (in_proj_weight, out_proj.weight, ...)."""

    def __init__(self, *args: Any, is_causal: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.is_causal = is_causal

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False, is_causal=self.is_causal)[0]


class EncoderLayer(nn.TransformerEncoderLayer):
    """TransformerEncoderLayer as one layer of a Sequential, causal or not; torch's keys."""

    def __init__(self, *args: Any, is_causal: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.is_causal = is_causal

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x, is_causal=self.is_causal)


class MeanPool(nn.Module):
    """(batch, time, features) -> (batch, features): the mean over time steps."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(axis=1)


def _sequence_input(signal: _Signal, path: str, kind: str) -> tuple[int, int]:
    _require_float(signal, path, kind)
    if len(signal.shape) != 2:
        raise SpecError(path, f"{kind} needs a sequence (time, features), got "
                              f"{signal.describe()}")
    return signal.shape[0], signal.shape[1]


def _heads(heads: int, width: int, path: str, width_name: str) -> int:
    _positive(heads, path)
    if width % heads:
        fits = [h for h in range(1, width + 1) if width % h == 0 and h <= 64]
        raise SpecError(path, f"{width_name} {width} (the input's last axis) is not divisible "
                              f"by {heads} heads; use one of {fits}")
    return heads


def _attention_parameters(width: int, bias: bool) -> int:
    return 4 * width * width + (4 * width if bias else 0)  # in_proj (3 E x E) and out_proj


def _plan_multihead_attention(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _, width = _sequence_input(signal, path, "multihead_attention")
    heads = _heads(cfg.num_heads, width, f"{path}.num_heads", "embed_dim")
    dropout = _in_range(cfg.dropout, f"{path}.dropout", 0.0, 1.0, high_open=True)
    bias = cfg.bias if cfg.HasField("bias") else True
    return _Planned(signal, _attention_parameters(width, bias),
                    lambda: SelfAttention(width, heads, dropout, bias, dtype=ctx.dtype,
                                          rng=ctx.rng, is_causal=cfg.is_causal))


def _plan_transformer_encoder_layer(cfg: Any, signal: _Signal, path: str,
                                    ctx: _Context) -> _Planned:
    _, width = _sequence_input(signal, path, "transformer_encoder_layer")
    heads = _heads(cfg.nhead, width, f"{path}.nhead", "d_model")
    feedforward = cfg.dim_feedforward or 2048  # 0 means PyTorch's default
    dropout = _in_range(cfg.dropout if cfg.HasField("dropout") else 0.1, f"{path}.dropout",
                        0.0, 1.0, high_open=True)
    activation = cfg.activation or "relu"
    if activation not in ("relu", "gelu"):
        raise SpecError(f"{path}.activation", f"must be 'relu' or 'gelu', got "
                                              f"{cfg.activation!r}")
    eps = cfg.layer_norm_eps if cfg.HasField("layer_norm_eps") else 1e-5
    if not eps > 0:
        raise SpecError(f"{path}.layer_norm_eps", f"must be > 0, got {eps:g}")
    parameters = (_attention_parameters(width, True) + 2 * width * feedforward + feedforward
                  + width + 4 * width)
    return _Planned(signal, parameters,
                    lambda: EncoderLayer(width, heads, feedforward, dropout, activation, eps,
                                         norm_first=cfg.norm_first, dtype=ctx.dtype,
                                         rng=ctx.rng, is_causal=cfg.is_causal))


def _plan_positional_embedding(cfg: Any, signal: _Signal, path: str,
                               ctx: _Context) -> _Planned:
    steps, width = _sequence_input(signal, path, "positional_embedding")
    positions = cfg.num_positions or steps  # 0: exactly the data's sequence length
    if positions < steps:
        raise SpecError(f"{path}.num_positions", f"must be at least the sequence length "
                                                 f"{steps}, got {positions}")
    return _Planned(signal, positions * width,
                    lambda: nn.PositionalEmbedding(positions, width, dtype=ctx.dtype,
                                                   rng=ctx.rng))


def _plan_mean_pool(cfg: Any, signal: _Signal, path: str, ctx: _Context) -> _Planned:
    _sequence_input(signal, path, "mean_pool")
    return _Planned(_Signal(signal.shape[1:], False), 0, MeanPool)


_LAYER_PLANS: dict[str, Callable[..., _Planned]] = {
    "linear": _plan_linear,
    "relu": _activation(nn.ReLU, "relu"),
    "tanh": _activation(nn.Tanh, "tanh"),
    "sigmoid": _activation(nn.Sigmoid, "sigmoid"),
    "gelu": _plan_gelu,
    "silu": _activation(nn.SiLU, "silu"),
    "leaky_relu": _plan_leaky_relu,
    "dropout": _plan_dropout,
    "batch_norm": _plan_batch_norm,
    "layer_norm": _plan_layer_norm,
    "embedding": _plan_embedding,
    "residual": _plan_residual,
    "lstm": _recurrent("lstm", SequenceLSTM, 4),
    "gru": _recurrent("gru", SequenceGRU, 3),
    "rnn": _recurrent("rnn", SequenceRNN, 1),
    "last_step": _plan_last_step,
    "flatten": _plan_flatten,
    "conv1d": _conv("conv1d", 1, nn.Conv1d),
    "conv2d": _conv("conv2d", 2, nn.Conv2d),
    "max_pool2d": _plan_max_pool2d,
    "avg_pool2d": _plan_avg_pool2d,
    "adaptive_avg_pool2d": _plan_adaptive_avg_pool2d,
    "batch_norm2d": _plan_batch_norm2d,
    "dropout2d": _plan_dropout2d,
    "multihead_attention": _plan_multihead_attention,
    "transformer_encoder_layer": _plan_transformer_encoder_layer,
    "positional_embedding": _plan_positional_embedding,
    "mean_pool": _plan_mean_pool,
}
LAYER_KINDS: tuple[str, ...] = tuple(_LAYER_PLANS)


def _walk(layers: Any, signal: _Signal, path: str, ctx: _Context,
          plans: list[LayerPlan] | None = None) -> tuple[_Signal, int, int, list[nn.Module]]:
    """(output signal, parameter count, frozen parameter count, modules if ctx.build) of a
    list of layers; each layer's plan is appended to `plans` when given.

    A layer with `trainable: false` is frozen with every layer nested in it: its parameters
    are built with requires_grad False, so backward computes no gradient for them (the engine
    skips a VJP whose input needs none), and ParameterLayout marks their slots so the
    parameter-server shards never update them (worker/flat_parameters.py).
    """
    parameters, frozen, modules = 0, 0, []
    for index, layer in enumerate(layers):
        layer_path = f"{path}[{index}]"
        kind = layer.WhichOneof("kind")
        if kind is None:
            raise SpecError(layer_path, f"empty layer: set exactly one of "
                                        f"{', '.join(LAYER_KINDS)}")
        plan = _LAYER_PLANS.get(kind)
        if plan is None:
            raise SpecError(layer_path, f"layer kind {kind!r} is not supported by this worker")
        planned = plan(getattr(layer, kind), signal, f"{layer_path}.{kind}", ctx)
        trainable = layer.trainable if layer.HasField("trainable") else True
        if not trainable and not planned.parameters:
            raise SpecError(f"{layer_path}.trainable", f"{kind} has no parameters to freeze; "
                                                       f"leave trainable unset")
        layer_frozen = planned.frozen if trainable else planned.parameters
        if ctx.build:
            module = planned.make()
            if not trainable:
                for parameter in module.parameters():
                    parameter.requires_grad = False
            modules.append(module)
        parameters += planned.parameters
        frozen += layer_frozen
        signal = planned.output
        if plans is not None:
            plans.append(LayerPlan(f"{layer_path}.{kind}", signal.shape, planned.parameters,
                                   trainable, layer_frozen))
    return signal, parameters, frozen, modules


def _plan_model(model_spec: job_pb2.ModelSpec, input_shape: Any, input_dtype: Any, path: str,
                ctx: _Context,
                plans: list[LayerPlan] | None = None
                ) -> tuple[_Signal, int, int, list[nn.Module]]:
    shape = tuple(int(n) for n in input_shape)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"input_shape must be one sample's non-empty shape, got {input_shape}")
    integer = None
    if input_dtype is not None:
        kind = np.dtype(input_dtype).kind
        if kind not in "iuf":
            raise ValueError(f"input_dtype must be an integer or float type, got {input_dtype}")
        integer = kind in "iu"
    if not model_spec.layers:
        raise SpecError(f"{path}.layers", "a model needs at least one layer")
    return _walk(model_spec.layers, _Signal(shape, integer), f"{path}.layers", ctx, plans)


# --- the model -------------------------------------------------------------------------------


def build_model(model_spec: job_pb2.ModelSpec, input_shape: tuple[int, ...],
                dtype: Any = np.float32, *, seed: int | None = None, input_dtype: Any = None,
                path: str = "model") -> nn.Sequential:
    """The engine model for `model_spec`, given one sample's `input_shape` (e.g. (64,)).

    Children are named "0", "1", ... (state_dict keys "0.weight", "0.bias", as
    torch.nn.Sequential), recurrent layers run batch first. `seed` fixes the initial weights
    (None: the engine's global generator, as torch's default); dropout masks always come from
    the engine's generator. `input_dtype` is the data's feature type: an integer type says the
    features are tokens (for embedding); None means not known, which skips the checks that
    depend on it.
    """
    rng = np.random.default_rng(seed) if seed is not None else None
    ctx = _Context(dtype=np.dtype(dtype), rng=rng, build=True)
    _, _, _, modules = _plan_model(model_spec, input_shape, input_dtype, path, ctx)
    return nn.Sequential(*modules)


def output_shape(model_spec: job_pb2.ModelSpec, input_shape: tuple[int, ...],
                 input_dtype: Any = None, path: str = "model") -> tuple[int, ...]:
    """One sample's output shape, without building anything."""
    ctx = _Context(dtype=np.float32, rng=None, build=False)
    return _plan_model(model_spec, input_shape, input_dtype, path, ctx)[0].shape


def output_features(model_spec: job_pb2.ModelSpec, input_shape: tuple[int, ...],
                    input_dtype: Any = None, path: str = "model") -> int:
    """The width of the model's output vector; a SpecError when the output is not one vector
    per sample (a sequence needs last_step or flatten before the losses)."""
    shape = output_shape(model_spec, input_shape, input_dtype, path)
    if len(shape) != 1:
        raise SpecError(f"{path}.layers", f"the model outputs shape {shape} per sample; the "
                                          f"losses need one vector per sample (end a sequence "
                                          f"with last_step or flatten)")
    return shape[0]


def count_parameters(model_spec: job_pb2.ModelSpec, input_shape: tuple[int, ...],
                     input_dtype: Any = None) -> int:
    """Trainable parameters of the model, counted without allocating them."""
    ctx = _Context(dtype=np.float32, rng=None, build=False)
    return _plan_model(model_spec, input_shape, input_dtype, "model", ctx)[1]


def plan_model(model_spec: job_pb2.ModelSpec, input_shape: tuple[int, ...], input_dtype: Any,
               path: str = "model") -> ModelPlan:
    """Every layer's output shape and parameter count, from one walk that allocates nothing."""
    ctx = _Context(dtype=np.float32, rng=None, build=False)
    layers: list[LayerPlan] = []
    output, parameters, frozen, _ = _plan_model(model_spec, input_shape, input_dtype, path,
                                                ctx, layers)
    return ModelPlan(model_spec.SerializeToString(deterministic=True),
                     tuple(int(n) for n in input_shape), np.dtype(input_dtype).name,
                     tuple(layers), output.shape, parameters, frozen,
                     tuple(ctx.per_sample_batch_norms))


def build_planned_model(plan: ModelPlan, dtype: Any, seed: int | None) -> nn.Sequential:
    """The engine model of a plan: `build_model` on the spec and data it was planned for."""
    return build_model(job_pb2.ModelSpec.FromString(plan.spec), plan.input_shape, dtype,
                       seed=seed, input_dtype=plan.input_dtype)


def check_model_fits_data(spec: job_pb2.JobSpec, input_shape: tuple[int, ...], *, task: str,
                          num_classes: int = 0, target_shape: tuple[int, ...] = (),
                          input_dtype: Any = None) -> None:
    """SpecError unless the model's output, the loss and the data's targets agree.

    `task` is "classification" (integer labels 0..num_classes-1) or "regression" (float
    targets of `target_shape`, e.g. (1,)).
    """
    loss = _loss_name(spec)
    last = f"model.layers[{len(spec.model.layers) - 1}]"
    if loss == "next_token_cross_entropy" or task == "next_token":
        if loss != "next_token_cross_entropy" or task != "next_token":
            raise SpecError("loss", "next_token_cross_entropy and text data sets go together: "
                                    f"the loss is {loss} and the data set is {task}")
        shape = output_shape(spec.model, input_shape, input_dtype)
        expected = (input_shape[0], num_classes)
        if shape != expected:
            raise SpecError(last, f"the model outputs shape {shape} per window; next-token "
                                  f"prediction needs {expected}: a score for each of the "
                                  f"{num_classes} byte values at each of the {input_shape[0]} "
                                  f"positions (end with linear {{out_features: {num_classes}}})")
        return
    width = output_features(spec.model, input_shape, input_dtype)
    if loss == "cross_entropy":
        if task != "classification":
            raise SpecError("loss", f"cross_entropy needs class labels, but the data set is "
                                    f"{task}; use mse or l1")
        if width != num_classes:
            raise SpecError(last, f"the model outputs {width} values per sample but the data "
                                  f"set has {num_classes} classes; the output must be "
                                  f"{num_classes} wide")
        return
    if loss == "binary_cross_entropy_with_logits" and task == "classification":
        if num_classes > 2 or width != 1:
            raise SpecError(last if num_classes <= 2 else "loss",
                            f"binary_cross_entropy_with_logits on class labels needs 2 classes "
                            f"and 1 output; got {num_classes} classes and {width} outputs")
        return
    if task != "regression":
        raise SpecError("loss", f"{loss} needs float targets, but the data set has class labels; "
                                f"use cross_entropy")
    expected_width = math.prod(target_shape) if target_shape else 1
    if width != expected_width:
        raise SpecError(last, f"the model outputs {width} values per sample but the targets "
                              f"have {expected_width}")


# --- the loss ----------------------------------------------------------------------------------


def _loss_name(spec: job_pb2.JobSpec) -> str:
    if not spec.loss:
        raise SpecError("loss", f"required: one of {', '.join(LOSSES)}")
    if spec.loss not in LOSSES:
        raise SpecError("loss", f"unknown loss {spec.loss!r}; one of {', '.join(LOSSES)}")
    return spec.loss


@dataclass(frozen=True)
class Loss:
    """loss(output, target) -> scalar Tensor.

    reduction "mean" is PyTorch's. reduction "sum" adds the per-sample losses (each sample's
    elements averaged, so with k outputs a sample weighs as in "mean"): summed over a batch's
    micro-batches and divided by the GLOBAL batch size, it equals the "mean" loss of the whole
    batch, and so do its gradients, however the batch was cut.
    """

    name: str
    reduction: str
    label_smoothing: float = 0.0

    def __call__(self, output: Tensor, target: Any) -> Tensor:
        if self.name == "cross_entropy":
            return F.cross_entropy(output, target, self.reduction, self.label_smoothing)
        if self.name == "next_token_cross_entropy":  # output (n, T, vocab), target (n, T)
            steps, vocabulary = output.shape[-2], output.shape[-1]
            tokens = np.asarray(getattr(target, "data", target)).reshape(-1)
            logits = output.reshape((-1, vocabulary))
            if self.reduction == "mean":
                return F.cross_entropy(logits, tokens, "mean")
            # A sample's loss is the mean over its T positions, as "sum" promises.
            return F.cross_entropy(logits, tokens, "sum") * (1.0 / steps)
        elementwise = {"mse": F.mse_loss, "l1": F.l1_loss,
                       "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits}
        function = elementwise[self.name]
        target = _float_target(output, target)
        if self.reduction == "mean":
            return function(output, target, reduction="mean")
        per_element = function(output, target, reduction="none")
        if per_element.ndim > 1 and per_element.size > len(per_element):
            per_element = per_element.mean(axis=tuple(range(1, per_element.ndim)))
        return per_element.sum()


    def correct(self, output: np.ndarray, target: np.ndarray) -> int:
        """Right predictions among the `predictions_per_sample` of each sample: the arg-max
        class for cross-entropy (at every position for next-token prediction), the logit's
        sign against a 0/1 label for binary cross-entropy (each label of a multi-label
        target); 0 for regression losses."""
        if self.name in ("cross_entropy", "next_token_cross_entropy"):
            return int((output.argmax(axis=-1) == target).sum())
        if self.name == "binary_cross_entropy_with_logits":
            labels = target.reshape(output.shape) if target.size == output.size else target
            return int(((output > 0) == (labels > 0.5)).sum())
        return 0


def predictions_per_sample(loss: str, output_shape: tuple[int, ...]) -> int:
    """How many predictions `Loss.correct` counts in one sample (the accuracy's divisor per
    sample): one class, T next tokens, or k binary labels; 0 for regression losses."""
    if loss == "cross_entropy":
        return 1
    if loss == "next_token_cross_entropy":
        return output_shape[0]
    if loss == "binary_cross_entropy_with_logits":
        return math.prod(output_shape)
    return 0


def _float_target(output: Tensor, target: Any) -> np.ndarray:
    """Targets in the output's dtype; integer labels (n,) against an (n, 1) output (binary
    classification) become an (n, 1) column."""
    target = np.asarray(getattr(target, "data", target))
    if target.ndim == 1 and output.ndim == 2 and output.shape[1] == 1:
        target = target.reshape(-1, 1)
    return target.astype(output.dtype, copy=False)


def build_loss(spec: job_pb2.JobSpec, reduction: str = "mean") -> Loss:
    """The spec's loss as a callable (output, target) -> Tensor; see `Loss` for "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    name = _loss_name(spec)
    smoothing = spec.label_smoothing
    if smoothing and name != "cross_entropy":
        raise SpecError("label_smoothing", f"only applies to cross_entropy, not {name}")
    _in_range(smoothing, "label_smoothing", 0.0, 1.0, high_open=False)
    return Loss(name, reduction, smoothing)


# --- optimizer, schedule, clipping, dtype ------------------------------------------------------


def _field_path(prefix: str, error: ValueError, renames: dict[str, str] | None = None) -> SpecError:
    """A hyperparameter dataclass's "AdamHyper.betas[0] must be ..." as a SpecError on
    prefix.betas[0]."""
    text = str(error)
    match = re.match(r"^\w+\.(\w+(?:\[\d+\])?) (.*)$", text, re.DOTALL)
    if match is None:
        return SpecError(prefix, text)
    field = (renames or {}).get(match.group(1), match.group(1))
    return SpecError(f"{prefix}.{field}", match.group(2))


def build_optimizer(spec: job_pb2.JobSpec | job_pb2.OptimizerSpec) -> tuple[str, Any]:
    """(rule name in worker.backprop.optim.RULES, its hyperparameter dataclass).

    Fields left unset take PyTorch's defaults (the dataclasses' defaults); an unset optimizer
    is Adam with its defaults.
    """
    optimizer = spec.optimizer if isinstance(spec, job_pb2.JobSpec) else spec
    kind = optimizer.WhichOneof("rule")
    if kind is None:
        return "adam", AdamHyper()
    path = f"optimizer.{kind}"
    message = getattr(optimizer, kind)
    if kind == KFAC:
        return KFAC, _kfac_hyper(message, path)
    rule = RULES.get(kind)
    if rule is None:
        raise SpecError("optimizer", f"optimizer {kind!r} is not supported by this worker")
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.has_presence:
            if message.HasField(field.name):
                values[field.name] = value
        elif field.type == field.TYPE_BOOL:
            if value:
                values[field.name] = True
        elif len(value):  # repeated: betas
            if len(value) != 2:
                raise SpecError(f"{path}.{field.name}", f"needs exactly 2 numbers, got "
                                                        f"{len(value)}")
            values[field.name] = tuple(value)
    renames = {}
    if kind == "adafactor":  # PyTorch's eps is the pair (eps1 or None, eps2)
        default_eps = _default(rule.hyper_type, "eps")
        if "eps1" in values or "eps2" in values:
            values["eps"] = (values.pop("eps1", default_eps[0]),
                             values.pop("eps2", default_eps[1]))
        renames = {"eps[0]": "eps1", "eps[1]": "eps2"}
    lr = values.get("lr", _default(rule.hyper_type, "lr"))
    if not lr > 0:
        raise SpecError(f"{path}.lr", f"must be > 0, got {lr:g}")
    known = {field.name for field in dataclasses.fields(rule.hyper_type)}
    for name in values:
        if name not in known:
            raise SpecError(f"{path}.{name}", f"not supported by this worker's {kind}")
    try:
        return kind, rule.hyper_type(**values)
    except ValueError as error:
        raise _field_path(path, error, renames) from error


def _kfac_hyper(message: job_pb2.OptimizerSpec.KFAC, path: str) -> KFACHyper:
    """K-FAC's hyperparameters: not a rule of RULES (it preconditions whole layers, see
    worker/kfac_layout.py), so its fields are read here; 0 intervals and an empty
    damping_method mean the defaults, as the proto says."""
    values: dict[str, Any] = {}
    for name in ("lr", "momentum", "damping", "factor_decay", "weight_decay", "kl_clip"):
        if message.HasField(name):
            values[name] = getattr(message, name)
    for name in ("factor_update_interval", "inverse_update_interval"):
        if getattr(message, name):
            values[name] = getattr(message, name)
    if message.damping_method:
        values["damping_method"] = message.damping_method
    lr = values.get("lr", _default(KFACHyper, "lr"))
    if not lr > 0:
        raise SpecError(f"{path}.lr", f"must be > 0, got {lr:g}")
    try:
        return KFACHyper(**values)
    except ValueError as error:
        raise _field_path(path, error) from error


def _default(hyper_type: type, name: str) -> Any:
    return next(field.default for field in dataclasses.fields(hyper_type) if field.name == name)


def build_schedule(spec: job_pb2.JobSpec, total_steps: int) -> Schedule:
    """The learning rate as a function of the step, from the optimizer's lr as base rate.

    `total_steps` is the job's number of optimizer steps, the cosine's default length.
    """
    _, hyper = build_optimizer(spec)
    base_lr = hyper.lr
    kind = spec.schedule.WhichOneof("schedule")
    if kind is None or kind == "constant":
        return Constant(base_lr)
    cfg = getattr(spec.schedule, kind)
    path = f"schedule.{kind}"
    try:
        if kind == "step_decay":
            gamma = cfg.gamma if cfg.HasField("gamma") else 0.1
            return StepDecay(base_lr, cfg.step_size, gamma)
        if kind == "exponential":
            return Exponential(base_lr, cfg.gamma)
        if kind == "linear_warmup":
            return LinearWarmup(base_lr, cfg.warmup_steps, cfg.start_factor)
        if kind == "cosine_with_warmup":
            total = cfg.total_steps or total_steps
            if not cfg.total_steps and total <= cfg.warmup_steps:
                raise SpecError(f"{path}.warmup_steps",
                                f"must be less than the job's {total} optimizer steps, got "
                                f"{cfg.warmup_steps}")
            return CosineWithWarmup(base_lr, cfg.warmup_steps, total, cfg.min_lr_ratio,
                                    cfg.start_factor)
    except SpecError:
        raise
    except ValueError as error:
        raise _field_path(path, error) from error
    raise SpecError("schedule", f"schedule {kind!r} is not supported by this worker")


@dataclass(frozen=True)
class Clipping:
    """Global gradient clipping: None means off."""

    max_norm: float | None = None
    max_value: float | None = None


def build_clipping(spec: job_pb2.JobSpec) -> Clipping:
    values = {}
    for name in ("max_norm", "max_value"):
        if spec.clipping.HasField(name):
            value = getattr(spec.clipping, name)
            if not value > 0:
                raise SpecError(f"clipping.{name}", f"must be > 0, got {value:g}")
            values[name] = value
    if "max_value" in values and spec.optimizer.WhichOneof("rule") == KFAC:
        # K-FAC preconditions the reduced gradient before the clipping coefficient is known;
        # a norm clip scales the preconditioned direction alike, a value clip would not.
        raise SpecError("clipping.max_value", "does not combine with optimizer.kfac: clip by "
                                              "max_norm, or bound the step with kfac.kl_clip")
    return Clipping(**values)


def resolve_dtype(spec: job_pb2.JobSpec) -> np.dtype:
    """The spec's float type: float32 unless it says "float64"."""
    if spec.dtype not in DTYPES:
        raise SpecError("dtype", f"must be 'float32' or 'float64', got {spec.dtype!r}")
    return np.dtype(DTYPES[spec.dtype])
