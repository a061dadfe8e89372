"""From a job spec to engine objects: models with torch's keys and inferred sizes, losses whose
"sum" form adds up to the batch mean, optimizer hyperparameters and schedules, and a SpecError
naming the field for every inconsistency."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from chainrule.spec_file import SpecError, load_job_spec
from chainrule.v1 import job_pb2
from scheduler.datasets import load_builtin, split_and_standardize
from worker.backprop import Tensor, optim
from worker.model_builder import (
    LAYER_KINDS,
    build_clipping,
    build_loss,
    build_model,
    build_optimizer,
    build_schedule,
    check_model_fits_data,
    count_parameters,
    output_features,
    output_shape,
    resolve_dtype,
)

DIGITS_YAML = """
name: digits-mlp
model: {layers: [{linear: {out_features: 128}}, {relu: {}}, {dropout: {p: 0.1}}, {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adamw: {lr: 0.001, weight_decay: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 128, epochs: 20, validation_fraction: 0.2}
resources: {workers: 2, parameter_servers: 2}
seed: 0
"""  # noqa: E501 - the issue's example, verbatim


def spec(text: str) -> job_pb2.JobSpec:
    return load_job_spec(text)


def model_spec(layers: str) -> job_pb2.ModelSpec:
    return spec(f"model: {{layers: {layers}}}").model


@contextmanager
def raises_at(path: str, *fragments: str):
    """pytest.raises(SpecError) that also checks the field path and message fragments."""
    with pytest.raises(SpecError) as info:
        yield info
    assert info.value.field_path == path, str(info.value)
    for fragment in fragments:
        assert fragment in info.value.message, str(info.value)


# --- the digits model ----------------------------------------------------------------------


def test_digits_spec_builds_a_model_with_torch_state_dict_keys():
    job = spec(DIGITS_YAML)
    model = build_model(job.model, (64,), np.float32, seed=0)
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert state["0.weight"].shape == (128, 64) and state["3.weight"].shape == (10, 128)
    assert all(value.dtype == np.float32 for value in state.values())
    assert model.num_parameters() == count_parameters(job.model, (64,)) == 64 * 128 + 128 + 1290
    assert output_features(job.model, (64,)) == 10


def test_digits_model_computes_what_torch_computes_with_the_same_weights():
    torch = pytest.importorskip("torch")
    job = spec(DIGITS_YAML)
    model = build_model(job.model, (64,), np.float64, seed=0).eval()
    reference = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.1), torch.nn.Linear(128, 10)).double()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    reference.eval()
    x = np.random.default_rng(0).normal(size=(5, 64))
    np.testing.assert_allclose(model(Tensor(x)).data,
                               reference(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)


def test_same_seed_same_initial_weights_and_another_seed_differs():
    job = spec(DIGITS_YAML)
    a, b, c = (build_model(job.model, (64,), seed=s).state_dict() for s in (5, 5, 6))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_digits_job_fits_the_digits_data():
    job = spec(DIGITS_YAML)
    data = split_and_standardize(load_builtin("sklearn:digits"), 0.2, True, 0)
    check_model_fits_data(job, data.feature_shape, task=data.task, num_classes=data.num_classes,
                          input_dtype=data.x.dtype)


# --- every layer kind ------------------------------------------------------------------------

# kind -> (layers, input shape, input dtype, expected output shape)
LAYER_CASES = {
    "linear": ("[{linear: {out_features: 3, bias: false}}]", (5,), np.float32, (3,)),
    "relu": ("[{relu: {}}]", (5,), np.float32, (5,)),
    "tanh": ("[{tanh: {}}]", (5,), np.float32, (5,)),
    "sigmoid": ("[{sigmoid: {}}]", (5,), np.float32, (5,)),
    "gelu": ("[{gelu: {approximate: tanh}}]", (5,), np.float32, (5,)),
    "silu": ("[{silu: {}}]", (5,), np.float32, (5,)),
    "leaky_relu": ("[{leaky_relu: {negative_slope: 0.2}}]", (5,), np.float32, (5,)),
    "dropout": ("[{dropout: {p: 0.3}}]", (5,), np.float32, (5,)),
    "batch_norm": ("[{batch_norm: {eps: 0.001, momentum: 0.2}}]", (5,), np.float32, (5,)),
    "layer_norm": ("[{layer_norm: {}}]", (4, 5), np.float32, (4, 5)),
    "embedding": ("[{embedding: {num_embeddings: 7, embedding_dim: 3}}]", (4,), np.int64, (4, 3)),
    "residual": ("[{residual: {layers: [{linear: {out_features: 8}}, {relu: {}}, "
                 "{linear: {out_features: 5}}]}}]", (5,), np.float32, (5,)),
    "lstm": ("[{lstm: {hidden_size: 6, num_layers: 2, dropout: 0.1}}]", (4, 5), np.float32,
             (4, 6)),
    "gru": ("[{gru: {hidden_size: 6, bidirectional: true}}]", (4, 5), np.float32, (4, 12)),
    "rnn": ("[{rnn: {hidden_size: 6, nonlinearity: relu}}]", (4, 5), np.float32, (4, 6)),
    "last_step": ("[{last_step: {}}]", (4, 5), np.float32, (5,)),
    "flatten": ("[{flatten: {}}]", (4, 5), np.float32, (20,)),
    "conv1d": ("[{conv1d: {out_channels: 4, kernel_size: 3, padding: same}}]", (2, 9),
               np.float32, (4, 9)),
    "conv2d": ("[{conv2d: {out_channels: 4, kernel_size: 3, stride: 2}}]", (2, 9, 9),
               np.float32, (4, 4, 4)),
    "max_pool2d": ("[{max_pool2d: {kernel_size: 2}}]", (2, 9, 9), np.float32, (2, 4, 4)),
    "avg_pool2d": ("[{avg_pool2d: {kernel_size: 3, stride: 2, padding: 1}}]", (2, 9, 9),
                   np.float32, (2, 5, 5)),
    "adaptive_avg_pool2d": ("[{adaptive_avg_pool2d: {output_size: 1}}]", (2, 9, 9), np.float32,
                            (2, 1, 1)),
    "batch_norm2d": ("[{batch_norm2d: {momentum: 0.2}}]", (2, 3, 3), np.float32, (2, 3, 3)),
    "dropout2d": ("[{dropout2d: {p: 0.2}}]", (2, 3, 3), np.float32, (2, 3, 3)),
    "multihead_attention": ("[{multihead_attention: {num_heads: 2}}]", (4, 6), np.float32,
                            (4, 6)),
    "transformer_encoder_layer": ("[{transformer_encoder_layer: {nhead: 2, dim_feedforward: 8}}]",
                                  (4, 6), np.float32, (4, 6)),
    "positional_embedding": ("[{positional_embedding: {num_positions: 9}}]", (4, 6), np.float32,
                             (4, 6)),
    "mean_pool": ("[{mean_pool: {}}]", (4, 6), np.float32, (6,)),
}


def test_every_layer_kind_has_a_case():
    assert set(LAYER_CASES) == set(LAYER_KINDS)
    kinds = job_pb2.Layer.DESCRIPTOR.oneofs_by_name["kind"].fields
    assert set(LAYER_KINDS) == {field.name for field in kinds}


@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_every_layer_kind_builds_runs_and_counts_its_parameters(kind):
    layers, shape, dtype, expected = LAYER_CASES[kind]
    spec_model = model_spec(layers)
    model = build_model(spec_model, shape, np.float32, seed=0, input_dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, size=(3, *shape)) if dtype == np.int64 else rng.normal(
        size=(3, *shape)).astype(np.float32)
    out = model(Tensor(x))
    assert out.shape == (3, *expected)
    assert output_shape(spec_model, shape, dtype) == expected
    assert model.num_parameters() == count_parameters(spec_model, shape, dtype)
    if model.num_parameters():
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_recurrent_layers_keep_torch_parameter_names_and_leave_dropout_to_the_engine():
    model = build_model(model_spec(LAYER_CASES["lstm"][0]), (4, 5), seed=0)
    assert list(model.state_dict())[:4] == ["0.weight_ih_l0", "0.weight_hh_l0", "0.bias_ih_l0",
                                            "0.bias_hh_l0"]
    assert model[0].batch_first and model[0].rng is None


def test_residual_block_gets_nested_torch_keys():
    model = build_model(model_spec(LAYER_CASES["residual"][0]), (5,), seed=0)
    assert list(model.state_dict()) == ["0.block.0.weight", "0.block.0.bias",
                                        "0.block.2.weight", "0.block.2.bias"]


def test_lstm_spec_on_the_parity_sequences_builds_and_runs_forward():
    job = spec("""
model: {layers: [{lstm: {hidden_size: 16}}, {last_step: {}}, {linear: {out_features: 2}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.01}}
""")
    data = split_and_standardize(load_builtin("synthetic:parity"), 0.2, True, 0)
    check_model_fits_data(job, data.feature_shape, task=data.task, num_classes=data.num_classes,
                          input_dtype=data.x.dtype)
    model = build_model(job.model, data.feature_shape, seed=0, input_dtype=data.x.dtype)
    logits = model(Tensor(data.x[:32]))
    assert logits.shape == (32, 2)
    loss = build_loss(job)(logits, data.y[:32])
    loss.backward()
    assert np.isfinite(float(loss.data))
    assert model.num_parameters() == count_parameters(job.model, data.feature_shape)


def test_embedding_gru_spec_on_token_sequences_builds_and_runs_forward():
    job = spec("""
model: {layers: [{embedding: {num_embeddings: 10, embedding_dim: 8}}, {gru: {hidden_size: 12}},
                 {last_step: {}}, {linear: {out_features: 2}}]}
loss: cross_entropy
""")
    data = load_builtin("synthetic:sequence_sum")
    model = build_model(job.model, data.feature_shape, seed=0, input_dtype=data.x.dtype)
    assert model(Tensor(data.x[:16])).shape == (16, 2)


# --- inconsistencies, each a SpecError naming the field --------------------------------------


def test_residual_block_that_changes_width_names_the_block_and_both_widths():
    layers = ("[{linear: {out_features: 64}}, {residual: {layers: [{linear: {out_features: 32}}, "
              "{relu: {}}]}}]")
    with raises_at("model.layers[1].residual", "width 64", "width 32"):
        build_model(model_spec(layers), (10,))


def test_error_inside_a_residual_block_has_the_nested_path():
    layers = "[{residual: {layers: [{relu: {}}, {linear: {out_features: 0}}]}}]"
    with raises_at("model.layers[0].residual.layers[1].linear.out_features", ">= 1"):
        count_parameters(model_spec(layers), (4,))


def test_empty_layer_is_named_by_its_index():
    model = job_pb2.ModelSpec()
    model.layers.add().linear.out_features = 4
    model.layers.add()  # no kind set
    with raises_at("model.layers[1]", "empty layer", "linear"):
        build_model(model, (3,))


def test_unknown_layer_kind_in_a_file_names_the_layer():
    with raises_at("model.layers[1]", "unknown field 'conv3d'"):
        load_job_spec("model: {layers: [{relu: {}}, {conv3d: {out_channels: 3}}]}")


def test_model_without_layers_is_rejected():
    with raises_at("model.layers", "at least one layer"):
        build_model(job_pb2.ModelSpec(), (3,))


def test_zero_out_features_is_rejected():
    with raises_at("model.layers[0].linear.out_features", "got 0"):
        build_model(model_spec("[{linear: {}}]"), (3,))


def test_embedding_on_float_features_is_rejected():
    with raises_at("model.layers[0].embedding", "integer tokens", "float"):
        count_parameters(model_spec("[{embedding: {num_embeddings: 4, embedding_dim: 2}}]"),
                         (3,), np.float32)


def test_linear_on_integer_tokens_asks_for_an_embedding():
    with raises_at("model.layers[0].linear", "embedding"):
        count_parameters(model_spec("[{linear: {out_features: 2}}]"), (3,), np.int64)


def test_last_step_without_a_sequence_is_rejected():
    with raises_at("model.layers[1].last_step", "sequence"):
        build_model(model_spec("[{linear: {out_features: 4}}, {last_step: {}}]"), (3,))


def test_recurrent_layer_on_flat_features_is_rejected():
    with raises_at("model.layers[0].lstm", "sequence"):
        build_model(model_spec("[{lstm: {hidden_size: 4}}]"), (3,))


def test_batch_norm_on_a_sequence_suggests_layer_norm():
    with raises_at("model.layers[0].batch_norm", "layer_norm"):
        build_model(model_spec("[{batch_norm: {}}]"), (4, 3))


@pytest.mark.parametrize(("layers", "path"), [
    ("[{dropout: {p: 1.0}}]", "model.layers[0].dropout.p"),
    ("[{gelu: {approximate: fast}}]", "model.layers[0].gelu.approximate"),
    ("[{layer_norm: {eps: 0}}]", "model.layers[0].layer_norm.eps"),
    ("[{flatten: {}}, {batch_norm: {momentum: 2}}]", "model.layers[1].batch_norm.momentum"),
    ("[{gru: {hidden_size: 4, nonlinearity: relu}}]", "model.layers[0].gru.nonlinearity"),
    ("[{rnn: {hidden_size: 4, nonlinearity: sigmoid}}]", "model.layers[0].rnn.nonlinearity"),
    ("[{lstm: {hidden_size: 4, dropout: 0.2}}]", "model.layers[0].lstm.dropout"),
    ("[{lstm: {}}]", "model.layers[0].lstm.hidden_size"),
])
def test_bad_layer_settings_name_the_setting(layers, path):
    with raises_at(path):
        count_parameters(model_spec(layers), (4, 3))


def test_sequence_output_is_rejected_by_output_features():
    with raises_at("model.layers", "last_step"):
        output_features(model_spec("[{lstm: {hidden_size: 4}}]"), (5, 3))


def test_output_width_must_match_the_class_count():
    job = spec(DIGITS_YAML)
    with raises_at("model.layers[3]", "10", "3 classes"):
        check_model_fits_data(job, (64,), task="classification", num_classes=3)


def test_cross_entropy_on_a_regression_set_names_the_loss():
    with raises_at("loss", "mse"):
        check_model_fits_data(spec(DIGITS_YAML), (64,), task="regression", target_shape=(10,))


def test_regression_output_must_match_target_width():
    job = spec("model: {layers: [{linear: {out_features: 2}}]}\nloss: mse")
    check_model_fits_data(job, (10,), task="regression", target_shape=(2,))
    with raises_at("model.layers[0]", "1"):
        check_model_fits_data(job, (10,), task="regression", target_shape=(1,))


def test_parameter_count_of_a_huge_model_allocates_nothing():
    layers = "[{linear: {out_features: 100000}}, {linear: {out_features: 100000}}]"
    assert count_parameters(model_spec(layers), (100000,)) == 2 * (100000 * 100000 + 100000)


# --- losses ----------------------------------------------------------------------------------


def micro_batch_gradient_sum(loss_sum, model, x, target, cuts):
    """Gradients of sum-reduced loss over micro-batches, each divided by the global batch."""
    total = [np.zeros_like(p.data, dtype=np.float64) for p in model.parameters()]
    for part in np.split(np.arange(len(x)), cuts):
        model.zero_grad()
        (loss_sum(model(Tensor(x[part])), target[part]) * (1.0 / len(x))).backward()
        total = [t + p.grad for t, p in zip(total, model.parameters())]
    return total


@pytest.mark.parametrize(("loss", "width", "labels"), [
    ("cross_entropy", 4, "classes"), ("mse", 3, "floats"), ("l1", 3, "floats"),
    ("binary_cross_entropy_with_logits", 3, "bits"), ("binary_cross_entropy_with_logits", 1,
                                                      "classes"),
])
def test_sum_reduced_loss_over_micro_batches_adds_up_to_the_batch_mean_gradient(loss, width,
                                                                               labels):
    job = spec(f"model: {{layers: [{{linear: {{out_features: {width}}}}}]}}\nloss: {loss}")
    model = build_model(job.model, (5,), np.float64, seed=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5))
    if labels == "classes":
        target = rng.integers(0, max(width, 2), size=12)
    elif labels == "bits":
        target = rng.integers(0, 2, size=(12, width)).astype(np.float64)
    else:
        target = rng.normal(size=(12, width))
    mean_loss = build_loss(job)
    model.zero_grad()
    mean_loss(model(Tensor(x)), target).backward()
    expected = [p.grad.copy() for p in model.parameters()]
    got = micro_batch_gradient_sum(build_loss(job, reduction="sum"), model, x, target, [3, 7, 8])
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-15)


def test_cross_entropy_with_label_smoothing_matches_torch():
    torch = pytest.importorskip("torch")
    job = spec("loss: cross_entropy\nlabel_smoothing: 0.1")
    logits = np.random.default_rng(0).normal(size=(6, 4))
    target = np.array([0, 1, 2, 3, 0, 1])
    ours = build_loss(job)(Tensor(logits), target)
    theirs = torch.nn.functional.cross_entropy(torch.from_numpy(logits),
                                               torch.from_numpy(target), label_smoothing=0.1)
    assert float(ours.data) == pytest.approx(float(theirs), rel=1e-12)


@pytest.mark.parametrize(("text", "path"), [
    ("name: x", "loss"),
    ("loss: hinge", "loss"),
    ("loss: mse\nlabel_smoothing: 0.1", "label_smoothing"),
    ("loss: cross_entropy\nlabel_smoothing: 1.5", "label_smoothing"),
])
def test_bad_loss_settings_name_the_field(text, path):
    with raises_at(path):
        build_loss(spec(text))


# --- optimizer ---------------------------------------------------------------------------------


def test_digits_optimizer_is_adamw_with_pytorch_defaults_for_unset_fields():
    name, hyper = build_optimizer(spec(DIGITS_YAML))
    assert name == "adamw" and name in optim.RULES
    assert hyper == optim.AdamWHyper(lr=0.001, weight_decay=0.01)
    assert hyper.betas == (0.9, 0.999) and hyper.eps == 1e-8


def test_unset_optimizer_is_adam_with_defaults():
    assert build_optimizer(job_pb2.JobSpec()) == ("adam", optim.AdamHyper())


FULL_OPTIMIZERS = {
    "sgd": ("{lr: 0.1, momentum: 0.9, dampening: 0, weight_decay: 0.001, nesterov: true, "
            "maximize: true}",
            optim.SGDHyper(0.1, 0.9, 0.0, 0.001, True, True)),
    "adam": ("{lr: 0.01, betas: [0.8, 0.9], eps: 1e-6, weight_decay: 0.1, amsgrad: true}",
             optim.AdamHyper(0.01, (0.8, 0.9), 1e-6, 0.1, True)),
    "adamw": ("{lr: 0.01, betas: [0.8, 0.9], eps: 1e-6, weight_decay: 0.0, maximize: true}",
              optim.AdamWHyper(0.01, (0.8, 0.9), 1e-6, 0.0, False, True)),
    "rmsprop": ("{lr: 0.01, alpha: 0.9, eps: 1e-6, weight_decay: 0.1, momentum: 0.5, "
                "centered: true}",
                optim.RMSpropHyper(0.01, 0.9, 1e-6, 0.1, 0.5, True)),
    "adagrad": ("{lr: 0.1, lr_decay: 0.01, weight_decay: 0.1, initial_accumulator_value: 0.5, "
                "eps: 1e-8}",
                optim.AdagradHyper(0.1, 0.01, 0.1, 0.5, 1e-8)),
    "lion": ("{lr: 0.0001, betas: [0.95, 0.98], weight_decay: 0.1}",
             optim.LionHyper(0.0001, (0.95, 0.98), 0.1)),
    "adafactor": ("{lr: 0.01, beta2_decay: -0.5, eps2: 0.01, d: 2, weight_decay: 0.1}",
                  optim.AdafactorHyper(0.01, -0.5, (None, 0.01), 2.0, 0.1)),
    "kfac": ("{lr: 0.05, momentum: 0.5, damping: 0.001, factor_decay: 0.9, "
             "factor_update_interval: 2, inverse_update_interval: 3, weight_decay: 0.0001, "
             "kl_clip: 0.001, damping_method: factored}",
             optim.KFACHyper(0.05, 0.5, 0.001, 0.9, 2, 3, 0.0001, 0.001, "factored")),
}


def test_every_optimizer_of_the_spec_has_a_case():
    oneof = job_pb2.OptimizerSpec.DESCRIPTOR.oneofs_by_name["rule"]
    assert {field.name for field in oneof.fields} == set(FULL_OPTIMIZERS)


@pytest.mark.parametrize("kind", sorted(FULL_OPTIMIZERS))
def test_every_optimizer_field_reaches_the_hyperparameters(kind):
    text, expected = FULL_OPTIMIZERS[kind]
    assert build_optimizer(spec(f"optimizer: {{{kind}: {text}}}")) == (kind, expected)


def test_kfac_intervals_of_0_and_an_empty_damping_method_take_the_defaults():
    name, hyper = build_optimizer(spec("optimizer: {kfac: {factor_update_interval: 0, "
                                       "inverse_update_interval: 0, damping_method: ''}}"))
    assert (name, hyper) == ("kfac", optim.KFACHyper())
    assert hyper.factor_update_interval == hyper.inverse_update_interval == 1
    assert hyper.damping_method == "eigen" and hyper.kl_clip is None


def test_kfac_with_clipping_by_value_is_refused_naming_the_field():
    with raises_at("clipping.max_value", "kfac"):
        build_clipping(spec("optimizer: {kfac: {}}\nclipping: {max_value: 1.0}"))
    assert build_clipping(spec("optimizer: {kfac: {}}\nclipping: {max_norm: 1.0}")).max_norm == 1


@pytest.mark.parametrize("lr", [0, -0.1])
def test_non_positive_learning_rate_names_the_lr_field(lr):
    with raises_at("optimizer.adamw.lr", "> 0"):
        build_optimizer(spec(f"optimizer: {{adamw: {{lr: {lr}}}}}"))


@pytest.mark.parametrize(("text", "path"), [
    ("{adam: {betas: [1.0, 0.999]}}", "optimizer.adam.betas[0]"),
    ("{adam: {betas: [0.9]}}", "optimizer.adam.betas"),
    ("{sgd: {lr: 0.1, nesterov: true}}", "optimizer.sgd.nesterov"),
    ("{sgd: {momentum: -1}}", "optimizer.sgd.momentum"),
    ("{adafactor: {eps1: -1}}", "optimizer.adafactor.eps1"),
    ("{adafactor: {d: 0.5}}", "optimizer.adafactor.d"),
    ("{kfac: {damping: 0}}", "optimizer.kfac.damping"),
    ("{kfac: {factor_decay: 1.0}}", "optimizer.kfac.factor_decay"),
    ("{kfac: {damping_method: exact}}", "optimizer.kfac.damping_method"),
    ("{kfac: {lr: 0}}", "optimizer.kfac.lr"),
])
def test_bad_hyperparameters_name_the_field(text, path):
    with raises_at(path):
        build_optimizer(spec(f"optimizer: {text}"))


# --- schedule, clipping, dtype -------------------------------------------------------------


def test_unset_schedule_is_constant_at_the_optimizer_lr():
    assert build_schedule(spec(DIGITS_YAML), 100) == optim.Constant(0.001)


def test_schedules_take_the_optimizer_lr_as_base():
    base = "optimizer: {sgd: {lr: 0.5}}\nschedule: "
    assert build_schedule(spec(base + "{step_decay: {step_size: 10}}"), 100) == \
        optim.StepDecay(0.5, 10, 0.1)
    assert build_schedule(spec(base + "{exponential: {gamma: 0.9}}"), 100) == \
        optim.Exponential(0.5, 0.9)
    assert build_schedule(spec(base + "{linear_warmup: {warmup_steps: 5}}"), 100) == \
        optim.LinearWarmup(0.5, 5, 0.0)
    cosine = build_schedule(spec(base + "{cosine_with_warmup: {warmup_steps: 10}}"), 200)
    assert cosine == optim.CosineWithWarmup(0.5, 10, 200)  # the job's steps by default
    assert cosine.lr_at(200) == pytest.approx(0.0)


@pytest.mark.parametrize(("schedule", "path"), [
    ("{step_decay: {}}", "schedule.step_decay.step_size"),
    ("{exponential: {}}", "schedule.exponential.gamma"),
    ("{linear_warmup: {start_factor: 2}}", "schedule.linear_warmup.start_factor"),
    ("{cosine_with_warmup: {warmup_steps: 100}}", "schedule.cosine_with_warmup.warmup_steps"),
    ("{cosine_with_warmup: {warmup_steps: 10, total_steps: 5}}",
     "schedule.cosine_with_warmup.total_steps"),
])
def test_bad_schedules_name_the_field(schedule, path):
    with raises_at(path):
        build_schedule(spec(f"schedule: {schedule}"), 100)


def test_clipping_settings_and_their_errors():
    clipping = build_clipping(spec("clipping: {max_norm: 1.0}"))
    assert clipping.max_norm == 1.0 and clipping.max_value is None
    with raises_at("clipping.max_value", "> 0"):
        build_clipping(spec("clipping: {max_value: 0}"))


def test_dtype_defaults_to_float32_and_rejects_others():
    assert resolve_dtype(job_pb2.JobSpec()) == np.float32
    assert resolve_dtype(spec("dtype: float64")) == np.float64
    with raises_at("dtype", "float16"):
        resolve_dtype(spec("dtype: float16"))
