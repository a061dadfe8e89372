"""Layers and losses agree with torch.nn to round-off: outputs, losses and every gradient.

Each case builds a float64 model in the engine, builds the same architecture in torch.nn
(`torch_twin`), copies our state_dict into it with torch.from_numpy (strict=True, so the key
names must match too), runs the same input through both and backpropagates the same upstream
gradient. Everything is compared at rtol=1e-10: in float64 that leaves room for a different
order of summation, not for a wrong formula.

Absolute tolerances: a value that is a sum of O(1) terms of both signs carries round-off of
about n * 1e-16 in absolute terms, however small the sum is, so an entry that happens to cancel
to ~1e-7 cannot meet 1e-10 *relative*. ATOL = 1e-13 is the floor for that, still a million
times below any gradient entry of a real mistake (those are O(1e-3) or more here).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.backprop.nn import functional as F
from worker.backprop.tensor import Tensor

RTOL = 1e-10
ATOL = 1e-13
# A gradient that is mathematically zero (the bias of a Linear feeding a training-mode
# BatchNorm: the batch mean subtracts any constant shift) is pure round-off in both engines,
# ~1e-16 * batch * |upstream|. Each side is required to be this close to 0 instead of equal.
ZERO_GRAD_ATOL = 1e-12

BATCH = 16
F64 = np.float64


# --- the torch twin of an engine model -----------------------------------------------------------


class TorchResidual(torch.nn.Module):
    """x + block(x): torch has no Residual module, this is ours written in torch."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def torch_twin(module: nn.Module, memo: dict[int, torch.nn.Module] | None = None):
    """The torch.nn module with the same architecture (float64), sharing what ours shares."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    kind = torch.float64
    if isinstance(module, nn.Linear):
        twin = torch.nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None, dtype=kind)
    elif isinstance(module, nn.Sequential):
        twin = torch.nn.Sequential(*(torch_twin(child, memo) for child in module))
    elif isinstance(module, nn.Residual):
        twin = TorchResidual(torch_twin(module.block, memo))
    elif isinstance(module, nn.BatchNorm1d):
        twin = torch.nn.BatchNorm1d(module.num_features, eps=module.eps,
                                    momentum=module.momentum, affine=module.affine,
                                    track_running_stats=module.track_running_stats, dtype=kind)
    elif isinstance(module, nn.LayerNorm):
        twin = torch.nn.LayerNorm(module.normalized_shape, eps=module.eps,
                                  elementwise_affine=module.weight is not None,
                                  bias=module.bias is not None, dtype=kind)
    elif isinstance(module, nn.Embedding):
        twin = torch.nn.Embedding(module.num_embeddings, module.embedding_dim, dtype=kind)
    elif isinstance(module, nn.Flatten):
        twin = torch.nn.Flatten(module.start_dim, module.end_dim)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind_of_conv = torch.nn.Conv1d if isinstance(module, nn.Conv1d) else torch.nn.Conv2d
        twin = kind_of_conv(module.in_channels, module.out_channels, module.kernel_size,
                            module.stride, module.padding, module.dilation, module.groups,
                            bias=module.bias is not None, dtype=kind)
    elif isinstance(module, nn.BatchNorm2d):
        twin = torch.nn.BatchNorm2d(module.num_features, eps=module.eps,
                                    momentum=module.momentum, affine=module.affine,
                                    track_running_stats=module.track_running_stats, dtype=kind)
    elif isinstance(module, nn.MaxPool2d):
        twin = torch.nn.MaxPool2d(module.kernel_size, module.stride, module.padding,
                                  module.dilation, ceil_mode=module.ceil_mode)
    elif isinstance(module, nn.AvgPool2d):
        twin = torch.nn.AvgPool2d(module.kernel_size, module.stride, module.padding,
                                  module.ceil_mode, module.count_include_pad,
                                  module.divisor_override)
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        twin = torch.nn.AdaptiveAvgPool2d(module.output_size)
    elif isinstance(module, nn.Dropout2d):
        twin = torch.nn.Dropout2d(module.p)
    elif isinstance(module, nn.GELU):
        twin = torch.nn.GELU(approximate=module.approximate)
    elif isinstance(module, nn.LeakyReLU):
        twin = torch.nn.LeakyReLU(module.negative_slope)
    elif isinstance(module, nn.Softmax):
        twin = torch.nn.Softmax(module.dim)
    elif isinstance(module, nn.LogSoftmax):
        twin = torch.nn.LogSoftmax(module.dim)
    else:
        stateless = {nn.ReLU: torch.nn.ReLU, nn.Tanh: torch.nn.Tanh, nn.Sigmoid: torch.nn.Sigmoid,
                     nn.SiLU: torch.nn.SiLU, nn.Identity: torch.nn.Identity}
        twin = stateless[type(module)]()
    memo[id(module)] = twin
    return twin


def twin_with_our_weights(ours: nn.Module) -> torch.nn.Module:
    twin = torch_twin(ours)
    state = {key: torch.from_numpy(value.copy()) for key, value in ours.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    twin.train(ours.training)
    return twin


# --- comparing -----------------------------------------------------------------------------------


def assert_close(actual, expected, name: str = "", atol: float = ATOL) -> None:
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    actual = actual.data if isinstance(actual, Tensor) else actual
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=name)


def assert_gradients_match(ours: nn.Module, twin: torch.nn.Module,
                           zero_grads: tuple[str, ...] = ()) -> None:
    our_grads = {name: p.grad for name, p in ours.named_parameters()}
    their_grads = {name: p.grad for name, p in twin.named_parameters()}
    assert list(our_grads) == list(their_grads)
    for name, theirs in their_grads.items():
        assert our_grads[name] is not None, f"{name} got no gradient"
        if name in zero_grads:
            assert_close(our_grads[name], np.zeros_like(our_grads[name]), name, ZERO_GRAD_ATOL)
            assert_close(theirs.numpy(), np.zeros_like(our_grads[name]), name, ZERO_GRAD_ATOL)
        else:
            assert_close(our_grads[name], theirs, name)


def assert_states_match(ours: nn.Module, twin: torch.nn.Module) -> None:
    theirs = twin.state_dict()
    ours_state = ours.state_dict()
    assert list(ours_state) == list(theirs)
    for key, value in ours_state.items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == int(theirs[key]), key
        else:
            assert_close(value, theirs[key], key)


def run_both(ours: nn.Module, twin: torch.nn.Module, x: np.ndarray, rng: np.random.Generator):
    """Forward both models on x and backpropagate the same random upstream gradient."""
    ours.zero_grad()
    twin.zero_grad()
    out = ours(x if x.dtype.kind in "iu" else Tensor(x))  # integer x: token indices
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    out_t = twin(torch.from_numpy(x))
    (out_t * torch.from_numpy(probe)).sum().backward()
    return out, out_t


# --- architectures -------------------------------------------------------------------------------

Builder = Callable[[np.random.Generator], nn.Module]


def linear(rng, n_in, n_out, bias=True):
    return nn.Linear(n_in, n_out, bias=bias, dtype=F64, rng=rng)


def mlp_with(activation: Callable[[], nn.Module]) -> Builder:
    return lambda rng: nn.Sequential(
        linear(rng, 5, 8), activation(), linear(rng, 8, 8), activation(), linear(rng, 8, 3)
    )


def randomize_affine(model: nn.Module, rng: np.random.Generator) -> nn.Module:
    """Norm layers start at weight 1, bias 0: perturb them so their gradients mean something."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.LayerNorm)):
            if module.weight is not None:
                module.weight.data[...] = rng.uniform(0.5, 1.5, module.weight.shape)
            if module.bias is not None:
                module.bias.data[...] = rng.uniform(-0.5, 0.5, module.bias.shape)
    return model


