"""`model.init_from` is checked when the job is resolved, from the weights file's header alone:
strict wants exactly the model's keys (parameters and buffers), non-strict keeps the seed's
values for a new head and ignores an old one, and a mis-shaped key is always an error; each
error names `model.init_from` and lists the keys with their shapes."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import SpecError, load_job_spec
from worker.initial_weights import WeightsShape, weights_reference
from worker.model_builder import build_model
from worker.resolved_job import DataShape, resolve

PRETRAINED = """
name: pretrained
model: {layers: [{linear: {out_features: 8}}, {batch_norm: {}}, {relu: {}},
                 {linear: {out_features: 3}}]}
loss: cross_entropy
data: {dataset: "sklearn:iris", batch_size: 8, epochs: 1}
"""
# The same body with a new head of another width, one layer further on.
FINE_TUNED = PRETRAINED.replace("{linear: {out_features: 3}}]",
                                "{dropout: {p: 0.1}}, {linear: {out_features: 3}}]")
IRIS = DataShape(150, 0, (4,), False, "classification", 3, ())


def _file_of(text: str, drop: tuple[str, ...] = (), **reshaped) -> WeightsShape:
    """The header of a chainrule download of the model `text` describes."""
    model = build_model(load_job_spec(text).model, (4,), np.float32, seed=1)
    tensors = [(key, tuple(value.shape)) for key, value in model.state_dict().items()
               if key not in drop]
    tensors = [(key, reshaped.get(key.replace(".", "_"), shape)) for key, shape in tensors]
    return WeightsShape("/weights/pretrained.safetensors", tuple(tensors), "pretrained")


def _error(text: str, weights: WeightsShape) -> SpecError:
    with pytest.raises(SpecError) as info:
        resolve(load_job_spec(text), IRIS, weights=weights)
    assert info.value.field_path == "model.init_from"
    return info.value


def _init(text: str, strict: bool | None = None) -> str:
    extra = "" if strict is None else f", init_strict: {str(strict).lower()}"
    return text.replace("model: {layers:", f"model: {{init_from: 'upload:pretrained'{extra}, "
                                           f"layers:", 1)


def test_a_download_of_the_same_model_loads_strictly_every_parameter_and_buffer():
    job = resolve(load_job_spec(_init(PRETRAINED)), IRIS, weights=_file_of(PRETRAINED))
    assert job.init_weights.strict and job.init_weights.path == "/weights/pretrained.safetensors"
    assert job.init_weights.keys == (
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.weight", "3.bias")


def test_strict_lists_the_missing_and_unexpected_keys_with_their_shapes():
    error = _error(_init(FINE_TUNED), _file_of(PRETRAINED))
    assert "missing keys (the model's, not in the file): 4.weight (3, 8), 4.bias (3,)" in str(error)
    assert "unexpected keys (the file's, not in the model): 3.weight (3, 8), 3.bias (3,)" in (
        str(error))
    assert "init_strict: false" in error.message


def test_non_strict_keeps_the_seeds_new_head_and_ignores_the_files_old_one():
    job = resolve(load_job_spec(_init(FINE_TUNED, strict=False)), IRIS,
                  weights=_file_of(PRETRAINED))
    assert not job.init_weights.strict
    assert "4.weight" not in job.init_weights.keys and "3.weight" not in job.init_weights.keys
    assert job.init_weights.keys[:2] == ("0.weight", "0.bias")


@pytest.mark.parametrize("strict", [True, False])
def test_a_key_of_another_shape_is_an_error_even_when_not_strict(strict):
    error = _error(_init(PRETRAINED, strict), _file_of(PRETRAINED, **{"0_weight": (16, 4)}))
    assert "mis-shaped keys: 0.weight: file (16, 4), model (8, 4)" in error.message


def test_a_file_sharing_no_key_with_the_model_is_refused_even_when_not_strict():
    weights = WeightsShape("/w.safetensors", (("encoder.weight", (8, 4)),), "other")
    error = _error(_init(PRETRAINED, strict=False), weights)
    assert "none of the file's 1 keys (encoder.weight) is a key of the model" in error.message


def test_a_long_list_of_keys_is_cut_and_counted():
    tensors = tuple((f"extra.{i}", (2,)) for i in range(25))
    error = _error(_init(PRETRAINED), WeightsShape("/w.safetensors", _file_of(PRETRAINED).tensors
                                                   + tensors, "big"))
    assert "extra.9 (2,) and 15 more" in error.message


def test_init_strict_without_init_from_names_its_field():
    spec = load_job_spec(PRETRAINED.replace("model: {layers:", "model: {init_strict: false, "
                                                               "layers:"))
    with pytest.raises(SpecError) as info:
        resolve(spec, IRIS)
    assert info.value.field_path == "model.init_strict"


def test_a_spec_with_init_from_needs_the_files_header_to_resolve():
    assert "no weights file" in _error(_init(PRETRAINED), None).message


@pytest.mark.parametrize("text, expected", [
    ("upload:base", ("upload", "base")), ("base", ("upload", "base")),
    ("file:/tmp/w.safetensors", ("file", "/tmp/w.safetensors"))])
def test_init_from_names_an_upload_or_a_local_file(text, expected):
    assert weights_reference(text) == expected


@pytest.mark.parametrize("text", ["upload:", "file:"])
def test_an_empty_name_or_path_is_refused(text):
    with pytest.raises(SpecError, match="model.init_from"):
        weights_reference(text)


def test_the_parameter_limit_is_checked_before_the_model_is_built_to_match_the_file():
    with pytest.raises(SpecError) as info:
        resolve(load_job_spec(_init(PRETRAINED)), IRIS, weights=_file_of(PRETRAINED),
                max_parameters=10)
    assert info.value.field_path == "model" and "limit of 10" in info.value.message


def test_a_scalar_buffer_saved_as_one_value_still_fits_as_pytorch_allows():
    weights = _file_of(PRETRAINED, **{"1_num_batches_tracked": (1,)})
    job = resolve(load_job_spec(_init(PRETRAINED)), IRIS, weights=weights)
    assert "1.num_batches_tracked" in job.init_weights.keys
    error = _error(_init(PRETRAINED), _file_of(PRETRAINED, **{"1_num_batches_tracked": (2,)}))
    assert "1.num_batches_tracked: file (2,), model ()" in error.message
