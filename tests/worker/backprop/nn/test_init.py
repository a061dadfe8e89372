"""Initialisers draw from torch.nn.init's distributions, reproducibly, in place.

Distributions are checked on 200 000 draws: the sample standard deviation is then within
about 0.3% of the true one (one sigma), so a 2% tolerance never fails by chance but does catch
a wrong fan, gain or factor (the smallest such mistake, fan_in for fan_out here, is 20%+).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.backprop.nn import init
from worker.backprop.tensor import Tensor

SHAPE = (400, 500)  # fan_out 400, fan_in 500: different, so mixing them up shows
FAN_OUT, FAN_IN = SHAPE
STD_RTOL = 0.02


@pytest.fixture(autouse=True)
def restore_engine_generator(monkeypatch):
    """manual_seed rebinds the engine's generator; put the original back afterwards."""
    monkeypatch.setattr(init, "_generator", init.default_generator())


def empty(shape=SHAPE, dtype=np.float64) -> Tensor:
    return Tensor(np.full(shape, np.nan, dtype=dtype), requires_grad=True)


def assert_zero_mean(values: np.ndarray, std: float) -> None:
    # The sample mean has standard error std / sqrt(n); five of those is never reached by chance.
    assert abs(values.mean()) < 5 * std / math.sqrt(values.size)


def assert_uniform(values: np.ndarray, bound: float) -> None:
    assert values.min() >= -bound and values.max() <= bound
    # 200k draws leave no 0.1% gap at either edge unless the bound is wrong.
    assert values.min() < -0.999 * bound and values.max() > 0.999 * bound
    assert values.std() == pytest.approx(bound / math.sqrt(3), rel=STD_RTOL)
    assert_zero_mean(values, bound / math.sqrt(3))


def assert_normal(values: np.ndarray, std: float) -> None:
    assert values.std() == pytest.approx(std, rel=STD_RTOL)
    assert_zero_mean(values, std)
    # Normal, not uniform with the same std: about 4.55% of draws lie beyond 2 std.
    assert np.mean(np.abs(values) > 2 * std) == pytest.approx(0.0455, abs=0.003)


# --- Xavier / Glorot -----------------------------------------------------------------------------


@pytest.mark.parametrize("gain", [1.0, 5.0 / 3], ids=["gain-1", "gain-tanh"])
def test_xavier_uniform_is_uniform_with_bound_gain_sqrt_6_over_fan_in_plus_fan_out(gain):
    tensor = init.xavier_uniform_(empty(), gain=gain)

    assert_uniform(tensor.data, gain * math.sqrt(6.0 / (FAN_IN + FAN_OUT)))


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)], ids=["gain-1", "gain-relu"])
def test_xavier_normal_has_std_gain_sqrt_2_over_fan_in_plus_fan_out(gain):
    tensor = init.xavier_normal_(empty(), gain=gain)

    assert_normal(tensor.data, gain * math.sqrt(2.0 / (FAN_IN + FAN_OUT)))


def test_fans_of_a_convolution_kernel_include_the_receptive_field():
    # (out_channels, in_channels, kh, kw): fan_in = 64 * 9, fan_out = 128 * 9, as torch counts.
    tensor = init.xavier_uniform_(empty((128, 64, 3, 3)))

    assert_uniform(tensor.data, math.sqrt(6.0 / (64 * 9 + 128 * 9)))
    assert init.fan_in_and_fan_out((128, 64, 3, 3)) == (64 * 9, 128 * 9)


@pytest.mark.parametrize("initialiser", [init.xavier_uniform_, init.xavier_normal_,
                                         init.kaiming_uniform_, init.kaiming_normal_])
def test_fan_based_initialisers_refuse_a_tensor_with_fewer_than_two_dimensions(initialiser):
    with pytest.raises(ValueError, match=r"\(7,\)"):
        initialiser(empty((7,)))


# --- Kaiming / He --------------------------------------------------------------------------------

KAIMING_CASES = [
    pytest.param(0.0, "fan_in", "relu", id="relu-fan-in"),
    pytest.param(0.0, "fan_out", "relu", id="relu-fan-out"),
    pytest.param(0.0, "fan_in", "leaky_relu", id="leaky-relu-a-0-is-relu"),
    pytest.param(0.2, "fan_in", "leaky_relu", id="leaky-relu-a-0.2"),
    pytest.param(math.sqrt(5), "fan_in", "leaky_relu", id="torch-linear-default-a-sqrt5"),
    pytest.param(0.0, "fan_out", "tanh", id="tanh-fan-out"),
    pytest.param(0.0, "fan_in", "linear", id="linear"),
]


