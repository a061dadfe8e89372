"""Multi-head attention (Vaswani et al., 2017) with torch.nn.MultiheadAttention's weights.

Parameters and state_dict keys are torch's: `in_proj_weight` (3E, E) holds the query, key and
value projections stacked in that order, `in_proj_bias` (3E,), and `out_proj` is a Linear
(`out_proj.weight`, `out_proj.bias`), so a state_dict loads into torch.nn.MultiheadAttention
(strict) and back.

Masks follow torch.nn.MultiheadAttention (NOT scaled_dot_product_attention, whose boolean
convention is the opposite): a boolean `attn_mask` or `key_padding_mask` is True where a query
may NOT look; float masks are added to the scores. Both are merged into one additive mask of
0 and -inf. Differences from torch, each a superset of its behaviour:
- `batch_first` defaults to True here (torch: False); both layouts work.
- `is_causal=True` builds the causal mask itself; torch requires `attn_mask` as well and treats
  is_causal as a hint about it. Given both, both are applied (the same result for a causal
  attn_mask).
- A query whose keys are all masked gets output from zero weights (torch's need_weights=True
  path gives NaN there, its scaled_dot_product_attention path 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop.nn import functional as F
from worker.backprop.nn import init
from worker.backprop.nn.layers import Linear
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor


def _as_array(mask: Any) -> np.ndarray:
    return np.asarray(getattr(mask, "data", mask))


def _additive(mask: np.ndarray, dtype: Any) -> np.ndarray:
    """torch.nn.MultiheadAttention's convention: boolean True = masked out; floats added."""
    if mask.dtype == bool:
        return np.where(mask, -np.inf, 0.0).astype(dtype)
    if mask.dtype.kind != "f":
        raise ValueError(f"MultiheadAttention: a mask must be boolean or float, got {mask.dtype}")
    return mask.astype(dtype, copy=False)


