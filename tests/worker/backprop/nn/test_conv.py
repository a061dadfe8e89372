"""Convolution and pooling agree with torch.nn and with finite differences.

Every combination of stride {1, 2} x padding {0, 1, "same" (stride 1 only, as torch allows)}
x dilation {1, 2} x groups {1, 2} x bias is run through our module and torch's, in float64,
with the same weights (loaded through state_dict, strict) and the same upstream gradient:
outputs, input gradients and parameter gradients agree to 1e-9 of the largest value compared.
Pooling is swept the same way over its own arguments. The kernels are not square and
"same" padding of an even kernel is uneven, so a transposed axis or a padding put on the wrong
side cannot pass.
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.backprop.gradcheck import gradcheck, gradgradcheck
from worker.backprop.nn import functional as F
from worker.backprop.tensor import Tensor

from .test_layers_vs_torch import twin_with_our_weights

F64 = np.float64
RELATIVE = 1e-9  # of the largest entry compared: room for summation order, not for a bug


def assert_matches(ours, theirs, name: str) -> None:
    ours = ours.data if isinstance(ours, Tensor) else np.asarray(ours)
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape, f"{name}: shape {ours.shape} != torch's {theirs.shape}"
    scale = max(float(np.abs(theirs).max(initial=0.0)), 1e-300)
    error = float(np.abs(ours - theirs).max(initial=0.0))
    assert error <= RELATIVE * scale, f"{name}: max error {error:.3g} vs largest {scale:.3g}"


def run_against_torch(ours: nn.Module, x: np.ndarray, seed: int = 0,
                      twin: torch.nn.Module | None = None) -> None:
    """Forward and backward the same input and upstream gradient through ours and torch's
    twin (by default a new one with our weights); compare the output, the input gradient and
    every parameter gradient."""
    twin = twin_with_our_weights(ours) if twin is None else twin
    x_ours = Tensor(x, requires_grad=True)
    x_torch = torch.from_numpy(x.copy()).requires_grad_(True)
    out = ours(x_ours)
    out_torch = twin(x_torch)
    assert_matches(out, out_torch, "output")
    probe = np.random.default_rng(seed).standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_torch * torch.from_numpy(probe)).sum().backward()
    assert_matches(x_ours.grad, x_torch.grad, "input gradient")
    theirs = dict(twin.named_parameters())
    for name, parameter in ours.named_parameters():
        assert_matches(parameter.grad, theirs[name].grad, f"{name} gradient")


def conv_settings(spatial: int):
    """Every stride x padding x dilation x groups x bias combination torch accepts."""
    for stride, padding, dilation, groups, bias in itertools.product(
            (1, 2), (0, 1, "same"), (1, 2), (1, 2), (True, False)):
        if padding == "same" and stride != 1:
            continue  # torch refuses "same" for strided convolutions (tested below)
        yield pytest.param(stride, padding, dilation, groups, bias,
                           id=f"{spatial}d-s{stride}-p{padding}-d{dilation}-g{groups}-"
                              f"{'bias' if bias else 'nobias'}")


# --- Conv2d and Conv1d against torch -------------------------------------------------------------


@pytest.mark.parametrize("stride, padding, dilation, groups, bias", conv_settings(2))
def test_conv2d_matches_torch_outputs_and_every_gradient(stride, padding, dilation, groups, bias):
    rng = np.random.default_rng(0)
    # Kernel 3x2: not square, and even along W, so "same" pads W unevenly (1 left... 0 right
    # when dilated by 1; torch puts the extra column on the right).
    conv = nn.Conv2d(4, 6, (3, 2), stride, padding, dilation, groups, bias, dtype=F64, rng=rng)

    run_against_torch(conv, rng.standard_normal((2, 4, 7, 8)))


@pytest.mark.parametrize("stride, padding, dilation, groups, bias", conv_settings(1))
def test_conv1d_matches_torch_outputs_and_every_gradient(stride, padding, dilation, groups, bias):
    rng = np.random.default_rng(1)
    conv = nn.Conv1d(4, 6, 4, stride, padding, dilation, groups, bias, dtype=F64, rng=rng)

    run_against_torch(conv, rng.standard_normal((3, 4, 11)))


def test_rectangular_stride_padding_and_dilation_match_torch():
    rng = np.random.default_rng(2)
    conv = nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2), dtype=F64,
                     rng=rng)

    run_against_torch(conv, rng.standard_normal((2, 3, 7, 6)))


def test_depthwise_convolution_with_groups_equal_to_channels_matches_torch():
    rng = np.random.default_rng(3)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4, dtype=F64, rng=rng)

    run_against_torch(conv, rng.standard_normal((2, 4, 5, 5)))


@pytest.mark.parametrize("layer, shape", [
    pytest.param(lambda rng: nn.Conv2d(3, 5, 3, padding=1, dtype=F64, rng=rng), (3, 6, 5),
                 id="conv2d-chw"),
    pytest.param(lambda rng: nn.Conv1d(3, 5, 3, stride=2, dtype=F64, rng=rng), (3, 9),
                 id="conv1d-cl"),
    pytest.param(lambda rng: nn.MaxPool2d(2), (3, 6, 5), id="max-pool-chw"),
    pytest.param(lambda rng: nn.AvgPool2d(3, 2, 1), (3, 6, 5), id="avg-pool-chw"),
])
def test_unbatched_input_matches_torch(layer, shape):
    rng = np.random.default_rng(4)

    run_against_torch(layer(rng), rng.standard_normal(shape))


def test_functional_forms_take_torchs_argument_names():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((4, 1, 3, 3)), np.ones(4)

    ours = F.conv2d(input=Tensor(x), weight=Tensor(w), bias=Tensor(b), stride=1, padding="same",
                    dilation=1, groups=2)
    theirs = torch.nn.functional.conv2d(input=torch.from_numpy(x), weight=torch.from_numpy(w),
                                        bias=torch.from_numpy(b), stride=1, padding="same",
                                        dilation=1, groups=2)
    assert_matches(ours, theirs, "conv2d")
    pooled = F.max_pool2d(input=ours, kernel_size=2, stride=None, padding=0, dilation=1,
                          ceil_mode=True)
    assert_matches(pooled, torch.nn.functional.max_pool2d(theirs, 2, ceil_mode=True), "pool")
    averaged = F.avg_pool2d(input=ours, kernel_size=3, stride=2, padding=1, ceil_mode=False,
                            count_include_pad=False, divisor_override=None)
    assert_matches(averaged, torch.nn.functional.avg_pool2d(
        theirs, 3, 2, 1, count_include_pad=False), "avg pool")
    adaptive = F.adaptive_avg_pool2d(input=ours, output_size=(4, None))
    assert_matches(adaptive, torch.nn.functional.adaptive_avg_pool2d(theirs, (4, None)),
                   "adaptive")


@pytest.mark.parametrize("stride, padding, output_padding, dilation, groups", [
    (1, 0, 0, 1, 1), (2, 1, 1, 1, 2), (2, 0, 1, 2, 1), (1, 1, 0, 2, 2), (2, 1, 0, 1, 1),
])
def test_conv_transpose2d_matches_torch(stride, padding, output_padding, dilation, groups):
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((2, 4, 4, 5)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 2)), requires_grad=True)
    b = Tensor(rng.standard_normal(3 * groups), requires_grad=True)
    xt, wt, bt = (torch.from_numpy(t.data.copy()).requires_grad_(True) for t in (x, w, b))

    out = F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    out_t = torch.nn.functional.conv_transpose2d(xt, wt, bt, stride, padding, output_padding,
                                                 groups, dilation)
    probe = rng.standard_normal(out.shape)
    (out * probe).sum().backward()
    (out_t * torch.from_numpy(probe)).sum().backward()

    assert_matches(out, out_t, "output")
    for ours, theirs, name in ((x, xt, "input"), (w, wt, "weight"), (b, bt, "bias")):
        assert_matches(ours.grad, theirs.grad, f"{name} gradient")


# --- finite differences --------------------------------------------------------------------------


def small_conv(stride, padding, dilation, groups, bias, seed=0):
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((2, 2, 5, 6)), requires_grad=True)
    w = Tensor(rng.standard_normal((2, 2 // groups, 2, 3)), requires_grad=True)
    inputs = [x, w] + ([Tensor(rng.standard_normal(2), requires_grad=True)] if bias else [])

    def conv(x, w, b=None):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    return conv, inputs


@pytest.mark.parametrize("stride, padding, dilation, groups, bias", conv_settings(2))
def test_conv2d_gradients_match_finite_differences(stride, padding, dilation, groups, bias):
    conv, inputs = small_conv(stride, padding, dilation, groups, bias)

    gradcheck(conv, inputs)


@pytest.mark.parametrize("stride, dilation, groups", itertools.product((1, 2), (1, 2), (1, 2)))
def test_conv2d_second_derivatives_match_finite_differences(stride, dilation, groups):
    # The input gradient is a transposed convolution and the weight gradient a convolution of
    # the input with G, each an op with its own VJPs: Hessian-vector products are exact.
    conv, inputs = small_conv(stride, 1, dilation, groups, bias=True)

    gradgradcheck(conv, inputs)


def test_conv1d_first_and_second_derivatives_match_finite_differences():
    rng = np.random.default_rng(7)
    x = Tensor(rng.standard_normal((2, 2, 7)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 1, 3)), requires_grad=True)

    def conv(x, w):
        return F.conv1d(x, w, None, 2, "valid", 2, 2)

    gradcheck(conv, [x, w])
    gradgradcheck(conv, [x, w])


def distinct_values(shape, seed=0):
    """Values 0.05 apart, shuffled: no two tie, so each pooling window has one maximum."""
    size = int(np.prod(shape))
    order = np.random.default_rng(seed).permutation(size)
    return Tensor(0.05 * (order - size / 2).reshape(shape), requires_grad=True)


@pytest.mark.parametrize("pool", [
    pytest.param(lambda x: F.max_pool2d(x, 2), id="max-2x2"),
    pytest.param(lambda x: F.max_pool2d(x, 3, 2, 1, 2, True), id="max-3x3-pad-dilated-ceil"),
    pytest.param(lambda x: F.avg_pool2d(x, 3, 2, 1, True, False), id="avg-3x3-ceil-no-pad"),
    pytest.param(lambda x: F.adaptive_avg_pool2d(x, (3, 2)), id="adaptive-3x2"),
    pytest.param(lambda x: F.adaptive_avg_pool2d(x, 1), id="adaptive-global"),
])
def test_pooling_first_and_second_derivatives_match_finite_differences(pool):
    x = distinct_values((2, 2, 7, 6))

    gradcheck(pool, [x])
    gradgradcheck(pool, [x])


# --- pooling against torch -----------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, stride, padding, dilation, ceil_mode", [
    pytest.param(k, s, p, d, c, id=f"k{k}-s{s}-p{p}-d{d}-{'ceil' if c else 'floor'}")
    for k, s, p, d, c in itertools.product((2, 3), (None, 1, 2), (0, 1), (1, 2), (False, True))
])
def test_max_pool2d_matches_torch(kernel_size, stride, padding, dilation, ceil_mode):
    pool = nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)

    run_against_torch(pool, distinct_values((2, 3, 9, 8)).data)


def test_max_pool2d_gives_a_tied_windows_gradient_to_its_first_maximum_like_torch():
    # All values equal, windows overlapping: every window is a tie, broken the same way.
    pool = nn.MaxPool2d(3, stride=1, padding=1)

    run_against_torch(pool, np.zeros((1, 2, 5, 4)))


@pytest.mark.parametrize("kernel_size, stride, padding, ceil_mode, count_include_pad", [
    pytest.param(k, s, p, c, i, id=f"k{k}-s{s}-p{p}-{'ceil' if c else 'floor'}-"
                                   f"{'with' if i else 'without'}-pad")
    for k, s, p, c, i in itertools.product((2, 3), (None, 1, 2), (0, 1), (False, True),
                                           (True, False))
])
def test_avg_pool2d_matches_torch(kernel_size, stride, padding, ceil_mode, count_include_pad):
    pool = nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad)

    run_against_torch(pool, np.random.default_rng(8).standard_normal((2, 3, 9, 8)))


def test_avg_pool2d_divisor_override_matches_torch():
    pool = nn.AvgPool2d((3, 2), (2, 1), (1, 0), divisor_override=4)

    run_against_torch(pool, np.random.default_rng(9).standard_normal((2, 3, 7, 6)))


@pytest.mark.parametrize("output_size", [
    pytest.param(1, id="global"),
    pytest.param((3, 4), id="sizes-divide"),
    pytest.param((4, 3), id="uneven-overlapping-windows"),
    pytest.param((None, 5), id="keep-height"),
    pytest.param(7, id="larger-than-width"),
])
def test_adaptive_avg_pool2d_matches_torch(output_size):
    pool = nn.AdaptiveAvgPool2d(output_size)

    run_against_torch(pool, np.random.default_rng(10).standard_normal((2, 3, 6, 8)))


# --- parameters, state_dict and initialisation ---------------------------------------------------


@pytest.mark.parametrize("ours, theirs", [
    pytest.param(lambda: nn.Conv2d(4, 6, (3, 2), groups=2),
                 lambda: torch.nn.Conv2d(4, 6, (3, 2), groups=2), id="conv2d"),
    pytest.param(lambda: nn.Conv2d(3, 5, 3, bias=False),
                 lambda: torch.nn.Conv2d(3, 5, 3, bias=False), id="conv2d-no-bias"),
    pytest.param(lambda: nn.Conv1d(3, 5, 4), lambda: torch.nn.Conv1d(3, 5, 4), id="conv1d"),
])
def test_conv_state_dict_has_torchs_keys_and_shapes_and_loads_both_ways(ours, theirs):
    mine, reference = ours(), theirs().double()
    state = mine.state_dict()
    assert list(state) == list(reference.state_dict())

    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()},
                              strict=True)
    fresh = ours()
    fresh.load_state_dict(reference.state_dict(), strict=True)

    for key, value in state.items():
        np.testing.assert_array_equal(fresh.state_dict()[key], value, err_msg=key)


def test_conv_initialisation_is_torchs_uniform_bound_one_over_sqrt_fan_in():
    # kaiming_uniform(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias likewise.
    conv = nn.Conv2d(8, 64, (3, 5), groups=2, rng=np.random.default_rng(11))
    bound = 1.0 / np.sqrt(4 * 3 * 5)  # fan_in = in_channels / groups * kh * kw

    for values in (conv.weight.data, conv.bias.data):
        assert np.abs(values).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.99 * bound  # 3840 draws fill the interval
    assert abs(conv.weight.data.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert conv.weight.dtype == np.float32


def test_conv_weights_are_reproducible_from_the_engine_seed():
    nn.init.manual_seed(3)
    first = nn.Conv2d(2, 3, 3).weight.data.copy()
    nn.init.manual_seed(3)

    np.testing.assert_array_equal(nn.Conv2d(2, 3, 3).weight.data, first)


# --- errors name the problem ---------------------------------------------------------------------


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda: nn.Conv2d(3, 4, 3)(Tensor(np.zeros((1, 2, 5, 5)))),
                 "input has 2 channels", id="channels"),
    pytest.param(lambda: nn.Conv2d(3, 4, 7)(Tensor(np.zeros((1, 3, 5, 5)))),
                 "smaller than the kernel", id="kernel-larger-than-input"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, stride=2, padding="same"),
                 "not supported for strided", id="same-with-stride"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, groups=2), "divisible by groups", id="groups"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding_mode="reflect"), "only 'zeros'",
                 id="padding-mode"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3)(Tensor(np.zeros((3, 5)))), "(N, C, H, W)",
                 id="conv2d-rank"),
    pytest.param(lambda: F.conv2d(Tensor(np.zeros((1, 2, 5, 5))), Tensor(np.zeros((2, 2, 3, 3))),
                                  padding="full"), "padding must be", id="padding-word"),
    pytest.param(lambda: F.max_pool2d(Tensor(np.zeros((1, 1, 4, 4))), 2, padding=2),
                 "at most half the kernel", id="pool-padding"),
    pytest.param(lambda: F.max_pool2d(Tensor(np.zeros((1, 1, 2, 2))), 3),
                 "too small for kernel", id="pool-too-small"),
    pytest.param(lambda: F.adaptive_avg_pool2d(Tensor(np.zeros((1, 1, 4, 4))), 0),
                 "positive int", id="adaptive-size"),
])
def test_bad_arguments_raise_a_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_same_padding_keeps_the_spatial_size_for_even_and_odd_kernels():
    x = Tensor(np.zeros((1, 2, 7, 6), dtype=np.float32))

    for kernel, dilation in (((3, 4), 1), ((2, 5), 2)):
        out = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation)(x)
        assert out.shape == (1, 3, 7, 6)


def test_conv2d_allocates_its_output_and_a_bounded_workspace_not_the_whole_im2col_matrix(
    monkeypatch,
):
    # LeNet's first layer: the whole im2col matrix (25 values per output position) would be
    # 5 MB, four times the 1.2 MB output; the workspace is at most 1 MiB of whole samples (on
    # one thread; each thread has its own).
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    conv = nn.Conv2d(1, 6, 5, padding=2)
    x = Tensor(np.random.default_rng(12).standard_normal((64, 1, 28, 28)).astype(np.float32))
    output_bytes = 64 * 6 * 28 * 28 * 4

    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    conv(x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert peak - base <= output_bytes + 2**20 + 300_000  # + a padded chunk of the input


def cnn_step(threads: str, monkeypatch) -> list[np.ndarray]:
    """A small CNN's output, input gradient and parameter gradients, float32."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
    rng = np.random.default_rng(13)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, rng=rng), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, rng=rng), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5, rng=rng),
    )
    x = Tensor(rng.standard_normal((10, 3, 14, 14)).astype(np.float32), requires_grad=True)
    out = model(x)
    out.backward(rng.standard_normal(out.shape).astype(np.float32))
    return [out.data, x.grad] + [p.grad for p in model.parameters()]


def test_a_cnn_step_gives_the_same_bits_on_one_thread_and_on_two(monkeypatch):
    # The kernels split the batch into blocks fixed by its size, so the thread count cannot
    # change a sum's grouping: the distributed runtime's same-bits guarantee holds.
    one, two = cnn_step("1", monkeypatch), cnn_step("2", monkeypatch)

    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
