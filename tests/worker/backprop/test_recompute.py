"""Recomputation (gradient checkpointing): the plain run's gradients, bitwise, for less memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from worker.backprop import ops
from worker.backprop.nn import init
from worker.backprop.nn.layers import Dropout, Linear, ReLU, Residual, Sequential, Tanh
from worker.backprop.nn.recurrent import LSTM
from worker.backprop.recompute import recompute, recompute_sequential
from worker.backprop.tensor import Tensor, grad, no_grad


def deep_mlp(depth: int, width: int, seed: int = 0) -> Sequential:
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(depth):
        layers += [Linear(width, width, rng=rng), ReLU()]
    return Sequential(*layers)


def gradients(model: Sequential, x: Tensor) -> dict[str, np.ndarray]:
    found = {name: p.grad.copy() for name, p in model.named_parameters()}
    found["input"] = x.grad.copy()
    return found


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_recomputed_mlp_gradients_are_bitwise_those_of_the_plain_run():
    model = deep_mlp(depth=8, width=16)
    data = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)

    x = Tensor(data, requires_grad=True)
    plain_out = model(x)
    (plain_out * plain_out).sum().backward()
    plain = gradients(model, x)

    model.zero_grad()
    x = Tensor(data, requires_grad=True)
    out = recompute_sequential(model, 4, x)
    (out * out).sum().backward()
    np.testing.assert_array_equal(out.data, plain_out.data)
    assert_bitwise_equal(gradients(model, x), plain)


def test_parameters_inside_fn_get_gradients_when_no_input_requires_grad():
    layer = Linear(3, 2, rng=np.random.default_rng(2))
    data = Tensor(np.ones((5, 3), np.float32))  # a data batch: no gradient wanted

    ops.tanh(layer(data)).sum().backward()
    expected = {name: p.grad.copy() for name, p in layer.named_parameters()}
    layer.zero_grad()
    out = recompute(lambda x: ops.tanh(layer(x)), data)
    assert out.requires_grad
    out.sum().backward()
    for name, p in layer.named_parameters():
        np.testing.assert_array_equal(p.grad, expected[name])


def test_fn_is_recomputed_once_per_backward_however_many_inputs_need_gradients():
    calls = []

    def fn(a, b, c):
        calls.append(1)
        return ops.tanh(a * b + c)

    rng = np.random.default_rng(3)
    a, b, c = (Tensor(rng.standard_normal(4), requires_grad=True) for _ in range(3))
    out = recompute(fn, a, b, c)
    assert len(calls) == 1
    out.sum().backward()
    assert len(calls) == 2
    expected = 1 - np.tanh(a.data * b.data + c.data) ** 2
    np.testing.assert_allclose(c.grad, expected)
    np.testing.assert_allclose(a.grad, expected * b.data)
    np.testing.assert_allclose(b.grad, expected * a.data)


def test_non_tensor_arguments_pass_through_to_fn():
    x = Tensor(np.arange(4.0), requires_grad=True)
    out = recompute(lambda x, power, scale: (x ** power) * scale, x, 3, 0.5)
    out.sum().backward()
    np.testing.assert_allclose(x.grad, 1.5 * x.data ** 2)


def test_nested_recomputes_give_the_plain_gradients():
    model = deep_mlp(depth=4, width=5, seed=13)
    data = np.random.default_rng(14).standard_normal((3, 5)).astype(np.float32)
    x = Tensor(data, requires_grad=True)
    model(x).sum().backward()
    plain = gradients(model, x)

    model.zero_grad()
    x = Tensor(data, requires_grad=True)

    def layers_0_to_5(h: Tensor) -> Tensor:  # layers 2-5 recomputed again inside
        return recompute_sequential(list(model)[2:6], 2, model[1](model[0](h)))

    model[7](model[6](recompute(layers_0_to_5, x))).sum().backward()
    assert_bitwise_equal(gradients(model, x), plain)


def test_backward_twice_with_retain_graph_accumulates_twice():
    layer = Linear(3, 3, rng=np.random.default_rng(4))
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    out = recompute(layer, x).sum()
    out.backward(retain_graph=True)
    once_x, once_w = x.grad.copy(), layer.weight.grad.copy()
    out.backward()
    np.testing.assert_allclose(x.grad, 2 * once_x)
    np.testing.assert_allclose(layer.weight.grad, 2 * once_w)


def test_grad_returns_input_gradients_through_a_recompute():
    x = Tensor(np.linspace(-1, 1, 5), requires_grad=True)
    (gx,) = grad(recompute(ops.sigmoid, x).sum(), [x])
    s = 1 / (1 + np.exp(-x.data))
    np.testing.assert_allclose(gx, s * (1 - s))


def test_dropout_inside_a_recompute_draws_the_same_mask_in_the_recompute():
    init.manual_seed(5)
    block = Sequential(Linear(8, 8, rng=np.random.default_rng(6)), Dropout(0.5))
    data = np.random.default_rng(7).standard_normal((4, 8)).astype(np.float32)

    init.manual_seed(8)
    x = Tensor(data, requires_grad=True)
    block(x).sum().backward()
    plain = gradients(block, x)

    block.zero_grad()
    init.manual_seed(8)
    x = Tensor(data, requires_grad=True)
    out = recompute(block, x)
    init.default_generator().random(100)  # the generator moves on before backward
    out.sum().backward()
    assert_bitwise_equal(gradients(block, x), plain)


def test_residual_blocks_and_an_lstm_can_be_recomputed():
    rng = np.random.default_rng(9)
    model = Sequential(*(Residual(Sequential(Linear(6, 6, rng=rng), Tanh())) for _ in range(4)))
    lstm = LSTM(6, 3, rng=rng)
    data = rng.standard_normal((5, 2, 6)).astype(np.float32)

    def run(use_recompute: bool):
        model.zero_grad()
        lstm.zero_grad()
        x = Tensor(data, requires_grad=True)
        h = recompute_sequential(model, 2, x) if use_recompute else model(x)
        out = recompute(lambda h: lstm(h)[0], h) if use_recompute else lstm(h)[0]
        out.sum().backward()
        found = {name: p.grad.copy() for name, p in model.named_parameters()}
        found.update({name: p.grad.copy() for name, p in lstm.named_parameters()})
        found["input"] = x.grad.copy()
        return found

    plain, recomputed = run(False), run(True)
    for key in plain:
        np.testing.assert_allclose(recomputed[key], plain[key], rtol=1e-6, atol=1e-7,
                                   err_msg=key)


def peak_bytes_of_one_step(model: Sequential, data: np.ndarray, segments: int | None) -> int:
    """The highest traced allocation during forward and backward, above what existed before."""
    model.zero_grad()
    tracemalloc.start()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    x = Tensor(data)
    out = model(x) if segments is None else recompute_sequential(model, segments, x)
    out.mean().backward()
    del out
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - baseline


def test_recomputing_a_deep_mlp_lowers_the_peak_activation_memory():
    depth, width, batch = 32, 64, 512
    model = deep_mlp(depth, width, seed=10)
    data = np.random.default_rng(11).standard_normal((batch, width)).astype(np.float32)
    activation = batch * width * 4  # bytes of one layer's output

    plain = peak_bytes_of_one_step(model, data, segments=None)
    recomputed = peak_bytes_of_one_step(model, data, segments=8)
    # The plain run holds two arrays per layer (the linear output and the relu output);
    # recomputing keeps one array per segment plus one segment's activations when rerun.
    assert plain > 2 * depth * activation * 0.9
    assert recomputed < plain / 2


def test_under_no_grad_recompute_just_runs_fn():
    layer = Linear(2, 2, rng=np.random.default_rng(12))
    with no_grad():
        out = recompute(layer, Tensor(np.ones((1, 2), np.float32)))
    assert not out.requires_grad


def test_fn_must_return_a_tensor():
    with pytest.raises(TypeError, match="must return a Tensor"):
        recompute(lambda x: (x, x), Tensor(np.ones(2), requires_grad=True))


def test_second_order_through_a_recompute_is_refused_clearly():
    x = Tensor(np.ones(3), requires_grad=True)
    out = recompute(lambda x: (x * x * x).sum(), x)
    with pytest.raises(NotImplementedError, match="create_graph"):
        grad(out, [x], create_graph=True)


def test_recompute_sequential_rejects_more_segments_than_layers():
    with pytest.raises(ValueError, match="segments"):
        recompute_sequential(deep_mlp(1, 2), 3, Tensor(np.ones((1, 2), np.float32)))
