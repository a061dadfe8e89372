"""Transformer encoder blocks (torch.nn.TransformerEncoderLayer, TransformerEncoder) and
learned positional embeddings.

Submodule names are torch's (self_attn, linear1, dropout, linear2, norm1, norm2, dropout1,
dropout2; `layers.0.…` in the encoder), so state_dicts load into torch.nn and back. As in
MultiheadAttention, batch_first defaults to True here, is_causal=True needs no mask beside it,
and boolean masks are True where a query may NOT look (torch.nn.Transformer's convention).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop.nn import init
from worker.backprop.nn.attention import KVCache, MultiheadAttention
from worker.backprop.nn.layers import Dropout, Linear, Sequential
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.nn.norm import LayerNorm
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": ops.relu, "gelu": ops.gelu}


class TransformerEncoderLayer(Module):
    """Self-attention then a feed-forward block, each with a residual connection and LayerNorm.

    norm_first=False (torch's default, the original post-norm):
        x = norm1(x + sa(x)); x = norm2(x + ff(x))
    norm_first=True (pre-norm, as GPT-2):
        x = x + sa(norm1(x)); x = x + ff(norm2(x))
    where ff(x) = linear2(dropout(activation(linear1(x)))), and dropout1 / dropout2 act on
    each block's output before the residual sum.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str | Callable[[Tensor], Tensor] = "relu",
                 layer_norm_eps: float = 1e-5, batch_first: bool = True,
                 norm_first: bool = False, bias: bool = True, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if isinstance(activation, str) and activation not in ACTIVATIONS:
            raise ValueError(f"TransformerEncoderLayer: activation must be 'relu', 'gelu' or "
                             f"a function, got {activation!r}")
        dtype = dtype or DEFAULT_DTYPE
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, dtype=dtype, rng=rng)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype, rng=rng)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype, rng=rng)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = ACTIVATIONS[activation] if isinstance(activation, str) else activation

    def forward(self, src: Tensor, src_mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._self_attention_block(self.norm1(x), src_mask, src_key_padding_mask,
                                               is_causal)
            return x + self._feed_forward_block(self.norm2(x))
        x = self.norm1(x + self._self_attention_block(x, src_mask, src_key_padding_mask,
                                                      is_causal))
        return self.norm2(x + self._feed_forward_block(x))

    def forward_cached(self, src: Tensor, cache: KVCache) -> Tensor:
        """forward(whole, is_causal=True) at the positions `src` (batch, n, d_model) adds
        after the cache's, for inference: self-attention over `cache` (which the new
        positions join), so that a generated position costs O(positions so far), not a pass
        over all of them. Eval mode (dropout off) and batch_first only."""
        def attend(x: Tensor) -> Tensor:
            return self.dropout1(self.self_attn.cached_causal_self_attention(x, cache))

        x = src
        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + self._feed_forward_block(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + self._feed_forward_block(x))

    def _self_attention_block(self, x: Tensor, attn_mask: Any, key_padding_mask: Any,
                              is_causal: bool) -> Tensor:
        out, _ = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False,
                                attn_mask=attn_mask, is_causal=is_causal)
        return self.dropout1(out)

    def _feed_forward_block(self, x: Tensor) -> Tensor:
        if self.activation is ops.relu and getattr(self.linear1, "capture", None) is None:
            # One op keeps relu's output only, not also the (batch, L, dim_feedforward)
            # pre-activation; not when K-FAC's capture must see linear1's output.
            hidden = ops.linear_relu(x, self.linear1.weight, self.linear1.bias)
        else:
            hidden = self.activation(self.linear1(x))
        return self.dropout2(self.linear2(self.dropout(hidden)))


class TransformerEncoder(Module):
    """num_layers deep copies of encoder_layer (so they start with equal weights, as in torch),
    then an optional final norm. Keys `layers.0.self_attn.in_proj_weight`, ..., `norm.weight`.
    """

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Module | None = None):
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"TransformerEncoder: num_layers must be positive, got {num_layers}")
        # A Sequential only as the numbered container ("layers.0", ...): forward below passes
        # the masks to each layer itself.
        self.layers = Sequential(*(copy.deepcopy(encoder_layer) for _ in range(num_layers)))
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: bool = False) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=is_causal)
        return x if self.norm is None else self.norm(x)


class PositionalEmbedding(Module):
    """Learned absolute positions: adds weight[:T] to an input of shape (..., T, embedding_dim).

    torch has no such module. Its single parameter `weight` (num_positions, embedding_dim) is
    laid out, initialised (N(0, 1)) and keyed exactly as a torch.nn.Embedding(num_positions,
    embedding_dim) applied to arange(T), which is how a torch model writes the same thing:
    `x + pos(torch.arange(T))` with `pos = nn.Embedding(...)`. So its state_dict ("weight",
    or "<name>.weight" inside a model) loads into that Embedding and back.
    """

    def __init__(self, num_positions: int, embedding_dim: int, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if num_positions <= 0 or embedding_dim <= 0:
            raise ValueError(f"PositionalEmbedding: num_positions and embedding_dim must be "
                             f"positive, got {num_positions} and {embedding_dim}")
        self.num_positions, self.embedding_dim = num_positions, embedding_dim
        self.weight = Parameter(np.empty((num_positions, embedding_dim),
                                         dtype=dtype or DEFAULT_DTYPE))
        init.normal_(self.weight, 0.0, 1.0, rng)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """x plus the embeddings of positions start, start + 1, ... (`start` > 0: the rest of
        a sequence whose first `start` positions were embedded before, as when generating)."""
        if x.ndim < 2 or x.shape[-1] != self.embedding_dim:
            raise ValueError(f"PositionalEmbedding: input must be (..., T, {self.embedding_dim}),"
                             f" got shape {x.shape}")
        stop = start + x.shape[-2]
        if stop > self.num_positions:
            raise ValueError(f"PositionalEmbedding: a sequence of {stop} positions is longer "
                             f"than num_positions={self.num_positions}")
        return x + self.weight[start:stop]

    def extra_repr(self) -> str:
        return f"{self.num_positions}, {self.embedding_dim}"
