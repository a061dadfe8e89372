"""state_dict, load_state_dict, dtype conversion, modes and parameter naming follow torch.nn.

A checkpoint written by the engine must load into torch.nn and back without renaming, and a
bad checkpoint must be refused before anything is changed: a half-loaded model is worse than
an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.backprop.tensor import Tensor

F64 = np.float64


# --- one architecture written twice --------------------------------------------------------------


def our_model(seed: int = 0) -> nn.Module:
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(5, 8, rng=rng),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Linear(8, 8, rng=rng), nn.LayerNorm(8), nn.Tanh())),
        nn.Dropout(0.2),
        nn.Linear(8, 3, bias=False, rng=rng),
    )


class TorchResidual(torch.nn.Module):
    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def torch_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        TorchResidual(torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Tanh())),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(8, 3, bias=False),
    )


def snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {key: value.copy() for key, value in model.state_dict().items()}


def assert_state_equals(model: nn.Module, expected: dict[str, np.ndarray]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def train_a_few_steps(model: nn.Module, steps: int = 3) -> None:
    """Move BatchNorm's running statistics and counter away from their initial values."""
    rng = np.random.default_rng(99)
    model.train()
    for _ in range(steps):
        model(Tensor(rng.standard_normal((6, 5)).astype(model[0].weight.dtype)))


# --- keys and shapes -----------------------------------------------------------------------------


def test_state_dict_keys_order_and_shapes_equal_torchs_for_the_same_architecture():
    ours = our_model().state_dict()
    theirs = torch_model().state_dict()

    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].shape == tuple(theirs[key].shape), key


def test_linear_weight_is_stored_out_features_by_in_features():
    layer = nn.Linear(5, 3)

    assert layer.state_dict()["weight"].shape == (3, 5)
    assert layer.state_dict()["bias"].shape == (3,)


def test_batch_norm_buffers_are_in_state_dict_with_an_integer_step_counter():
    state = nn.BatchNorm1d(4).state_dict()

    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert state["num_batches_tracked"].shape == ()
    assert state["num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(
    "ours, theirs",
    [
        pytest.param(lambda: nn.BatchNorm1d(4, affine=False),
                     lambda: torch.nn.BatchNorm1d(4, affine=False), id="batch-norm-no-affine"),
        pytest.param(lambda: nn.BatchNorm1d(4, track_running_stats=False),
                     lambda: torch.nn.BatchNorm1d(4, track_running_stats=False),
                     id="batch-norm-no-running-stats"),
        pytest.param(lambda: nn.LayerNorm(4, elementwise_affine=False),
                     lambda: torch.nn.LayerNorm(4, elementwise_affine=False),
                     id="layer-norm-no-affine"),
        pytest.param(lambda: nn.LayerNorm((3, 4), bias=False),
                     lambda: torch.nn.LayerNorm((3, 4), bias=False), id="layer-norm-no-bias"),
        pytest.param(lambda: nn.Embedding(10, 3), lambda: torch.nn.Embedding(10, 3),
                     id="embedding"),
    ],
)
def test_optional_parts_appear_in_state_dict_exactly_when_torch_has_them(ours, theirs):
    state, expected = ours().state_dict(), theirs().state_dict()

    assert list(state) == list(expected)
    assert [v.shape for v in state.values()] == [tuple(v.shape) for v in expected.values()]


# --- round trip through torch --------------------------------------------------------------------


def test_state_dict_loads_into_torch_and_back_exactly():
    ours = our_model(seed=1)
    train_a_few_steps(ours)
    original = snapshot(ours)
    theirs = torch_model()

    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    fresh = our_model(seed=2)
    fresh.load_state_dict(theirs.state_dict())  # torch tensors in, as a checkpoint would be

    assert_state_equals(fresh, original)
    assert int(fresh[1].num_batches_tracked) == 3


def test_torch_trained_values_load_into_our_model():
    theirs = torch_model()
    theirs.train()
    theirs(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))  # moves BN buffers
    ours = our_model()

    ours.load_state_dict(theirs.state_dict())

    for key, value in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[key], value.numpy(), err_msg=key)


# --- refusing bad checkpoints --------------------------------------------------------------------


