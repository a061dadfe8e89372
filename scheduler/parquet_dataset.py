"""A Parquet data set (`data.dataset: "parquet:PATH"`): its shape from the file's metadata, and
the one streaming pass that prepares it for training.

- `parquet_shape(data, seed)`: what resolve() needs, read from the footer (schema, row groups)
  and, for a classification, the label column's maximum from the row groups' statistics (one
  pass over that column alone, a row group at a time, when a writer left none). The
  validation split is a hash of each row's position (worker/parquet_rows.py), so its size
  needs no read of the data.
- `load_parquet(job)`: one pass over the row groups that computes the standardisation's
  statistics over the training rows (merged per row group: Chan et al.'s parallel variance)
  and keeps the validation rows, which the runner evaluates on. The training rows stay in the
  file: each replica reads the row groups its micro-batches fall in (worker/parquet_rows.py).

Only `chainrule train` (this process's own files) reads a local path; the service refuses one
and reads its tenants' uploaded Parquet files instead, `parquet:upload:NAME`
(services/job_inputs.py and services/parquet_upload.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.datasets import (
    CLASSIFICATION,
    HASHED_ROWS,
    REGRESSION,
    ValidationSplit,
    apply_standardization,
    usable_statistics,
)
from worker.parquet_rows import ParquetRows, ParquetSource, held_out, open_parquet
from worker.resolved_job import DataShape, ResolvedJob
from worker.spec_error import SpecError

PARQUET_PREFIX = "parquet:"


def is_parquet(dataset: str) -> bool:
    return dataset.startswith(PARQUET_PREFIX)


@dataclass(frozen=True)
class ParquetLayout:
    """A Parquet file as a job reads it: its columns, task and row groups, split."""

    source: ParquetSource  # unstandardised (load_parquet fits the statistics)
    task: str
    num_classes: int  # 0 for regression

    @property
    def training_samples(self) -> int:
        return sum(self.source.training_per_group)

    @property
    def validation_samples(self) -> int:
        return sum(self.source.group_rows) - self.training_samples

    @property
    def shape(self) -> DataShape:
        return DataShape(self.training_samples, self.validation_samples,
                         (len(self.source.feature_columns),), False, self.task,
                         self.num_classes, (1,) if self.task == REGRESSION else ())


def parquet_shape(data: job_pb2.DataSpec, seed: int, location: str | None = None) -> DataShape:
    """The shape of the Parquet data set `data` names (read from `location` when given, see
    parquet_layout), split as a job with `seed` splits it: its held-out rows are the set's own
    validation part (resolve() cuts no other)."""
    return parquet_layout(data.dataset, data.label_column, tuple(data.feature_columns), seed,
                          data.validation_fraction, location=location).shape


def parquet_layout(dataset: str, label_column: str, feature_columns: tuple[str, ...],
                   seed: int, validation_fraction: float, dtype: str = "float32",
                   shuffle: bool = True, location: str | None = None) -> ParquetLayout:
    """The layout of the file `dataset` names, or a SpecError naming the field at fault.
    `location`: where the file is read from instead of the path in `dataset` (an upload's
    stored file, services/parquet_upload.py); the messages name `dataset`'s path."""
    import pyarrow as pa

    path = dataset[len(PARQUET_PREFIX):]
    if not path:
        raise SpecError("data.dataset", "parquet: needs a path, as in parquet:data.parquet")
    location = location or path
    remote = "://" in location
    if not remote and not os.path.isfile(location):
        raise SpecError("data.dataset", f"no Parquet file at {path!r}")
    try:
        parquet_file = open_parquet(location)
    except FileNotFoundError as error:
        raise SpecError("data.dataset", f"no Parquet file at {path!r}") from error
    except (pa.ArrowInvalid, OSError) as error:
        problem = "cannot be read" if remote else "is not a Parquet file"
        raise SpecError("data.dataset", f"{path!r} {problem}: {error}") from error
    schema = parquet_file.schema_arrow
    if not label_column:
        raise SpecError("data.label_column", "a Parquet data set needs the column of its labels")
    if schema.get_field_index(label_column) < 0:
        raise SpecError("data.label_column", f"no column {label_column!r} in {path!r}; its "
                                             f"columns are {', '.join(schema.names)}")
    label_type = schema.field(label_column).type
    if pa.types.is_integer(label_type) or pa.types.is_boolean(label_type):
        task = CLASSIFICATION
    elif pa.types.is_floating(label_type):
        task = REGRESSION
    else:
        raise SpecError("data.label_column", f"column {label_column!r} is {label_type}: labels "
                                             f"must be integers (classes) or floats")
    features = feature_columns or tuple(n for n in schema.names if n != label_column)
    for name in features:
        if schema.get_field_index(name) < 0:
            raise SpecError("data.feature_columns", f"no column {name!r} in {path!r}")
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            raise SpecError("data.feature_columns", f"column {name!r} is {kind}, not a number")
        if name == label_column:
            raise SpecError("data.feature_columns", f"{name!r} is the label column")
    if not features:
        raise SpecError("data.feature_columns", f"{path!r} has no column besides the labels")
    metadata = parquet_file.metadata
    group_rows = tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
    training = tuple(
        int(rows - held_out(sum(group_rows[:g]), rows, seed, validation_fraction).sum())
        for g, rows in enumerate(group_rows))
    if sum(training) < 1:
        raise SpecError("data.dataset", f"{path!r} has no training rows")
    if validation_fraction > 0 and sum(training) == sum(group_rows):
        raise SpecError("data.validation_fraction",
                        f"holds out none of the {sum(group_rows)} rows of {path!r}")
    source = ParquetSource(location, tuple(features), label_column, task == REGRESSION, dtype,
                           None, None, seed, validation_fraction, group_rows, training, shuffle)
    classes = _classes(parquet_file, label_column) if task == CLASSIFICATION else 0
    return ParquetLayout(source, task, classes)