def kaiming_std(a: float, mode: str, nonlinearity: str) -> float:
    fan = FAN_IN if mode == "fan_in" else FAN_OUT
    return torch.nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)


@pytest.mark.parametrize("a, mode, nonlinearity", KAIMING_CASES)
def test_kaiming_normal_has_std_gain_over_sqrt_fan(a, mode, nonlinearity):
    tensor = init.kaiming_normal_(empty(), a=a, mode=mode, nonlinearity=nonlinearity)

    assert_normal(tensor.data, kaiming_std(a, mode, nonlinearity))


@pytest.mark.parametrize("a, mode, nonlinearity", KAIMING_CASES)
def test_kaiming_uniform_has_bound_gain_sqrt_3_over_fan(a, mode, nonlinearity):
    tensor = init.kaiming_uniform_(empty(), a=a, mode=mode, nonlinearity=nonlinearity)

    assert_uniform(tensor.data, math.sqrt(3.0) * kaiming_std(a, mode, nonlinearity))


@pytest.mark.parametrize("a, mode, nonlinearity", KAIMING_CASES)
def test_kaiming_spread_matches_torchs_on_the_same_shape(a, mode, nonlinearity):
    # The same arguments mean the same thing in both: compare the empirical spreads directly.
    ours = init.kaiming_normal_(empty(), a=a, mode=mode, nonlinearity=nonlinearity).data
    theirs = torch.nn.init.kaiming_normal_(
        torch.empty(SHAPE, dtype=torch.float64), a=a, mode=mode, nonlinearity=nonlinearity,
        generator=torch.Generator().manual_seed(0),
    ).numpy()

    assert ours.std() == pytest.approx(theirs.std(), rel=STD_RTOL)


def test_kaiming_defaults_are_torchs_leaky_relu_a_0_fan_in():
    tensor = init.kaiming_normal_(empty())

    assert_normal(tensor.data, math.sqrt(2.0) / math.sqrt(FAN_IN))


@pytest.mark.parametrize("initialiser", [init.kaiming_uniform_, init.kaiming_normal_])
def test_kaiming_with_an_unknown_mode_raises_naming_it_and_leaves_the_tensor_alone(initialiser):
    tensor = Tensor(np.arange(12.0).reshape(3, 4))

    with pytest.raises(ValueError, match="fan_avg"):
        initialiser(tensor, mode="fan_avg")

    np.testing.assert_array_equal(tensor.data, np.arange(12.0).reshape(3, 4))


def test_kaiming_with_an_unknown_nonlinearity_raises_naming_it():
    with pytest.raises(ValueError, match="swish"):
        init.kaiming_normal_(empty((3, 4)), nonlinearity="swish")


# --- gains ---------------------------------------------------------------------------------------

NONLINEARITIES = [
    pytest.param("linear", None), pytest.param("conv1d", None), pytest.param("conv2d", None),
    pytest.param("conv3d", None), pytest.param("conv_transpose1d", None),
    pytest.param("conv_transpose2d", None), pytest.param("conv_transpose3d", None),
    pytest.param("sigmoid", None), pytest.param("tanh", None), pytest.param("relu", None),
    pytest.param("leaky_relu", None, id="leaky_relu-default"),
    pytest.param("leaky_relu", 0.2, id="leaky_relu-0.2"),
    pytest.param("leaky_relu", 0, id="leaky_relu-int-0"),
    pytest.param("leaky_relu", math.sqrt(5), id="leaky_relu-sqrt5"),
    pytest.param("selu", None),
]


@pytest.mark.parametrize("nonlinearity, param", NONLINEARITIES)
def test_calculate_gain_equals_torchs_for_every_nonlinearity(nonlinearity, param):
    expected = torch.nn.init.calculate_gain(nonlinearity, param)

    assert init.calculate_gain(nonlinearity, param) == pytest.approx(expected, rel=1e-15)


def test_calculate_gain_refuses_an_unknown_nonlinearity_as_torch_does():
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain("softplus")
    with pytest.raises(ValueError, match="softplus"):
        init.calculate_gain("softplus")


# --- layer defaults ------------------------------------------------------------------------------


