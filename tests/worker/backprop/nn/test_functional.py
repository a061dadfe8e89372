"""nn.functional edge cases: dropout's mask and scale, loss input checking, numerical
stability at extreme logits, embedding gradients and index checking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.backprop import nn, ops
from worker.backprop.nn import functional as F
from worker.backprop.nn import init
from worker.backprop.tensor import Tensor

F64 = np.float64


@pytest.fixture(autouse=True)
def restore_engine_generator(monkeypatch):
    """Dropout draws from the engine's generator; leave it as the other tests found it."""
    monkeypatch.setattr(init, "_generator", init.default_generator())


def leaf(values, dtype=F64) -> Tensor:
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


def random_leaf(shape, seed=0, dtype=F64) -> Tensor:
    return leaf(np.random.default_rng(seed).standard_normal(shape), dtype)


# --- dropout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, training", [(0.5, False), (0.0, True), (0.0, False), (1.0, False)],
                         ids=["eval", "p-0-training", "p-0-eval", "p-1-eval"])
def test_dropout_in_eval_or_with_p_0_is_the_identity_with_identity_gradient(p, training):
    x = random_leaf((5, 4))
    upstream = np.random.default_rng(1).standard_normal((5, 4))

    y = F.dropout(x, p, training=training)
    y.backward(upstream)

    np.testing.assert_array_equal(y.data, x.data)
    np.testing.assert_array_equal(x.grad, upstream)


def test_dropout_module_follows_train_and_eval():
    layer = nn.Dropout(0.5)
    x = Tensor(np.ones((50, 50)))

    assert np.any(layer(x).data == 0.0)
    layer.eval()
    np.testing.assert_array_equal(layer(x).data, x.data)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_training_dropout_zeroes_about_p_and_scales_survivors_by_one_over_one_minus_p(p):
    n = 200_000
    x = Tensor(np.ones(n))

    y = F.dropout(x, p, training=True, rng=np.random.default_rng(0)).data

    dropped = np.mean(y == 0.0)
    # The dropped fraction is binomial: within five standard errors of p.
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(y[y != 0.0], 1.0 / (1.0 - p))
    assert y.mean() == pytest.approx(1.0, abs=5 * math.sqrt(p / (1 - p) / n))  # inverted


def test_dropout_gradient_is_the_same_scaled_mask_as_the_forward():
    p = 0.3
    x = leaf(np.ones((40, 30)))
    upstream = np.random.default_rng(2).standard_normal((40, 30))

    y = F.dropout(x, p, training=True, rng=np.random.default_rng(3))
    y.backward(upstream)

    # With x = 1 the output *is* the scaled mask: 0 where dropped, 1/(1-p) where kept.
    np.testing.assert_array_equal(x.grad, upstream * y.data)
    assert set(np.unique(y.data)) == {0.0, 1.0 / (1.0 - p)}


def test_dropout_with_p_1_zeroes_values_and_gradients():
    x = random_leaf((4, 4))

    y = F.dropout(x, 1.0, training=True)
    y.sum().backward()

    np.testing.assert_array_equal(y.data, 0.0)
    np.testing.assert_array_equal(x.grad, 0.0)


def test_dropout_keeps_float32():
    x = random_leaf((8, 8), dtype=np.float32)

    assert F.dropout(x, 0.5, training=True).dtype == np.float32


def test_dropout_masks_are_reproducible_from_a_seed_and_differ_between_calls():
    x = Tensor(np.ones((30, 30)))
    init.manual_seed(5)
    first, second = F.dropout(x, 0.5).data, F.dropout(x, 0.5).data
    init.manual_seed(5)
    again = F.dropout(x, 0.5).data

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_probability_outside_0_1_raises_quoting_it(p):
    x = Tensor(np.ones(3))

    with pytest.raises(ValueError, match=str(p)):
        F.dropout(x, p, training=True)
    with pytest.raises(ValueError, match=str(p)):
        F.dropout(x, p, training=False)  # checked even when it would not be used
    with pytest.raises(ValueError, match=str(p)):
        nn.Dropout(p)


