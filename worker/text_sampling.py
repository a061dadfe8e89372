"""How a trained byte-level language model writes text: one next byte at a time.

A model trained with `loss: next_token_cross_entropy` on a text data set maps a window of byte
tokens (n, T) to logits (n, T, 256), position t predicting the byte after position t. To
continue a prompt, run the model on the last `context_length` bytes, turn the last position's
logits into the next byte (the arg-max, or a draw from softmax(logits / temperature)), append
it, and repeat. No cache of past keys and values: every byte costs one forward pass over the
window, which is plenty for a few hundred bytes from a small model.

Plain engine code (no Ray, no protobuf), so a Generate RPC can call it on a model built from a
job's spec and its downloaded weights.
"""

from __future__ import annotations

import numpy as np

from worker.backprop import nn
from worker.backprop.nn.transformer import PositionalEmbedding
from worker.backprop.tensor import Tensor, no_grad

BYTE_VALUES = 256


def sample_text(model: nn.Module, prompt: str | bytes, length: int, temperature: float = 1.0,
                seed: int = 0, *, context_length: int | None = None) -> str:
    """The `length` bytes the model writes after `prompt`, decoded as UTF-8 (an invalid
    sequence, e.g. a character cut at the end, becomes U+FFFD). The prompt is not repeated.

    `temperature` 0 picks the most likely byte every time (greedy, and then `seed` plays no
    part); above 0 draws from softmax(logits / temperature) with a generator seeded by `seed`,
    so the same call writes the same text. `context_length` is how many of the last bytes the
    model sees; by default the model's positional embedding's num_positions (the longest window
    it can take), or the whole text so far when it has none.
    """
    tokens = list(prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt))
    if not tokens:
        raise ValueError("sample_text needs a prompt of at least one byte")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    window = context_length if context_length is not None else _longest_window(model)
    if window is not None and window < 1:
        raise ValueError(f"context_length must be >= 1, got {window}")
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()  # dropout off, batch statistics from the running averages
    try:
        with no_grad():
            for _ in range(length):
                context = tokens[-window:] if window is not None else tokens
                logits = model(Tensor(np.asarray([context], dtype=np.int64))).data
                if logits.shape[-1] != BYTE_VALUES or logits.ndim != 3:
                    raise ValueError(f"a byte-level language model outputs (n, T, "
                                     f"{BYTE_VALUES}) logits, this one {logits.shape}")
                tokens.append(_next_byte(logits[0, -1].astype(np.float64), temperature, rng))
    finally:
        model.train(was_training)
    written = tokens[len(tokens) - length:] if length else []
    return bytes(written).decode("utf-8", errors="replace")


def _longest_window(model: nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, PositionalEmbedding):
            return module.num_positions
    return None


def _next_byte(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    probabilities = np.exp(scaled - scaled.max())  # softmax, shifted so that exp cannot overflow
    probabilities /= probabilities.sum()
    return int(rng.choice(BYTE_VALUES, p=probabilities))