def layer_norm_mlp(rng):
    return randomize_affine(nn.Sequential(
        linear(rng, 5, 8), nn.LayerNorm(8, dtype=F64), nn.Tanh(), linear(rng, 8, 3)
    ), rng)


def layer_norm_without_bias(rng):
    return randomize_affine(nn.Sequential(
        linear(rng, 5, 8), nn.LayerNorm(8, bias=False, dtype=F64), nn.GELU(), linear(rng, 8, 3)
    ), rng)


def layer_norm_over_two_axes(rng):
    # Linear acts on the last axis of (batch, 5, 4) input; LayerNorm normalises (5, 6) jointly.
    return randomize_affine(nn.Sequential(
        linear(rng, 4, 6), nn.LayerNorm((5, 6), dtype=F64), nn.SiLU(), nn.Flatten(),
        linear(rng, 30, 3),
    ), rng)


def residual_mlp(rng):
    return nn.Sequential(
        linear(rng, 5, 6),
        nn.Residual(nn.Sequential(linear(rng, 6, 6), nn.Tanh(), linear(rng, 6, 6))),
        nn.Residual(nn.Sequential(nn.LayerNorm(6, dtype=F64), linear(rng, 6, 6), nn.GELU())),
        linear(rng, 6, 3),
    )


def nested_residual(rng):
    inner = nn.Residual(nn.Sequential(linear(rng, 6, 6), nn.ReLU()))
    return nn.Sequential(linear(rng, 5, 6), nn.Residual(nn.Sequential(inner, nn.Sigmoid())),
                         linear(rng, 6, 2))


