"""Train a job spec without the gRPC service: the `chainrule train` command's runtime and its
Python twin.

    from chainrule.spec_file import load_job_spec
    from scheduler.training import train_job
    result = train_job(load_job_spec("digits.yaml"), workers=2)

Everything that can be checked without training (the spec against its data set, the output
path) is checked before Ray starts: a SpecError or ValueError costs seconds, not a training run.
The weights and their manifest are written by `save_trained_weights`, for the service too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chainrule.v1 import job_pb2
from scheduler import ray_cluster
from scheduler.datasets import (
    Dataset,
    builtin_shape,
    builtin_text,
    from_text,
    is_builtin_text,
    load_builtin,
    split_and_standardize,
)
from scheduler.job_runner import JobRunner, TrainingResult
from scheduler.parquet_dataset import ParquetDataset, is_parquet, load_parquet, parquet_shape
from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord
from scheduler.storage import FORMATS, local_weights_shape, save_weights
from worker.layer_description import describe_model
from worker.model_builder import plan_model
from worker.resolved_job import DataShape, ResolvedJob, resolve


def resolve_builtin_job(spec: job_pb2.JobSpec, *, workers: int | None = None,
                        parameter_servers: int | None = None) -> ResolvedJob:
    """The spec resolved against its built-in data set (SpecError naming the field), with
    `workers` and `parameter_servers` in place of its resources when given, and its
    model.init_from against the local file it names."""
    return resolve(spec, local_data_shape(spec), workers=workers,
                   parameter_servers=parameter_servers, weights=local_weights_shape(spec))


def local_data_shape(spec: job_pb2.JobSpec) -> DataShape:
    """The shape of a data set this process reads itself: a built-in, or a local Parquet file
    (read from its metadata; split by the spec's seed). SpecError naming the field."""
    if is_parquet(spec.data.dataset):
        return parquet_shape(spec.data, spec.seed)
    return builtin_shape(spec.data.dataset)


def prepare_local_dataset(job: ResolvedJob) -> Dataset | ParquetDataset:
    """The job's data set as this process reads it: a local Parquet file prepared in one
    streaming pass (its training rows stay in the file), or a built-in, whole."""
    if is_parquet(job.dataset):
        return load_parquet(job)
    return prepare_dataset(job)


def prepare_dataset(job: ResolvedJob, loaded: Dataset | None = None) -> Dataset:
    """The job's data set (its built-in unless `loaded` is given), split and standardised as
    the job says."""
    if loaded is None and is_builtin_text(job.dataset):
        loaded = from_text(builtin_text(job.dataset), job.context_length,
                           job.validation_fraction, name=job.dataset)
    dataset = loaded if loaded is not None else load_builtin(job.dataset, job.seed)
    return split_and_standardize(dataset, job.validation_fraction, job.standardize, job.seed,
                                 dtype=job.dtype)


def check_output_path(path: str | Path) -> Path:
    """`path` if trained weights can be written there, else ValueError saying why: checked
    before training, so that a typo does not cost a training run."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{str(path)!r}: a weights file must end in {' or '.join(FORMATS)}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r}: the folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{str(path)!r}: the folder {str(folder)!r} is not writable")
    return path


def train_job(
    spec: job_pb2.JobSpec,
    *,
    workers: int | None = None,
    parameter_servers: int | None = None,
    ray_address: str | None = None,
    output: str | Path | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_evaluation: Callable[[EvaluationRecord], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
) -> TrainingResult:
    """Train on embedded Ray (or the cluster at `ray_address`); write weights to `output`.
    A bad spec (SpecError) or output path (ValueError) fails before Ray starts."""
    job = resolve_builtin_job(spec, workers=workers, parameter_servers=parameter_servers)
    if output is not None:
        check_output_path(output)
    return run_job(job, spec, ray_address=ray_address, output=output, on_step=on_step,
                   on_evaluation=on_evaluation, on_recovery=on_recovery)


def run_job(
    job: ResolvedJob,
    spec: job_pb2.JobSpec,
    *,
    ray_address: str | None = None,
    output: str | Path | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_evaluation: Callable[[EvaluationRecord], None] | None = None,
    on_recovery: Callable[[RecoveryRecord], None] | None = None,
) -> TrainingResult:
    """Train an already resolved job (`spec` is the one it was resolved from, recorded in the
    weights' manifest) on its built-in or local Parquet data set."""
    dataset = prepare_local_dataset(job)
    ray_cluster.connect(ray_address)
    result = JobRunner(job, dataset, on_step=on_step, on_evaluation=on_evaluation,
                       on_recovery=on_recovery).run()
    if output is not None:
        save_trained_weights(output, spec, result)
    return result


def save_trained_weights(path: str | Path, spec: job_pb2.JobSpec, result: TrainingResult, *,
                         job_id: str | None = None, private: bool = False) -> Path:
    """The trained weights and their manifest `<path>.json`, written the same way by
    `chainrule train -o` and by the service (which adds the job's id, and keeps them private
    to its user: `private`)."""
    manifest = weights_manifest(spec, result)
    if job_id is not None:
        manifest["job_id"] = job_id
    return save_weights(path, result.state_dict, manifest=manifest, private=private)


def weights_manifest(spec: job_pb2.JobSpec, result: TrainingResult) -> dict:
    """What a weights file needs beside it to be used: the spec it was trained from, how the
    training ended, the feature standardisation every new input must go through, the layer
    plan (each layer's kind, PyTorch class and arguments, shapes and state_dict keys) and how
    the validation samples were chosen: enough to rebuild the network in PyTorch and check
    its figures there (README, "Rebuilding a model in PyTorch")."""
    from google.protobuf import json_format

    final = result.final_evaluation
    layers = None
    if result.input_shape is not None:
        plan = plan_model(spec.model, result.input_shape, result.input_dtype or "float32")
        layers = [layer.to_json() for layer in describe_model(plan)]
    split = result.validation_split
    return {
        "format": "chainrule-weights/1",
        "keys": "PyTorch state_dict names",
        "spec": json_format.MessageToDict(spec),
        "steps": result.steps,
        "validation_loss": final.loss if final else None,
        "validation_accuracy": final.accuracy if final else None,
        "feature_mean": _as_list(result.feature_mean),
        "feature_std": _as_list(result.feature_std),
        "input_shape": None if result.input_shape is None else list(result.input_shape),
        "input_dtype": result.input_dtype or None,
        "layers": layers,
        "validation_split": None if split is None else split.to_json(),
    }


def _as_list(values: np.ndarray | None) -> list | None:
    return None if values is None else values.tolist()
