"""Feedback alignment (Lillicrap et al., 2016): the error reaches a layer's input through a fixed
random matrix B, the weight gradient is backprop's, and a network still learns digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from worker.backprop import Tensor, nn, no_grad, optim
from worker.backprop.nn import functional as F


def test_input_gradient_goes_through_the_feedback_matrix_not_the_weight():
    rng = np.random.default_rng(0)
    layer = nn.FeedbackAlignmentLinear(4, 3, feedback_seed=7).double()
    x = Tensor(rng.standard_normal((5, 4)), requires_grad=True)
    upstream = rng.standard_normal((5, 3))
    layer(x).backward(upstream)
    np.testing.assert_allclose(x.grad, upstream @ layer.feedback, rtol=1e-12)
    assert not np.allclose(x.grad, upstream @ layer.weight.data)


def test_weight_and_bias_gradients_and_output_are_backprops():
    rng = np.random.default_rng(1)
    aligned = nn.FeedbackAlignmentLinear(4, 3, feedback_seed=1).double()
    plain = nn.Linear(4, 3).double()
    plain.load_state_dict(aligned.state_dict())
    x = rng.standard_normal((2, 6, 4))  # a sequence of inputs: batch axes are summed over
    upstream = rng.standard_normal((2, 6, 3))
    out_aligned, out_plain = aligned(Tensor(x)), plain(Tensor(x))
    out_aligned.backward(upstream)
    out_plain.backward(upstream)
    np.testing.assert_array_equal(out_aligned.data, out_plain.data)
    np.testing.assert_allclose(aligned.weight.grad, plain.weight.grad, rtol=1e-12)
    np.testing.assert_allclose(aligned.bias.grad, plain.bias.grad, rtol=1e-12)


def test_the_feedback_matrix_is_drawn_from_its_seed_never_trained_and_not_a_parameter():
    layer = nn.FeedbackAlignmentLinear(6, 4, feedback_seed=3)
    twin = nn.FeedbackAlignmentLinear(6, 4, feedback_seed=3)
    other = nn.FeedbackAlignmentLinear(6, 4, feedback_seed=4)
    np.testing.assert_array_equal(layer.feedback, twin.feedback)
    assert not np.array_equal(layer.feedback, other.feedback)
    assert layer.feedback.shape == layer.weight.shape
    assert np.abs(layer.feedback).max() <= 1 / np.sqrt(6)  # the weight's own initial range
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]

    before = layer.feedback.copy()
    sgd = optim.SGD(layer.parameters(), lr=0.5)
    layer(Tensor(np.ones((2, 6)))).sum().backward()
    sgd.step()
    np.testing.assert_array_equal(layer.feedback, before)


def test_an_unseeded_layer_takes_its_seed_from_the_engine_generator():
    nn.init.manual_seed(5)
    first = nn.FeedbackAlignmentLinear(3, 2)
    nn.init.manual_seed(5)
    second = nn.FeedbackAlignmentLinear(3, 2)
    assert first.feedback_seed == second.feedback_seed
    np.testing.assert_array_equal(first.feedback, second.feedback)


def test_state_dict_loads_strictly_into_torch_linear_and_back():
    ours = nn.FeedbackAlignmentLinear(5, 2, feedback_seed=0)
    theirs = torch.nn.Linear(5, 2)
    theirs.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ours.state_dict().items()},
                           strict=True)
    np.testing.assert_array_equal(theirs.weight.detach().numpy(), ours.weight.data)
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    np.testing.assert_array_equal(ours.weight.data, theirs.weight.detach().numpy())


def train_digits(layer_type) -> float:
    """MLP 64-64-64-10 (tanh), 20 epochs of SGD (lr 0.05, momentum 0.9, batch 32) on 80% of the
    standardised digits; returns the accuracy on the other 20%."""
    digits = load_digits()
    x = digits.data.astype(np.float64)
    x = ((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, validation = order[: int(0.8 * len(x))], order[int(0.8 * len(x)):]
    nn.init.manual_seed(0)
    reference = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 10))
    model = nn.Sequential(layer_type(64, 64), nn.Tanh(), layer_type(64, 64), nn.Tanh(),
                          layer_type(64, 10))
    model.load_state_dict(reference.state_dict())  # the same initial weights for both rules
    sgd = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(1)
    for _ in range(20):
        shuffled = rng.permutation(train)
        for start in range(0, len(shuffled), 32):
            batch = shuffled[start:start + 32]
            sgd.zero_grad()
            F.cross_entropy(model(Tensor(x[batch])), y[batch]).backward()
            sgd.step()
    with no_grad():
        return float((model(Tensor(x[validation])).data.argmax(axis=1) == y[validation]).mean())


def test_feedback_alignment_learns_digits_nearly_as_well_as_backprop():
    """Same net, initial weights, data order and steps (900 SGD steps). Measured validation
    accuracy: backprop 0.983, feedback alignment 0.981."""
    backprop = train_digits(nn.Linear)
    alignment = train_digits(nn.FeedbackAlignmentLinear)
    assert backprop >= 0.95
    assert alignment >= 0.85
    assert alignment >= backprop - 0.05