def shared_linear_applied_twice(rng):
    # The same Linear at positions 0 and 2: its gradient is the sum over both uses.
    shared = linear(rng, 5, 5)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.ReLU(), linear(rng, 5, 3))


def linear_without_bias(rng):
    return nn.Sequential(linear(rng, 5, 8, bias=False), nn.Tanh(), linear(rng, 8, 3, bias=False))


def softmax_head(rng):
    return nn.Sequential(linear(rng, 5, 8), nn.Tanh(), linear(rng, 8, 4), nn.Softmax(-1))


def log_softmax_head(rng):
    return nn.Sequential(linear(rng, 5, 8), nn.ReLU(), linear(rng, 8, 4), nn.LogSoftmax(-1))


def batch_norm_without_affine(rng):
    return nn.Sequential(linear(rng, 5, 8), nn.BatchNorm1d(8, affine=False, dtype=F64),
                         nn.Tanh(), linear(rng, 8, 3))


ACTIVATIONS = [
    pytest.param(mlp_with(nn.ReLU), id="relu"),
    pytest.param(mlp_with(nn.Tanh), id="tanh"),
    pytest.param(mlp_with(nn.Sigmoid), id="sigmoid"),
    pytest.param(mlp_with(lambda: nn.GELU("none")), id="gelu-none"),
    pytest.param(mlp_with(lambda: nn.GELU("tanh")), id="gelu-tanh"),
    pytest.param(mlp_with(nn.SiLU), id="silu"),
    pytest.param(mlp_with(nn.LeakyReLU), id="leaky-relu-default-slope"),
    pytest.param(mlp_with(lambda: nn.LeakyReLU(0.2)), id="leaky-relu-0.2"),
    pytest.param(mlp_with(nn.Identity), id="identity"),
    pytest.param(softmax_head, id="softmax-head"),
    pytest.param(log_softmax_head, id="log-softmax-head"),
]

STATELESS_ARCHITECTURES = [
    pytest.param(layer_norm_mlp, (BATCH, 5), id="layer-norm"),
    pytest.param(layer_norm_without_bias, (BATCH, 5), id="layer-norm-without-bias"),
    pytest.param(layer_norm_over_two_axes, (BATCH, 5, 4), id="layer-norm-over-two-axes"),
    pytest.param(residual_mlp, (BATCH, 5), id="residual-blocks"),
    pytest.param(nested_residual, (BATCH, 5), id="nested-residual"),
    pytest.param(shared_linear_applied_twice, (BATCH, 5), id="shared-linear-applied-twice"),
    pytest.param(linear_without_bias, (BATCH, 5), id="linear-without-bias"),
]


