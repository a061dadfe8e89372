"""Capturing layer statistics: each call's input and the gradient at its output are recorded,
and nothing else about the forward or backward changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop import Tensor, nn, no_grad
from worker.backprop.nn import functional as F
from worker.backprop.nn.capture import capture_layers


def double_mlp(seed: int = 0) -> nn.Sequential:
    nn.init.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_each_layer_records_its_input_and_the_gradient_at_its_output_as_pytorch_computes_it():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    model = double_mlp()
    with capture_layers([model[0], model[2]]) as (first, second):
        F.cross_entropy(model(Tensor(x)), y).backward()

    w1, b1, w2, b2 = (torch.tensor(p.data, requires_grad=True) for p in model.parameters())
    pre_activation = torch.tensor(x) @ w1.T + b1
    pre_activation.retain_grad()
    hidden = torch.tanh(pre_activation)
    logits = hidden @ w2.T + b2
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits, torch.tensor(y)).backward()

    [(x_first, g_first)], [(x_second, g_second)] = first.calls(), second.calls()
    np.testing.assert_array_equal(x_first, x)
    np.testing.assert_allclose(x_second, hidden.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(g_first, pre_activation.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(g_second, logits.grad.numpy(), rtol=1e-10)


def test_capturing_changes_neither_the_output_nor_any_parameter_gradient():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    plain, captured = double_mlp(1), double_mlp(1)
    loss = F.cross_entropy(plain(Tensor(x)), y)
    loss.backward()
    with capture_layers([captured[0], captured[2]]):
        captured_loss = F.cross_entropy(captured(Tensor(x)), y)
        captured_loss.backward()
    assert captured_loss.item() == loss.item()
    for p, q in zip(plain.parameters(), captured.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_a_layer_called_twice_records_both_calls_each_with_its_own_gradient():
    rng = np.random.default_rng(2)
    nn.init.manual_seed(2)
    shared = nn.Linear(3, 3).double()
    x = rng.standard_normal((2, 3))
    upstream = rng.standard_normal((2, 3))
    with capture_layers([shared]) as (captured,):
        hidden = shared(Tensor(x))
        (shared(hidden) * Tensor(upstream)).sum().backward()
    (x_first, g_first), (x_second, g_second) = captured.calls()
    np.testing.assert_array_equal(x_first, x)
    np.testing.assert_array_equal(x_second, hidden.data)
    np.testing.assert_allclose(g_second, upstream, rtol=1e-15)
    np.testing.assert_allclose(g_first, upstream @ shared.weight.data, rtol=1e-12)


def test_a_forward_without_gradients_records_nothing():
    model = double_mlp()
    with capture_layers([model[0]]) as (captured,):
        with no_grad():
            model(Tensor(np.ones((2, 4))))
    assert captured.calls() == [] and captured.inputs == []


def test_layers_stop_recording_when_the_block_ends_even_on_an_error():
    model = double_mlp()
    with pytest.raises(ValueError, match="boom"):
        with capture_layers([model[0], model[2]]):
            raise ValueError("boom")
    assert model[0].capture is None and model[2].capture is None
    with capture_layers([model[0]]) as (captured,):
        pass
    model(Tensor(np.ones((2, 4)))).sum().backward()
    assert captured.calls() == []


def test_a_layer_cannot_be_captured_twice_at_once_nor_a_layer_without_support():
    model = double_mlp()
    with capture_layers([model[0]]):
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture_layers([model[0]]):
                pass
    with pytest.raises(ValueError, match="listed more than once"):
        with capture_layers([model[0], model[0]]):
            pass
    with pytest.raises(TypeError, match="Tanh does not support capturing"):
        with capture_layers([model[1]]):
            pass


def test_conv2d_records_its_image_input_and_the_gradient_at_its_feature_maps():
    rng = np.random.default_rng(3)
    nn.init.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = rng.standard_normal((2, 2, 4, 4))
    upstream = rng.standard_normal((2, 3, 4, 4))
    with capture_layers([conv]) as (captured,):
        (conv(Tensor(x)) * Tensor(upstream)).sum().backward()
    [(recorded_x, recorded_g)] = captured.calls()
    np.testing.assert_array_equal(recorded_x, x)
    np.testing.assert_array_equal(recorded_g, upstream)


def test_a_second_backward_over_a_retained_graph_adds_to_the_recorded_gradient():
    model = double_mlp()
    with capture_layers([model[2]]) as (captured,):
        out = model(Tensor(np.ones((1, 4))))
        out.backward(np.ones((1, 3)), retain_graph=True)
        out.backward(np.full((1, 3), 2.0))
    [(_, g)] = captured.calls()
    np.testing.assert_array_equal(g, np.full((1, 3), 3.0))