def bad_state(kind: str) -> tuple[dict, str]:
    """A checkpoint for our_model() with one problem, and the key the error must name."""
    state = {key: value.copy() + 1 for key, value in snapshot(our_model(seed=5)).items()}
    if kind == "missing":
        del state["3.block.1.weight"]
        return state, "3.block.1.weight"
    if kind == "unexpected":
        state["3.block.9.weight"] = np.ones(8, dtype=np.float32)
        return state, "3.block.9.weight"
    state["0.weight"] = np.ones((5, 8), dtype=np.float32)  # transposed: the classic mistake
    return state, "0.weight"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong-shape"])
def test_load_state_dict_refuses_a_bad_checkpoint_naming_the_key_and_changes_nothing(kind):
    model = our_model()
    before = snapshot(model)
    state, key = bad_state(kind)

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model.load_state_dict(state)

    assert_state_equals(model, before)  # not even the valid keys were copied


def test_load_state_dict_reports_every_problem_at_once():
    model = our_model()
    state = snapshot(our_model(seed=5))
    del state["1.running_var"]
    state["extra"] = np.zeros(2)
    state["5.weight"] = np.zeros((8, 3))

    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)

    for key in ("1.running_var", "extra", "5.weight"):
        assert key in str(error.value)


def test_wrong_shape_error_quotes_both_shapes():
    model = nn.Linear(5, 3)
    state = {"weight": np.zeros((5, 3), dtype=np.float32), "bias": np.zeros(3, np.float32)}

    with pytest.raises(ValueError, match=r"weight.*\(5, 3\).*\(3, 5\)"):
        model.load_state_dict(state)


def test_non_strict_load_ignores_missing_and_unexpected_keys_but_loads_the_rest():
    model = nn.Linear(4, 2)
    bias_before = model.bias.data.copy()
    new_weight = np.full((2, 4), 0.5, dtype=np.float32)

    model.load_state_dict({"weight": new_weight, "other": np.zeros(1)}, strict=False)

    np.testing.assert_array_equal(model.weight.data, new_weight)
    np.testing.assert_array_equal(model.bias.data, bias_before)


def test_non_strict_load_still_refuses_a_wrong_shape():
    model = nn.Linear(4, 2)
    before = snapshot(model)

    with pytest.raises(ValueError, match="weight"):
        model.load_state_dict({"weight": np.zeros((4, 2))}, strict=False)

    assert_state_equals(model, before)


# --- loading in place ----------------------------------------------------------------------------


def test_load_state_dict_copies_into_the_existing_arrays_so_views_see_new_values():
    model = our_model()
    weight = model[0].weight.data
    weight_row = weight[1]  # a view taken before loading
    running_mean = model[1].running_mean
    counter = model[1].num_batches_tracked
    live_state = model.state_dict()
    source = our_model(seed=7)
    train_a_few_steps(source)

    model.load_state_dict(source.state_dict())

    assert model[0].weight.data is weight
    np.testing.assert_array_equal(weight_row, source[0].weight.data[1])
    np.testing.assert_array_equal(running_mean, source[1].running_mean)
    assert int(counter) == 3
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(live_state[key], value, err_msg=key)


def test_loading_does_not_alias_the_source_arrays():
    model, source = nn.Linear(3, 2), nn.Linear(3, 2)

    model.load_state_dict(source.state_dict())
    source.weight.data[...] = 42.0

    assert not np.any(model.weight.data == 42.0)


def test_loading_float64_values_into_a_float32_model_keeps_float32():
    model = nn.Linear(3, 2)
    state = {"weight": np.full((2, 3), 0.1, dtype=F64), "bias": np.zeros(2, dtype=F64)}

    model.load_state_dict(state)

    assert model.weight.dtype == np.float32
    np.testing.assert_array_equal(model.weight.data, np.float32(0.1))


# --- dtype conversion ----------------------------------------------------------------------------


def dtypes(model: nn.Module) -> dict[str, np.dtype]:
    return {key: value.dtype for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "convert, expected",
    [
        pytest.param(lambda m: m.double(), np.float64, id="double"),
        pytest.param(lambda m: m.to(np.float64), np.float64, id="to-float64"),
        pytest.param(lambda m: m.to("float64"), np.float64, id="to-float64-by-name"),
        pytest.param(lambda m: m.double().float(), np.float32, id="double-then-float"),
        pytest.param(lambda m: m.double().to(np.float32), np.float32, id="double-then-to-float32"),
    ],
)
def test_dtype_conversion_converts_parameters_and_float_buffers_but_not_the_step_counter(
    convert, expected
):
    model = our_model()
    train_a_few_steps(model)
    values_before = snapshot(model)

    assert convert(model) is model

    for key, dtype in dtypes(model).items():
        if key.endswith("num_batches_tracked"):
            assert dtype == np.int64, key
        else:
            assert dtype == expected, key
    assert int(model[1].num_batches_tracked) == 3
    for key, value in model.state_dict().items():  # float32 -> float64 -> float32 is exact
        np.testing.assert_array_equal(value, values_before[key], err_msg=key)