# --- loss input checking -------------------------------------------------------------------------

ELEMENTWISE_LOSSES = [
    pytest.param(F.mse_loss, id="mse_loss"),
    pytest.param(F.l1_loss, id="l1_loss"),
    pytest.param(F.binary_cross_entropy_with_logits, id="bce_with_logits"),
]


@pytest.mark.parametrize("loss", ELEMENTWISE_LOSSES)
@pytest.mark.parametrize(
    "input_shape, target_shape",
    [((4, 3), (4, 2)), ((4, 3), (3, 4)), ((4, 1), (4,)), ((4,), (4, 1)), ((4, 3), (4, 3, 1))],
    ids=["other-width", "transposed", "column-vs-vector", "vector-vs-column", "extra-axis"],
)
def test_elementwise_loss_refuses_a_target_of_another_shape_naming_both(
    loss, input_shape, target_shape
):
    # Broadcasting would otherwise turn (4, 1) against (4,) into a silent (4, 4) loss.
    prediction = random_leaf(input_shape)
    target = np.zeros(target_shape)

    with pytest.raises(ValueError) as error:
        loss(prediction, target)

    assert str(input_shape) in str(error.value)
    assert str(target_shape) in str(error.value)


@pytest.mark.parametrize("loss", ELEMENTWISE_LOSSES)
def test_elementwise_loss_accepts_a_target_tensor_of_the_same_shape(loss):
    prediction = random_leaf((4, 3))

    value = loss(prediction, Tensor(np.zeros((4, 3))))

    assert value.shape == ()


@pytest.mark.parametrize("target_shape", [(5,), (3,), (4, 1)],
                         ids=["longer", "shorter", "column"])
def test_cross_entropy_refuses_a_target_of_the_wrong_shape_naming_it_and_the_expected(
    target_shape
):
    logits = random_leaf((4, 3))

    with pytest.raises(ValueError) as error:
        F.cross_entropy(logits, np.zeros(target_shape, dtype=np.int64))

    assert str(target_shape) in str(error.value)
    assert "(4,)" in str(error.value)  # the shape the logits' batch of 4 requires


def test_cross_entropy_refuses_class_indices_outside_the_range_naming_it():
    logits = random_leaf((4, 3))

    for bad in (3, -1):
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            F.cross_entropy(logits, np.array([0, 1, 2, bad]))


def test_cross_entropy_refuses_float_targets():
    with pytest.raises(ValueError, match="float64"):
        F.cross_entropy(random_leaf((4, 3)), np.zeros(4))


@pytest.mark.parametrize("target_shape", [(5,), (3,)], ids=["longer", "shorter"])
def test_nll_loss_refuses_a_target_of_the_wrong_length(target_shape):
    # A shorter target must not silently average over the first rows only.
    log_probs = F.log_softmax(random_leaf((4, 3)), -1)

    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        F.nll_loss(log_probs, np.zeros(target_shape, dtype=np.int64))


@pytest.mark.parametrize("bad", [3, -1])
def test_nll_loss_refuses_class_indices_outside_the_range(bad):
    # -1 must not silently pick the last class as NumPy's negative indexing would.
    log_probs = F.log_softmax(random_leaf((4, 3)), -1)

    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        F.nll_loss(log_probs, np.array([0, 1, 2, bad]))


@pytest.mark.parametrize("loss", [
    lambda r: F.mse_loss(random_leaf(3), np.zeros(3), reduction=r),
    lambda r: F.l1_loss(random_leaf(3), np.zeros(3), reduction=r),
    lambda r: F.binary_cross_entropy_with_logits(random_leaf(3), np.zeros(3), reduction=r),
    lambda r: F.cross_entropy(random_leaf((2, 3)), np.zeros(2, np.int64), reduction=r),
    lambda r: F.nll_loss(random_leaf((2, 3)), np.zeros(2, np.int64), reduction=r),
], ids=["mse", "l1", "bce", "cross_entropy", "nll"])
def test_an_unknown_reduction_raises_quoting_it(loss):
    with pytest.raises(ValueError, match="average"):
        loss("average")


