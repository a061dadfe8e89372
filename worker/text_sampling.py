"""How a trained byte-level language model writes text: one next byte at a time.

A model trained with `loss: next_token_cross_entropy` on a text data set maps a window of byte
tokens (n, T) to logits (n, T, 256), position t predicting the byte after position t. To
continue a prompt, run the model on the last `context_length` bytes, turn the last position's
logits into the next byte (the arg-max, or a draw from softmax(logits / temperature), among
the top_k most likely when asked), append it, and repeat. `generate_bytes` is that loop, for
`sample_text` here and for the service's Generate RPC (services/inference.py).

A key/value cache (`CachedDecoder`) makes each new byte cost O(context): the causal attention
layers keep the keys and values of the positions they have seen, and only the new position
goes through the model. It gives the bytes a full pass over the window gives (tested), for a
model made of the layers it knows (embeddings, causal transformer layers and causal
self-attention, and position-wise layers); any other model gets full passes. Positions are
absolute (PositionalEmbedding), so once the text is longer than the window, the window slides
and every cached position moves: the cache is then refilled with the whole window each byte,
which costs what a full pass costs.

Plain engine code (no Ray, no protobuf), so a Generate RPC can call it on a model built from a
job's spec and its downloaded weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from worker.backprop import nn
from worker.backprop.nn.attention import KVCache
from worker.backprop.nn.transformer import PositionalEmbedding
from worker.backprop.tensor import Tensor, no_grad

BYTE_VALUES = 256
# Layers that act on each position alone: the cached path runs them on the new positions only.
POSITION_WISE = (nn.Embedding, nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity, nn.ReLU,
                 nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU)


def sample_text(model: nn.Module, prompt: str | bytes, length: int, temperature: float = 1.0,
                seed: int = 0, *, top_k: int = 0, context_length: int | None = None,
                use_cache: bool = True) -> str:
    """The `length` bytes the model writes after `prompt`, decoded as UTF-8 (an invalid
    sequence, e.g. a character cut at the end, becomes U+FFFD). The prompt is not repeated.
    The arguments are `generate_bytes`'s; the model is left in the mode it was found in."""
    was_training = model.training
    try:
        written = bytes(generate_bytes(model, prompt, length, temperature, seed, top_k=top_k,
                                       context_length=context_length, use_cache=use_cache))
    finally:
        model.train(was_training)
    return written.decode("utf-8", errors="replace")


def generate_bytes(model: nn.Module, prompt: str | bytes, length: int,
                   temperature: float = 1.0, seed: int = 0, *, top_k: int = 0,
                   context_length: int | None = None, use_cache: bool = True,
                   lock: contextlib.AbstractContextManager | None = None) -> Iterator[int]:
    """The `length` bytes the model writes after `prompt`, one at a time, each drawn when the
    previous one has been taken (a consumer that stops stops the work). Puts the model in eval
    mode (dropout off).

    `temperature` 0 picks the most likely byte every time (greedy, and then `seed` plays no
    part); above 0 draws from softmax(logits / temperature), among the `top_k` most likely
    bytes when top_k > 0, with a generator seeded by `seed`: the same call writes the same
    bytes, with or without the cache. `context_length` is how many of the last bytes the model
    sees; by default its positional embedding's num_positions (the longest window it takes),
    or the whole text so far when it has none. `lock` is held around each model call (a
    model shared between threads).
    """
    tokens = list(prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt))
    if not tokens:
        raise ValueError("sample_text needs a prompt of at least one byte")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 <= top_k <= BYTE_VALUES:
        raise ValueError(f"top_k must be in [0, {BYTE_VALUES}], got {top_k}")
    window = context_length if context_length is not None else longest_window(model)
    if window is not None and window < 1:
        raise ValueError(f"context_length must be >= 1, got {window}")
    decoder = CachedDecoder.of(model, window) if use_cache else None
    rng = np.random.default_rng(seed)
    lock = lock or contextlib.nullcontext()
    for _ in range(length):
        with lock, no_grad():
            model.eval()
            if decoder is not None:
                logits = decoder.next_logits(tokens)
            else:
                context = tokens[-window:] if window is not None else tokens
                logits = _last_logits(model(Tensor(np.asarray([context], dtype=np.int64))))
        token = next_byte(logits.astype(np.float64), temperature, top_k, rng)
        tokens.append(token)
        yield token


