"""Optimizers: PyTorch's trajectories, the functional core on shard slices, state round trips."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.backprop import optim
from worker.backprop.optim import RULES

STEPS = 50
SHAPES = [(4, 3), (5,), ()]  # matrix, vector, scalar


class Param:
    """The smallest thing an optimizer steps: `.data` and `.grad` ndarrays."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.grad: np.ndarray | None = None


def initial_values(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [np.array(rng.standard_normal(shape)) for shape in shapes]


class Quadratic:
    """loss = sum_k 0.5 * h_k * (p_k - c_k)^2 plus a seeded per-step noise term in the gradient.

    The gradient depends on the parameters, so an error in the state or the update compounds
    over the trajectory instead of washing out.
    """

    def __init__(self, shapes, seed=1):
        rng = np.random.default_rng(seed)
        self.curvature = [rng.uniform(0.5, 2.0, shape) for shape in shapes]
        self.centre = [rng.standard_normal(shape) for shape in shapes]
        self.noise = [[0.3 * rng.standard_normal(shape) for shape in shapes] for _ in range(STEPS)]

    def grads(self, values, step):
        return [
            np.asarray(h * (p - c) + n)
            for h, c, p, n in zip(
                self.curvature, self.centre, values, self.noise[step], strict=True
            )
        ]


def run_ours(make_optimizer, shapes, problem, steps=STEPS):
    params = [Param(v) for v in initial_values(shapes)]
    opt = make_optimizer(params)
    for step in range(steps):
        for p, g in zip(params, problem.grads([p.data for p in params], step), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def run_torch(make_optimizer, shapes, problem, steps=STEPS):
    params = [torch.nn.Parameter(torch.tensor(v)) for v in initial_values(shapes)]
    opt = make_optimizer(params)
    for step in range(steps):
        values = [p.detach().numpy() for p in params]
        for p, g in zip(params, problem.grads(values, step), strict=True):
            p.grad = torch.from_numpy(g)
        opt.step()
    return params, opt


# name -> (ours, torch's); the keyword arguments are the same for both.
PAIRS = {
    "sgd": (optim.SGD, torch.optim.SGD),
    "rmsprop": (optim.RMSprop, torch.optim.RMSprop),
    "adagrad": (optim.Adagrad, torch.optim.Adagrad),
    "adam": (optim.Adam, torch.optim.Adam),
    "adamw": (optim.AdamW, torch.optim.AdamW),
    "adafactor": (optim.Adafactor, torch.optim.Adafactor),
}

TORCH_CASES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "maximize": True}),
    ("rmsprop", {"lr": 0.01}),
    ("rmsprop", {"lr": 0.01, "centered": True, "weight_decay": 0.05}),
    ("rmsprop", {"lr": 0.01, "momentum": 0.9}),
    ("rmsprop", {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True}),
    ("adagrad", {"lr": 0.1}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "amsgrad": True}),
    ("adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("adam", {"lr": 0.01, "betas": (0.3, 0.9), "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", {"lr": 0.01}),
    ("adamw", {"lr": 0.01, "weight_decay": 0.5, "amsgrad": True}),
    ("adamw", {"lr": 0.01, "maximize": True}),
    ("adafactor", {}),
    ("adafactor", {"lr": 0.05, "weight_decay": 0.1, "d": 1.5}),
    ("adafactor", {"lr": 0.05, "eps": (1e-30, 1e-3), "beta2_decay": -0.5}),
]


def case_id(case):
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("case", TORCH_CASES, ids=[case_id(c) for c in TORCH_CASES])
def test_optimizer_follows_pytorch_trajectory_for_50_steps(case):
    name, kwargs = case
    ours_cls, torch_cls = PAIRS[name]
    # Adafactor factors every parameter of 2+ dimensions, also over leading batch axes.
    shapes = [*SHAPES, (2, 3, 4)] if name == "adafactor" else SHAPES
    problem = Quadratic(shapes)
    params, opt = run_ours(lambda ps: ours_cls(ps, **kwargs), shapes, problem)
    torch_params, torch_opt = run_torch(
        lambda ps: torch_cls(ps, **kwargs, foreach=False), shapes, problem
    )

    for p, tp in zip(params, torch_params, strict=True):
        assert p.data.shape == tp.shape
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-8)
    # The state matches too, under PyTorch's key names and in PyTorch's shapes.
    ours_state = opt.state_dict()["state"]
    for i, tp in enumerate(torch_params):
        for key, value in torch_opt.state[tp].items():
            if key == "step":
                assert ours_state[i]["step"] == int(value)
            else:
                np.testing.assert_allclose(ours_state[i][key], value.numpy(), rtol=1e-8)


