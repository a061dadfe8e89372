"""Job spec files: YAML and JSON map onto JobSpec with protobuf's JSON mapping, and every
mistake is a SpecError that names the field."""

from __future__ import annotations

import json

import pytest

from chainrule.spec_file import SpecError, dump_job_spec, load_job_spec
from chainrule.v1 import job_pb2

DIGITS_YAML = """\
name: digits-mlp
model: {layers: [{linear: {out_features: 128}}, {relu: {}}, {dropout: {p: 0.1}}, {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adamw: {lr: 0.001, weight_decay: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 128, epochs: 20, validation_fraction: 0.2}
resources: {workers: 2, parameter_servers: 2}
seed: 0
"""  # noqa: E501 - the issue's example, verbatim


def digits_spec() -> job_pb2.JobSpec:
    layer = job_pb2.Layer
    return job_pb2.JobSpec(
        name="digits-mlp",
        model=job_pb2.ModelSpec(layers=[
            layer(linear=layer.Linear(out_features=128)),
            layer(relu=layer.ReLU()),
            layer(dropout=layer.Dropout(p=0.1)),
            layer(linear=layer.Linear(out_features=10)),
        ]),
        loss="cross_entropy",
        optimizer=job_pb2.OptimizerSpec(adamw=job_pb2.OptimizerSpec.AdamW(lr=0.001,
                                                                           weight_decay=0.01)),
        data=job_pb2.DataSpec(dataset="sklearn:digits", batch_size=128, epochs=20,
                              validation_fraction=0.2),
        resources=job_pb2.ResourceSpec(workers=2, parameter_servers=2),
        seed=0,
    )


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_job_spec(text)
    return info.value


# --- what parses ------------------------------------------------------------------------------


def test_issue_yaml_example_parses_to_the_expected_message():
    spec = load_job_spec(DIGITS_YAML)
    assert spec == digits_spec()
    assert spec.optimizer.WhichOneof("rule") == "adamw"
    assert spec.optimizer.adamw.HasField("lr") and not spec.optimizer.adamw.HasField("eps")
    assert spec.model.layers[1].WhichOneof("kind") == "relu"


def test_yaml_file_and_json_file_give_the_same_message(tmp_path):
    yaml_path = tmp_path / "job.yaml"
    yaml_path.write_text(DIGITS_YAML)
    json_path = tmp_path / "job.json"
    import yaml

    json_path.write_text(json.dumps(yaml.safe_load(DIGITS_YAML)))
    assert load_job_spec(yaml_path) == digits_spec()
    assert load_job_spec(str(json_path)) == digits_spec()
    assert load_job_spec(json_path.read_text()) == digits_spec()  # JSON text is YAML too


def test_lower_camel_case_json_names_are_accepted():
    spec = load_job_spec('{"model": {"layers": [{"linear": {"outFeatures": 3}}]}, '
                         '"data": {"batchSize": 4}}')
    assert spec.model.layers[0].linear.out_features == 3
    assert spec.data.batch_size == 4


def test_exponent_without_a_dot_is_a_number_not_a_string():
    # YAML 1.1 reads 1e-3 as a string; the JSON mapping accepts numeric strings.
    spec = load_job_spec("optimizer: {adam: {lr: 1e-3, betas: [0.9, 0.95]}}")
    assert spec.optimizer.adam.lr == pytest.approx(1e-3)
    assert list(spec.optimizer.adam.betas) == [0.9, 0.95]


def test_null_oneof_member_means_that_member_without_settings():
    spec = load_job_spec("model:\n  layers:\n    - relu:\n    - linear: {out_features: 2}\n")
    assert spec.model.layers[0].WhichOneof("kind") == "relu"


def test_optional_fields_distinguish_zero_from_unset():
    spec = load_job_spec("model: {layers: [{leaky_relu: {negative_slope: 0}}, {dropout: {}}]}")
    assert spec.model.layers[0].leaky_relu.HasField("negative_slope")
    assert not spec.model.layers[1].dropout.HasField("p")


def test_dump_then_load_gives_back_the_same_spec():
    spec = digits_spec()
    spec.clipping.max_norm = 1.0
    spec.model.layers.add().residual.layers.add().linear.out_features = 10
    text = dump_job_spec(spec)
    assert "adamw:" in text and "out_features: 128" in text
    assert load_job_spec(text) == spec


