"""TransformerEncoderLayer, TransformerEncoder and PositionalEmbedding follow torch.nn.

Outputs, input gradients and every parameter gradient agree with torch (float64, the same
weights through a strict load_state_dict) to 1e-9 of the largest value compared, for post-
and pre-norm blocks, relu and gelu, and every mask: none, a boolean or float src_mask, is_causal,
a key padding mask, and padding with causal. State dicts load into torch and back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop import gradcheck, gradgradcheck, nn
from worker.backprop.nn import init
from worker.backprop.tensor import Tensor

F64 = np.float64
RELATIVE = 1e-9
BATCH, LENGTH, D_MODEL, HEADS, FEED_FORWARD = 3, 5, 8, 2, 12


def assert_matches(ours, theirs, name: str) -> None:
    """max |ours - theirs| <= 1e-9 * max |theirs| (and the same shape)."""
    ours = ours.data if isinstance(ours, Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    error = np.abs(ours - theirs).max(initial=0.0)
    assert error <= RELATIVE * np.abs(theirs).max(initial=0.0), f"{name}: max error {error}"


def randomize(module: nn.Module, rng: np.random.Generator) -> nn.Module:
    """Every weight random (norms start at 1 and 0, attention biases at 0)."""
    for parameter in module.parameters():
        parameter.data[...] = 0.4 * rng.standard_normal(parameter.shape)
    return module


def our_layer(rng, norm_first=False, activation="relu", **kwargs) -> nn.TransformerEncoderLayer:
    return randomize(nn.TransformerEncoderLayer(
        D_MODEL, HEADS, FEED_FORWARD, dropout=0.0, activation=activation, norm_first=norm_first,
        dtype=F64, rng=rng, **kwargs), rng)


def torch_layer(ours: nn.TransformerEncoderLayer, **kwargs) -> torch.nn.Module:
    return torch.nn.TransformerEncoderLayer(
        D_MODEL, HEADS, FEED_FORWARD, dropout=0.0, activation=kwargs.pop("activation", "relu"),
        batch_first=ours.self_attn.batch_first, norm_first=ours.norm_first, dtype=torch.float64,
        **kwargs)


def load_ours_into(twin: torch.nn.Module, ours: nn.Module) -> torch.nn.Module:
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()},
                         strict=True)
    return twin


def run_both(ours, twin, x: np.ndarray, rng, our_kwargs: dict, torch_kwargs: dict):
    x_ours, x_t = Tensor(x.copy(), requires_grad=True), torch.tensor(x, requires_grad=True)
    out = ours(x_ours, **our_kwargs)
    out_t = twin(x_t, **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                         for k, v in torch_kwargs.items()})
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_t * torch.from_numpy(probe)).sum().backward()
    assert_matches(out, out_t, "output")
    assert_matches(x_ours.grad, x_t.grad, "input gradient")
    theirs = dict(twin.named_parameters())
    assert [name for name, _ in ours.named_parameters()] == list(theirs)
    for name, parameter in ours.named_parameters():
        assert_matches(parameter.grad, theirs[name].grad, f"{name} gradient")


CAUSAL = np.triu(np.ones((LENGTH, LENGTH), dtype=bool), 1)  # True = masked
FLOAT_MASK = np.random.default_rng(1).standard_normal((LENGTH, LENGTH))
PADDED = np.zeros((BATCH, LENGTH), dtype=bool)
PADDED[0, 3:] = True
PADDED[2, 4:] = True

# Each case: the layer's keyword arguments and torch's (torch needs src_mask beside is_causal).
MASKS = {
    "no_mask": ({}, {}),
    "bool_src_mask": ({"src_mask": CAUSAL}, {"src_mask": CAUSAL}),
    "float_src_mask": ({"src_mask": FLOAT_MASK}, {"src_mask": FLOAT_MASK}),
    "is_causal": ({"is_causal": True}, {"src_mask": CAUSAL, "is_causal": True}),
    "key_padding_mask": ({"src_key_padding_mask": PADDED}, {"src_key_padding_mask": PADDED}),
    "key_padding_mask_and_causal": (
        {"src_key_padding_mask": PADDED, "is_causal": True},
        {"src_key_padding_mask": PADDED, "src_mask": CAUSAL, "is_causal": True}),
}


@pytest.mark.parametrize("masks", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_encoder_layer_matches_torch(norm_first, activation, masks):
    rng = np.random.default_rng(2)
    ours = our_layer(rng, norm_first, activation)
    twin = load_ours_into(torch_layer(ours, activation=activation), ours)

    run_both(ours, twin, rng.standard_normal((BATCH, LENGTH, D_MODEL)), rng, *masks)


@pytest.mark.parametrize("variant", [
    {"bias": False}, {"batch_first": False}, {"layer_norm_eps": 1e-2},
], ids=["without_bias", "sequence_first", "layer_norm_eps"])
def test_encoder_layer_options_match_torch(variant):
    rng = np.random.default_rng(3)
    ours = our_layer(rng, norm_first=True, **variant)
    twin = load_ours_into(torch_layer(ours, **{k: v for k, v in variant.items()
                                               if k != "batch_first"}), ours)
    shape = (BATCH, LENGTH, D_MODEL) if variant.get("batch_first", True) else (
        LENGTH, BATCH, D_MODEL)

    run_both(ours, twin, rng.standard_normal(shape), rng, {}, {})


def encoder_pair(rng, norm_first: bool, final_norm: bool):
    norm = nn.LayerNorm(D_MODEL, dtype=F64) if final_norm else None
    ours = randomize(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, 0.0, norm_first=norm_first,
                                   dtype=F64, rng=rng), 2, norm=norm), rng)
    twin = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, 0.0, batch_first=True,
                                         norm_first=norm_first, dtype=torch.float64), 2,
        norm=torch.nn.LayerNorm(D_MODEL, dtype=torch.float64) if final_norm else None,
        enable_nested_tensor=False)
    return ours, load_ours_into(twin, ours)


@pytest.mark.parametrize("masks", MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize("norm_first, final_norm", [(False, False), (True, True)],
                         ids=["post_norm", "pre_norm_with_final_norm"])
def test_two_layer_encoder_matches_torch(norm_first, final_norm, masks):
    rng = np.random.default_rng(4)
    ours, twin = encoder_pair(rng, norm_first, final_norm)
    rename = {"src_mask": "mask"}  # the encoder calls it mask, the layer src_mask
    our_kwargs, torch_kwargs = ({rename.get(k, k): v for k, v in kw.items()} for kw in masks)

    run_both(ours, twin, rng.standard_normal((BATCH, LENGTH, D_MODEL)), rng, our_kwargs,
             torch_kwargs)


def test_encoder_layer_gradients_first_and_second_order():
    rng = np.random.default_rng(5)
    layer = randomize(nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="gelu",
                                                 norm_first=True, dtype=F64, rng=rng), rng)
    x = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    padding = np.array([[False, False, True], [False, False, False]])

    def encode(x, *parameters):  # the parameters are the layer's own (float64) tensors
        return layer(x, src_key_padding_mask=padding, is_causal=True)

    gradcheck(encode, [x, *layer.parameters()])
    gradgradcheck(encode, [x, *layer.parameters()])


# --- keys, copies and loading ------------------------------------------------------------------


def test_state_dict_keys_and_submodule_names_are_torchs():
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD), 2,
                                 norm=nn.LayerNorm(D_MODEL))
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, batch_first=True), 2,
        norm=torch.nn.LayerNorm(D_MODEL), enable_nested_tensor=False)

    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert list(ours.state_dict())[0] == "layers.0.self_attn.in_proj_weight"
    assert [name for name, _ in ours.layers[0].named_modules()] == [
        name for name, _ in theirs.layers[0].named_modules()]


def test_torch_weights_load_strictly_and_compute_the_same_and_load_back():
    rng = np.random.default_rng(6)
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, 0.0, batch_first=True,
                                         dtype=torch.float64), 2, enable_nested_tensor=False)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0.0, 0.4)
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, 0.0,
                                                            dtype=F64), 2)

    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()}, strict=True)
    x = rng.standard_normal((BATCH, LENGTH, D_MODEL))
    theirs.eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x))
    back = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, 0.0, batch_first=True,
                                         dtype=torch.float64), 2, enable_nested_tensor=False)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()},
                         strict=True)

    assert_matches(ours(Tensor(x)), expected, "output")
    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key].numpy(), value.numpy(), key)


def test_encoder_layers_are_independent_deep_copies_that_start_equal():
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD)
    encoder = nn.TransformerEncoder(layer, 3)
    first, second = encoder.layers[0], encoder.layers[1]

    assert first is not layer and first is not second
    np.testing.assert_array_equal(first.linear1.weight.data, second.linear1.weight.data)
    first.linear1.weight.data[...] = 0.0
    assert not np.all(second.linear1.weight.data == 0.0)
    assert not np.all(layer.linear1.weight.data == 0.0)
    assert len({id(p) for p in encoder.parameters()}) == 3 * len(list(layer.parameters()))


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_is_active_in_training_and_off_in_evaluation():
    """Evaluation: deterministic and equal to the same weights with dropout 0. Training:
    each call draws new masks from the engine's generator (reproducible from its seed)."""
    rng = np.random.default_rng(7)
    noisy = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.3, dtype=F64)
    plain = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0, dtype=F64)
    plain.load_state_dict(noisy.state_dict())
    x = Tensor(rng.standard_normal((BATCH, LENGTH, D_MODEL)))

    noisy.eval()
    np.testing.assert_array_equal(noisy(x).data, noisy(x).data)
    np.testing.assert_allclose(noisy(x).data, plain(x).data, rtol=1e-12)
    noisy.train()
    init.manual_seed(0)
    first, second = noisy(x).data, noisy(x).data
    init.manual_seed(0)
    replay = noisy(x).data

    assert not np.allclose(first, second)
    assert not np.allclose(first, plain(x).data)
    np.testing.assert_array_equal(first, replay)


