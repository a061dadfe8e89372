"""The layers a CNN is built from besides convolution (BatchNorm2d, Dropout2d, Flatten) agree
with torch.nn, and a whole CNN's state_dict moves to torch.nn and back without renaming.

Float64 throughout; gradients are compared to 1e-9 of the largest entry (see test_conv.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.backprop.gradcheck import gradcheck, gradgradcheck
from worker.backprop.nn import functional as F
from worker.backprop.tensor import Tensor

from .test_conv import assert_matches, run_against_torch
from .test_layers_vs_torch import twin_with_our_weights

F64 = np.float64


def randomize_batch_norms(model: nn.Module, rng: np.random.Generator) -> nn.Module:
    """BatchNorm starts at weight 1, bias 0: perturb them so their gradients mean something."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.affine:
            module.weight.data[...] = rng.uniform(0.5, 1.5, module.weight.shape)
            module.bias.data[...] = rng.uniform(-0.5, 0.5, module.bias.shape)
    return model


def image_batch(rng: np.random.Generator, step: int, shape=(4, 3, 5, 6)) -> np.ndarray:
    # Each batch has its own mean and scale, so the running statistics keep moving.
    return (1.0 + 0.5 * step) * rng.standard_normal(shape) + 0.3 * step


def assert_states_match(ours: nn.Module, twin: torch.nn.Module) -> None:
    theirs = twin.state_dict()
    assert list(ours.state_dict()) == list(theirs)
    for key, value in ours.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(theirs[key]), key
        else:
            assert_matches(value, theirs[key], key)


# --- BatchNorm2d ---------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum, eps", [(0.1, 1e-5), (0.3, 1e-3)],
                         ids=["torch-defaults", "momentum-0.3-eps-1e-3"])
def test_batch_norm2d_training_matches_torch_step_after_step_including_running_stats(
    momentum, eps
):
    rng = np.random.default_rng(0)
    ours = randomize_batch_norms(nn.BatchNorm2d(3, eps, momentum, dtype=F64), rng)
    twin = twin_with_our_weights(ours)

    for step in range(4):
        x = image_batch(rng, step)
        x_ours, x_torch = Tensor(x, requires_grad=True), torch.from_numpy(x).requires_grad_(True)
        out, out_torch = ours(x_ours), twin(x_torch)
        probe = rng.standard_normal(out.shape)
        (out * probe).sum().backward()
        (out_torch * torch.from_numpy(probe)).sum().backward()

        assert_matches(out, out_torch, f"output at step {step}")
        assert_matches(x_ours.grad, x_torch.grad, f"input gradient at step {step}")
        assert_matches(ours.weight.grad, twin.weight.grad, "weight gradient")
        assert_matches(ours.bias.grad, twin.bias.grad, "bias gradient")
        assert_states_match(ours, twin)  # running_mean, running_var, num_batches_tracked
        ours.zero_grad()
        twin.zero_grad()

    assert int(ours.num_batches_tracked) == 4


def test_batch_norm2d_eval_uses_running_stats_like_torch_and_leaves_them_alone():
    rng = np.random.default_rng(1)
    ours = randomize_batch_norms(nn.BatchNorm2d(3, dtype=F64), rng)
    for step in range(3):
        ours(Tensor(image_batch(rng, step)))
    ours.eval()
    before = {key: value.copy() for key, value in ours.state_dict().items()}

    run_against_torch(ours, image_batch(rng, 5, (2, 3, 4, 4)))

    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@pytest.mark.parametrize("affine, track_running_stats", [(False, True), (True, False)],
                         ids=["no-affine", "no-running-stats-in-eval"])
def test_batch_norm2d_options_match_torch(affine, track_running_stats):
    rng = np.random.default_rng(2)
    ours = randomize_batch_norms(
        nn.BatchNorm2d(3, affine=affine, track_running_stats=track_running_stats, dtype=F64),
        rng)
    if not track_running_stats:
        ours.eval()  # without running statistics, evaluation still uses the batch's
    assert list(ours.state_dict()) == list(
        torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track_running_stats)
        .state_dict())

    run_against_torch(ours, image_batch(rng, 1))


def test_batch_norm2d_gradients_match_finite_differences_first_and_second_order():
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((3, 2, 3, 2)), requires_grad=True)
    weight = Tensor(rng.uniform(0.5, 1.5, 2), requires_grad=True)
    bias = Tensor(rng.uniform(-0.5, 0.5, 2), requires_grad=True)

    def normalise(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, training=True)

    gradcheck(normalise, [x, weight, bias])
    gradgradcheck(normalise, [x, weight, bias])


@pytest.mark.parametrize("layer, shape, layout", [
    pytest.param(lambda: nn.BatchNorm2d(3), (4, 3, 5), "(N, C, H, W)", id="2d-refuses-3d"),
    pytest.param(lambda: nn.BatchNorm1d(3), (4, 3, 5, 5), "(N, C) or (N, C, L)",
                 id="1d-refuses-4d"),
])
def test_batch_norms_refuse_the_other_ones_input_naming_their_layout(layer, shape, layout):
    with pytest.raises(ValueError, match=layout.replace("(", r"\(").replace(")", r"\)")):
        layer()(Tensor(np.zeros(shape, dtype=np.float32)))