# --- what fails, and how it is reported -------------------------------------------------------


def test_unknown_optimizer_names_the_optimizer_field_and_suggests_a_fix():
    error = error_of("optimizer: {adamx: {lr: 0.1}}")
    assert error.field_path == "optimizer"
    assert "unknown field 'adamx'" in str(error)
    assert "did you mean 'adam" in str(error)
    assert str(error).startswith("optimizer: unknown field 'adamx'")


def test_unknown_layer_kind_names_the_layer():
    error = error_of("model: {layers: [{linear: {out_features: 4}}, {conv3d: {}}]}")
    assert error.field_path == "model.layers[1]"
    assert "unknown field 'conv3d'" in error.message


def test_unknown_top_level_field_is_reported_with_an_empty_path():
    error = error_of("nmae: x")
    assert error.field_path == ""
    assert "did you mean 'name'" in error.message


def test_wrong_type_names_the_nested_field():
    error = error_of("model: {layers: [{linear: {out_features: 4}}, {relu: {}}, "
                     "{linear: {out_features: many}}]}")
    assert error.field_path == "model.layers[2].linear.out_features"
    assert "expected an integer" in error.message


def test_negative_count_is_rejected_with_its_path():
    error = error_of("data: {batch_size: -1}")
    assert error.field_path == "data.batch_size"
    assert error.message == "must not be negative, got -1"  # not ">= 0": 0 is no batch size


def test_fractional_value_for_integer_field_is_rejected():
    assert error_of("seed: 1.5").field_path == "seed"


def test_string_for_a_boolean_is_rejected():
    assert error_of("data: {shuffle: 'maybe'}").field_path == "data.shuffle"


def test_two_kinds_in_one_layer_are_rejected():
    error = error_of("model: {layers: [{relu: {}, tanh: {}}]}")
    assert error.field_path == "model.layers[0]"
    assert "'relu' and 'tanh'" in error.message


def test_a_bare_layer_name_gets_a_hint():
    error = error_of("model: {layers: [relu]}")
    assert error.field_path == "model.layers[0]"
    assert "relu: {}" in error.message


def test_bad_element_of_a_repeated_number_is_indexed():
    assert error_of("optimizer: {adam: {betas: [0.9, x]}}").field_path == "optimizer.adam.betas[1]"


def test_non_finite_numbers_are_rejected():
    assert error_of("optimizer: {sgd: {lr: .nan}}").field_path == "optimizer.sgd.lr"


def test_invalid_yaml_says_where():
    error = error_of("name: x\nmodel: {layers: [\n")
    assert error.field_path == ""
    assert "invalid YAML" in error.message and "line" in error.message


def test_invalid_json_file_says_where(tmp_path):
    path = tmp_path / "job.json"
    path.write_text('{"name": "x",}')
    error = error_of(str(path))
    assert "invalid JSON at line 1" in error.message


def test_a_key_given_twice_is_rejected_instead_of_silently_overridden():
    error = error_of("optimizer: {adam: {}}\noptimizer: {sgd: {}}")
    assert "'optimizer' is given twice" in error.message and "line 2" in error.message


def test_one_line_yaml_that_ends_like_a_file_name_is_text():
    assert load_job_spec("name: run.yaml").name == "run.yaml"


def test_a_document_that_is_not_a_mapping_is_rejected():
    assert "mapping" in error_of("- name: x").message


def test_missing_file_is_a_spec_error(tmp_path):
    assert "cannot read" in error_of(str(tmp_path / "absent.yaml")).message


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


def test_shape_arguments_take_a_number_a_list_or_a_word_as_in_pytorch():
    spec = load_job_spec(DIGITS_YAML.replace(
        "{linear: {out_features: 128}}",
        "{conv2d: {out_channels: 4, kernel_size: [3, 5], stride: 2, padding: same}}"))
    conv = spec.model.layers[0].conv2d
    assert [v.number_value for v in conv.kernel_size.list_value.values] == [3, 5]
    assert conv.stride.number_value == 2
    assert conv.padding.string_value == "same"


def test_a_mapping_as_a_shape_argument_names_the_field():
    error = error_of("model: {layers: [{conv2d: {out_channels: 4, kernel_size: {h: 3}}}]}")
    assert error.field_path == "model.layers[0].conv2d.kernel_size"
    assert "a number, a list of numbers" in error.message