def lion_reference_step(p: torch.Tensor, exp_avg: torch.Tensor, lr, betas, weight_decay):
    """lucidrains/lion-pytorch's update_fn, the paper's Algorithm 2, written in torch."""
    beta1, beta2 = betas
    grad = p.grad
    p.data.mul_(1.0 - lr * weight_decay)
    update = exp_avg.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sign_()
    p.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_lion_follows_the_papers_update_written_in_torch(weight_decay):
    lr, betas = 0.01, (0.9, 0.99)
    # Gradients that do not depend on the parameters: the sign() makes a closed loop chaotic.
    rng = np.random.default_rng(3)
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(STEPS)]

    params = [Param(v) for v in initial_values(SHAPES)]
    opt = optim.Lion(params, lr=lr, betas=betas, weight_decay=weight_decay)
    torch_params = [torch.tensor(v) for v in initial_values(SHAPES)]
    exp_avgs = [torch.zeros_like(tp) for tp in torch_params]
    for step_grads in grads:
        for p, tp, ea, g in zip(params, torch_params, exp_avgs, step_grads, strict=True):
            p.grad = g
            tp.grad = torch.from_numpy(g)
            lion_reference_step(tp, ea, lr, betas, weight_decay)
        opt.step()

    state = opt.state_dict()["state"]
    for i, (p, tp) in enumerate(zip(params, torch_params, strict=True)):
        np.testing.assert_allclose(p.data, tp.numpy(), rtol=1e-8)
        np.testing.assert_allclose(state[i]["exp_avg"], exp_avgs[i].numpy(), rtol=1e-8)


# --- the functional core -------------------------------------------------------------------------

# Hyperparameters that switch on every branch of each elementwise rule.
ELEMENTWISE = {
    "sgd": optim.SGDHyper(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "rmsprop": optim.RMSpropHyper(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
    "adagrad": optim.AdagradHyper(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "adam": optim.AdamHyper(lr=0.01, amsgrad=True, weight_decay=0.01),
    "adamw": optim.AdamWHyper(lr=0.01, amsgrad=True),
    "lion": optim.LionHyper(lr=0.01, weight_decay=0.1),
}
ALL_HYPERS = {**ELEMENTWISE, "adafactor": optim.AdafactorHyper(weight_decay=0.1)}


def random_grads(size, steps, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size) for _ in range(steps)]


def test_registry_names_every_rule_and_only_adafactor_is_not_elementwise():
    assert set(RULES) == {"sgd", "rmsprop", "adagrad", "adam", "adamw", "lion", "adafactor"}
    assert {name for name, rule in RULES.items() if not rule.elementwise} == {"adafactor"}
    for name, rule in RULES.items():
        assert rule.name == name
        assert isinstance(rule.hyper_type(), rule.hyper_type)  # every field has a default


@pytest.mark.parametrize("name", sorted(ALL_HYPERS))
def test_step_updates_params_and_state_in_place_and_never_writes_grads(name):
    rule, hyper = RULES[name], ALL_HYPERS[name]
    big = np.random.default_rng(0).standard_normal(20)
    params = big[5:15]  # a view, as a PS shard's slice of the flat vector
    state = rule.init_state(params, hyper)
    arrays_before = {k: v for k, v in state.items()}
    before = params.copy()
    for t, g in enumerate(random_grads(10, 3), start=1):
        g_before = g.copy()
        out_params, out_state = rule.step(params, g, state, hyper, t)
        assert out_params is params and out_state is state
        assert np.array_equal(g, g_before)
    assert all(state[k] is v for k, v in arrays_before.items())
    assert not np.array_equal(big[5:15], before)  # the update landed in the big vector
    assert np.array_equal(big[:5], np.random.default_rng(0).standard_normal(20)[:5])


@pytest.mark.parametrize("name", sorted(ALL_HYPERS))
def test_float32_params_stay_float32(name):
    rule, hyper = RULES[name], ALL_HYPERS[name]
    params = np.ones(8, dtype=np.float32)
    state = rule.init_state(params, hyper)
    rule.step(params, np.full(8, 0.5, dtype=np.float32), state, hyper, 1)
    assert params.dtype == np.float32
    assert all(v.dtype == np.float32 for v in state.values())


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=299), max_size=5, unique=True))
def test_stepping_contiguous_slices_equals_stepping_the_whole_vector_bitwise(name, cuts):
    rule, hyper = RULES[name], ELEMENTWISE[name]
    size = 300
    whole = np.random.default_rng(1).standard_normal(size)
    sliced = whole.copy()
    bounds = [0, *sorted(cuts), size]
    whole_state = rule.init_state(whole, hyper)
    slice_states = [rule.init_state(sliced[a:b], hyper) for a, b in zip(bounds, bounds[1:])]
    for t, g in enumerate(random_grads(size, 8), start=1):
        rule.step(whole, g, whole_state, hyper, t)
        for (a, b), state in zip(zip(bounds, bounds[1:]), slice_states, strict=True):
            rule.step(sliced[a:b], g[a:b], state, hyper, t)

    assert np.array_equal(whole, sliced)
    for key, value in whole_state.items():
        assert np.array_equal(value, np.concatenate([s[key] for s in slice_states]))


