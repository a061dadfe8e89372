"""A Parquet data set's shape from its metadata, and the streaming pass that prepares it."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.parquet_dataset import load_parquet, parquet_shape
from services.errors import InvalidArgument
from services.job_inputs import data_shape
from worker.parquet_rows import held_out
from worker.resolved_job import DataShape, resolve
from worker.spec_error import SpecError

ROWS = 600


def write(path, *, statistics=True, labels=None, row_group_size=64):
    rng = np.random.default_rng(1)
    columns = {"a": rng.normal(3.0, 2.0, ROWS), "b": rng.integers(0, 9, ROWS),
               "note": ["x"] * ROWS,
               "label": rng.integers(0, 5, ROWS) if labels is None else labels}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size,
                   write_statistics=statistics)
    return columns


def spec_for(path, extra=""):
    return load_job_spec(f"""
model: {{layers: [{{linear: {{out_features: 5}}}}]}}
loss: cross_entropy
optimizer: {{sgd: {{lr: 0.1}}}}
data: {{dataset: "parquet:{path}", label_column: label, feature_columns: [a, b],
       batch_size: 32, epochs: 1, validation_fraction: 0.25{extra}}}
seed: 4
""")


@pytest.mark.parametrize("statistics", [True, False])
def test_the_shape_comes_from_the_metadata_and_the_label_column_alone(tmp_path, statistics):
    path = tmp_path / "d.parquet"
    columns = write(path, statistics=statistics)
    shape = parquet_shape(spec_for(path).data, seed=4)
    validation = int(held_out(0, ROWS, 4, 0.25).sum())
    assert (shape.samples, shape.validation_samples) == (ROWS - validation, validation)
    assert shape.feature_shape == (2,) and not shape.integer_features
    assert (shape.task, shape.num_classes) == ("classification", columns["label"].max() + 1)


def test_float_labels_make_a_regression_with_one_target(tmp_path):
    path = tmp_path / "r.parquet"
    write(path, labels=np.linspace(0, 1, ROWS))
    shape = parquet_shape(spec_for(path).data, seed=4)
    assert (shape.task, shape.num_classes, shape.target_shape) == ("regression", 0, (1,))


@pytest.mark.parametrize("change, field", [
    (lambda d: setattr(d, "label_column", "missing"), "data.label_column"),
    (lambda d: setattr(d, "label_column", ""), "data.label_column"),
    (lambda d: d.feature_columns.append("note"), "data.feature_columns"),
    (lambda d: d.feature_columns.append("nope"), "data.feature_columns"),
    (lambda d: setattr(d, "dataset", "parquet:/nonexistent.parquet"), "data.dataset"),
])
def test_a_bad_column_or_path_is_refused_naming_the_field(tmp_path, change, field):
    path = tmp_path / "d.parquet"
    write(path)
    spec = spec_for(path)
    change(spec.data)
    with pytest.raises(SpecError) as refused:
        parquet_shape(spec.data, seed=4)
    assert refused.value.field_path == field


def test_negative_class_labels_are_refused(tmp_path):
    path = tmp_path / "n.parquet"
    write(path, labels=np.arange(ROWS) - 3)
    with pytest.raises(SpecError, match=">= 0"):
        parquet_shape(spec_for(path).data, seed=4)


def test_label_column_on_a_data_set_that_is_not_parquet_is_refused():
    spec = spec_for("x")
    spec.data.dataset = "sklearn:iris"
    with pytest.raises(SpecError) as refused:
        resolve(spec, DataShape(150, 0, (4,), False, "classification", 3, ()))
    assert refused.value.field_path == "data.label_column"


def test_the_streaming_pass_fits_the_training_rows_statistics_and_keeps_the_validation_rows(
        tmp_path):
    path = tmp_path / "d.parquet"
    columns = write(path)
    spec = spec_for(path)
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    dataset = load_parquet(job)
    x = np.stack([columns["a"], columns["b"]], axis=1).astype(np.float64)
    validation = held_out(0, ROWS, 4, 0.25)
    np.testing.assert_allclose(dataset.feature_mean, x[~validation].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dataset.feature_std, x[~validation].std(axis=0), rtol=1e-12)
    expected = ((x[validation] - dataset.feature_mean) / dataset.feature_std).astype(np.float32)
    np.testing.assert_array_equal(dataset.x_val, expected)
    np.testing.assert_array_equal(dataset.y_val, columns["label"][validation])
    assert dataset.shape.samples == job.training_samples
    split = dataset.validation_split.to_json()
    assert split["rule"] == "hashed_rows" and split["validation_samples"] == validation.sum()
    assert (split["seed"], split["fraction"], split["samples"]) == (4, 0.25, ROWS)


def test_the_service_reads_no_local_parquet_file():
    with pytest.raises(InvalidArgument) as refused:
        data_shape(None, "tenant",  # type: ignore[arg-type]
                   load_job_spec('data: {dataset: "parquet:/etc/hosts", epochs: 1}'))
    assert refused.value.field_path == "data.dataset"
    assert "chainrule train" in str(refused.value)
