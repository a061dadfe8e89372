"""Mixed precision: dynamic loss scaling as torch.amp.GradScaler does it, float32 master weights,
and float16 training that lands where float32 training does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop.amp import GradScaler, MasterWeights
from worker.backprop.nn.layers import Linear, Sequential, Tanh
from worker.backprop.optim import SGD
from worker.backprop.tensor import Tensor


class Param:
    """The smallest thing an optimizer steps: `.data` and `.grad` ndarrays."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.grad: np.ndarray | None = None


def mlp(seed: int) -> Sequential:
    rng = np.random.default_rng(seed)
    return Sequential(Linear(4, 32, rng=rng), Tanh(), Linear(32, 1, rng=rng))


def regression_data(n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    y = np.sin(x @ np.array([1.0, -0.5, 0.25, 0.8], np.float32))[:, None]
    return x, y.astype(np.float32)


def mse(prediction: Tensor, y: np.ndarray) -> Tensor:
    error = prediction - y
    return (error * error).mean()


# --- scale trajectory, against torch ------------------------------------------------------------

# True marks a step whose gradient is inf or nan.
OVERFLOWS = [False, False, False, True, False, False, False, False, True, True,
             False, False, False, False, False, False, False, True, False, False]


@pytest.mark.parametrize(
    "growth_factor, backoff_factor, init_scale",
    [(2.0, 0.5, 2.0**16), (3.0, 0.3, 1000.0)],
    ids=["defaults", "float32_rounding"],
)
def test_scale_and_weight_trajectories_equal_torch_grad_scaler(growth_factor, backoff_factor,
                                                              init_scale):
    kwargs = dict(init_scale=init_scale, growth_factor=growth_factor,
                  backoff_factor=backoff_factor, growth_interval=3)
    start = np.array([0.5, -1.0, 2.0], np.float32)
    coefficients = np.array([1.0, 2.0, -3.0], np.float32)

    p_torch = torch.nn.Parameter(torch.tensor(start))
    opt_torch = torch.optim.SGD([p_torch], lr=0.01)
    scaler_torch = torch.amp.GradScaler("cpu", **kwargs)

    p_ours = Tensor(start.copy(), requires_grad=True)
    opt_ours = SGD([p_ours], lr=0.01)
    scaler_ours = GradScaler(**kwargs)

    for step, overflow in enumerate(OVERFLOWS):
        bad = np.float32(np.inf if step % 2 else np.nan)

        opt_torch.zero_grad()
        scaler_torch.scale((p_torch * torch.tensor(coefficients)).sum()).backward()
        if overflow:
            p_torch.grad[1] = float(bad)
        scaler_torch.step(opt_torch)
        scaler_torch.update()

        opt_ours.zero_grad()
        scaler_ours.scale((p_ours * coefficients).sum()).backward()
        if overflow:
            p_ours.grad[1] = bad
        scaler_ours.step(opt_ours)
        scaler_ours.update()

        assert scaler_ours.get_scale() == scaler_torch.get_scale(), f"step {step}"
        np.testing.assert_array_equal(p_ours.data, p_torch.detach().numpy(), err_msg=f"step {step}")
    assert scaler_ours.state_dict() == scaler_torch.state_dict()


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    p = Param(np.ones(3, np.float32))
    optimizer = SGD([p], lr=0.1)
    scaler = GradScaler(init_scale=1024.0)
    p.grad = np.array([1.0, np.inf, 1.0], np.float32)
    scaler.step(optimizer)
    scaler.update()
    np.testing.assert_array_equal(p.data, np.ones(3, np.float32))
    assert scaler.get_scale() == 512.0


def test_a_finite_step_applies_the_unscaled_gradient():
    p = Param(np.ones(2, np.float32))
    optimizer = SGD([p], lr=0.5)
    scaler = GradScaler(init_scale=256.0)
    p.grad = np.array([256.0, -512.0], np.float32)  # already scaled by 256
    scaler.step(optimizer)
    scaler.update()
    np.testing.assert_array_equal(p.data, [0.5, 2.0])
    assert scaler.get_scale() == 256.0


def test_scale_grows_after_growth_interval_clean_steps():
    p = Param(np.zeros(1, np.float32))
    optimizer = SGD([p], lr=0.1)
    scaler = GradScaler(init_scale=4.0, growth_interval=3)
    scales = []
    for _ in range(7):
        p.grad = np.ones(1, np.float32)
        scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_unscale_before_clipping_then_step_does_not_unscale_twice():
    p = Param(np.zeros(2, np.float32))
    optimizer = SGD([p], lr=1.0)
    scaler = GradScaler(init_scale=8.0)
    p.grad = np.array([8.0, 16.0], np.float32)
    scaler.unscale_(optimizer)
    np.testing.assert_array_equal(p.grad, [1.0, 2.0])
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    np.testing.assert_array_equal(p.data, [-1.0, -2.0])
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(optimizer)
    scaler.update()


def test_update_without_any_inf_check_is_an_error():
    with pytest.raises(RuntimeError, match="No inf checks"):
        GradScaler().update()


def test_float16_gradients_must_be_moved_to_float32_masters_before_unscaling():
    p = Param(np.zeros(2, np.float16))
    p.grad = np.ones(2, np.float16)
    with pytest.raises(ValueError, match="MasterWeights"):
        GradScaler().unscale_([p])


def test_state_dict_round_trip_keeps_scale_and_growth_tracker():
    scaler = GradScaler(init_scale=64.0, growth_interval=5)
    p = Param(np.zeros(1, np.float32))
    optimizer = SGD([p], lr=0.1)
    for _ in range(3):
        p.grad = np.ones(1, np.float32)
        scaler.step(optimizer)
        scaler.update()
    restored = GradScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()
    assert restored.state_dict()["_growth_tracker"] == 3


def test_disabled_scaler_is_a_pass_through():
    scaler = GradScaler(enabled=False)
    loss = Tensor(np.float32(2.0), requires_grad=True)
    assert scaler.scale(loss) is loss
    p = Param(np.ones(1, np.float32))
    p.grad = np.ones(1, np.float32)
    scaler.step(SGD([p], lr=1.0))
    scaler.update()
    np.testing.assert_array_equal(p.data, [0.0])
    assert scaler.get_scale() == 1.0


def test_scaled_float16_loss_is_float32_so_the_scale_itself_does_not_overflow():
    loss = Tensor(np.float16(3.0), requires_grad=True)
    scaled = GradScaler().scale(loss)
    assert scaled.dtype == np.float32 and scaled.item() == 3.0 * 2**16


# --- master weights and float16 training ----------------------------------------------------


def test_master_weights_are_float32_copies_of_a_float16_model():
    model = mlp(seed=2)
    original = [p.data.copy() for p in model.parameters()]
    master = MasterWeights(model)
    assert all(p.dtype == np.float16 for p in model.parameters())
    assert all(m.dtype == np.float32 for m in master.params)
    for m, o in zip(master.params, original):
        np.testing.assert_array_equal(m.data, o)  # the masters keep full precision

    master.params[0].data += 1e-4  # an update too small for float16 at this magnitude...
    master.copy_master_to_model()
    half = next(iter(model.parameters()))
    np.testing.assert_array_equal(half.data, master.params[0].data.astype(np.float16))
    # ...is kept by the master, so many such updates add up.
    assert np.abs(master.params[0].data - original[0]).max() > 0


def test_loss_scaling_keeps_small_float16_gradients_from_underflowing():
    x, y = regression_data()
    reference = mlp(seed=3)
    (mse(reference(Tensor(x)), y) * 1e-6).backward()
    true_grads = [p.grad for p in reference.parameters()]

    def float16_gradients(scaler: GradScaler | None) -> list[np.ndarray]:
        model = mlp(seed=3)
        master = MasterWeights(model)
        loss = mse(model(Tensor(x.astype(np.float16))).astype(np.float32), y) * 1e-6
        (scaler.scale(loss) if scaler else loss).backward()
        master.copy_grads_to_master()
        if scaler:
            scaler.unscale_(master.params)
        return [m.grad for m in master.params]

    def worst_relative_error(grads):
        return max(np.abs(g - t).max() / np.abs(t).max() for g, t in zip(grads, true_grads))

    assert worst_relative_error(float16_gradients(None)) > 0.1  # float16 flushed them
    assert worst_relative_error(float16_gradients(GradScaler())) < 0.01


def train(model_dtype, steps: int = 300) -> tuple[float, float, GradScaler | None]:
    x, y = regression_data()
    model = mlp(seed=4)
    if model_dtype == np.float32:
        optimizer, master, scaler = SGD(list(model.parameters()), lr=0.2), None, None
    else:
        master, scaler = MasterWeights(model), GradScaler()
        optimizer = SGD(master.params, lr=0.2)
    inputs = Tensor(x.astype(model_dtype))
    losses = []
    for _ in range(steps):
        # The loss in float32, as autocast computes it; only the model runs in float16.
        loss = mse(model(inputs).astype(np.float32), y)
        losses.append(loss.item())
        if scaler is None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            continue
        scaler.scale(loss).backward()
        master.copy_grads_to_master()
        scaler.step(optimizer)
        scaler.update()
        master.zero_grad()
        master.copy_master_to_model()
    return losses[0], losses[-1], scaler


def test_float16_training_with_scaler_and_master_weights_matches_float32_loss():
    first32, last32, _ = train(np.float32)
    first16, last16, scaler = train(np.float16)
    assert abs(first16 - first32) < 1e-2 * first32
    assert last32 < 0.2 * first32  # it did learn
    assert abs(last16 - last32) < 0.1 * last32 + 1e-3
    assert scaler.get_scale() >= 1.0