# --- numerical stability -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_on_logits_of_magnitude_1e4_is_finite_and_matches_torch(
    dtype, rtol, label_smoothing
):
    rng = np.random.default_rng(4)
    values = 1e4 * rng.standard_normal((8, 5))
    values[0] = [1e4, -1e4, -1e4, -1e4, -1e4]  # target certain: loss exactly 0
    values[1] = [-1e4, 1e4, -1e4, -1e4, -1e4]  # target impossible: loss 2e4
    target = np.array([0, 0, 1, 2, 3, 4, 0, 1])
    logits = leaf(values, dtype)
    logits_t = torch.tensor(values, dtype=torch.float64 if dtype == F64 else torch.float32,
                            requires_grad=True)

    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    loss.backward()
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.from_numpy(target),
                                               label_smoothing=label_smoothing)
    loss_t.backward()

    assert np.isfinite(loss.item()) and np.all(np.isfinite(logits.grad))
    np.testing.assert_allclose(loss.item(), loss_t.item(), rtol=rtol)
    np.testing.assert_allclose(logits.grad, logits_t.grad.numpy(), rtol=rtol, atol=1e-12)
    per_sample = F.cross_entropy(Tensor(values.astype(dtype)), target, reduction="none").data
    assert per_sample[0] == 0.0
    assert per_sample[1] == pytest.approx(2e4, rel=rtol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("pos_weight", [None, np.array([3.0, 3.0, 0.5, 0.5])],
                         ids=["no-pos-weight", "pos-weight"])
def test_bce_with_logits_at_plus_minus_1e4_is_finite_and_exact(dtype, pos_weight):
    # Right answers cost 0, wrong ones cost |x| (times pos_weight for a missed positive).
    logits = leaf([[1e4, -1e4, 1e4, -1e4]], dtype)
    target = np.array([[1.0, 0.0, 0.0, 1.0]], dtype=dtype)

    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none",
                                              pos_weight=pos_weight)
    loss.sum().backward()
    loss_t = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits.data), torch.from_numpy(target), reduction="none",
        pos_weight=None if pos_weight is None else torch.from_numpy(pos_weight.astype(dtype)),
    )

    missed_positive_weight = 1.0 if pos_weight is None else pos_weight[3]
    np.testing.assert_array_equal(loss.data, [[0.0, 0.0, 1e4, 1e4 * missed_positive_weight]])
    np.testing.assert_array_equal(loss.data, loss_t.numpy())
    # d/dx = sigmoid(x) - y, with the missed positive's part scaled by pos_weight.
    np.testing.assert_array_equal(logits.grad, [[0.0, 0.0, 1.0, -missed_positive_weight]])


