"""scaled_dot_product_attention and MultiheadAttention agree with PyTorch under every mask.

Each case runs the same float64 inputs (and, for the module, the same weights, copied through
a strict load_state_dict) through the engine and torch, pushes the same random upstream
gradient back through both, and requires outputs and every gradient (inputs and parameters)
to agree to 1e-9 of the largest value compared: a different order of summation passes, a
wrong formula does not.

Mask conventions differ between the two torch functions, and we follow each: for
scaled_dot_product_attention a boolean True means "may take part"; for MultiheadAttention
(attn_mask, key_padding_mask) True means "masked out". Float masks are added to the scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop import gradcheck, gradgradcheck, nn, ops
from worker.backprop.nn import functional as F
from worker.backprop.tensor import Tensor

F64 = np.float64
RELATIVE = 1e-9
BATCH, HEADS, QUERIES, KEYS, FEATURES, VALUE_FEATURES = 2, 3, 4, 5, 6, 7
EMBED = 8  # MultiheadAttention: 2 heads of 4


def assert_matches(ours, theirs, name: str) -> None:
    """max |ours - theirs| <= 1e-9 * max |theirs| (and the same shape)."""
    ours = ours.data if isinstance(ours, Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != {theirs.shape}"
    assert np.all(np.isfinite(theirs)), f"{name}: the torch reference is not finite"
    error = np.abs(ours - theirs).max(initial=0.0)
    assert error <= RELATIVE * np.abs(theirs).max(initial=0.0), f"{name}: max error {error}"


def leaf(array: np.ndarray) -> tuple[Tensor, torch.Tensor]:
    return Tensor(array.copy(), requires_grad=True), torch.tensor(array, requires_grad=True)


# --- scaled_dot_product_attention ------------------------------------------------------------

PADDING = np.ones((BATCH, 1, 1, KEYS), dtype=bool)  # item 0: the last two keys are padding
PADDING[0, ..., 3:] = False
BOOL_MASK = np.random.default_rng(1).random((QUERIES, KEYS)) < 0.7
BOOL_MASK[:, 0] = True  # every query keeps a key
FLOAT_MASK = np.random.default_rng(2).standard_normal((BATCH, HEADS, QUERIES, KEYS))

SDPA_MASKS = {
    "no_mask": {},
    "bool_attn_mask": {"attn_mask": BOOL_MASK},
    "bool_padding_mask_broadcast": {"attn_mask": PADDING},
    "float_attn_mask": {"attn_mask": FLOAT_MASK},
    "is_causal": {"is_causal": True},
    "scale": {"scale": 0.25},
    "bool_attn_mask_and_scale": {"attn_mask": BOOL_MASK, "scale": 2.0},
}


def torch_masks(kwargs: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("masks", SDPA_MASKS.values(), ids=SDPA_MASKS.keys())
def test_scaled_dot_product_attention_matches_torch_values_and_gradients(masks):
    rng = np.random.default_rng(0)
    q, q_t = leaf(rng.standard_normal((BATCH, HEADS, QUERIES, FEATURES)))
    k, k_t = leaf(rng.standard_normal((BATCH, HEADS, KEYS, FEATURES)))
    v, v_t = leaf(rng.standard_normal((BATCH, HEADS, KEYS, VALUE_FEATURES)))

    out = F.scaled_dot_product_attention(q, k, v, **masks)
    out_t = torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t, **torch_masks(masks))
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_t * torch.from_numpy(probe)).sum().backward()

    assert_matches(out, out_t, "output")
    for name, ours, theirs in (("query", q, q_t), ("key", k, k_t), ("value", v, v_t)):
        assert_matches(ours.grad, theirs.grad, f"{name} gradient")


def test_scaled_dot_product_attention_gives_zero_for_a_query_with_every_key_masked_like_torch():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, QUERIES, FEATURES)) for _ in range(3))
    mask = np.ones((QUERIES, QUERIES), dtype=bool)
    mask[1] = False  # query 1 may look nowhere

    out = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), attn_mask=mask)
    out_t = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), attn_mask=torch.from_numpy(mask))

    np.testing.assert_array_equal(out.data[0, 1], np.zeros(FEATURES))
    assert_matches(out, out_t, "output")


def test_scaled_dot_product_attention_refuses_a_mask_together_with_is_causal():
    x = Tensor(np.zeros((2, 3, 4)))

    with pytest.raises(ValueError, match="attn_mask or is_causal"):
        F.scaled_dot_product_attention(x, x, x, attn_mask=np.ones((3, 3), bool), is_causal=True)


def test_scaled_dot_product_attention_refuses_value_of_another_length():
    q = Tensor(np.zeros((2, 3, 4)))

    with pytest.raises(ValueError, match="value"):
        F.scaled_dot_product_attention(q, q, Tensor(np.zeros((2, 5, 4))))


def test_attention_dropout_zeroes_weights_and_rescales_the_rest():
    """dropout_p > 0 drops whole attention weights (not outputs): with every weight dropped the
    output is 0, with none dropped (p = 0) it is the plain attention."""
    rng = np.random.default_rng(4)
    q, k, v = (Tensor(rng.standard_normal((2, QUERIES, FEATURES))) for _ in range(3))

    dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    half = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, rng=np.random.default_rng(5))

    np.testing.assert_array_equal(dropped.data, np.zeros_like(dropped.data))
    weights = nn.functional.softmax(q @ k.transpose(0, 2, 1) * FEATURES ** -0.5, -1).data
    keep = np.random.default_rng(5).random(weights.shape) >= 0.5  # the same draw
    np.testing.assert_allclose(half.data, (weights * keep * 2.0) @ v.data, rtol=1e-12)


def test_scaled_dot_product_attention_gradients_first_and_second_order():
    rng = np.random.default_rng(6)
    q, k, v = (Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True) for _ in range(3))
    mask = np.array([[True, True, False], [True, False, True], [False, False, False]])

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    gradcheck(attention, [q, k, v])
    gradgradcheck(attention, [q, k, v])


# --- MultiheadAttention ----------------------------------------------------------------------


def our_attention(rng, bias: bool = True, batch_first: bool = True) -> nn.MultiheadAttention:
    module = nn.MultiheadAttention(EMBED, 2, bias=bias, batch_first=batch_first, dtype=F64,
                                   rng=rng)
    for parameter in module.parameters():  # biases start at 0: make every entry matter
        parameter.data[...] = 0.5 * rng.standard_normal(parameter.shape)
    return module


def torch_twin(ours: nn.MultiheadAttention) -> torch.nn.MultiheadAttention:
    twin = torch.nn.MultiheadAttention(
        ours.embed_dim, ours.num_heads, bias=ours.in_proj_bias is not None,
        batch_first=ours.batch_first, dtype=torch.float64)
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()},
                         strict=True)
    return twin


CAUSAL = np.triu(np.ones((QUERIES, QUERIES), dtype=bool), 1)  # True = masked, torch.nn style
PADDED = np.zeros((BATCH, QUERIES), dtype=bool)
PADDED[0, 2:] = True  # item 0: the last two positions are padding (query 0 still sees key 0)
FLOAT_PADDING = np.where(PADDED, -1e4, 0.3)
PER_HEAD = np.random.default_rng(7).random((BATCH * 2, QUERIES, QUERIES)) < 0.3
PER_HEAD[..., 0] = False

# Each case: our keyword arguments, and torch's (torch needs attn_mask beside is_causal).
MHA_MASKS = {
    "no_mask": ({}, {}),
    "bool_attn_mask": ({"attn_mask": CAUSAL}, {"attn_mask": CAUSAL}),
    "float_attn_mask": ({"attn_mask": FLOAT_MASK[0, 0, :, :QUERIES]},
                        {"attn_mask": FLOAT_MASK[0, 0, :, :QUERIES]}),
    "per_head_attn_mask": ({"attn_mask": PER_HEAD}, {"attn_mask": PER_HEAD}),
    "is_causal": ({"is_causal": True}, {"attn_mask": CAUSAL, "is_causal": True}),
    "key_padding_mask": ({"key_padding_mask": PADDED}, {"key_padding_mask": PADDED}),
    "float_key_padding_mask": ({"key_padding_mask": FLOAT_PADDING},
                               {"key_padding_mask": FLOAT_PADDING}),
    "key_padding_mask_and_causal": ({"key_padding_mask": PADDED, "is_causal": True},
                                    {"key_padding_mask": PADDED, "attn_mask": CAUSAL,
                                     "is_causal": True}),
}


def run_attention(ours, twin, inputs: list[np.ndarray], rng, our_kwargs: dict,
                  torch_kwargs: dict, same_tensor: str = "all"):
    """Forward both on (query, key, value) built from `inputs`, backpropagate random probes
    through the output and (when returned) the weights; return outputs, weights, inputs."""
    ours_in = [Tensor(a.copy(), requires_grad=True) for a in inputs]
    theirs_in = [torch.tensor(a, requires_grad=True) for a in inputs]
    if same_tensor == "all":  # self-attention: the very same tensor three times
        ours_qkv, theirs_qkv = [ours_in[0]] * 3, [theirs_in[0]] * 3
    elif same_tensor == "key_value":
        ours_qkv, theirs_qkv = [ours_in[0], ours_in[1], ours_in[1]], [
            theirs_in[0], theirs_in[1], theirs_in[1]]
    else:
        ours_qkv, theirs_qkv = ours_in, theirs_in
    out, weights = ours(*ours_qkv, **our_kwargs)
    out_t, weights_t = twin(*theirs_qkv, **torch_masks(torch_kwargs))
    probe = rng.standard_normal(out.shape)
    loss, loss_t = (out * probe).sum(), (out_t * torch.from_numpy(probe)).sum()
    if weights is not None:
        weight_probe = rng.standard_normal(weights.shape)
        loss = loss + (weights * weight_probe).sum()
        loss_t = loss_t + (weights_t * torch.from_numpy(weight_probe)).sum()
    loss.backward()
    loss_t.backward()
    return (out, out_t), (weights, weights_t), (ours_in, theirs_in)


def assert_parameter_gradients_match(ours: nn.Module, twin: torch.nn.Module) -> None:
    theirs = dict(twin.named_parameters())
    assert [name for name, _ in ours.named_parameters()] == list(theirs)
    for name, parameter in ours.named_parameters():
        assert_matches(parameter.grad, theirs[name].grad, f"{name} gradient")


@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("masks", MHA_MASKS.values(), ids=MHA_MASKS.keys())
def test_self_attention_matches_torch_under_every_mask(masks, need_weights):
    rng = np.random.default_rng(8)
    ours = our_attention(rng)
    twin = torch_twin(ours)
    our_kwargs, torch_kwargs = masks
    x = rng.standard_normal((BATCH, QUERIES, EMBED))

    (out, out_t), (weights, weights_t), (xs, xs_t) = run_attention(
        ours, twin, [x], rng, dict(our_kwargs, need_weights=need_weights),
        dict(torch_kwargs, need_weights=need_weights))

    assert_matches(out, out_t, "output")
    if need_weights:
        assert_matches(weights, weights_t, "attention weights")
    else:
        assert weights is None and weights_t is None
    assert_matches(xs[0].grad, xs_t[0].grad, "input gradient")
    assert_parameter_gradients_match(ours, twin)


VARIANTS = {
    "per_head_weights": dict(our={"average_attn_weights": False}),
    "sequence_first": dict(batch_first=False),
    "without_bias": dict(bias=False),
    "key_is_value": dict(same_tensor="key_value", lengths=(QUERIES, KEYS)),
    "distinct_query_key_value": dict(same_tensor="none", lengths=(QUERIES, KEYS, KEYS)),
    "distinct_with_padding": dict(
        same_tensor="none", lengths=(QUERIES, KEYS, KEYS),
        our={"key_padding_mask": PADDING[:, 0, 0] == 0}),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_attention_variants_match_torch(variant):
    rng = np.random.default_rng(9)
    batch_first = variant.get("batch_first", True)
    ours = our_attention(rng, bias=variant.get("bias", True), batch_first=batch_first)
    twin = torch_twin(ours)
    lengths = variant.get("lengths", (QUERIES,))
    shapes = [(BATCH, n, EMBED) if batch_first else (n, BATCH, EMBED) for n in lengths]
    kwargs = variant.get("our", {})

    (out, out_t), (weights, weights_t), (xs, xs_t) = run_attention(
        ours, twin, [rng.standard_normal(s) for s in shapes], rng, kwargs, kwargs,
        variant.get("same_tensor", "all"))

    assert_matches(out, out_t, "output")
    assert_matches(weights, weights_t, "attention weights")
    for position, (x, x_t) in enumerate(zip(xs, xs_t)):
        assert_matches(x.grad, x_t.grad, f"gradient of input {position}")
    assert_parameter_gradients_match(ours, twin)


def test_unbatched_input_matches_torch():
    rng = np.random.default_rng(10)
    ours = our_attention(rng)
    twin = torch_twin(ours)
    padding = np.array([False, False, True, False])

    (out, out_t), (weights, weights_t), (xs, xs_t) = run_attention(
        ours, twin, [rng.standard_normal((QUERIES, EMBED))], rng,
        {"key_padding_mask": padding}, {"key_padding_mask": padding})

    assert out.shape == (QUERIES, EMBED)
    assert_matches(out, out_t, "output")
    assert_matches(weights, weights_t, "attention weights")
    assert_matches(xs[0].grad, xs_t[0].grad, "input gradient")
    assert_parameter_gradients_match(ours, twin)


def test_a_fully_padded_item_gets_finite_output_from_zero_weights():
    # torch's need_weights path gives NaN here; ours gives what its SDPA path gives: the
    # output projection of a zero vector, i.e. out_proj's bias.
    rng = np.random.default_rng(11)
    ours = our_attention(rng)
    padding = np.zeros((BATCH, QUERIES), dtype=bool)
    padding[1] = True

    out, weights = ours(*[Tensor(rng.standard_normal((BATCH, QUERIES, EMBED)))] * 3,
                        key_padding_mask=padding)

    np.testing.assert_array_equal(weights.data[1], np.zeros((QUERIES, QUERIES)))
    np.testing.assert_allclose(out.data[1], np.tile(ours.out_proj.bias.data, (QUERIES, 1)))


def test_multihead_attention_gradients_first_and_second_order():
    rng = np.random.default_rng(12)
    ours = nn.MultiheadAttention(4, 2, dtype=F64, rng=rng)
    for parameter in ours.parameters():
        parameter.data[...] = 0.5 * rng.standard_normal(parameter.shape)
    x = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    padding = np.array([[False, False, True], [False, False, False]])

    def attend(x, *parameters):  # the parameters are the module's own (float64) tensors
        return ours(x, x, x, key_padding_mask=padding, is_causal=True)[0]

    gradcheck(attend, [x, *ours.parameters()])
    gradgradcheck(attend, [x, *ours.parameters()])


# --- weights, keys and errors ----------------------------------------------------------------


def test_parameters_and_state_dict_keys_are_torchs():
    ours = nn.MultiheadAttention(EMBED, 2)
    theirs = torch.nn.MultiheadAttention(EMBED, 2, batch_first=True)

    assert [(n, p.shape) for n, p in ours.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert list(nn.MultiheadAttention(EMBED, 2, bias=False).state_dict()) == list(
        torch.nn.MultiheadAttention(EMBED, 2, bias=False).state_dict())


def test_state_dict_round_trips_through_torch_and_computes_the_same():
    rng = np.random.default_rng(13)
    theirs = torch.nn.MultiheadAttention(EMBED, 4, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_()
    ours = nn.MultiheadAttention(EMBED, 4, dtype=F64)

    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()}, strict=True)
    x = rng.standard_normal((BATCH, QUERIES, EMBED))
    out, _ = ours(*[Tensor(x)] * 3, need_weights=False)
    out_t, _ = theirs(*[torch.from_numpy(x)] * 3, need_weights=False)
    back = torch.nn.MultiheadAttention(EMBED, 4, batch_first=True, dtype=torch.float64)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()},
                         strict=True)

    assert_matches(out, out_t, "output")
    for key, value in back.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), theirs.state_dict()[key].numpy(), key)


def test_initialisation_follows_torch():
    """Xavier-uniform in_proj_weight, zero biases, out_proj.weight as any Linear."""
    ours = nn.MultiheadAttention(64, 4, rng=np.random.default_rng(14))
    xavier_bound = np.sqrt(6.0 / (64 + 3 * 64))

    assert np.abs(ours.in_proj_weight.data).max() <= xavier_bound
    assert np.abs(ours.in_proj_weight.data).max() > 0.9 * xavier_bound
    np.testing.assert_array_equal(ours.in_proj_bias.data, 0.0)
    np.testing.assert_array_equal(ours.out_proj.bias.data, 0.0)
    assert np.abs(ours.out_proj.weight.data).max() <= 1 / 8


@pytest.mark.parametrize("embed_dim, num_heads", [(10, 4), (8, 0), (0, 2)])
def test_embed_dim_must_be_a_positive_multiple_of_num_heads(embed_dim, num_heads):
    with pytest.raises(ValueError, match=f"embed_dim \\({embed_dim}\\).*num_heads"):
        nn.MultiheadAttention(embed_dim, num_heads)


@pytest.mark.parametrize("kwargs, message", [
    ({"attn_mask": np.zeros((3, 3), bool)}, r"attn_mask must have shape \(4, 4\)"),
    ({"key_padding_mask": np.zeros((2, 3), bool)}, r"key_padding_mask must have shape \(2, 4\)"),
    ({"attn_mask": np.zeros((4, 4), np.int64)}, "boolean or float"),
])
def test_a_mask_of_the_wrong_shape_or_type_is_refused_naming_it(kwargs, message):
    ours = nn.MultiheadAttention(EMBED, 2)
    x = Tensor(np.zeros((2, 4, EMBED), np.float32))

    with pytest.raises(ValueError, match=message):
        ours(x, x, x, **kwargs)


def test_inputs_of_the_wrong_width_are_refused_naming_them():
    ours = nn.MultiheadAttention(EMBED, 2)
    x, wide = Tensor(np.zeros((2, 4, EMBED))), Tensor(np.zeros((2, 4, EMBED + 1)))

    with pytest.raises(ValueError, match="key has 9 features"):
        ours(x, wide, wide)


# --- the fused self-attention op's causal tiles ----------------------------------------------


def torch_causal_self_attention(qkv: torch.Tensor, heads: int, padding: np.ndarray | None):
    batch, length, width = qkv.shape
    q, k, v = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    if padding is not None:  # True = may take part, as scaled_dot_product_attention reads it
        mask = mask & ~torch.from_numpy(padding)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, width // 3)


@pytest.mark.parametrize("length, tile", [(40, None), (7, 2), (6, 3)],
                         ids=["length_40_real_tiles", "tiles_of_2", "tiles_of_3"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "causal_and_padding"])
def test_causal_self_attention_in_tiles_matches_torch(length, tile, padded, monkeypatch):
    """Queries in tiles, each against the keys up to its last query: the same values and
    gradients as the full masked attention, with the key gradients summed over tiles."""
    if tile is not None:
        monkeypatch.setattr(ops, "_CAUSAL_TILE", tile)
    rng = np.random.default_rng(15)
    heads = 2
    qkv, qkv_t = leaf(rng.standard_normal((3, length, 3 * heads * 4)))
    padding = np.zeros((3, length), dtype=bool)
    padding[1, length - 2:] = True  # at the end: every query keeps a key
    mask = np.where(padding, -np.inf, 0.0)[:, None, None, :] if padded else None

    out = ops.self_attention(qkv, heads, mask, causal=True)
    out_t = torch_causal_self_attention(qkv_t, heads, padding if padded else None)
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_t * torch.from_numpy(probe)).sum().backward()

    assert_matches(out, out_t, "output")
    assert_matches(qkv.grad, qkv_t.grad, "qkv gradient")


def test_causal_self_attention_in_tiles_gradients_first_and_second_order(monkeypatch):
    monkeypatch.setattr(ops, "_CAUSAL_TILE", 2)
    rng = np.random.default_rng(16)
    qkv = Tensor(rng.standard_normal((2, 5, 12)), requires_grad=True)
    mask = np.zeros((2, 1, 1, 5))
    mask[0, ..., 4] = -np.inf

    def attend(qkv):
        return ops.self_attention(qkv, 2, mask, causal=True)

    gradcheck(attend, [qkv])
    gradgradcheck(attend, [qkv])
