"""What a job spec means, fully resolved: every count, default, size and setting of a job,
decided once, here, for a given data set.

`resolve(spec, data)` checks the spec against the data set's shape and returns a `ResolvedJob`.
Everything downstream consumes that record and never reads the raw spec for a setting again:
the service's validation (resolve plus the server's limits), `chainrule train`, the job queue,
the job runner and the worker replicas. A spec that resolves cannot fail later for a spec
reason.

The model, loss, optimizer, schedule and clipping are read by worker/model_builder.py (one
layer at a time, with the field path of every error); this module adds what makes a job of
them: data split and batching, step counts, resources, evaluation, early stopping and
checkpoints. Proto3 leaves an unset number at 0, so "0 means the default" is decided here, with
the reason beside each default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chainrule.v1 import job_pb2
from worker.backprop.optim import Schedule
from worker.compression import Compression, PowerSGD, TopK
from worker.initial_weights import InitialWeights, WeightsShape, match_weights
from worker.kfac_layout import KFAC
from worker.model_builder import (
    Clipping,
    ModelPlan,
    build_clipping,
    build_loss,
    build_optimizer,
    build_planned_model,
    build_schedule,
    check_model_fits_data,
    plan_model,
    predictions_per_sample,
    resolve_dtype,
)
from worker.spec_error import SpecError

# Logical micro-batches per global batch when the spec does not say: fixed, never derived from
# the worker count, so a job's result does not depend on it (BRIEF invariant 1); 4 serves 1, 2
# and 4 workers with aligned subtrees of the reduction tree.
DEFAULT_MICRO_BATCHES = 4
PLACEMENT_STRATEGIES = ("", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
# A step's deadline when the spec does not say (resources.step_deadline): ten times the job's
# median step, and never under 3 s, so that a busy shared machine's pauses are not failures
# while a stopped worker of a millisecond step is still found in seconds, not minutes.
DEFAULT_DEADLINE_MULTIPLIER = 10.0
DEFAULT_DEADLINE_FLOOR_SECONDS = 3.0


@dataclass(frozen=True)
class DataShape:
    """What resolving needs to know of a data set, without its arrays."""

    samples: int  # the training part: every sample when the set brings no validation part
    validation_samples: int  # the set's own validation part; 0 when it has none
    feature_shape: tuple[int, ...]  # one sample's
    integer_features: bool  # tokens (for an embedding), never standardised
    task: str  # "classification" or "regression" (scheduler/datasets.py)
    num_classes: int  # 0 for regression
    target_shape: tuple[int, ...]  # one target's: () for a class label
    # A text (task "next_token"): its length in bytes. Its samples are windows whose count and
    # shape depend on the spec's context_length, so resolve() derives them (`text_windows`).
    text_bytes: int = 0


# Next-byte prediction: every byte value is a class.
BYTE_VOCABULARY = 256


@dataclass(frozen=True)
class TextWindows:
    """How a text of `text_bytes` bytes is cut for a job: the training part is bytes
    [0, cut), the validation part [cut, end); each part is cut into windows of context_length
    bytes, each with the byte after it (so the last byte of a part starts no window)."""

    cut: int
    training: int  # windows
    validation: int  # windows


def text_windows(text_bytes: int, context_length: int, fraction: float) -> TextWindows:
    """The windows of a text, or a SpecError naming the field that makes none possible. The
    validation part is the text's tail, cut before the windows are: no validation byte, target
    included, is ever in a training window."""
    if context_length < 2:
        raise SpecError("data.context_length", f"a text needs windows of >= 2 bytes, got "
                                               f"{context_length}")
    cut = text_bytes - round(text_bytes * fraction)
    windows = TextWindows(cut, max(cut - 1, 0) // context_length,
                          max(text_bytes - cut - 1, 0) // context_length)
    if not windows.training:
        raise SpecError("data.context_length",
                        f"the text's training part has {cut} bytes, too few for one window of "
                        f"{context_length} bytes and its next byte")
    if fraction > 0 and not windows.validation:
        raise SpecError("data.validation_fraction",
                        f"the text's validation part has {text_bytes - cut} bytes, too few for "
                        f"one window of {context_length} bytes; raise the fraction or shorten "
                        f"context_length")
    return windows


def _windowed(data: DataShape, context_length: int, fraction: float) -> DataShape:
    """A text's shape as the job will see it: windows of context_length byte tokens."""
    if not data.text_bytes:
        if context_length:
            raise SpecError("data.context_length", "only applies to text data sets (a text "
                                                   "upload); leave it unset for arrays")
        return data
    windows = text_windows(data.text_bytes, context_length, fraction)
    return DataShape(windows.training, windows.validation, (context_length,), True,
                     data.task, BYTE_VOCABULARY, (context_length,))