def test_softmax_and_log_softmax_of_huge_logits_are_finite():
    x = leaf([[1e4, -1e4, 0.0], [1e300, 1e300, -1e300]])

    probabilities = F.softmax(x, -1).data
    log_probabilities = F.log_softmax(x, -1).data

    np.testing.assert_array_equal(probabilities, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert np.all(np.isfinite(log_probabilities[0]))
    assert log_probabilities[0, 0] == 0.0


def test_sigmoid_and_silu_at_extreme_inputs_are_finite_and_saturate():
    x = leaf([-1e4, -800.0, 800.0, 1e4])

    np.testing.assert_array_equal(F.sigmoid(x).data, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(F.silu(x).data, [-0.0, -0.0, 800.0, 1e4])


def test_gelu_of_a_negative_input_is_never_positive():
    # GELU(x) = x * Phi(x) with 0 <= Phi <= 1: for x < 0 the output is <= 0, however far out
    # in the tail (torch gives -0.0 there). A positive value means Phi went negative.
    x = leaf(-np.geomspace(0.01, 1e3, 200))

    out = F.gelu(x).data
    cdf = ops.normal_cdf(x).data

    assert np.all(cdf >= 0.0), f"Phi({x.data[cdf < 0][:3]}) = {cdf[cdf < 0][:3]}"
    assert np.all(out <= 0.0), f"gelu({x.data[out > 0][:3]}) = {out[out > 0][:3]}"


def test_gelu_matches_torch_to_1e_10_relative_where_its_value_is_representable():
    # Down to x = -4 the output is still >= 1e-4 of the input; further out both engines lose
    # relative precision to 1 + erf(x / sqrt 2) cancelling (torch too), so no reference exists.
    x = np.linspace(-4.0, 6.0, 1001)
    ours, theirs = leaf(x), torch.tensor(x, requires_grad=True)

    out = F.gelu(ours)
    out.sum().backward()
    out_t = torch.nn.functional.gelu(theirs)
    out_t.sum().backward()

    np.testing.assert_allclose(out.data, out_t.detach().numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-15)


# --- embedding -----------------------------------------------------------------------------------


def test_embedding_gathers_rows():
    weight = leaf(np.arange(15.0).reshape(5, 3))

    out = F.embedding(np.array([[4, 0], [2, 2]]), weight)

    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out.data[0, 0], [12.0, 13.0, 14.0])
    np.testing.assert_array_equal(out.data[1, 1], [6.0, 7.0, 8.0])


def test_embedding_accumulates_the_gradient_of_repeated_indices():
    weight = leaf(np.zeros((5, 3)))
    indices = np.array([[1, 1], [3, 1]])
    upstream = np.arange(12.0).reshape(2, 2, 3)

    F.embedding(indices, weight).backward(upstream)

    expected = np.zeros((5, 3))
    expected[1] = upstream[0, 0] + upstream[0, 1] + upstream[1, 1]  # row 1 used three times
    expected[3] = upstream[1, 0]
    np.testing.assert_array_equal(weight.grad, expected)
    theirs = torch.zeros((5, 3), dtype=torch.float64, requires_grad=True)
    torch.nn.functional.embedding(torch.from_numpy(indices), theirs).backward(
        torch.from_numpy(upstream))
    np.testing.assert_array_equal(weight.grad, theirs.grad.numpy())


def test_embedding_gradient_accumulates_across_backward_calls():
    weight = leaf(np.zeros((3, 2)))

    F.embedding(np.array([2, 2]), weight).sum().backward()
    F.embedding(np.array([2]), weight).sum().backward()

    np.testing.assert_array_equal(weight.grad, [[0.0, 0.0], [0.0, 0.0], [3.0, 3.0]])


@pytest.mark.parametrize("bad", [5, -1, 100])
def test_embedding_index_out_of_range_raises_naming_the_range(bad):
    weight = leaf(np.zeros((5, 3)))

    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        F.embedding(np.array([0, bad]), weight)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        nn.Embedding(5, 3)(np.array([[bad]]))


def test_embedding_refuses_float_indices():
    with pytest.raises(ValueError, match="integer"):
        F.embedding(np.array([0.0, 1.0]), leaf(np.zeros((5, 3))))


def test_embedding_accepts_an_empty_index_array():
    out = F.embedding(np.zeros((0,), dtype=np.int64), leaf(np.zeros((5, 3))))

    assert out.shape == (0, 3)


# --- normalisation input checking ----------------------------------------------------------------


def test_layer_norm_refuses_an_input_not_ending_in_the_normalized_shape():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4,\)"):
        F.layer_norm(random_leaf((4, 5)), (4,))


def test_batch_norm_training_refuses_a_single_value_per_channel():
    with pytest.raises(ValueError, match=r"\(1, 3\)"):
        nn.BatchNorm1d(3)(Tensor(np.ones((1, 3), dtype=np.float32)))


def test_batch_norm_refuses_the_wrong_number_of_features():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        nn.BatchNorm1d(3)(Tensor(np.ones((4, 5), dtype=np.float32)))
