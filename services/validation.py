"""Is a submitted JobSpec runnable here? Every check runs before the job is stored or scheduled,
and a failure is an `InvalidArgument` naming the field and quoting the bad value.

Validation is resolving the job (worker/resolved_job.py: the very code whose result the queue,
the runner and the replicas consume, so a spec that passes here cannot fail there for a spec
reason) plus what only this server decides: whether the data set exists for this tenant, and
the limits one job must stay within. `chainrule train` runs the same checks before Ray starts.

What a spec costs to check is bounded too: its size and its layer count are judged first, in
time proportional to the limits (never to the spec), before resolving walks the layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from chainrule.v1 import job_pb2
from scheduler.datasets import BUILTIN_DATASETS, is_builtin
from scheduler.sampler import filled_micro_batches
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
    # Checked before anything else, so that a huge spec costs microseconds to refuse.
    max_spec_bytes: int = 256 * 1024
    # Layers, counting those nested in residual blocks and every stacked recurrent layer
    # (num_layers): a 1,000-layer spec is already a very deep network.
    max_layers: int = 1000
    max_total_steps: int = 10_000_000  # optimizer steps over all epochs
    # Longest a run of a job may train before it is stopped FAILED (it can be resumed).
    max_wall_seconds: float = 7 * 24 * 3600.0
    # Activations of one micro-batch's forward pass on one worker (see activation_bytes).
    max_activation_bytes: int = 2 * 1024**3
    # The highest `priority` a tenant's job may ask for, unless the token file gives that
    # tenant its own (services/auth.py). 0: going ahead of others is the operator's to grant.
    max_priority: int = 0


# A job's name is shown in listings and logs: printable, short, never a path.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:+@()-]*")
MAX_NAME_LENGTH = 128
RECURRENT_KINDS = ("lstm", "gru", "rnn")


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
    check_spec_size(spec, limits)
    check_name(spec.name)
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


def check_spec_size(spec: job_pb2.JobSpec, limits: Limits) -> None:
    """SpecError when the spec has more layers or bytes than this server takes. The layers are
    counted first and the count stops past the limit, so a spec of millions of layers costs
    no more to refuse than one just over it (the byte size walks every layer)."""
    layers = count_layers(spec.model, stop_after=limits.max_layers)
    if layers > limits.max_layers:
        raise SpecError("model.layers", f"has more than {limits.max_layers:,} layers (counting "
                                        f"those in residual blocks and each of a recurrent "
                                        f"layer's num_layers), this server's limit")
    size = spec.ByteSize()
    if size > limits.max_spec_bytes:
        raise SpecError("spec", f"is {size:,} bytes, more than this server's limit of "
                                f"{limits.max_spec_bytes:,}")


def count_layers(model: job_pb2.ModelSpec, stop_after: int) -> int:
    """The model's layers: those nested in residual blocks included, a recurrent layer counted
    once per stacked layer. Stops counting once past `stop_after` (so at most that + 1 of
    millions are visited); iterative, so nesting depth costs no stack."""
    count = 0
    pending = [iter(model.layers)]
    while pending and count <= stop_after:
        layer = next(pending[-1], None)
        if layer is None:
            pending.pop()
            continue
        kind = layer.WhichOneof("kind")
        if kind in RECURRENT_KINDS:
            count += max(getattr(layer, kind).num_layers, 1)
        else:
            count += 1
        if kind == "residual":
            pending.append(iter(layer.residual.layers))
    return count


def check_name(name: str) -> None:
    """SpecError unless the job's name is empty or printable, short and free of path
    separators (it once named shared-memory folders: `evil/../../x` escaped /dev/shm)."""
    if not name:
        return
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise SpecError("name", f"must be at most {MAX_NAME_LENGTH} characters: letters, digits, "
                                f"spaces and . _ - : + @ ( ), starting with a letter or digit; "
                                f"got {shown!r} ({len(name)} characters)")


def activation_bytes(job: ResolvedJob) -> tuple[int, int, int]:
    """(bytes, samples, values per sample): an estimate of the activations one worker holds
    for backward. A worker runs forward and backward one micro-batch at a time, and keeps
    every layer's output of that micro-batch until backward: its samples times the input's
    and every top-level layer's output size (worker/model_builder.py's plan), in the job's
    dtype. A lower bound: layers inside a block keep their own outputs too."""
    samples = math.ceil(job.batch_size / filled_micro_batches(
        job.batch_size, job.micro_batches, job.min_micro_batch_samples))
    values = math.prod(job.model.input_shape) + sum(math.prod(layer.output_shape)
                                                    for layer in job.model.layers)
    return samples * values * np.dtype(job.dtype).itemsize, samples, values


def check_priority(priority: int, max_priority: int, tenant: str,
                   min_priority: int | None = None) -> None:
    """InvalidArgument when a tenant asks for a priority outside its range: refused rather than
    changed, so that no job runs at a priority its owner did not choose."""
    if min_priority is not None and not min_priority <= priority <= max_priority:
        raise InvalidArgument("priority", f"must be from {min_priority} to {max_priority} for "
                                          f"tenant {tenant!r} on this server, got {priority} "
                                          f"(the operator sets the range: min_priority and "
                                          f"max_priority in serve's --config file)")
    if priority > max_priority:
        raise InvalidArgument("priority", f"must be at most {max_priority} for tenant "
                                          f"{tenant!r} on this server, got {priority} (the "
                                          f"operator sets the cap: serve --max-priority, or "
                                          f"max_priority in --config or the token file)")


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
    if job.total_steps > limits.max_total_steps:
        raise SpecError("data.epochs", f"{job.epochs:,} epochs of {job.steps_per_epoch:,} steps "
                                       f"are {job.total_steps:,} optimizer steps, more than this "
                                       f"server's limit of {limits.max_total_steps:,}")
    size, samples, values = activation_bytes(job)
    if size > limits.max_activation_bytes:
        raise SpecError("data.batch_size", f"a micro-batch of {samples:,} samples (batch_size "
                                           f"{job.batch_size:,} / {job.micro_batches} "
                                           f"micro_batches) keeps about {_mib(size)} of "
                                           f"activations on a worker ({values:,} values per "
                                           f"sample, {job.dtype}), more than this server's "
                                           f"limit of {_mib(limits.max_activation_bytes)}; "
                                           f"lower batch_size, raise micro_batches or narrow "
                                           f"the model")


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