@dataclass(frozen=True)
class EarlyStoppingRule:
    """Stop when `patience` evaluations in a row brought no validation loss below the best
    so far minus `min_delta`."""

    patience: int
    min_delta: float
    restore_best: bool  # the result is the best evaluation's weights, not the last


@dataclass(frozen=True)
class StepDeadlineRule:
    """A step's deadline: max(multiplier x the median of the job's recent step times, floor)
    (scheduler/step_deadline.py keeps the times)."""

    multiplier: float = DEFAULT_DEADLINE_MULTIPLIER
    floor_seconds: float = DEFAULT_DEADLINE_FLOOR_SECONDS


@dataclass(frozen=True)
class ResolvedJob:
    name: str
    seed: int  # initial weights, validation split, sample order, dropout masks
    # --- resources (none of them changes the result) ----------------------------------------
    workers: int
    parameter_servers: int  # shards of the flat parameter vector and its optimizer state
    cpus_per_worker: float  # 0: the cluster's CPUs shared among the workers, at most 1 each
    placement_strategy: str  # "": SPREAD on a multi-node cluster, else PACK (at placement)
    memory_bytes_per_worker: int  # reserved in each worker's bundle; 0: none
    memory_bytes_per_shard: int  # reserved in each shard's bundle; 0: none
    # --- data ------------------------------------------------------------------------------
    dataset: str
    validation_fraction: float  # of the samples, when the set brings no validation part
    context_length: int  # bytes per window of a text data set; 0 for arrays
    training_samples: int  # the training split
    validation_samples: int  # the validation split; 0: no evaluation
    standardize: bool
    shuffle: bool
    # --- batching and steps --------------------------------------------------------------------
    batch_size: int  # samples per global batch
    micro_batches: int  # logical slices of each global batch, reduced in a fixed tree
    accumulation_steps: int  # global batches per optimizer step
    epochs: int
    batches_per_epoch: int  # the last one holds the remainder: no sample is dropped
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    # --- numerics, model, loss and optimizer ---------------------------------------------------
    dtype: str  # "float32" or "float64": parameters, activations, float features
    model: ModelPlan
    loss: str
    label_smoothing: float
    # Predictions scored per sample for accuracy (a class, T next bytes, k binary labels);
    # 0: a regression loss, no accuracy.
    predictions_per_sample: int
    optimizer: str  # a rule of worker.backprop.optim.RULES
    hyperparameters: Any  # that rule's hyperparameter dataclass
    schedule: Schedule  # the learning rate by optimizer step
    clipping: Clipping
    # --- evaluation, early stopping, checkpoints -----------------------------------------------
    evaluation_interval: int  # optimizer steps between evaluations on the validation split
    early_stopping: EarlyStoppingRule | None
    checkpoint_interval: int  # optimizer steps between checkpoints
    # --- the model's start -------------------------------------------------------------------
    # model.init_from: the file and the keys the runner loads before the first step; None: the
    # seed's initialisation only.
    init_weights: InitialWeights | None = None
    # --- failure detection (does not change the result) --------------------------------------
    step_deadline: StepDeadlineRule = StepDeadlineRule()
    # --- batching, for a model with a per-sample batch norm --------------------------------------
    # The fewest samples of a non-empty micro-batch: 2 when a batch norm sees one value per
    # channel of a sample (ModelPlan.per_sample_batch_norms), so that a short batch is cut into
    # fewer, fuller micro-batches (scheduler/sampler.cut_batch); else 1.
    min_micro_batch_samples: int = 1
    # --- a Parquet data set's columns (scheduler/parquet_dataset.py) ----------------------------
    label_column: str = ""
    feature_columns: tuple[str, ...] = ()  # (): every column but the labels
    # --- communication.compression: what the workers send the shards (None: whole gradients) --
    compression: Compression | None = None


