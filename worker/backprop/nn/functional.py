"""Stateless layer functions and losses, as in torch.nn.functional.

Activations and softmax are the ops themselves; the rest are compositions of ops, so their
gradients (and second derivatives) come from the op table with nothing new to get wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop.nn import init
from worker.backprop.tensor import Tensor

linear = ops.linear
relu = ops.relu
tanh = ops.tanh
sigmoid = ops.sigmoid
gelu = ops.gelu
silu = ops.silu
leaky_relu = ops.leaky_relu
softmax = ops.softmax
log_softmax = ops.log_softmax
cross_entropy = ops.cross_entropy
conv1d = ops.conv1d
conv2d = ops.conv2d
conv_transpose2d = ops.conv_transpose2d
max_pool2d = ops.max_pool2d
avg_pool2d = ops.avg_pool2d


def _reduce(loss: Tensor, reduction: str, name: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_same_shape(name: str, input: Tensor, target: Any) -> None:
    if tuple(input.shape) != tuple(np.shape(getattr(target, "data", target))):
        raise ValueError(
            f"{name}: input shape {input.shape} and target shape "
            f"{np.shape(getattr(target, 'data', target))} differ"
        )


def mse_loss(input: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    """Mean squared error, (input - target)^2 averaged."""
    _check_same_shape("mse_loss", input, target)
    diff = input - target
    return _reduce(diff * diff, reduction, "mse_loss")


def l1_loss(input: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    _check_same_shape("l1_loss", input, target)
    return _reduce(ops.abs(input - target), reduction, "l1_loss")


def binary_cross_entropy_with_logits(
    input: Tensor, target: Any, reduction: str = "mean", pos_weight: Any = None
) -> Tensor:
    """-[p y log s(x) + (1 - y) log(1 - s(x))] computed from logits without overflow:
    log(1 + e^-|x|) + max(-x, 0) is -log s(x) for any x."""
    _check_same_shape("binary_cross_entropy_with_logits", input, target)
    log_sigmoid_neg = ops.log1p(ops.exp(-ops.abs(input))) + ops.relu(-input)  # -log s(x)
    if pos_weight is None:
        loss = (1 - target) * input + log_sigmoid_neg
    else:
        loss = (1 - target) * input + (1 + (pos_weight - 1) * target) * log_sigmoid_neg
    return _reduce(loss, reduction, "binary_cross_entropy_with_logits")


def nll_loss(log_probs: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    """-log_probs[i, target[i]], from log-probabilities (N, C) and integer classes (N,)."""
    target = np.asarray(getattr(target, "data", target))
    if log_probs.ndim != 2:
        raise ValueError(f"nll_loss: log_probs must be (batch, classes), got {log_probs.shape}")
    n, classes = log_probs.shape
    if target.shape != (n,) or target.dtype.kind not in "iu":
        raise ValueError(
            f"nll_loss: target must be integer classes of shape ({n},) for log_probs of shape "
            f"{log_probs.shape}, got {target.dtype} {target.shape}"
        )
    if target.size and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"nll_loss: target classes must lie in [0, {classes}), "
                         f"got {target.min()}..{target.max()}")
    picked = -log_probs[np.arange(len(target)), target]
    return _reduce(picked, reduction, "nll_loss")


def dropout(x: Tensor, p: float = 0.5, training: bool = True,
            rng: np.random.Generator | None = None) -> Tensor:
    """Zero each value with probability p and scale the rest by 1/(1-p) (inverted dropout),
    so evaluation needs no rescaling."""
    return _dropout("dropout", x, p, training, rng, x.shape)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True,
              rng: np.random.Generator | None = None) -> Tensor:
    """Zero whole channels: each (sample, channel) feature map is kept or dropped as one, as
    torch.nn.functional.dropout2d (which reads a 3-D input as (N, C, L), and so does this)."""
    if input.ndim < 2:
        raise ValueError(f"dropout2d: input must be (N, C, H, W) or (N, C, L), got shape "
                         f"{input.shape}")
    return _dropout("dropout2d", input, p, training, rng,
                    input.shape[:2] + (1,) * (input.ndim - 2))


def _dropout(name: str, x: Tensor, p: float, training: bool,
             rng: np.random.Generator | None, mask_shape: tuple[int, ...]) -> Tensor:
    """Inverted dropout with one keep/drop draw per entry of `mask_shape`, broadcast over x."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * np.zeros(mask_shape, dtype=x.dtype)
    rng = rng if rng is not None else init.default_generator()
    keep = rng.random(mask_shape, dtype=np.float64) >= p
    return x * (keep * (1.0 / (1.0 - p))).astype(x.dtype)


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise over the last len(normalized_shape) axes of each sample (one fused op, which
    keeps only its input and output for backward)."""
    normalized_shape = tuple(normalized_shape)
    if tuple(x.shape[-len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {x.shape} does not end in {normalized_shape}")
    return ops.layer_norm(x, len(normalized_shape), weight, bias, eps)


def batch_norm(x: Tensor, running_mean: np.ndarray | None, running_var: np.ndarray | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalise each feature (axis 1) over the batch axis and any axes after the features
    (length, height, width): BatchNorm1d's and BatchNorm2d's arithmetic.

    Training uses the batch's statistics and updates the running ones in place (the variance
    unbiased, as PyTorch does); evaluation uses the running statistics.
    """
    if x.ndim < 2:
        raise ValueError(f"batch_norm: expected (N, C, ...) input, got shape {x.shape}")
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if training:
        count = x.size // x.shape[1]
        if count < 2:
            raise ValueError(
                f"batch_norm: training needs more than 1 value per channel, got shape {x.shape}"
            )
        mean = x.mean(axes, keepdims=True)
        centered = x - mean
        variance = (centered * centered).mean(axes, keepdims=True)
        if running_mean is not None and running_var is not None:  # both, or neither
            running_mean *= 1 - momentum
            running_mean += momentum * mean.data.reshape(-1)
            running_var *= 1 - momentum
            running_var += momentum * variance.data.reshape(-1) * (count / (count - 1))
        out = centered / ops.sqrt(variance + eps)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: evaluation (training=False) needs the running "
                             "statistics")
        out = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def adaptive_avg_pool2d(input: Tensor, output_size: Any) -> Tensor:
    """Average pooling to a fixed (Ho, Wo), as torch.nn.functional.adaptive_avg_pool2d: output
    i averages input floor(i H / Ho) .. ceil((i + 1) H / Ho) - 1 (None keeps that size).

    Three exact forms of one map: a mean for (1, 1), avg_pool2d when the sizes divide (the
    windows are then equal and do not overlap), else a product with an averaging matrix per
    axis, Y = A_h X A_w^T, whose windows may differ in size and overlap.
    """
    if input.ndim not in (3, 4):
        raise ValueError(f"adaptive_avg_pool2d: input must be (N, C, H, W) or (C, H, W), "
                         f"got shape {input.shape}")
    sizes = (output_size,) * 2 if output_size is None or isinstance(output_size, int) else (
        tuple(output_size))
    if len(sizes) != 2 or any(s is not None and (isinstance(s, bool) or not isinstance(s, int)
                                                 or s < 1) for s in sizes):
        raise ValueError(f"adaptive_avg_pool2d: output_size must be a positive int or two "
                         f"(positive int or None), got {output_size!r}")
    (h, w) = input.shape[-2:]
    ho, wo = (h if sizes[0] is None else sizes[0]), (w if sizes[1] is None else sizes[1])
    if (ho, wo) == (1, 1):
        return input.mean(axis=(-2, -1), keepdims=True)
    if h % ho == 0 and w % wo == 0:
        return ops.avg_pool2d(input, (h // ho, w // wo))
    rows = _adaptive_average_matrix(h, ho, input.dtype)  # (Ho, H)
    cols = _adaptive_average_matrix(w, wo, input.dtype)  # (Wo, W)
    return ops.matmul(rows, ops.matmul(input, cols.T))


def _adaptive_average_matrix(size: int, output_size: int, dtype: Any) -> np.ndarray:
    """(output_size, size): row i averages torch's adaptive window i."""
    i = np.arange(output_size)
    start = (i * size) // output_size
    end = -((-(i + 1) * size) // output_size)  # ceil division
    position = np.arange(size)
    inside = (position >= start[:, None]) & (position < end[:, None])
    return (inside / (end - start)[:, None]).astype(dtype)


def embedding(indices: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` picked by integer indices; repeated indices accumulate gradient."""
    indices = np.asarray(getattr(indices, "data", indices))
    if indices.dtype.kind not in "iu":
        raise ValueError(f"embedding: indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= weight.shape[0]):
        raise ValueError(
            f"embedding: indices must lie in [0, {weight.shape[0]}), "
            f"got {indices.min()}..{indices.max()}"
        )
    return weight[indices]


# --- attention ---------------------------------------------------------------------------------


def causal_mask(query_length: int, key_length: int, dtype: Any = np.float32) -> np.ndarray:
    """Additive (query_length, key_length) mask: 0 where query i may look at key j <= i, -inf
    above the diagonal (aligned top-left, as torch's is_causal)."""
    mask = np.zeros((query_length, key_length), dtype=dtype)
    mask[np.triu_indices(query_length, 1, key_length)] = -np.inf
    return mask


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, rng: np.random.Generator | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(E) + mask) v, as torch.nn.functional.scaled_dot_product_attention.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev). `attn_mask`
    broadcasts to (..., L, S): boolean True = may take part (torch's convention here), or
    floats added to the scores. `is_causal` masks key j > query i and excludes `attn_mask`.
    Dropout (probability dropout_p) is applied to the weights whenever dropout_p > 0, as in
    torch: a module passes 0 in evaluation. A query whose keys are all masked gets 0.
    The weights are one op (`ops.attention_weights`); the product with v is a matmul.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], "
                         f"got {dropout_p}")
    if value.ndim < 2 or value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"scaled_dot_product_attention: value (..., S, Ev) must have key's S = "
            f"{key.shape[-2] if key.ndim >= 2 else '?'}, got shapes key {key.shape}, "
            f"value {value.shape}"
        )
    mask = None
    if is_causal:
        mask = causal_mask(query.shape[-2], key.shape[-2], query.dtype)
    elif attn_mask is not None:
        attn_mask = np.asarray(getattr(attn_mask, "data", attn_mask))
        if attn_mask.dtype == bool:
            mask = np.where(attn_mask, 0.0, -np.inf).astype(query.dtype)
        else:
            mask = attn_mask
    weights = ops.attention_weights(query, key, mask, scale)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p, True, rng)
    return weights @ value