@pytest.mark.parametrize("name", sorted(ALL_HYPERS))
def test_class_and_functional_core_agree_bitwise(name):
    rule, hyper = RULES[name], ALL_HYPERS[name]
    values = initial_values([(4, 3), (6,), ()], seed=2)
    params = [Param(v.copy()) for v in values]
    opt = type_for(name)(params, **dataclasses.asdict(hyper))
    flats = [v.reshape(-1).copy() for v in values]
    # Adafactor's class passes each parameter's shape; a PS shard does so by keyword too.
    shape_kw = [{"shape": v.shape} if name == "adafactor" else {} for v in values]
    states = [rule.init_state(f, hyper, **kw) for f, kw in zip(flats, shape_kw, strict=True)]
    rng = np.random.default_rng(4)
    for t in range(1, 11):
        for p, f, s, kw in zip(params, flats, states, shape_kw, strict=True):
            p.grad = rng.standard_normal(p.data.shape)
            rule.step(f, p.grad.reshape(-1), s, hyper, t, **kw)
        opt.step()
    for p, f in zip(params, flats, strict=True):
        assert np.array_equal(p.data.reshape(-1), f)


def type_for(name):
    return {
        "sgd": optim.SGD,
        "rmsprop": optim.RMSprop,
        "adagrad": optim.Adagrad,
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "lion": optim.Lion,
        "adafactor": optim.Adafactor,
    }[name]


def test_adafactor_keeps_factored_state_only_for_matrices():
    hyper = optim.AdafactorHyper()
    flat = np.zeros(12)
    assert set(optim.adafactor_init_state(flat, hyper)) == {"variance"}
    factored = optim.adafactor_init_state(flat, hyper, shape=(4, 3))
    assert {k: v.shape for k, v in factored.items()} == {"row_var": (4, 1), "col_var": (1, 3)}
    with pytest.raises(ValueError, match="does not hold 12 elements"):
        optim.adafactor_init_state(flat, hyper, shape=(5, 3))


def test_flat_core_rejects_bad_arrays_step_counts_and_hyperparameter_types():
    hyper = optim.AdamHyper()
    state = optim.adam_init_state(np.zeros(4), hyper)
    with pytest.raises(ValueError, match="flat 1-D"):
        optim.adam_step(np.zeros((2, 2)), np.zeros((2, 2)), state, hyper, 1)
    with pytest.raises(ValueError, match="does not match"):
        optim.adam_step(np.zeros(4), np.zeros(3), state, hyper, 1)
    with pytest.raises(ValueError, match="1-based"):
        optim.adam_step(np.zeros(4), np.zeros(4), state, hyper, 0)
    with pytest.raises(TypeError, match="expected AdamHyper, got AdamWHyper"):
        optim.adam_step(np.zeros(4), np.zeros(4), state, optim.AdamWHyper(), 1)


# --- the classes ---------------------------------------------------------------------------------


def test_parameters_without_grad_are_skipped_and_get_no_state():
    a, b = Param(np.ones(3)), Param(np.ones(2))
    opt = optim.Adam([a, b], lr=0.1)
    a.grad = np.ones(3)
    opt.step()
    assert np.array_equal(b.data, np.ones(2))
    assert set(opt.state_dict()["state"]) == {0}
    assert not np.array_equal(a.data, np.ones(3))


def test_zero_grad_sets_grad_to_none():
    params = [Param(np.ones(3)), Param(np.ones(2))]
    for p in params:
        p.grad = np.ones_like(p.data)
    opt = optim.SGD(params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_non_contiguous_parameter_is_updated_like_a_contiguous_one():
    values = np.arange(12.0).reshape(3, 4)
    transposed = Param(values.copy().T)  # a Fortran-ordered view
    contiguous = Param(np.ascontiguousarray(values.T))
    assert not transposed.data.flags.c_contiguous
    opts = [optim.Adam([p], lr=0.1) for p in (transposed, contiguous)]
    for _ in range(3):
        for p, opt in zip((transposed, contiguous), opts, strict=True):
            p.grad = np.cos(p.data)
            opt.step()
    assert np.array_equal(transposed.data, contiguous.data)


def test_setting_lr_changes_the_next_step_and_is_validated():
    p = Param(np.zeros(2))
    opt = optim.SGD([p], lr=0.1)
    opt.lr = 0.5
    p.grad = np.ones(2)
    opt.step()
    assert np.array_equal(p.data, [-0.5, -0.5])
    assert opt.hyper.lr == 0.5
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0


@pytest.mark.parametrize("name", sorted(ALL_HYPERS))
def test_state_dict_round_trip_resumes_identically(name):
    hyper = ALL_HYPERS[name]
    rng = np.random.default_rng(6)
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(20)]

    def make(values):
        params = [Param(v.copy()) for v in values]
        return params, type_for(name)(params, **dataclasses.asdict(hyper))

    params, opt = make(initial_values(SHAPES))
    for step_grads in grads[:10]:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    saved = opt.state_dict()
    assert_plain(saved)

    resumed_params, resumed = make([p.data for p in params])
    resumed.load_state_dict(saved)
    for step_grads in grads[10:]:
        for p, q, g in zip(params, resumed_params, step_grads, strict=True):
            p.grad, q.grad = g, g.copy()
        opt.step()
        resumed.step()
    for p, q in zip(params, resumed_params, strict=True):
        assert np.array_equal(p.data, q.data)
    # A snapshot: stepping after state_dict() did not change what was saved.
    assert saved["state"][0]["step"] == 10