def validation_split_size(samples: int, fraction: float) -> int:
    """How many of `samples` a job holds out for validation when its data set has no
    validation part: round(samples * fraction), at least 1 and leaving at least 1."""
    if fraction <= 0:
        return 0
    if samples < 2:
        raise SpecError("data.validation_fraction",
                        f"cannot hold out a validation split from {samples} sample(s)")
    return min(max(1, round(samples * fraction)), samples - 1)


def resolve(spec: job_pb2.JobSpec, data: DataShape, *, workers: int | None = None,
            parameter_servers: int | None = None, weights: WeightsShape | None = None,
            max_parameters: int | None = None) -> ResolvedJob:
    """The job `spec` describes on a data set of shape `data`, or a SpecError naming the first
    field at fault. `workers` and `parameter_servers`, when given, replace the spec's counts
    (`chainrule train --workers`). `weights` is the header of the file `model.init_from`
    names (found by the caller: an upload, or a local file for `chainrule train`).
    `max_parameters` (the server's limit) is checked before anything is allocated: matching
    `weights` builds the model once."""
    if not spec.HasField("model") or not spec.model.layers:
        raise SpecError("model.layers", "a model needs at least one layer")

    # --- data and batching ---------------------------------------------------------------------
    epochs = spec.data.epochs  # required: no default, the proto says >= 1
    if epochs < 1:
        raise SpecError("data.epochs", f"must be >= 1, got {epochs}")
    fraction = spec.data.validation_fraction
    if not 0.0 <= fraction < 1.0:
        raise SpecError("data.validation_fraction", f"must be in [0, 1), got {fraction!r}")
    if not spec.data.dataset.startswith("parquet:"):
        for field in ("label_column", "feature_columns"):
            if getattr(spec.data, field):
                raise SpecError(f"data.{field}", "is for Parquet data sets (parquet:PATH) only")
    data = _windowed(data, spec.data.context_length, fraction)
    if data.validation_samples:  # the set's own validation part wins; the fraction is ignored
        training, validation = data.samples, data.validation_samples
    else:
        validation = validation_split_size(data.samples, fraction)
        training = data.samples - validation
    batch_size = spec.data.batch_size  # required: no default, the proto says >= 1
    if batch_size < 1:
        raise SpecError("data.batch_size", f"must be >= 1, got {batch_size}")
    if batch_size > training:
        raise SpecError("data.batch_size", f"must be at most the training split's {training} "
                                           f"samples, got {batch_size}")
    if spec.data.micro_batches > batch_size:
        raise SpecError("data.micro_batches", f"must be at most data.batch_size ({batch_size}), "
                                             f"got {spec.data.micro_batches}")
    micro_batches = spec.data.micro_batches or DEFAULT_MICRO_BATCHES
    accumulation = spec.gradient_accumulation_steps or 1  # 0 means 1: no accumulation
    batches_per_epoch = math.ceil(training / batch_size)
    # An epoch's last optimizer step may accumulate fewer batches: steps never span epochs.
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * epochs

    # --- evaluation, early stopping, checkpoints -----------------------------------------------
    early_stopping = None
    if spec.HasField("early_stopping"):
        rule = spec.early_stopping
        # 0 is refused rather than read as 1: stopping after zero evaluations without an
        # improvement would end the job at its first evaluation, which no one means.
        if rule.patience < 1:
            raise SpecError("early_stopping.patience", f"must be >= 1, got {rule.patience}")
        if rule.min_delta < 0:
            raise SpecError("early_stopping.min_delta", f"must be >= 0, got {rule.min_delta!r}")
        if not validation:
            raise SpecError("early_stopping", "watches the validation loss, but the job has no "
                                              "validation split: set data.validation_fraction")
        early_stopping = EarlyStoppingRule(rule.patience, rule.min_delta, rule.restore_best)
    # 0: at every epoch's end, so an evaluation (and a checkpoint) always sees whole epochs.
    evaluation_interval = spec.eval_interval_steps or steps_per_epoch
    checkpoint_interval = spec.checkpoint.interval_steps or steps_per_epoch

    # --- resources -----------------------------------------------------------------------------
    # 0 means 1, as job.proto says: proto3 cannot tell a count left out of `resources` from one
    # written as 0, and `resources: {workers: 2}` must not be refused for its missing shards.
    resources = spec.resources
    for field, override in (("workers", workers), ("parameter_servers", parameter_servers)):
        if override is not None and override < 1:
            raise SpecError(f"resources.{field}", f"must be >= 1, got {override} (the "
                                                  f"{field.replace('_', '-')} override)")
    workers = workers or resources.workers or 1
    parameter_servers = parameter_servers or resources.parameter_servers or 1
    if resources.cpus_per_worker < 0:
        raise SpecError("resources.cpus_per_worker",
                        f"must be >= 0, got {resources.cpus_per_worker!r}")
    if resources.placement_strategy not in PLACEMENT_STRATEGIES:
        raise SpecError("resources.placement_strategy",
                        f"must be one of {', '.join(PLACEMENT_STRATEGIES[1:])}, got "
                        f"{resources.placement_strategy!r}")

    # --- the model against the data, loss, optimizer, schedule, clipping -----------------------
    dtype = resolve_dtype(spec).name
    input_dtype = "int64" if data.integer_features else dtype  # as the data set stores them
    check_model_fits_data(spec, data.feature_shape, task=data.task,
                          num_classes=data.num_classes, target_shape=data.target_shape,
                          input_dtype=input_dtype)
    model = plan_model(spec.model, data.feature_shape, input_dtype)
    if max_parameters is not None and model.parameters > max_parameters:
        raise SpecError("model", f"has {model.parameters:,} parameters, more than this "
                                 f"server's limit of {max_parameters:,}")
    if model.parameters and model.frozen_parameters == model.parameters:
        raise SpecError("model.layers", "every layer with parameters is frozen (trainable: "
                                        "false): nothing would train")
    init_weights = _initial_weights(spec, model, weights)
    min_micro_batch_samples = 2 if model.per_sample_batch_norms else 1
    if min_micro_batch_samples > 1:
        _check_batches_fit_batch_norm(model.per_sample_batch_norms[0], training, batch_size)
    if parameter_servers > model.parameters:
        raise SpecError("resources.parameter_servers",
                        f"{parameter_servers} shards for {model.parameters} parameters: at most "
                        f"one shard per parameter")
    loss = build_loss(spec)
    optimizer, hyperparameters = build_optimizer(spec)
    schedule = build_schedule(spec, total_steps)
    clipping = build_clipping(spec)
    compression = _compression(spec, optimizer)

    return ResolvedJob(
        name=spec.name, seed=spec.seed,
        workers=workers, parameter_servers=parameter_servers,
        cpus_per_worker=resources.cpus_per_worker,
        placement_strategy=resources.placement_strategy,
        memory_bytes_per_worker=resources.memory_bytes_per_worker,
        memory_bytes_per_shard=resources.memory_bytes_per_shard,
        step_deadline=_step_deadline(resources.step_deadline),
        dataset=spec.data.dataset, validation_fraction=fraction,
        context_length=spec.data.context_length,
        training_samples=training, validation_samples=validation,
        standardize=spec.data.standardize if spec.data.HasField("standardize") else True,
        shuffle=spec.data.shuffle if spec.data.HasField("shuffle") else True,
        batch_size=batch_size, micro_batches=micro_batches, accumulation_steps=accumulation,
        epochs=epochs, batches_per_epoch=batches_per_epoch, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        dtype=dtype, model=model, loss=loss.name, label_smoothing=loss.label_smoothing,
        predictions_per_sample=predictions_per_sample(loss.name, model.output_shape),
        optimizer=optimizer, hyperparameters=hyperparameters, schedule=schedule,
        clipping=clipping,
        evaluation_interval=evaluation_interval, early_stopping=early_stopping,
        checkpoint_interval=checkpoint_interval,
        init_weights=init_weights, min_micro_batch_samples=min_micro_batch_samples,
        label_column=spec.data.label_column, feature_columns=tuple(spec.data.feature_columns),
        compression=compression,
    )


