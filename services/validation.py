"""Is a submitted JobSpec runnable? Every check runs before the job is stored or scheduled, and
a failure is an `InvalidArgument` naming the field and quoting the bad value.

The model, loss, optimizer, schedule and clipping checks are the engine builders' own
(worker/model_builder.py raises SpecError with the field path): the service asks exactly the
code that will build the job, so a spec that passes here cannot fail there for a spec reason.
What only the service knows is checked here: the data set exists for this tenant, the batch
fits its training split, and the job stays within the configured limits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.datasets import BUILTIN_DATASETS, is_builtin, load_builtin
from services.errors import InvalidArgument
from worker.model_builder import (
    build_clipping,
    build_loss,
    build_optimizer,
    build_schedule,
    check_model_fits_data,
    count_parameters,
    resolve_dtype,
)
from worker.spec_error import SpecError

UPLOAD_PREFIX = "upload:"
PLACEMENT_STRATEGIES = ("", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class Limits:
    """What one job may ask for. The defaults suit one machine; a cluster raises them."""

    max_workers: int = 8
    max_parameter_servers: int = 8
    max_parameters: int = 50_000_000  # 200 MB of float32 weights, before optimizer state
    max_epochs: int = 10_000
    max_micro_shards: int = 4096
    max_gradient_accumulation_steps: int = 1024


@dataclass(frozen=True)
class DataShape:
    """What validation needs to know of a data set, without its arrays."""

    samples: int
    validation_samples: int  # the data set's own validation part; 0 when it has none
    feature_shape: tuple[int, ...]
    integer_features: bool
    task: str
    num_classes: int
    target_shape: tuple[int, ...]


@functools.cache
def builtin_shape(name: str) -> DataShape:
    """Shapes do not depend on the seed (synthetic sets only redraw values), so one load per
    name serves every spec; scikit-learn's sets load in milliseconds from the package."""
    dataset = load_builtin(name, 0)
    return DataShape(len(dataset.x), 0, tuple(dataset.feature_shape), dataset.integer_features,
                     dataset.task, dataset.num_classes, tuple(dataset.target_shape))


def upload_name(dataset: str) -> str | None:
    """The upload a spec's `data.dataset` refers to ("upload:NAME" or NAME), or None for a
    built-in."""
    if is_builtin(dataset):
        return None
    return dataset.removeprefix(UPLOAD_PREFIX)


def training_samples(shape: DataShape, validation_fraction: float) -> int:
    """The training split's size, as scheduler.datasets.split_and_standardize cuts it."""
    if shape.validation_samples or validation_fraction <= 0 or shape.samples < 2:
        return shape.samples
    held_out = min(max(1, round(shape.samples * validation_fraction)), shape.samples - 1)
    return shape.samples - held_out


def validate_spec(spec: job_pb2.JobSpec, data: DataShape | None, limits: Limits) -> None:
    """InvalidArgument for the first problem found; `data` None means the data set named by
    the spec does not exist (for this tenant)."""
    try:
        _validate(spec, data, limits)
    except SpecError as error:
        raise InvalidArgument(error.field_path, error.message) from error


