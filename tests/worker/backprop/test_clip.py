"""Gradient clipping: PyTorch's clip_grad_norm_ / clip_grad_value_, and the sharded form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.backprop import optim

SHAPES = [(4, 3), (5,), (), (2, 3, 2)]


class Param:
    def __init__(self, grad):
        self.data = np.zeros(np.shape(grad))
        self.grad = grad


def grads(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [np.array(scale * rng.standard_normal(s)) for s in SHAPES]


def torch_params(arrays):
    params = []
    for g in arrays:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "leaves_alone"])
def test_clip_grad_norm_matches_pytorch(norm_type, max_norm):
    params = [Param(g) for g in grads()]
    reference = torch_params(grads())
    total = optim.clip_grad_norm_(params, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type)
    assert total == pytest.approx(expected.item(), rel=1e-12)
    for p, r in zip(params, reference, strict=True):
        np.testing.assert_allclose(p.grad, r.grad.numpy(), rtol=1e-12)


def test_clipped_gradients_have_max_norm_and_small_ones_are_untouched():
    params = [Param(g) for g in grads(scale=10.0)]
    optim.clip_grad_norm_(params, 1.0)
    assert optim.get_total_norm([p.grad for p in params]) == pytest.approx(1.0, rel=1e-5)
    small = [Param(g) for g in grads(scale=1e-3)]
    optim.clip_grad_norm_(small, 1.0)
    assert all(np.array_equal(p.grad, g) for p, g in zip(small, grads(scale=1e-3), strict=True))


def test_parameters_without_grad_are_ignored_and_none_at_all_gives_zero():
    params = [Param(g) for g in grads()]
    params[1].grad = None
    reference = torch_params(grads())
    reference[1].grad = None
    total = optim.clip_grad_norm_(params, 0.5)
    assert total == pytest.approx(torch.nn.utils.clip_grad_norm_(reference, 0.5).item())
    assert optim.clip_grad_norm_([Param(None)], 1.0) == 0.0


def test_a_gradient_array_shared_by_two_parameters_is_scaled_once():
    shared = np.full(4, 3.0)
    a, b = Param(shared), Param(shared)
    view = Param(shared[:])  # another view object of the same memory
    # Both parameters count in the norm, as two parameters with equal gradients would.
    total = optim.clip_grad_norm_([a, b, view], max_norm=1.0)
    assert total == pytest.approx(math.sqrt(3 * 4 * 9.0))
    coef = 1.0 / (total + 1e-6)
    np.testing.assert_allclose(shared, np.full(4, 3.0 * coef), rtol=1e-15)


def test_sharded_clipping_with_squared_norm_and_clip_coefficient_equals_clip_grad_norm_():
    whole = np.random.default_rng(1).standard_normal(1000)
    expected = whole.copy()
    optim.clip_grad_norm_([Param(expected)], max_norm=2.0)

    shards = np.split(whole.copy(), [100, 357, 800])  # each PS shard owns one slice
    total = math.sqrt(sum(optim.squared_norm(s) for s in shards))
    coef = optim.clip_coefficient(total, max_norm=2.0)
    for shard in shards:
        shard *= coef
    np.testing.assert_allclose(np.concatenate(shards), expected, rtol=1e-14)


def test_clip_coefficient_is_pytorchs_formula_clamped_to_one():
    assert optim.clip_coefficient(4.0, 2.0) == 2.0 / (4.0 + 1e-6)
    assert optim.clip_coefficient(1.0, 2.0) == 1.0
    assert optim.clip_coefficient(0.0, 2.0) == 1.0
    assert math.isnan(optim.clip_coefficient(math.nan, 2.0))


def test_squared_norm_of_ten_million_float32_values_keeps_its_digits():
    # Ten million equal values are the worst case for a float32 running sum (a plain one is
    # off by ~1e-3); blocked rows summed in float64 stay within a few 1e-6.
    values = np.full(10_000_000, 0.1, dtype=np.float32)
    exact = 10_000_000 * float(np.float32(0.1)) ** 2
    assert optim.squared_norm(values) == pytest.approx(exact, rel=5e-6)
    rng = np.random.default_rng(0)
    typical = rng.standard_normal(1_000_003).astype(np.float32)
    reference = float(np.dot(typical.astype(np.float64), typical.astype(np.float64)))
    assert optim.squared_norm(typical) == pytest.approx(reference, rel=1e-7)


def test_squared_norm_is_the_same_in_every_run_and_exact_in_float64():
    values = np.random.default_rng(1).standard_normal(300_001)
    assert optim.squared_norm(values) == optim.squared_norm(values.copy())
    assert optim.squared_norm(values) == pytest.approx(float(values @ values), rel=1e-13)


def test_non_finite_norm_raises_only_when_asked():
    params = [Param(np.array([1.0, np.inf]))]
    with pytest.raises(RuntimeError, match="non-finite"):
        optim.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    reference = torch_params([np.array([1.0, np.inf])])
    with np.errstate(invalid="ignore"):  # inf * 0 -> nan, exactly as PyTorch's result
        assert optim.clip_grad_norm_(params, 1.0) == math.inf
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    np.testing.assert_array_equal(params[0].grad, reference[0].grad.numpy())


def test_float32_gradients_stay_float32():
    grad = np.full(3, 10.0, dtype=np.float32)
    optim.clip_grad_norm_([Param(grad)], 1.0)
    assert grad.dtype == np.float32
    assert np.linalg.norm(grad) == pytest.approx(1.0, rel=1e-6)


def test_invalid_norm_type_is_rejected():
    with pytest.raises(ValueError, match="norm_type"):
        optim.clip_grad_norm_([Param(np.ones(2))], 1.0, norm_type=0)


def test_clip_grad_value_matches_pytorch():
    params = [Param(g) for g in grads(scale=2.0)]
    reference = torch_params(grads(scale=2.0))
    optim.clip_grad_value_(params, 0.7)
    torch.nn.utils.clip_grad_value_(reference, 0.7)
    for p, r in zip(params, reference, strict=True):
        np.testing.assert_array_equal(p.grad, r.grad.numpy())