def _compression(spec: job_pb2.JobSpec, optimizer: str) -> Compression | None:
    """communication.compression, checked: None when unset."""
    if not spec.communication.HasField("compression"):
        return None
    compression = spec.communication.compression
    method = compression.WhichOneof("method")
    field = f"communication.compression.{method}"
    if method is None:
        raise SpecError("communication.compression", "names no method: set powersgd: {rank: R} "
                                                     "or topk: {ratio: F}")
    if optimizer == KFAC:
        raise SpecError("communication.compression", "does not apply with the K-FAC optimizer "
                                                     "(its factor statistics travel whole)")
    if method == "powersgd":
        if compression.powersgd.rank < 1:
            raise SpecError(f"{field}.rank", f"must be >= 1, got {compression.powersgd.rank}")
        return PowerSGD(compression.powersgd.rank)
    ratio = compression.topk.ratio
    if not 0.0 < ratio <= 1.0:  # also refuses NaN
        raise SpecError(f"{field}.ratio", f"must be in (0, 1], got {ratio!r}")
    return TopK(ratio)


def _check_batches_fit_batch_norm(batch_norm: str, training: int, batch_size: int) -> None:
    """SpecError unless every batch has at least 2 samples: a batch norm that sees one value
    per channel of a sample has no variance to train on in a micro-batch of 1 sample, and a
    batch of 1 sample cannot be cut into anything larger. Longer batches too short for every
    micro-batch to get 2 samples are cut into fewer (scheduler/sampler.cut_batch)."""
    why = (f"{batch_norm} needs micro-batches of at least 2 samples to train (one value per "
           f"channel each, no variance from 1)")
    if batch_size < 2:
        raise SpecError("data.batch_size", f"a batch of 1 sample makes a micro-batch of 1 "
                                           f"sample, and {why}; use batch_size >= 2")
    if training % batch_size == 1:
        nearest = _nearest_batch_sizes(training, batch_size)
        raise SpecError("data.batch_size",
                        f"the training split's {training} samples in batches of {batch_size} "
                        f"leave a last batch of 1 sample, so a micro-batch of 1 sample, and "
                        f"{why}; choose a batch_size that leaves 0 or >= 2 samples over (e.g. "
                        f"{' or '.join(str(size) for size in nearest)})")