def _validate(spec: job_pb2.JobSpec, data: DataShape | None, limits: Limits) -> None:
    if not spec.HasField("model") or not spec.model.layers:
        raise SpecError("model.layers", "a model needs at least one layer")
    # --- data and batching -------------------------------------------------------------------
    name = spec.data.dataset
    if not name:
        raise SpecError("data.dataset", f"required: a built-in ({', '.join(BUILTIN_DATASETS)}) "
                                        f"or the name of an uploaded data set")
    if data is None:
        raise SpecError("data.dataset", f"no data set {name!r}: not a built-in "
                                        f"({', '.join(BUILTIN_DATASETS)}) and not uploaded")
    if spec.data.epochs < 1:
        raise SpecError("data.epochs", f"must be >= 1, got {spec.data.epochs}")
    _at_most(spec.data.epochs, limits.max_epochs, "data.epochs")
    if not 0.0 <= spec.data.validation_fraction < 1.0:
        raise SpecError("data.validation_fraction",
                        f"must be in [0, 1), got {spec.data.validation_fraction!r}")
    if spec.data.batch_size < 1:
        raise SpecError("data.batch_size", f"must be >= 1, got {spec.data.batch_size}")
    train = training_samples(data, spec.data.validation_fraction)
    if spec.data.batch_size > train:
        raise SpecError("data.batch_size", f"must be at most the training split's {train} "
                                           f"samples, got {spec.data.batch_size}")
    _at_most(spec.data.micro_shards, limits.max_micro_shards, "data.micro_shards")
    if spec.data.micro_shards > spec.data.batch_size:
        raise SpecError("data.micro_shards", f"must be at most data.batch_size "
                                             f"({spec.data.batch_size}), got "
                                             f"{spec.data.micro_shards}")
    _at_most(spec.gradient_accumulation_steps, limits.max_gradient_accumulation_steps,
             "gradient_accumulation_steps")
    if spec.HasField("early_stopping"):
        rule = spec.early_stopping
        if rule.patience < 1:
            raise SpecError("early_stopping.patience", f"must be >= 1, got {rule.patience}")
        if rule.min_delta < 0:
            raise SpecError("early_stopping.min_delta", f"must be >= 0, got {rule.min_delta!r}")
        if not data.validation_samples and spec.data.validation_fraction <= 0:
            raise SpecError("early_stopping", "watches the validation loss, but the job has no "
                                              "validation split: set data.validation_fraction")
    # --- resources -----------------------------------------------------------------------------
    # 0 means 1 when `resources` is left out; written out, a count must say how many.
    explicit = spec.HasField("resources")
    for field, limit in (("workers", limits.max_workers),
                         ("parameter_servers", limits.max_parameter_servers)):
        value = getattr(spec.resources, field)
        if explicit and value == 0:
            raise SpecError(f"resources.{field}", "must be >= 1, got 0")
        _at_most(value, limit, f"resources.{field}")
    if spec.resources.cpus_per_worker < 0:
        raise SpecError("resources.cpus_per_worker",
                        f"must be >= 0, got {spec.resources.cpus_per_worker!r}")
    if spec.resources.placement_strategy not in PLACEMENT_STRATEGIES:
        raise SpecError("resources.placement_strategy",
                        f"must be one of {', '.join(PLACEMENT_STRATEGIES[1:])}, got "
                        f"{spec.resources.placement_strategy!r}")
    # --- the model against the data, and the builders' own checks ------------------------------
    resolve_dtype(spec)
    input_dtype: Any = np.int64 if data.integer_features else np.float32
    check_model_fits_data(spec, data.feature_shape, task=data.task,
                          num_classes=data.num_classes, target_shape=data.target_shape,
                          input_dtype=input_dtype)
    parameters = count_parameters(spec.model, data.feature_shape, input_dtype)
    if parameters > limits.max_parameters:
        raise SpecError("model", f"has {parameters:,} parameters, more than this server's "
                                 f"limit of {limits.max_parameters:,}")
    shards = spec.resources.parameter_servers or 1
    if shards > parameters:
        raise SpecError("resources.parameter_servers",
                        f"{shards} shards for {parameters} parameters: at most one shard per "
                        f"parameter")
    if not 0.0 <= spec.label_smoothing <= 1.0:
        raise SpecError("label_smoothing", f"must be in [0, 1], got {spec.label_smoothing!r}")
    build_loss(spec)
    build_optimizer(spec)
    steps_per_epoch = -(-train // spec.data.batch_size)
    accumulation = max(1, spec.gradient_accumulation_steps)
    build_schedule(spec, -(-steps_per_epoch // accumulation) * spec.data.epochs)
    build_clipping(spec)


def _at_most(value: int, limit: int, path: str) -> None:
    if value > limit:
        raise SpecError(path, f"must be at most {limit} on this server, got {value}")
