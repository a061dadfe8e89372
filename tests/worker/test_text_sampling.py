"""sample_text: how a byte-level language model continues a prompt (greedy or by temperature),
on tiny hand-made models whose next-byte distribution is known."""

import numpy as np
import pytest

from worker.backprop import Tensor, nn
from worker.text_sampling import sample_text


def next_byte_model(shift: int = 1, scale: float = 10.0) -> nn.Sequential:
    """Logits (n, T, 256) that favour byte (b + shift) % 256 after byte b, by `scale`."""
    table = nn.Embedding(256, 256)
    table.weight.data[...] = scale * np.roll(np.eye(256), shift, axis=1)
    return nn.Sequential(table)


class RecordsWindows(nn.Module):
    """An identity layer remembering the length of every sequence it saw."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def forward(self, x: Tensor) -> Tensor:
        self.lengths.append(x.shape[-2])
        return x


def test_greedy_sampling_follows_the_most_likely_byte_and_leaves_the_prompt_out():
    assert sample_text(next_byte_model(), "a", 5, temperature=0) == "bcdef"
    assert sample_text(next_byte_model(), b"x", 3, temperature=0) == "yz{"


def test_temperature_sampling_is_reproducible_by_seed_and_spreads_with_temperature():
    flat = next_byte_model(scale=0.0)  # every byte equally likely
    first = sample_text(flat, "a", 200, temperature=1.0, seed=7)
    assert first == sample_text(flat, "a", 200, temperature=1.0, seed=7)
    assert first != sample_text(flat, "a", 200, temperature=1.0, seed=8)
    # A preference by a logit gap of 10 is followed at temperature 0.1 (gap 100), and mostly
    # not at temperature 10 (gap 1, against 255 other bytes: followed with probability 0.01).
    model = next_byte_model()
    assert sample_text(model, "a", 20, temperature=0.1, seed=1) == "bcdefghijklmnopqrstu"
    assert sample_text(model, "a", 20, temperature=10.0, seed=1) != "bcdefghijklmnopqrstu"


def test_the_model_sees_at_most_its_positional_embeddings_length():
    recorder = RecordsWindows()
    model = nn.Sequential(nn.Embedding(256, 8), nn.PositionalEmbedding(4, 8), recorder,
                          nn.Linear(8, 256))
    sample_text(model, "ab", 5, temperature=0)
    assert recorder.lengths == [2, 3, 4, 4, 4]
    recorder.lengths.clear()
    sample_text(model, "abcdefgh", 2, temperature=0, context_length=3)
    assert recorder.lengths == [3, 3]


def test_sampling_leaves_the_model_in_the_mode_it_found():
    model = next_byte_model()
    model.train()
    sample_text(model, "a", 2)
    assert model.training
    model.eval()
    sample_text(model, "a", 2)
    assert not model.training


@pytest.mark.parametrize("prompt, length, temperature, message", [
    ("", 3, 1.0, "at least one byte"),
    ("a", -1, 1.0, "length"),
    ("a", 3, -0.5, "temperature"),
    ("a", 3, float("nan"), "temperature"),
])
def test_bad_arguments_are_refused_naming_the_argument(prompt, length, temperature, message):
    with pytest.raises(ValueError, match=message):
        sample_text(next_byte_model(), prompt, length, temperature)


def test_a_model_that_is_not_a_byte_language_model_is_refused():
    with pytest.raises(ValueError, match=r"\(n, T, 256\)"):
        sample_text(nn.Sequential(nn.Embedding(256, 10)), "a", 1)
