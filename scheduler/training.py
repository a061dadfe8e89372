"""Train a job spec without the gRPC service: the `chainrule train` command and its Python twin.

    from scheduler.training import train_job
    result = train_job("digits.yaml", workers=2)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chainrule.spec_file import load_job_spec
from chainrule.v1 import job_pb2
from scheduler import ray_cluster
from scheduler.datasets import Dataset, load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner, TrainingResult
from scheduler.records import EvaluationRecord, StepRecord
from worker.weights_file import save_weights


def prepare_dataset(spec: job_pb2.JobSpec, loaded: Dataset | None = None) -> Dataset:
    """The spec's data set (a built-in unless `loaded` is given), split and standardised."""
    dataset = loaded if loaded is not None else load_builtin(spec.data.dataset, spec.seed)
    standardize = spec.data.standardize if spec.data.HasField("standardize") else True
    dtype = "float64" if spec.dtype == "float64" else "float32"
    return split_and_standardize(dataset, spec.data.validation_fraction, standardize, spec.seed,
                                 dtype=dtype)


def train_job(
    spec: job_pb2.JobSpec | str | Path,
    *,
    workers: int | None = None,
    parameter_servers: int | None = None,
    ray_address: str | None = None,
    output: str | Path | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_evaluation: Callable[[EvaluationRecord], None] | None = None,
) -> TrainingResult:
    """Train on embedded Ray (or the cluster at `ray_address`); write weights to `output`."""
    if not isinstance(spec, job_pb2.JobSpec):
        spec = load_job_spec(spec)
    dataset = prepare_dataset(spec)
    ray_cluster.connect(ray_address)
    result = JobRunner(spec, dataset, workers=workers, parameter_servers=parameter_servers,
                       on_step=on_step, on_evaluation=on_evaluation).run()
    if output is not None:
        save_weights(output, result.state_dict, manifest=weights_manifest(spec, result))
    return result


def weights_manifest(spec: job_pb2.JobSpec, result: TrainingResult) -> dict:
    from google.protobuf import json_format

    final = result.final_evaluation
    return {
        "format": "chainrule-weights/1",
        "keys": "PyTorch state_dict names",
        "spec": json_format.MessageToDict(spec),
        "steps": result.steps,
        "validation_loss": final.loss if final else None,
        "validation_accuracy": final.accuracy if final else None,
    }
