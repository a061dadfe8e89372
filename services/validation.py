"""Is a submitted JobSpec runnable here? Every check runs before the job is stored or scheduled,
and a failure is an `InvalidArgument` naming the field and quoting the bad value.

Validation is resolving the job (worker/resolved_job.py: the very code whose result the queue,
the runner and the replicas consume, so a spec that passes here cannot fail there for a spec
reason) plus what only this server decides: whether the data set exists for this tenant, and
the limits one job must stay within. `chainrule train` runs the same checks before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from chainrule.v1 import job_pb2
from scheduler.datasets import BUILTIN_DATASETS, is_builtin
from services.errors import InvalidArgument
from worker.initial_weights import WeightsShape
from worker.resolved_job import DataShape, ResolvedJob, resolve
from worker.spec_error import SpecError

UPLOAD_PREFIX = "upload:"


@dataclass(frozen=True)
class Limits:
    """What one job may ask for. The defaults suit one machine; a cluster raises them."""

    max_workers: int = 8
    max_parameter_servers: int = 8
    max_parameters: int = 50_000_000  # 200 MB of float32 weights, before optimizer state
    max_epochs: int = 10_000
    max_micro_batches: int = 4096
    max_gradient_accumulation_steps: int = 1024


def upload_name(dataset: str) -> str | None:
    """The upload a spec's `data.dataset` refers to ("upload:NAME" or NAME), or None for a
    built-in."""
    if is_builtin(dataset):
        return None
    return dataset.removeprefix(UPLOAD_PREFIX)


def validate_spec(spec: job_pb2.JobSpec, data: DataShape | None, limits: Limits,
                  weights: WeightsShape | None = None) -> ResolvedJob:
    """The job resolved, or InvalidArgument for the first problem found; `data` None means the
    data set named by the spec does not exist (for this tenant). `weights`: the header of the
    upload `model.init_from` names (None when it names none, or none that exists)."""
    try:
        return check_spec(spec, data, limits, weights=weights)
    except SpecError as error:
        raise InvalidArgument(error.field_path, error.message) from error


def check_spec(spec: job_pb2.JobSpec, data: DataShape | None, limits: Limits, *,
               workers: int | None = None, parameter_servers: int | None = None,
               weights: WeightsShape | None = None) -> ResolvedJob:
    """`validate_spec` with SpecError (for `chainrule train`, which also passes its
    --workers and --parameter-servers overrides)."""
    name = spec.data.dataset
    if not name:
        raise SpecError("data.dataset", f"required: a built-in ({', '.join(BUILTIN_DATASETS)}) "
                                        f"or the name of an uploaded data set")
    if data is None:
        raise SpecError("data.dataset", f"no data set {name!r}: not a built-in "
                                        f"({', '.join(BUILTIN_DATASETS)}) and not uploaded")
    job = resolve(spec, data, workers=workers, parameter_servers=parameter_servers,
                  weights=weights, max_parameters=limits.max_parameters)
    check_limits(job, limits)
    return job


def check_limits(job: ResolvedJob, limits: Limits) -> None:
    """SpecError naming the first field whose resolved value is over this server's limit."""
    for value, limit, path in (
        (job.epochs, limits.max_epochs, "data.epochs"),
        (job.micro_batches, limits.max_micro_batches, "data.micro_batches"),
        (job.accumulation_steps, limits.max_gradient_accumulation_steps,
         "gradient_accumulation_steps"),
        (job.workers, limits.max_workers, "resources.workers"),
        (job.parameter_servers, limits.max_parameter_servers, "resources.parameter_servers"),
    ):
        if value > limit:
            raise SpecError(path, f"must be at most {limit} on this server, got {value}")
    if job.model.parameters > limits.max_parameters:
        raise SpecError("model", f"has {job.model.parameters:,} parameters, more than this "
                                 f"server's limit of {limits.max_parameters:,}")