def _nearest_batch_sizes(training: int, batch_size: int) -> list[int]:
    """Up to two batch sizes nearest `batch_size`, below and above, that leave no last batch
    of 1 sample."""
    below = next((size for size in range(batch_size - 1, 1, -1) if training % size != 1), None)
    above = next((size for size in range(batch_size + 1, training + 1)
                  if training % size != 1), None)
    return [size for size in (below, above) if size is not None]


def _step_deadline(spec: job_pb2.StepDeadlineSpec) -> StepDeadlineRule:
    """resources.step_deadline with its defaults (0 means the default), or a SpecError."""
    multiplier = spec.multiplier or DEFAULT_DEADLINE_MULTIPLIER
    if not 2.0 <= multiplier <= 1000.0:  # also refuses nan and inf
        raise SpecError("resources.step_deadline.multiplier",
                        f"must be in [2, 1000] (0: {DEFAULT_DEADLINE_MULTIPLIER:g}), got "
                        f"{spec.multiplier!r}")
    floor = spec.floor_seconds or DEFAULT_DEADLINE_FLOOR_SECONDS
    if not 0.5 <= floor <= 86400.0:
        raise SpecError("resources.step_deadline.floor_seconds",
                        f"must be in [0.5, 86400] seconds (0: "
                        f"{DEFAULT_DEADLINE_FLOOR_SECONDS:g}), got {spec.floor_seconds!r}")
    return StepDeadlineRule(multiplier, floor)


def _initial_weights(spec: job_pb2.JobSpec, model: ModelPlan,
                     weights: WeightsShape | None) -> InitialWeights | None:
    """model.init_from checked against the model's state_dict keys and shapes. Those come
    from building the model once (the plan walk knows counts, not key names): only for a
    spec with init_from, and within the server's parameter limit."""
    if not spec.model.init_from:
        if weights is not None:
            raise ValueError("weights given for a spec without model.init_from")
        if spec.model.HasField("init_strict"):
            raise SpecError("model.init_strict", "only applies with model.init_from")
        return None
    if weights is None:
        raise SpecError("model.init_from", f"no weights file {spec.model.init_from!r}")
    built = build_planned_model(model, "float32", seed=0)
    shapes = {key: tuple(value.shape) for key, value in built.state_dict().items()}
    strict = spec.model.init_strict if spec.model.HasField("init_strict") else True
    return match_weights(shapes, weights, strict)