def longest_window(model: nn.Module) -> int | None:
    """The longest window a model takes: its positional embedding's num_positions (None:
    no positional embedding, any length)."""
    for module in model.modules():
        if isinstance(module, PositionalEmbedding):
            return module.num_positions
    return None


def next_byte(logits: np.ndarray, temperature: float, top_k: int,
              rng: np.random.Generator) -> int:
    """The byte after `logits` (256,): the arg-max at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k largest (all when top_k is 0)."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if top_k:
        cutoff = np.sort(scaled)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - scaled.max())  # shifted so that exp cannot overflow
    probabilities /= probabilities.sum()
    return int(rng.choice(BYTE_VALUES, p=probabilities))


def _last_logits(output: Tensor) -> np.ndarray:
    logits = output.data
    if logits.shape[-1] != BYTE_VALUES or logits.ndim != 3:
        raise ValueError(f"a byte-level language model outputs (n, T, {BYTE_VALUES}) logits, "
                         f"this one {logits.shape}")
    return logits[0, -1]


class CachedDecoder:
    """A causal byte model (an nn.Sequential of the layers it knows) run on the new positions
    only, over the keys and values its attention layers cached for the earlier ones."""

    def __init__(self, layers: list[nn.Module], window: int):
        self.layers, self.window = layers, window
        self.caches: dict[int, KVCache] = {}  # by attention layer (its position in `layers`)
        self.start = 0  # the text position the cached window starts at
        self.cached = 0  # positions of the window in the cache

    @classmethod
    def of(cls, model: nn.Module, window: int | None) -> CachedDecoder | None:
        """A decoder for `model`, or None when it has a layer the cache cannot serve (a
        non-causal attention sees later positions; a recurrent or pooling layer is not
        position-wise) or no bounded window (the cache's size)."""
        if window is None or not isinstance(model, nn.Sequential):
            return None
        layers = list(model.children())
        for layer in layers:
            attention = _attention_of(layer)
            if attention is not None:
                if not getattr(layer, "is_causal", False) or not attention.batch_first:
                    return None
            elif not isinstance(layer, (*POSITION_WISE, PositionalEmbedding)):
                return None
        return cls(layers, window)

    def next_logits(self, tokens: list[int]) -> np.ndarray:
        """The logits after `tokens` (the whole text so far): those of a full pass over its
        last `window` bytes."""
        start = max(0, len(tokens) - self.window)
        if start != self.start:  # the window slid: every position moved, refill the cache
            self.start, self.cached = start, 0
        new = tokens[start + self.cached:]
        x = Tensor(np.asarray([new], dtype=np.int64))
        for index, layer in enumerate(self.layers):
            attention = _attention_of(layer)
            if attention is None:
                x = layer(x, self.cached) if isinstance(layer, PositionalEmbedding) else layer(x)
                continue
            cache = self._cache(index, attention, x.dtype)
            cache.length = self.cached
            if isinstance(layer, nn.TransformerEncoderLayer):
                x = layer.forward_cached(x, cache)
            else:
                x = attention.cached_causal_self_attention(x, cache)
        self.cached += len(new)
        return _last_logits(x)

    def _cache(self, index: int, attention: nn.MultiheadAttention, dtype) -> KVCache:
        if index not in self.caches:
            self.caches[index] = KVCache.empty(1, attention.num_heads, self.window,
                                               attention.head_dim, dtype)
        return self.caches[index]


def _attention_of(layer: nn.Module) -> nn.MultiheadAttention | None:
    if isinstance(layer, nn.TransformerEncoderLayer):
        return layer.self_attn
    if isinstance(layer, nn.MultiheadAttention):
        return layer
    return None
