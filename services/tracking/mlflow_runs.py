"""Each job as an MLflow run, when the server is given a tracking URI
(`chainrule serve --mlflow-tracking-uri URI`).

    client = mlflow_client("sqlite:///mlflow.db")        # at serve start: a bad URI is refused
    runs = MlflowRuns(client, store.get_job)              # one of the job queue's observers
    ...
    runs.close()                                           # at server stop

A job's run is in its tenant's experiment, `chainrule/<tenant>`, tagged `chainrule.job_id`, so
a resumed job (and a job resumed by the next server start) continues its own run:
  - params: the job's spec flattened (`model.layers.0.linear.out_features`: `128`; MLflow
    allows no brackets in names), logged when the run is created;
  - per step: `train_loss`, `samples_per_second`, `learning_rate` and `gradient_norm`, for the
    job's first and last step and at most one step per `metric_interval_seconds` between;
  - per evaluation: `validation_loss`, and `validation_accuracy` for classifiers;
  - per recovery: `recoveries`, the count so far, at the step it happened in;
  - at its end: the status (FINISHED, FAILED with the error in the tag `chainrule.error`, or
    KILLED for a cancelled job) and, for a SUCCEEDED job, `final_validation_loss`,
    `final_validation_accuracy` and the model: the weights file and its JSON manifest as
    artifacts under `model/`.

An MLflow outage never fails or slows a job. The observer methods, called on the job's thread,
only throttle and put a record on a bounded queue; one thread talks to MLflow. A call that
fails is logged (once per job and kind of call, then counted) and its record dropped; when
the queue is full (MLflow too slow or hung), new records are dropped (`dropped`).

MLflow is imported by this module only, and this module only when a tracking URI is set:
`pip install 'chainrule[tracking]'` (mlflow-skinny, with SQLAlchemy and Alembic for sqlite:
stores).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from chainrule.v1 import job_pb2
from scheduler.job_states import CANCELLED, FAILED, RUNNING, SUCCEEDED
from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord
from scheduler.storage import manifest_path
from services.store import JobRecord
from services.tracking.record_writer import Record, RecordWriter

log = logging.getLogger(__name__)

JOB_ID_TAG = "chainrule.job_id"
TENANT_TAG = "chainrule.tenant"
ERROR_TAG = "chainrule.error"
EXPERIMENT_PREFIX = "chainrule/"
# MLflow's own limits (mlflow.utils.validation): params per log_batch call, a param's length.
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARACTERS = 6000
MLFLOW_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}
TRACKING_URI_FLAG = "--mlflow-tracking-uri"


class MlflowMissing(ValueError):
    """A tracking URI was given, but MLflow is not installed."""


def mlflow_client(tracking_uri: str) -> Any:
    """An MlflowClient for the URI: ValueError naming the flag when MLflow is missing or the
    URI is one it cannot use (an unknown scheme, a sqlite: file it cannot create)."""
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise MlflowMissing(f"{TRACKING_URI_FLAG}: MLflow is not installed; install it with "
                            f"pip install 'chainrule[tracking]'") from error
    try:
        return MlflowClient(tracking_uri=tracking_uri)
    except Exception as error:  # MlflowException, SQLAlchemy's errors, ...
        raise ValueError(f"{TRACKING_URI_FLAG}: MLflow cannot use {tracking_uri!r}: "
                         f"{error}") from error


def flatten_spec(spec: job_pb2.JobSpec) -> dict[str, str]:
    """The spec as MLflow params: one per leaf, named by its path, list indices as parts of
    it (`data.batch_size`, `model.layers.2.linear.out_features`: MLflow refuses brackets)."""
    flat: dict[str, str] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list) and value:
            for index, item in enumerate(value):
                visit(item, f"{path}.{index}")
        else:
            text = "{}" if value == {} else "[]" if value == [] else str(value)
            flat[path] = text[:MAX_PARAM_CHARACTERS]

    visit(json_format.MessageToDict(spec, preserving_proto_field_name=True), "")
    return flat


class MlflowRuns:
    """The job queue's observer that keeps each job's MLflow run."""

    def __init__(self, client: Any, job_record: Callable[[str], JobRecord | None], *,
                 artifact_location: str | None = None, metric_interval_seconds: float = 1.0,
                 queue_limit: int = 1000):
        """`client`: from `mlflow_client`. `job_record(job_id)`: the job's stored record (its
        tenant, spec, error, final validation and weights file). `artifact_location`: where
        the experiments this creates keep their artifacts (None: the tracking server's
        default; for a sqlite: URI that is MLflow's ./mlruns in the working folder)."""
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.client = client
        self.job_record = job_record
        self.artifact_location = artifact_location
        self.metric_interval_seconds = metric_interval_seconds
        self.failed_calls = 0  # MLflow calls that raised (their records dropped)
        # Per running job, touched by its own thread only: when a step was last sent, the
        # latest step (sent at the end if the throttle held it back), the recoveries so far.
        self._last_sent: dict[str, float] = {}
        self._latest: dict[str, StepRecord] = {}
        self._recoveries: dict[str, int] = {}
        # The MLflow thread's own.
        self._run_ids: dict[str, str] = {}
        self._warned: set[tuple[str, str]] = set()
        self._writer = RecordWriter("MLflow", self._send, limit=queue_limit,
                                    on_error=self._count_failure)

    @property
    def dropped(self) -> int:
        """Records not sent: the queue was full (MLflow too slow or hung)."""
        return self._writer.dropped

    # --- the queue's observer: throttle and enqueue, never wait -------------------------------

    def job_state_changed(self, job_id: str, state: str) -> None:
        if state == RUNNING:
            self._writer.put("start", job_id, None)
            return
        latest = self._latest.pop(job_id, None)
        if latest is not None:  # the run's last step, which the throttle held back
            self._writer.put("step", job_id, latest)
        self._last_sent.pop(job_id, None)
        if state in MLFLOW_STATUS:  # ended (QUEUED: stopped by a shutdown, resumed later)
            self._recoveries.pop(job_id, None)
            self._writer.put("end", job_id, state)

    def job_step(self, job_id: str, record: StepRecord) -> None:
        now = time.monotonic()
        last = self._last_sent.get(job_id)
        if (last is None or now - last >= self.metric_interval_seconds
                or record.step == record.total_steps):
            self._last_sent[job_id] = now
            self._latest.pop(job_id, None)
            self._writer.put("step", job_id, record)
        else:
            self._latest[job_id] = record

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None:
        self._writer.put("evaluation", job_id, record)

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None:
        count = self._recoveries[job_id] = self._recoveries.get(job_id, 0) + 1
        self._writer.put("recovery", job_id, (record.step, count))

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is queued, then end the thread; False when MLflow did not take it all
        within `timeout` (the rest is dropped: a hung tracking server must not hold the
        server's stop)."""
        return self._writer.close(timeout)

    # --- the MLflow thread --------------------------------------------------------------------

    def _count_failure(self, record: Record, error: Exception) -> None:
        # An outage, a refused value: never the job's problem.
        kind, job_id, _ = record
        self.failed_calls += 1
        if (job_id, kind) not in self._warned:
            self._warned.add((job_id, kind))
            log.warning("MLflow: a %s of job %s was not recorded (%s: %s); further failures "
                        "of this kind for the job are only counted", kind, job_id,
                        type(error).__name__, error)

    def _send(self, kind: str, job_id: str, payload: Any) -> None:
        if kind == "start":
            self._run_ids.pop(job_id, None)  # looked up again: a resume reopens its run
            self._run_id(job_id, reopen=True)
            return
        run_id = self._run_id(job_id)
        if run_id is None:
            return
        now_ms = int(time.time() * 1000)
        if kind == "step":
            record: StepRecord = payload
            values = {"train_loss": record.loss,
                      "samples_per_second": record.samples_per_second,
                      "learning_rate": record.learning_rate,
                      "gradient_norm": record.gradient_norm}
            self._log_metrics(run_id, values, record.step, now_ms)
        elif kind == "evaluation":
            evaluation: EvaluationRecord = payload
            self._log_metrics(run_id, {"validation_loss": evaluation.loss,
                                       "validation_accuracy": evaluation.accuracy},
                              evaluation.step, now_ms)
        elif kind == "recovery":
            step, count = payload
            self._log_metrics(run_id, {"recoveries": count}, step, now_ms)
        elif kind == "end":
            self._end(job_id, run_id, payload, now_ms)

    def _end(self, job_id: str, run_id: str, state: str, now_ms: int) -> None:
        job = self.job_record(job_id)
        if job is not None and state == SUCCEEDED:
            final = job.final_validation
            if final is not None:
                self._log_metrics(run_id, {"final_validation_loss": final.loss,
                                           "final_validation_accuracy": final.accuracy},
                                  final.step, now_ms)
            if job.weights_path:
                weights = Path(job.weights_path)
                for path in (weights, manifest_path(weights)):
                    if path.exists():
                        self.client.log_artifact(run_id, str(path), artifact_path="model")
        if job is not None and state == FAILED and job.error:
            self.client.set_tag(run_id, ERROR_TAG, job.error[:MAX_PARAM_CHARACTERS])
        self.client.set_terminated(run_id, status=MLFLOW_STATUS[state])
        self._run_ids.pop(job_id, None)

    def _log_metrics(self, run_id: str, values: Mapping[str, float | None], step: int,
                     timestamp_ms: int) -> None:
        metrics = [self._Metric(key, float(value), timestamp_ms, step)
                   for key, value in values.items()
                   if value is not None and math.isfinite(value)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _run_id(self, job_id: str, reopen: bool = False) -> str | None:
        """The job's run: found by its tag, or created with the spec as its params. `reopen`
        (the job started again): an ended run is marked RUNNING again."""
        run_id = self._run_ids.get(job_id)
        if run_id is not None:
            return run_id
        job = self.job_record(job_id)
        if job is None:  # deleted meanwhile
            return None
        experiment_id = self._experiment_id(job.tenant)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            if reopen and found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=job.spec.name or job_id,
                                         tags={JOB_ID_TAG: job_id, TENANT_TAG: job.tenant})
            run_id = run.info.run_id
            for params in _batches(flatten_spec(job.spec), PARAMS_PER_BATCH):
                self.client.log_batch(run_id, params=[self._Param(key, value)
                                                      for key, value in params])
        self._run_ids[job_id] = run_id
        return run_id

    def _experiment_id(self, tenant: str) -> str:
        name = f"{EXPERIMENT_PREFIX}{tenant}"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location,
                                                 tags={TENANT_TAG: tenant})
        except Exception:  # made meanwhile by another server on the same tracking URI
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id


def _batches(items: dict[str, str], size: int) -> Iterator[list[tuple[str, str]]]:
    pairs = sorted(items.items())
    for start in range(0, len(pairs), size):
        yield pairs[start:start + size]