def test_attention_dropout_drops_attention_weights_in_training_only():
    attention = nn.MultiheadAttention(D_MODEL, HEADS, dropout=1.0, dtype=F64)
    x = Tensor(np.random.default_rng(8).standard_normal((BATCH, LENGTH, D_MODEL)))

    _, dropped = attention(x, x, x, average_attn_weights=False)
    attention.eval()
    _, kept = attention(x, x, x, average_attn_weights=False)

    np.testing.assert_array_equal(dropped.data, 0.0)  # torch returns the weights after dropout
    np.testing.assert_allclose(kept.data.sum(axis=-1), 1.0)


# --- positional embeddings -------------------------------------------------------------------


def test_positional_embedding_adds_the_first_positions_and_matches_a_torch_embedding():
    rng = np.random.default_rng(9)
    ours = nn.PositionalEmbedding(LENGTH + 3, D_MODEL, dtype=F64, rng=rng)
    twin = torch.nn.Embedding(LENGTH + 3, D_MODEL, dtype=torch.float64)
    load_ours_into(twin, ours)
    x = rng.standard_normal((BATCH, LENGTH, D_MODEL))
    x_ours, x_t = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)

    out = ours(x_ours)
    out_t = x_t + twin(torch.arange(LENGTH))
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_t * torch.from_numpy(probe)).sum().backward()

    np.testing.assert_array_equal(out.data, x + ours.weight.data[:LENGTH])
    assert_matches(out, out_t, "output")
    assert_matches(x_ours.grad, x_t.grad, "input gradient")
    assert_matches(ours.weight.grad, twin.weight.grad, "weight gradient")
    np.testing.assert_array_equal(ours.weight.grad[LENGTH:], 0.0)  # unused positions
    assert list(ours.state_dict()) == list(twin.state_dict()) == ["weight"]


def test_positional_embedding_refuses_a_sequence_longer_than_its_positions():
    positions = nn.PositionalEmbedding(4, D_MODEL)

    with pytest.raises(ValueError, match="5 positions.*num_positions=4"):
        positions(Tensor(np.zeros((2, 5, D_MODEL), np.float32)))


# --- errors --------------------------------------------------------------------------------------


def test_d_model_not_divisible_by_nhead_is_refused():
    with pytest.raises(ValueError, match=r"embed_dim \(10\).*num_heads \(4\)"):
        nn.TransformerEncoderLayer(10, 4)


def test_an_unknown_activation_is_refused_naming_it():
    with pytest.raises(ValueError, match="'tanh'"):
        nn.TransformerEncoderLayer(D_MODEL, HEADS, activation="tanh")