def random_input(rng, shape):
    # Scale 1.5: activations reach their curved regions (tanh, sigmoid saturation, GELU tails).
    return 1.5 * rng.standard_normal(shape)


# --- activations, layer norm, residual blocks ----------------------------------------------------


@pytest.mark.parametrize("build", ACTIVATIONS)
def test_mlp_with_each_activation_matches_torch_outputs_and_gradients(build):
    rng = np.random.default_rng(0)
    ours = build(rng)
    twin = twin_with_our_weights(ours)
    x = random_input(rng, (BATCH, 5))

    out, out_t = run_both(ours, twin, x, rng)

    assert out.dtype == np.float64
    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin)


@pytest.mark.parametrize("build, input_shape", STATELESS_ARCHITECTURES)
def test_norm_residual_and_shared_architectures_match_torch(build, input_shape):
    rng = np.random.default_rng(1)
    ours = build(rng)
    twin = twin_with_our_weights(ours)
    x = random_input(rng, input_shape)

    out, out_t = run_both(ours, twin, x, rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin)


def test_residual_passes_the_upstream_gradient_past_the_block_unchanged():
    # With a block whose output does not depend on x (zero weight, zero bias), x + block(x) = x,
    # so d/dx is exactly the upstream gradient.
    block = nn.Linear(4, 4, dtype=F64)
    nn.init.zeros_(block.weight)
    nn.init.zeros_(block.bias)
    x = Tensor(np.random.default_rng(2).standard_normal((3, 4)), requires_grad=True)
    upstream = np.arange(12.0).reshape(3, 4)

    nn.Residual(block)(x).backward(upstream)

    np.testing.assert_array_equal(x.grad, upstream)


# --- BatchNorm1d ---------------------------------------------------------------------------------


def batch_norm_mlp(rng, momentum=0.1, eps=1e-5):
    return randomize_affine(nn.Sequential(
        linear(rng, 5, 8), nn.BatchNorm1d(8, eps=eps, momentum=momentum, dtype=F64), nn.ReLU(),
        linear(rng, 8, 3),
    ), rng)


def shifted_batch(rng, step, shape=(BATCH, 5)):
    # Each batch has its own mean and scale, so the running statistics keep moving.
    return (1.0 + 0.5 * step) * rng.standard_normal(shape) + 0.3 * step


@pytest.mark.parametrize("momentum, eps", [(0.1, 1e-5), (0.3, 1e-3)],
                         ids=["torch-defaults", "momentum-0.3-eps-1e-3"])
def test_batch_norm_training_matches_torch_step_after_step_including_running_stats(
    momentum, eps
):
    rng = np.random.default_rng(3)
    ours = batch_norm_mlp(rng, momentum, eps)
    twin = twin_with_our_weights(ours)

    for step in range(4):
        x = shifted_batch(rng, step)
        out, out_t = run_both(ours, twin, x, rng)

        assert_close(out, out_t, f"output at step {step}")
        # "0.bias" feeds BatchNorm in training mode: its gradient is mathematically zero.
        assert_gradients_match(ours, twin, zero_grads=("0.bias",))
        assert_states_match(ours, twin)  # running_mean, running_var, num_batches_tracked

    assert int(ours[1].num_batches_tracked) == 4
    assert ours[1].num_batches_tracked.dtype == np.int64


def test_batch_norm_eval_mode_uses_running_stats_like_torch_after_training_steps():
    rng = np.random.default_rng(4)
    ours = batch_norm_mlp(rng)
    twin = twin_with_our_weights(ours)
    for step in range(3):
        run_both(ours, twin, shifted_batch(rng, step), rng)
    ours.eval()
    twin.eval()
    running_before = {k: v.copy() for k, v in ours.state_dict().items()}

    x = shifted_batch(rng, 5)
    out, out_t = run_both(ours, twin, x, rng)

    assert_close(out, out_t, "eval output")
    # In eval mode the normalisation is a fixed affine map, so the bias before it now matters.
    assert_gradients_match(ours, twin)
    for key, value in ours.state_dict().items():  # eval never updates the running statistics
        np.testing.assert_array_equal(value, running_before[key], err_msg=key)
    assert int(ours[1].num_batches_tracked) == 3


