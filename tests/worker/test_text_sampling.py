"""sample_text: how a byte-level language model continues a prompt (greedy or by temperature),
on tiny hand-made models whose next-byte distribution is known."""

import numpy as np
import pytest

from worker.backprop import Tensor, nn
from worker.backprop.tensor import no_grad
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


def causal_transformer(norm_first: bool, dtype=np.float64, positions: int = 24,
                       attention_layer: bool = False) -> nn.Sequential:
    """A small random causal byte transformer as the model builder makes one."""
    from chainrule.spec_file import job_spec_from_dict
    from worker.model_builder import build_model

    block = {"transformer_encoder_layer": {"nhead": 4, "dim_feedforward": 64, "dropout": 0.1,
                                           "is_causal": True, "norm_first": norm_first}}
    layers = [{"embedding": {"num_embeddings": 256, "embedding_dim": 32}},
              {"positional_embedding": {"num_positions": positions}}, block, block]
    if attention_layer:
        layers.append({"multihead_attention": {"num_heads": 2, "is_causal": True}})
    layers += [{"layer_norm": {}}, {"linear": {"out_features": 256}}]
    spec = job_spec_from_dict({"model": {"layers": layers}})
    return build_model(spec.model, (positions,), dtype, seed=4, input_dtype=np.int64)


@pytest.mark.parametrize("norm_first, attention_layer", [(True, False), (False, True)])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.8, 10), (0.0, 0)])
def test_the_key_value_cache_writes_the_bytes_full_passes_write(norm_first, attention_layer,
                                                                temperature, top_k):
    # 40 bytes after a 5-byte prompt: the window of 24 fills, then slides (cache refilled).
    from worker.text_sampling import CachedDecoder

    model = causal_transformer(norm_first, attention_layer=attention_layer)
    assert CachedDecoder.of(model, 24) is not None
    args = dict(prompt="print", length=40, temperature=temperature, seed=3, top_k=top_k)
    assert sample_text(model, **args, use_cache=True) == sample_text(model, **args,
                                                                     use_cache=False)


def test_cached_logits_match_a_full_pass_to_round_off():
    from worker.text_sampling import CachedDecoder

    model = causal_transformer(norm_first=True, dtype=np.float32)
    model.eval()
    decoder = CachedDecoder.of(model, 24)
    assert decoder is not None
    tokens = list(b"def sample(")
    for _ in range(30):
        with no_grad():
            cached = decoder.next_logits(tokens)
            full = model(Tensor(np.asarray([tokens[-24:]]))).data[0, -1]
        np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-5)
        tokens.append(int(np.argmax(full)))


def test_a_model_the_cache_cannot_serve_gets_full_passes():
    from worker.text_sampling import CachedDecoder

    non_causal = causal_transformer(norm_first=True)
    for layer in non_causal.children():
        if hasattr(layer, "is_causal"):
            layer.is_causal = False
    assert CachedDecoder.of(non_causal, 24) is None
    assert CachedDecoder.of(next_byte_model(), None) is None  # no window: no cache size
    recorder = nn.Sequential(nn.Embedding(256, 8), nn.PositionalEmbedding(4, 8),
                             RecordsWindows(), nn.Linear(8, 256))
    assert CachedDecoder.of(recorder, 4) is None