# --- Dropout2d -----------------------------------------------------------------------------------


def test_dropout2d_zeros_whole_channels_and_scales_the_kept_ones():
    x = Tensor(np.ones((8, 16, 3, 4)), requires_grad=True)
    out = nn.Dropout2d(0.25, rng=np.random.default_rng(4))(x)
    out.backward(np.ones(out.shape))

    per_channel = out.data.reshape(8, 16, -1)
    first = per_channel[..., :1]
    assert np.all(per_channel == first)  # each feature map is kept or dropped as one
    assert set(np.unique(first)) == {0.0, 1.0 / 0.75}
    np.testing.assert_array_equal(x.grad, out.data)  # the gradient passes the same channels


def test_dropout2d_draws_one_value_per_channel_from_the_generator_like_dropout():
    x = Tensor(np.ones((2, 3, 4, 4), dtype=np.float32))
    expected = np.random.default_rng(5).random((2, 3, 1, 1)) >= 0.5

    out = F.dropout2d(x, 0.5, True, np.random.default_rng(5))

    np.testing.assert_array_equal(out.data[:, :, 0, 0] != 0, expected[:, :, 0, 0])


def test_dropout2d_follows_the_engine_seed_and_is_the_identity_in_eval():
    layer = nn.Dropout2d(0.5)
    x = Tensor(np.ones((4, 6, 2, 2), dtype=np.float32))
    nn.init.manual_seed(7)
    first = layer(x).data.copy()
    nn.init.manual_seed(7)

    np.testing.assert_array_equal(layer(x).data, first)
    assert layer.eval()(x) is x


def test_dropout2d_reads_a_three_dimensional_input_as_n_c_l_like_torch():
    out = F.dropout2d(Tensor(np.ones((4, 5, 6))), 0.5, True, np.random.default_rng(8))

    assert np.all(out.data == out.data[:, :, :1])  # one draw per (sample, channel)


# --- Flatten -------------------------------------------------------------------------------------


@pytest.mark.parametrize("start_dim, end_dim", [(1, -1), (0, -1), (1, 2), (-3, -2), (2, 3)])
def test_flatten_merges_the_same_axes_as_torch(start_dim, end_dim):
    run_against_torch(nn.Flatten(start_dim, end_dim),
                      np.random.default_rng(9).standard_normal((2, 3, 4, 5)))


def test_flatten_refuses_a_start_after_the_end():
    with pytest.raises(ValueError, match="start_dim 2 comes after end_dim 1"):
        nn.Flatten(2, 1)(Tensor(np.zeros((2, 3, 4))))


# --- a whole CNN ---------------------------------------------------------------------------------


def our_cnn(seed: int, dtype=F64) -> nn.Module:
    rng = np.random.default_rng(seed)
    return randomize_batch_norms(nn.Sequential(
        # No bias before BatchNorm: its gradient would be zero up to round-off.
        nn.Conv2d(3, 8, 3, padding=1, bias=False, dtype=dtype, rng=rng),
        nn.BatchNorm2d(8, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding="same", groups=2, bias=False, dtype=dtype, rng=rng),
        nn.ReLU(),
        nn.Dropout2d(0.0),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d((2, 1)),
        nn.Flatten(),
        nn.Linear(16, 5, dtype=dtype, rng=rng),
    ), rng)


def torch_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding="same", groups=2, bias=False), torch.nn.ReLU(),
        torch.nn.Dropout2d(0.0), torch.nn.AvgPool2d(2, ceil_mode=True),
        torch.nn.AdaptiveAvgPool2d((2, 1)), torch.nn.Flatten(), torch.nn.Linear(16, 5),
    ).double()


def test_a_cnn_trains_like_torch_step_after_step():
    rng = np.random.default_rng(10)
    ours = our_cnn(seed=0)
    twin = twin_with_our_weights(ours)
    for step in range(3):
        x = image_batch(rng, step, (4, 3, 9, 10))
        run_against_torch(ours, x, seed=step, twin=twin)
        with torch.no_grad():  # plain SGD by hand on both sides
            theirs = dict(twin.named_parameters())
            for name, parameter in ours.named_parameters():
                parameter.data -= 0.1 * parameter.grad
                theirs[name] -= 0.1 * theirs[name].grad
        ours.zero_grad()
        twin.zero_grad()
        assert_states_match(ours, twin)


def test_cnn_state_dict_loads_into_torch_and_back_exactly():
    ours = our_cnn(seed=1, dtype=np.float32)
    for step in range(2):  # move the running statistics and the step counter
        ours(Tensor(image_batch(np.random.default_rng(step), step, (4, 3, 9, 10))
                    .astype(np.float32)))
    original = {key: value.copy() for key, value in ours.state_dict().items()}
    theirs = torch_cnn().float()

    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()},
                           strict=True)
    fresh = our_cnn(seed=2, dtype=np.float32)
    fresh.load_state_dict(theirs.state_dict(), strict=True)

    assert list(fresh.state_dict()) == list(original)
    for key, value in original.items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value, err_msg=key)
    assert int(fresh[1].num_batches_tracked) == 2