def assert_plain(value):
    """Only dicts, lists, tuples, numbers, bools, None, strings and ndarrays: no pickle needed."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, int | str)
            assert_plain(v)
    elif isinstance(value, list | tuple):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or isinstance(value, int | float | bool | str | np.ndarray)


def test_load_state_dict_rejects_state_of_another_optimizer():
    params = [Param(np.ones(3))]
    adam = optim.Adam(params)
    params[0].grad = np.ones(3)
    adam.step()
    sgd = optim.SGD([Param(np.ones(3))], momentum=0.9)
    with pytest.raises(ValueError, match="SGDHyper"):
        sgd.load_state_dict(adam.state_dict())
    other = optim.Adam([Param(np.ones(4))])
    with pytest.raises(ValueError, match="3 elements, expected 4"):
        other.load_state_dict(adam.state_dict())
    assert other.state == {}


def test_optimizer_rejects_empty_or_duplicated_parameter_lists():
    with pytest.raises(ValueError, match="empty"):
        optim.Adam([])
    p = Param(np.ones(2))
    with pytest.raises(ValueError, match="more than once"):
        optim.Adam([p, p])


BAD_HYPERS = [
    (optim.SGDHyper, {"lr": -0.1}, "lr", "-0.1"),
    (optim.SGDHyper, {"momentum": -0.5}, "momentum", "-0.5"),
    (optim.SGDHyper, {"nesterov": True}, "nesterov", "True"),
    (optim.SGDHyper, {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov", "True"),
    (optim.RMSpropHyper, {"eps": -1e-8}, "eps", "-1e-08"),
    (optim.RMSpropHyper, {"alpha": -0.1}, "alpha", "-0.1"),
    (optim.AdagradHyper, {"lr_decay": -1.0}, "lr_decay", "-1.0"),
    (optim.AdamHyper, {"lr": float("nan")}, "lr", "nan"),
    (optim.AdamHyper, {"betas": (1.0, 0.999)}, r"betas\[0\]", "1.0"),
    (optim.AdamHyper, {"betas": (0.9, -0.1)}, r"betas\[1\]", "-0.1"),
    (optim.AdamHyper, {"eps": -1.0}, "eps", "-1.0"),
    (optim.AdamWHyper, {"weight_decay": -0.01}, "weight_decay", "-0.01"),
    (optim.LionHyper, {"betas": (0.9, 1.5)}, r"betas\[1\]", "1.5"),
    (optim.LionHyper, {"betas": (0.9,)}, "betas", r"\(0.9,\)"),
    (optim.AdafactorHyper, {"eps": (None, -1.0)}, r"eps\[1\]", "-1.0"),
    (optim.AdafactorHyper, {"eps": (-1.0, 1e-3)}, r"eps\[0\]", "-1.0"),
    (optim.AdafactorHyper, {"beta2_decay": 0.5}, "beta2_decay", "0.5"),
    (optim.AdafactorHyper, {"d": 0.5}, "d", "0.5"),
]


@pytest.mark.parametrize(
    "hyper_type, kwargs, field, value",
    BAD_HYPERS,
    ids=[f"{h.__name__}-{k}" for h, k, _, _ in BAD_HYPERS],
)
def test_bad_hyperparameters_raise_value_error_naming_field_and_value(
    hyper_type, kwargs, field, value
):
    with pytest.raises(ValueError, match=rf"{hyper_type.__name__}\.{field} .*got {value}"):
        hyper_type(**kwargs)


def test_optimizer_class_validates_through_its_hyperparameters():
    with pytest.raises(ValueError, match=r"AdamHyper\.lr must be >= 0, got -1"):
        optim.Adam([Param(np.ones(2))], lr=-1)


def test_betas_from_json_lists_are_stored_as_tuples():
    hyper = optim.AdamHyper(betas=[0.8, 0.9])
    assert hyper.betas == (0.8, 0.9)
    hash(hyper)