def test_batch_norm_eval_on_a_single_sample_matches_torch():
    rng = np.random.default_rng(5)
    ours = batch_norm_mlp(rng)
    twin = twin_with_our_weights(ours)
    run_both(ours, twin, shifted_batch(rng, 1), rng)
    ours.eval()
    twin.eval()

    out, out_t = run_both(ours, twin, shifted_batch(rng, 2, (1, 5)), rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin)


def test_batch_norm_without_affine_matches_torch():
    rng = np.random.default_rng(6)
    ours = batch_norm_without_affine(rng)
    twin = twin_with_our_weights(ours)
    assert "1.weight" not in ours.state_dict()

    out, out_t = run_both(ours, twin, shifted_batch(rng, 1), rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin, zero_grads=("0.bias",))
    assert_states_match(ours, twin)


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval_like_torch():
    rng = np.random.default_rng(7)
    ours = randomize_affine(nn.Sequential(
        linear(rng, 5, 8), nn.BatchNorm1d(8, track_running_stats=False, dtype=F64), nn.Tanh(),
        linear(rng, 8, 3),
    ), rng).eval()
    twin = twin_with_our_weights(ours)
    assert list(ours.state_dict()) == list(twin.state_dict())

    out, out_t = run_both(ours, twin, shifted_batch(rng, 2), rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin, zero_grads=("0.bias",))


def test_batch_norm_on_sequences_normalises_over_batch_and_length_like_torch():
    rng = np.random.default_rng(8)
    ours = randomize_affine(nn.BatchNorm1d(4, dtype=F64), rng)
    twin = twin_with_our_weights(ours)

    for step in range(3):  # (N, C, L) input: statistics over axes 0 and 2
        x = shifted_batch(rng, step, (6, 4, 5))
        out, out_t = run_both(ours, twin, x, rng)
        assert_close(out, out_t, f"output at step {step}")
        assert_gradients_match(ours, twin)
        assert_states_match(ours, twin)


# --- Embedding front-ends ------------------------------------------------------------------------


def test_embedding_front_end_matches_torch_including_repeated_indices():
    rng = np.random.default_rng(9)
    ours = nn.Sequential(
        nn.Embedding(10, 4, dtype=F64, rng=rng), nn.Flatten(), linear(rng, 12, 6), nn.GELU(),
        linear(rng, 6, 3),
    )
    twin = twin_with_our_weights(ours)
    tokens = rng.integers(0, 10, size=(BATCH, 3))  # 48 draws from 10 rows: many repeats
    tokens[0] = [7, 7, 7]

    out, out_t = run_both(ours, twin, tokens, rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin)


def test_embedding_feeding_layer_norm_and_residual_matches_torch():
    rng = np.random.default_rng(10)
    ours = randomize_affine(nn.Sequential(
        nn.Embedding(7, 6, dtype=F64, rng=rng),
        nn.Residual(nn.Sequential(nn.LayerNorm(6, dtype=F64), linear(rng, 6, 6), nn.Tanh())),
        linear(rng, 6, 2),
    ), rng)
    twin = twin_with_our_weights(ours)
    tokens = rng.integers(0, 7, size=(4, 5))  # (batch, sequence) -> (4, 5, 6) embeddings

    out, out_t = run_both(ours, twin, tokens, rng)

    assert_close(out, out_t, "output")
    assert_gradients_match(ours, twin)


# --- losses --------------------------------------------------------------------------------------

CLASSES = 4


def float_target(rng):
    return rng.standard_normal((BATCH, CLASSES))


def class_target(rng):
    return rng.integers(0, CLASSES, size=BATCH)


def binary_target(rng):
    return rng.integers(0, 2, size=(BATCH, CLASSES)).astype(F64)


