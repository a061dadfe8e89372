"""What a spec means, resolved once: every default decided, every count derived from the data
set's shape, and a SpecError naming the field for anything the job could not run with."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from chainrule.v1 import job_pb2
from scheduler.datasets import builtin_shape, load_builtin, split_and_standardize
from worker.backprop.optim import Constant, CosineWithWarmup
from worker.model_builder import build_planned_model, count_parameters
from worker.resolved_job import (
    DataShape,
    EarlyStoppingRule,
    StepDeadlineRule,
    resolve,
    validation_split_size,
)
from worker.spec_error import SpecError

DIGITS = """
name: digits-mlp
model: {layers: [{linear: {out_features: 128}}, {relu: {}}, {dropout: {p: 0.1}},
                 {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adamw: {lr: 0.001, weight_decay: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 128, epochs: 20, validation_fraction: 0.2}
seed: 3
"""


def spec(text: str = DIGITS, **changes) -> job_pb2.JobSpec:
    from chainrule.spec_file import load_job_spec

    job_spec = load_job_spec(text)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = job_spec
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    return job_spec


def digits(job_spec: job_pb2.JobSpec, **overrides):
    return resolve(job_spec, builtin_shape("sklearn:digits"), **overrides)


def refused(job_spec: job_pb2.JobSpec, path: str, *fragments: str, **overrides) -> None:
    with pytest.raises(SpecError) as info:
        digits(job_spec, **overrides)
    assert info.value.field_path == path, str(info.value)
    for fragment in fragments:
        assert fragment in info.value.message, str(info.value)


def test_unset_counts_take_their_documented_defaults():
    job = digits(spec())
    assert (job.workers, job.parameter_servers, job.micro_batches, job.accumulation_steps) == (
        1, 1, 4, 1)
    assert (job.dtype, job.shuffle, job.standardize) == ("float32", True, True)
    assert (job.cpus_per_worker, job.placement_strategy) == (0.0, "")
    assert job.early_stopping is None
    assert job.schedule == Constant(0.001)
    assert (job.clipping.max_norm, job.clipping.max_value) == (None, None)
    assert (job.optimizer, job.hyperparameters.weight_decay) == ("adamw", 0.01)


def test_steps_come_from_the_training_split_and_evaluations_default_to_epoch_ends():
    job = digits(spec())
    # 1797 digits, 20% held out: 359 for validation, 1438 to train on in batches of 128.
    assert (job.training_samples, job.validation_samples) == (1438, 359)
    assert (job.batches_per_epoch, job.steps_per_epoch, job.total_steps) == (12, 12, 240)
    assert job.evaluation_interval == job.checkpoint_interval == 12


def test_accumulated_batches_make_fewer_optimizer_steps_that_never_span_an_epoch():
    job = digits(spec(gradient_accumulation_steps=5))
    assert (job.batches_per_epoch, job.steps_per_epoch, job.total_steps) == (12, 3, 60)


def test_the_split_size_is_the_one_the_data_preparation_cuts():
    job = digits(spec())
    raw = load_builtin("sklearn:digits", 3)
    prepared = split_and_standardize(raw, job.validation_fraction, job.standardize, job.seed)
    assert (len(prepared.x), len(prepared.x_val)) == (job.training_samples,
                                                       job.validation_samples)
    assert validation_split_size(1797, 0.2) == 359


def test_a_data_set_with_its_own_validation_part_ignores_the_fraction():
    shape = dataclasses.replace(builtin_shape("sklearn:digits"), samples=1000,
                                validation_samples=300)
    job = resolve(spec(), shape)
    assert (job.training_samples, job.validation_samples) == (1000, 300)


def test_explicit_settings_are_kept():
    text = DIGITS + """
gradient_accumulation_steps: 2
eval_interval_steps: 5
checkpoint: {interval_steps: 7}
resources: {workers: 2, parameter_servers: 3, cpus_per_worker: 0.5, placement_strategy: SPREAD}
dtype: float64
clipping: {max_norm: 1.5, max_value: 0.1}
early_stopping: {patience: 3, min_delta: 0.01, restore_best: true}
schedule: {cosine_with_warmup: {warmup_steps: 10}}
"""
    job = digits(spec(text, data__micro_batches=8, data__shuffle=False))
    assert (job.workers, job.parameter_servers, job.micro_batches, job.accumulation_steps) == (
        2, 3, 8, 2)
    assert (job.cpus_per_worker, job.placement_strategy, job.dtype) == (0.5, "SPREAD",
                                                                         "float64")
    assert (job.evaluation_interval, job.checkpoint_interval, job.shuffle) == (5, 7, False)
    assert (job.clipping.max_norm, job.clipping.max_value) == (1.5, 0.1)
    assert job.early_stopping == EarlyStoppingRule(3, 0.01, True)
    # The cosine's default length is the job's own step count.
    assert job.schedule == CosineWithWarmup(0.001, 10, job.total_steps, 0.0, 0.0)


def test_overrides_replace_the_spec_counts():
    job = digits(spec(), workers=4, parameter_servers=2)
    assert (job.workers, job.parameter_servers) == (4, 2)


def test_the_model_plan_walks_every_layer_without_building_it():
    job = digits(spec())
    plan = job.model
    assert (plan.input_shape, plan.input_dtype, plan.output_shape) == ((64,), "float32", (10,))
    assert [layer.path for layer in plan.layers] == [
        "model.layers[0].linear", "model.layers[1].relu", "model.layers[2].dropout",
        "model.layers[3].linear"]
    assert [layer.parameters for layer in plan.layers] == [64 * 128 + 128, 0, 0, 128 * 10 + 10]
    assert plan.parameters == count_parameters(spec().model, (64,)) == 9610


def test_the_planned_model_is_the_spec_model_with_the_job_seed():
    job = digits(spec())
    model = build_planned_model(job.model, job.dtype, job.seed)
    assert sum(p.size for p in model.parameters()) == job.model.parameters
    again = build_planned_model(job.model, job.dtype, job.seed)
    for key, value in model.state_dict().items():
        assert np.array_equal(again.state_dict()[key], value), key


def test_a_resolved_job_is_frozen():
    job = digits(spec())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.workers = 3


def test_early_stopping_patience_0_is_refused_not_read_as_1():
    refused(spec(DIGITS + "early_stopping: {patience: 0}\n"), "early_stopping.patience", ">= 1")


def test_early_stopping_needs_a_validation_split():
    refused(spec(DIGITS + "early_stopping: {patience: 2}\n", data__validation_fraction=0.0),
            "early_stopping", "validation")


ONE_EACH = {"resources__workers": 1, "resources__parameter_servers": 1}


@pytest.mark.parametrize("changes, path", [
    ({"data__epochs": 0}, "data.epochs"),
    ({"data__batch_size": 0}, "data.batch_size"),
    ({"data__batch_size": 1439}, "data.batch_size"),
    ({"data__micro_batches": 129}, "data.micro_batches"),
    ({"data__validation_fraction": 1.0}, "data.validation_fraction"),
    ({**ONE_EACH, "resources__cpus_per_worker": -1.0}, "resources.cpus_per_worker"),
    ({**ONE_EACH, "resources__placement_strategy": "RANDOM"}, "resources.placement_strategy"),
    ({**ONE_EACH, "resources__parameter_servers": 10_000}, "resources.parameter_servers"),
    ({"dtype": "float16"}, "dtype"),
    ({"loss": "hinge"}, "loss"),
])
def test_a_setting_the_job_cannot_run_with_names_its_field(changes, path):
    refused(spec(**changes), path)


def test_a_count_left_out_of_resources_is_one_as_the_proto_documents():
    job = digits(spec(resources__workers=2))
    assert (job.workers, job.parameter_servers) == (2, 1)
    job = digits(spec(resources__workers=0, resources__parameter_servers=3))
    assert (job.workers, job.parameter_servers) == (1, 3)


def test_an_override_below_one_is_refused_naming_the_count():
    refused(spec(), "resources.workers", "override", workers=0)


def test_the_step_deadline_defaults_to_ten_median_steps_and_three_seconds_at_least():
    assert digits(spec()).step_deadline == StepDeadlineRule(10.0, 3.0)
    job = digits(spec(resources__step_deadline__multiplier=4.0,
                      resources__step_deadline__floor_seconds=1.5))
    assert job.step_deadline == StepDeadlineRule(4.0, 1.5)


@pytest.mark.parametrize("field, value", [
    ("multiplier", 1.5), ("multiplier", -3.0), ("multiplier", float("nan")),
    ("floor_seconds", 0.1), ("floor_seconds", float("inf")),
])
def test_a_step_deadline_that_would_drop_healthy_workers_or_none_is_refused(field, value):
    refused(spec(**{f"resources__step_deadline__{field}": value}),
            f"resources.step_deadline.{field}", "must be in")


def test_a_split_from_a_single_sample_is_refused():
    shape = DataShape(1, 0, (64,), False, "classification", 10, ())
    with pytest.raises(SpecError) as info:
        resolve(spec(data__batch_size=1), shape)
    assert info.value.field_path == "data.validation_fraction"


BATCH_NORM_MLP = """
name: digits-bn
model: {layers: [{linear: {out_features: 16}}, {batch_norm: {}}, {relu: {}},
                 {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 96, epochs: 1, validation_fraction: 0.2,
       micro_batches: 4}
"""


def test_a_batch_norm_job_needs_micro_batches_of_two_samples_and_others_do_not():
    assert digits(spec(BATCH_NORM_MLP)).min_micro_batch_samples == 2
    assert digits(spec()).min_micro_batch_samples == 1


def test_a_batch_size_leaving_a_last_batch_of_one_sample_is_refused_for_batch_norm():
    # 1438 training samples = 3 x 479 + 1: the epoch's last micro-batch would hold 1 sample.
    refused(spec(BATCH_NORM_MLP, data__batch_size=479), "data.batch_size", "1438 samples",
            "batches of 479", "last batch of 1 sample", "micro-batch",
            "model.layers[1].batch_norm", "478 or 480")
    digits(spec(DIGITS, data__batch_size=479))  # without batch norm, 1 sample trains fine


def test_a_batch_norm2d_on_a_one_by_one_map_counts_as_one_value_per_channel():
    cnn = """
    name: cnn
    model: {layers: [{conv2d: {out_channels: 4, kernel_size: 3}}, {batch_norm2d: {}},
                     {adaptive_avg_pool2d: {output_size: 1}}, {batch_norm2d: {}},
                     {flatten: {}}, {linear: {out_features: 10}}]}
    loss: cross_entropy
    optimizer: {adam: {lr: 0.01}}
    data: {dataset: "sklearn:digits_images", batch_size: 64, epochs: 1,
           validation_fraction: 0.2}
    """
    job = resolve(spec(cnn), builtin_shape("sklearn:digits_images"))
    assert job.model.per_sample_batch_norms == ("model.layers[3].batch_norm2d",)
    assert job.min_micro_batch_samples == 2


def test_gradient_compression_resolves_to_its_method_and_is_off_when_unset():
    from worker.compression import PowerSGD, TopK

    assert digits(spec()).compression is None
    assert digits(spec(DIGITS + "communication: {compression: {powersgd: {rank: 4}}}\n")
                  ).compression == PowerSGD(4)
    assert digits(spec(DIGITS + "communication: {compression: {topk: {ratio: 0.01}}}\n")
                  ).compression == TopK(0.01)


@pytest.mark.parametrize("compression, path, fragment", [
    ("{powersgd: {}}", "communication.compression.powersgd.rank", ">= 1, got 0"),
    ("{topk: {}}", "communication.compression.topk.ratio", "(0, 1], got 0.0"),
    ("{topk: {ratio: 1.5}}", "communication.compression.topk.ratio", "got 1.5"),
    ("{}", "communication.compression", "powersgd"),
])
def test_a_compression_setting_the_job_cannot_run_with_names_its_field(compression, path,
                                                                        fragment):
    refused(spec(DIGITS + f"communication: {{compression: {compression}}}\n"), path, fragment)


def test_a_nan_top_k_ratio_set_in_the_message_itself_is_refused():
    refused(spec(communication__compression__topk__ratio=float("nan")),
            "communication.compression.topk.ratio", "got nan")


def test_compression_is_refused_with_kfac_whose_statistics_travel_whole():
    text = DIGITS.replace("{adamw: {lr: 0.001, weight_decay: 0.01}}", "{kfac: {lr: 0.01}}")
    refused(spec(text + "communication: {compression: {powersgd: {rank: 2}}}\n"),
            "communication.compression", "K-FAC")