def test_linear_initialises_weight_and_bias_uniform_within_one_over_sqrt_fan_in():
    layer = nn.Linear(FAN_IN, FAN_OUT, dtype=np.float64)

    assert_uniform(layer.weight.data, 1.0 / math.sqrt(FAN_IN))
    bias = layer.bias.data
    assert bias.min() >= -1.0 / math.sqrt(FAN_IN) and bias.max() <= 1.0 / math.sqrt(FAN_IN)


def test_embedding_initialises_standard_normal():
    table = nn.Embedding(1000, 200, dtype=np.float64)

    assert_normal(table.weight.data, 1.0)


def test_layers_initialise_in_the_requested_dtype():
    assert nn.Linear(3, 2).weight.dtype == np.float32  # the engine default
    assert nn.Linear(3, 2, dtype=np.float64).bias.dtype == np.float64
    assert nn.Embedding(4, 2, dtype=np.float64).weight.dtype == np.float64


# --- reproducibility -----------------------------------------------------------------------------


def test_manual_seed_makes_linear_weights_reproducible():
    init.manual_seed(1234)
    first = nn.Linear(6, 4)
    init.manual_seed(1234)
    second = nn.Linear(6, 4)
    init.manual_seed(1235)
    other = nn.Linear(6, 4)

    np.testing.assert_array_equal(first.weight.data, second.weight.data)
    np.testing.assert_array_equal(first.bias.data, second.bias.data)
    assert not np.array_equal(first.weight.data, other.weight.data)


def test_manual_seed_makes_a_whole_model_reproducible():
    def build():
        init.manual_seed(7)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Embedding(5, 3), nn.Linear(3, 2))

    first, second = build().state_dict(), build().state_dict()

    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_an_explicit_generator_does_not_consume_the_engine_generator():
    init.manual_seed(3)
    expected = nn.Linear(4, 4).weight.data.copy()
    init.manual_seed(3)
    nn.Linear(4, 4, rng=np.random.default_rng(0))  # draws from its own generator only

    np.testing.assert_array_equal(nn.Linear(4, 4).weight.data, expected)


@pytest.mark.parametrize("initialiser", [
    init.xavier_uniform_, init.xavier_normal_, init.kaiming_uniform_, init.kaiming_normal_,
])
def test_initialisers_given_the_same_generator_seed_draw_the_same_values(initialiser):
    first = initialiser(empty((5, 6)), rng=np.random.default_rng(11)).data
    second = initialiser(empty((5, 6)), rng=np.random.default_rng(11)).data

    np.testing.assert_array_equal(first, second)


# --- filling in place ----------------------------------------------------------------------------


@pytest.mark.parametrize("fill, value", [(init.zeros_, 0.0), (init.ones_, 1.0)],
                         ids=["zeros_", "ones_"])
def test_constant_fills_write_in_place_and_return_the_same_tensor(fill, value):
    tensor = Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
                    requires_grad=True)
    array, row = tensor.data, tensor.data[1]  # the array and a view taken before filling

    assert fill(tensor) is tensor

    assert tensor.data is array
    assert tensor.dtype == np.float32
    assert tensor.requires_grad
    np.testing.assert_array_equal(array, np.full((3, 4), value, dtype=np.float32))
    np.testing.assert_array_equal(row, np.full(4, value, dtype=np.float32))


@pytest.mark.parametrize("initialiser", [
    init.xavier_uniform_, init.xavier_normal_, init.kaiming_uniform_, init.kaiming_normal_,
    lambda t: init.uniform_(t, -1, 1), lambda t: init.normal_(t, 0, 1),
], ids=["xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "uniform_",
        "normal_"])
def test_random_initialisers_write_in_place_keeping_the_dtype(initialiser):
    tensor = empty((6, 5), dtype=np.float32)
    array, column = tensor.data, tensor.data[:, 0]

    assert initialiser(tensor) is tensor

    assert tensor.data is array
    assert tensor.dtype == np.float32
    assert np.all(np.isfinite(column))  # the view saw the new values (it held NaN)


def test_initialising_a_parameter_keeps_its_optimizer_visible_identity():
    layer = nn.Linear(3, 2)
    weight, array = layer.weight, layer.weight.data

    init.xavier_uniform_(layer.weight)

    assert layer.weight is weight and layer.weight.data is array
    assert [p for _, p in layer.named_parameters()][0] is weight