@dataclass
class KVCache:
    """One causal self-attention layer's keys and values of the positions it has seen, so that
    generating a position costs attention over them, not a forward pass over all of them:
    `keys` and `values` (batch, heads, capacity, head_dim), the first `length` filled."""

    keys: np.ndarray
    values: np.ndarray
    length: int = 0

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int,
              dtype: Any) -> KVCache:
        shape = (batch, heads, capacity, head_dim)
        return cls(np.empty(shape, dtype=dtype), np.empty(shape, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]


class MultiheadAttention(Module):
    """Attention with num_heads heads of size embed_dim / num_heads; torch's names and keys.

    forward(query, key, value) takes (batch, L, E) query and (batch, S, E) key and value when
    batch_first (else (L, batch, E)), or unbatched (L, E), and returns (output, weights):
    weights (batch, L, S) averaged over heads, (batch, num_heads, L, S) with
    average_attn_weights=False, or None with need_weights=False.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"MultiheadAttention: embed_dim ({embed_dim}) must be a positive multiple of "
                f"num_heads ({num_heads})"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"MultiheadAttention: dropout must be in [0, 1], got {dropout}")
        dtype = dtype or DEFAULT_DTYPE
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        # Initialised as torch does: Xavier-uniform projections, zero biases, and out_proj's
        # weight keeps Linear's own U(-1/sqrt(E), 1/sqrt(E)).
        self.in_proj_weight = Parameter(np.empty((3 * embed_dim, embed_dim), dtype=dtype))
        init.xavier_uniform_(self.in_proj_weight, rng=rng)
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, dtype=dtype)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, dtype=dtype, rng=rng)
        if self.out_proj.bias is not None:  # there is one exactly when `bias`
            init.zeros_(self.out_proj.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Any = None,
        need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.ndim == 3
        self._check_inputs(query, key, value, batched)
        if not batched:  # (L, E): a batch of one
            query, key, value = self._each_once(lambda x: x.reshape((1,) + x.shape),
                                                query, key, value)
        elif not self.batch_first:  # (L, batch, E) -> (batch, L, E)
            query, key, value = self._each_once(lambda x: x.transpose(1, 0, 2),
                                                query, key, value)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        dropout = self.dropout if self.training else 0.0
        fused = query is key and key is value and not need_weights and dropout == 0.0
        # The fused op takes is_causal as such (it then skips the scores above the diagonal);
        # the other path adds it to the mask.
        mask = self._merged_mask(key_padding_mask, attn_mask, is_causal and not fused, batch,
                                 length, source, batched, self.in_proj_weight.dtype)

        weights = None
        if fused:
            # The fused op: keeps no (batch, heads, L, L) weights, recomputes them in backward.
            qkv = ops.linear(query, self.in_proj_weight, self.in_proj_bias)
            merged = ops.self_attention(qkv, self.num_heads, mask, causal=is_causal)
        else:
            q, k, v = self._project(query, key, value)
            weights = ops.attention_weights(q, k, mask)  # (batch, heads, L, S)
            if dropout > 0.0:
                weights = F.dropout(weights, dropout, True)
            heads = weights @ v  # (batch, heads, L, head_dim)
            merged = heads.transpose(0, 2, 1, 3).reshape((batch, length, self.embed_dim))
        output = self.out_proj(merged)

        if not batched:
            output = output.reshape(output.shape[1:])
        elif not self.batch_first:
            output = output.transpose(1, 0, 2)
        if not need_weights:
            return output, None
        assert weights is not None  # need_weights: the unfused path, which keeps them
        if average_attn_weights:
            weights = weights.mean(axis=1)
        return output, weights if batched else weights.reshape(weights.shape[1:])

    def cached_causal_self_attention(self, x: Tensor, cache: KVCache) -> Tensor:
        """Causal self-attention for inference, `x` (batch, n, E) being the n positions after
        the `cache.length` ones the cache holds: their queries attend over the cached keys and
        values and their own (position i over those up to i), and their keys and values join
        the cache. The output is forward(whole, whole, whole, is_causal=True, need_weights=
        False) at those positions, to round-off, at O(positions so far) per new position
        instead of a pass over all of them. No gradient and no dropout: eval mode's result."""
        if not self.batch_first or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiheadAttention: the cached path takes batch-first (batch, "
                             f"n, {self.embed_dim}) inputs, got shape {x.shape}")
        batch, count = x.shape[0], x.shape[1]
        start, stop = cache.length, cache.length + count
        if stop > cache.capacity:
            raise ValueError(f"MultiheadAttention: {stop} positions are more than the cache's "
                             f"capacity of {cache.capacity}")
        weight = self.in_proj_weight.data
        qkv = x.data @ weight.T
        if self.in_proj_bias is not None:
            qkv += self.in_proj_bias.data
        # (batch, n, 3 E) -> (3, batch, heads, n, head_dim), as _heads does
        q, k, v = qkv.reshape(batch, count, 3, self.num_heads, self.head_dim).transpose(
            2, 0, 3, 1, 4)
        cache.keys[:, :, start:stop] = k
        cache.values[:, :, start:stop] = v
        cache.length = stop
        keys, values = cache.keys[:, :, :stop], cache.values[:, :, :stop]
        scores = (q @ keys.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(self.head_dim))
        if count > 1:  # new position i sees the cached ones and the new ones up to i
            scores += np.triu(np.full((count, stop), -np.inf, dtype=scores.dtype), start + 1)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        heads = scores @ values  # (batch, heads, n, head_dim)
        merged = heads.transpose(0, 2, 1, 3).reshape(batch, count, self.embed_dim)
        return self.out_proj(Tensor(merged))

    # --- the steps --------------------------------------------------------------------------

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, batched: bool) -> None:
        ndim = 3 if batched else 2
        if query.ndim not in (2, 3) or key.ndim != ndim or value.ndim != ndim:
            raise ValueError(
                f"MultiheadAttention: query, key and value must all be batched (3-D) or all "
                f"unbatched (2-D), got shapes {query.shape}, {key.shape}, {value.shape}"
            )
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.shape[-1] != self.embed_dim:
                raise ValueError(f"MultiheadAttention: {name} has {x.shape[-1]} features "
                                 f"(shape {x.shape}), embed_dim is {self.embed_dim}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"MultiheadAttention: key {key.shape} and value {value.shape} "
                             f"must have the same batch and length")
        batch_axis = 0 if self.batch_first else 1
        if batched and query.shape[batch_axis] != key.shape[batch_axis]:
            raise ValueError(f"MultiheadAttention: query {query.shape} and key {key.shape} "
                             f"have different batch sizes (batch_first={self.batch_first})")

    @staticmethod
    def _each_once(change, query: Tensor, key: Tensor, value: Tensor) -> list[Tensor]:
        """change(x) for each input, once per distinct tensor, so that self-attention (the
        same tensor three times) is still recognised as such afterwards."""
        changed: dict[int, Tensor] = {}
        for x in (query, key, value):
            if id(x) not in changed:
                changed[id(x)] = change(x)
        return [changed[id(x)] for x in (query, key, value)]

    def _heads(self, x: Tensor, count: int) -> Tensor:
        """(batch, L, count * E) -> (count, batch, heads, L, head_dim), views only."""
        batch, length = x.shape[0], x.shape[1]
        x = x.reshape((batch, length, count, self.num_heads, self.head_dim))
        return x.transpose(2, 0, 3, 1, 4)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """q, k, v of shape (batch, heads, length, head_dim): one GEMM for self-attention, as
        torch's _in_projection_packed; two when key is value; three otherwise."""
        e, weight, bias = self.embed_dim, self.in_proj_weight, self.in_proj_bias

        def rows(start: int, stop: int) -> tuple[Tensor, Tensor | None]:
            return weight[start:stop], None if bias is None else bias[start:stop]

        if query is key and key is value:
            qkv = self._heads(ops.linear(query, weight, bias), 3)
            return qkv[0], qkv[1], qkv[2]
        q = self._heads(ops.linear(query, *rows(0, e)), 1)[0]
        if key is value:
            kv = self._heads(ops.linear(key, *rows(e, 3 * e)), 2)
            return q, kv[0], kv[1]
        k = self._heads(ops.linear(key, *rows(e, 2 * e)), 1)[0]
        v = self._heads(ops.linear(value, *rows(2 * e, 3 * e)), 1)[0]
        return q, k, v

    def _merged_mask(self, key_padding_mask: Any, attn_mask: Any, is_causal: bool, batch: int,
                     length: int, source: int, batched: bool, dtype: Any) -> np.ndarray | None:
        """One additive mask broadcastable to (batch, heads, L, S), or None."""
        mask = None
        if attn_mask is not None:
            attn_mask = _as_array(attn_mask)
            per_head = (batch * self.num_heads, length, source)
            if attn_mask.shape == (length, source):
                mask = _additive(attn_mask, dtype)
            elif attn_mask.shape == per_head:
                mask = _additive(attn_mask, dtype).reshape(
                    (batch, self.num_heads, length, source))
            else:
                raise ValueError(
                    f"MultiheadAttention: attn_mask must have shape {(length, source)} or "
                    f"{per_head}, got {attn_mask.shape}"
                )
        if key_padding_mask is not None:
            key_padding_mask = _as_array(key_padding_mask)
            expected = (batch, source) if batched else (source,)
            if key_padding_mask.shape != expected:
                raise ValueError(f"MultiheadAttention: key_padding_mask must have shape "
                                 f"{expected}, got {key_padding_mask.shape}")
            padding = _additive(key_padding_mask, dtype).reshape((batch, 1, 1, source))
            mask = padding if mask is None else mask + padding
        if is_causal:
            causal = F.causal_mask(length, source, dtype)
            mask = causal if mask is None else mask + causal
        return mask

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")