def test_converted_model_computes_in_the_new_dtype_and_parameters_stay_parameters():
    model = our_model().double()
    x = Tensor(np.random.default_rng(0).standard_normal((4, 5)))

    out = model(x)
    out.sum().backward()

    assert out.dtype == np.float64
    for name, parameter in model.named_parameters():
        assert isinstance(parameter, nn.Parameter), name
        assert parameter.grad.dtype == np.float64, name


def test_dtype_conversion_drops_stale_gradients():
    model = nn.Linear(3, 2)
    model(Tensor(np.ones((1, 3), dtype=np.float32))).sum().backward()

    model.double()

    assert all(p.grad is None for p in model.parameters())


# --- train and eval ------------------------------------------------------------------------------


def test_train_and_eval_propagate_to_every_descendant():
    model = our_model()

    assert model.eval() is model
    assert all(not module.training for module in model.modules())
    assert model.train() is model
    assert all(module.training for module in model.modules())
    model.train(False)
    assert not model[3].block[1].training


def test_eval_turns_off_nested_dropout_and_batch_statistics():
    model = our_model()
    x = Tensor(np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32))
    model.eval()
    state_before = snapshot(model)

    first, second = model(x), model(x)

    np.testing.assert_array_equal(first.data, second.data)  # no dropout noise
    assert_state_equals(model, state_before)  # running statistics not updated
    single = model(Tensor(x.data[:1]))  # a batch of one is fine with running statistics
    np.testing.assert_allclose(single.data, first.data[:1], rtol=1e-5, atol=1e-6)


# --- naming parameters ---------------------------------------------------------------------------


def test_named_parameters_order_matches_torch():
    ours = [name for name, _ in our_model().named_parameters()]
    theirs = [name for name, _ in torch_model().named_parameters()]

    assert ours == theirs


def test_named_buffers_match_torch():
    ours = [name for name, _ in our_model().named_buffers()]
    theirs = [name for name, _ in torch_model().named_buffers()]

    assert ours == theirs


def test_a_module_used_twice_lists_its_parameters_once_like_torch():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    torch_shared = torch.nn.Linear(4, 4)
    twin = torch.nn.Sequential(torch_shared, torch.nn.Tanh(), torch_shared)

    names = [name for name, _ in model.named_parameters()]

    assert names == [name for name, _ in twin.named_parameters()] == ["0.weight", "0.bias"]
    assert len(list(model.parameters())) == 2
    assert model.num_parameters() == 4 * 4 + 4
    assert list(model.state_dict()) == list(twin.state_dict())  # state_dict keeps both names


def test_a_module_used_twice_lists_its_buffers_and_itself_once_like_torch():
    # Code that walks named_buffers() to update buffers in place (a step counter += 1) would
    # otherwise update a shared BatchNorm twice.
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    torch_shared = torch.nn.BatchNorm1d(3)
    twin = torch.nn.Sequential(torch_shared, torch.nn.ReLU(), torch_shared)

    assert [name for name, _ in model.named_buffers()] == [
        name for name, _ in twin.named_buffers()
    ]
    assert [name for name, _ in model.named_modules()] == [
        name for name, _ in twin.named_modules()
    ]


def test_a_tied_parameter_is_listed_once_under_its_first_name_like_torch():
    encoder, decoder = nn.Linear(4, 6), nn.Linear(6, 4)
    model = nn.Sequential(encoder, decoder)
    decoder.weight = encoder.weight  # tied: (6, 4) used by both layers
    torch_encoder, torch_decoder = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4)
    twin = torch.nn.Sequential(torch_encoder, torch_decoder)
    torch_decoder.weight = torch_encoder.weight

    names = [name for name, _ in model.named_parameters()]

    assert names == [name for name, _ in twin.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.bias"]


def test_parameters_are_parameters_and_require_gradients():
    for name, parameter in our_model().named_parameters():
        assert isinstance(parameter, nn.Parameter), name
        assert parameter.requires_grad, name


def test_reassigning_an_attribute_replaces_the_registration():
    layer = nn.Linear(3, 2)
    layer.bias = None  # as torch: the key disappears rather than holding None

    assert list(layer.state_dict()) == ["weight"]
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