def _classes(parquet_file, label_column: str) -> int:
    """max label + 1, from the row groups' statistics when every one has them, else from one
    pass over the label column, a row group at a time; SpecError for a negative label."""
    metadata = parquet_file.metadata
    column = parquet_file.schema_arrow.get_field_index(label_column)
    lowest, highest = None, None
    for group in range(metadata.num_row_groups):
        statistics = metadata.row_group(group).column(column).statistics
        if statistics is not None and statistics.null_count:
            raise SpecError("data.label_column", f"column {label_column!r} has missing values")
        if statistics is not None and statistics.has_min_max:
            low, high = int(statistics.min), int(statistics.max)
        else:
            labels = parquet_file.read_row_group(group, columns=[label_column])
            values = labels.column(0).to_numpy().astype(np.int64)
            if not len(values):
                continue
            low, high = int(values.min()), int(values.max())
        lowest = low if lowest is None else min(lowest, low)
        highest = high if highest is None else max(highest, high)
    if lowest is not None and lowest < 0:
        raise SpecError("data.label_column", f"class labels must be >= 0, found {lowest}")
    return 0 if highest is None else highest + 1


@dataclass(frozen=True, eq=False)
class ParquetDataset:
    """A Parquet data set prepared for a job: the standardised source the replicas read their
    rows from, and the validation rows in memory (the runner's evaluation)."""

    source: ParquetSource
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    task: str
    num_classes: int
    validation_split: ValidationSplit
    name: str = ""

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (len(self.source.feature_columns),)

    @property
    def feature_mean(self) -> np.ndarray | None:
        return self.source.feature_mean

    @property
    def feature_std(self) -> np.ndarray | None:
        return self.source.feature_std

    @property
    def training_row_groups(self) -> tuple[int, ...]:
        return self.source.training_per_group

    @property
    def shape(self) -> DataShape:
        return ParquetLayout(self.source, self.task, self.num_classes).shape

    def training_rows(self) -> ParquetRows:
        return ParquetRows(self.source)


def load_parquet(job: ResolvedJob, location: str | None = None) -> ParquetDataset:
    """The job's Parquet data set after one streaming pass: the training rows' feature
    statistics (when the job standardises) and the validation rows. `location`: where the
    file is read from (see parquet_layout)."""
    layout = parquet_layout(job.dataset, job.label_column, job.feature_columns, job.seed,
                            job.validation_fraction, job.dtype, job.shuffle, location)
    raw = layout.source
    parquet_file = open_parquet(raw.path)
    moments = _Moments(len(raw.feature_columns))
    validation_x, validation_y = [], []
    for group in range(len(raw.group_rows)):
        features, labels, validation = raw.read_raw(parquet_file, group)
        moments.add(features[~validation])
        validation_x.append(features[validation])
        validation_y.append(labels[validation])
    mean, std = usable_statistics(*moments.mean_and_std()) if job.standardize else (None, None)
    source = dataclasses.replace(raw, feature_mean=mean, feature_std=std)
    x_val = y_val = None
    if layout.validation_samples:
        x_val = apply_standardization(np.concatenate(validation_x), mean, std, job.dtype)
        y_val = source.targets(np.concatenate(validation_y))
    split = ValidationSplit(HASHED_ROWS, sum(raw.group_rows), layout.validation_samples,
                            job.seed, fraction=job.validation_fraction)
    return ParquetDataset(source, x_val, y_val, layout.task, layout.num_classes, split,
                          name=job.dataset)


class _Moments:
    """Count, mean and summed squared deviations of each feature, merged chunk by chunk
    (Chan, Golub and LeVeque's pairwise update): one pass, no row kept."""

    def __init__(self, features: int):
        self.count = 0
        self.mean = np.zeros(features)
        self.squares = np.zeros(features)

    def add(self, chunk: np.ndarray) -> None:
        if not len(chunk):
            return
        count, mean = len(chunk), chunk.mean(axis=0)
        squares = ((chunk - mean) ** 2).sum(axis=0)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.squares = self.squares + squares + delta ** 2 * (self.count * count / total)
        self.count = total

    def mean_and_std(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, np.sqrt(self.squares / self.count)