def soft_target(rng):
    return rng.uniform(0.0, 1.0, size=(BATCH, CLASSES))


POS_WEIGHT = np.array([0.5, 1.0, 2.0, 4.0])


def loss_case(name, ours, theirs, target, reductions=("mean", "sum", "none")):
    return [pytest.param(ours, theirs, target, reduction, id=f"{name}-{reduction}")
            for reduction in reductions]


LOSSES = [
    *loss_case("mse", F.mse_loss, torch.nn.functional.mse_loss, float_target),
    *loss_case("l1", F.l1_loss, torch.nn.functional.l1_loss, float_target),
    *loss_case("cross-entropy", F.cross_entropy, torch.nn.functional.cross_entropy,
               class_target),
    *loss_case(
        "cross-entropy-label-smoothing-0.1",
        lambda x, t, reduction: F.cross_entropy(x, t, reduction, label_smoothing=0.1),
        lambda x, t, reduction: torch.nn.functional.cross_entropy(
            x, t, reduction=reduction, label_smoothing=0.1),
        class_target,
    ),
    *loss_case(
        "cross-entropy-label-smoothing-0.4",
        lambda x, t, reduction: F.cross_entropy(x, t, reduction, label_smoothing=0.4),
        lambda x, t, reduction: torch.nn.functional.cross_entropy(
            x, t, reduction=reduction, label_smoothing=0.4),
        class_target,
    ),
    *loss_case("bce-with-logits", F.binary_cross_entropy_with_logits,
               torch.nn.functional.binary_cross_entropy_with_logits, binary_target),
    *loss_case("bce-with-logits-soft-target", F.binary_cross_entropy_with_logits,
               torch.nn.functional.binary_cross_entropy_with_logits, soft_target),
    *loss_case(
        "bce-with-logits-pos-weight",
        lambda x, t, reduction: F.binary_cross_entropy_with_logits(
            x, t, reduction, pos_weight=POS_WEIGHT),
        lambda x, t, reduction: torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, reduction=reduction, pos_weight=torch.from_numpy(POS_WEIGHT)),
        binary_target,
    ),
    *loss_case(
        "bce-with-logits-pos-weight-soft-target",
        lambda x, t, reduction: F.binary_cross_entropy_with_logits(
            x, t, reduction, pos_weight=POS_WEIGHT),
        lambda x, t, reduction: torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, reduction=reduction, pos_weight=torch.from_numpy(POS_WEIGHT)),
        soft_target,
    ),
    *loss_case(
        "nll-after-log-softmax",
        lambda x, t, reduction: F.nll_loss(F.log_softmax(x, -1), t, reduction),
        lambda x, t, reduction: torch.nn.functional.nll_loss(
            torch.nn.functional.log_softmax(x, -1), t, reduction=reduction),
        class_target,
    ),
]


@pytest.mark.parametrize("our_loss, torch_loss, make_target, reduction", LOSSES)
def test_each_loss_matches_torch_value_and_parameter_gradients(
    our_loss, torch_loss, make_target, reduction
):
    rng = np.random.default_rng(11)
    ours = nn.Sequential(linear(rng, 5, 8), nn.Tanh(), linear(rng, 8, CLASSES))
    twin = twin_with_our_weights(ours)
    x = random_input(rng, (BATCH, 5))
    target = make_target(rng)
    weights = rng.standard_normal(BATCH if target.ndim == 1 else (BATCH, CLASSES))

    loss = our_loss(ours(Tensor(x)), target, reduction=reduction)
    loss_t = torch_loss(twin(torch.from_numpy(x)), torch.from_numpy(target), reduction=reduction)
    # reduction="none" gives one loss per element; weight them so the gradient is generic.
    (loss if reduction != "none" else (loss * weights).sum()).backward()
    (loss_t if reduction != "none" else (loss_t * torch.from_numpy(weights)).sum()).backward()

    assert loss.shape == tuple(loss_t.shape)
    assert loss.dtype == np.float64
    assert_close(loss, loss_t, "loss")
    assert_gradients_match(ours, twin)
