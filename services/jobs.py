"""The service's domain: what each API operation does, in terms of the store, the job queue,
the uploads and the live event hub. No protobuf service types and no gRPC here: the servicer
adapts requests to these calls and these results back to messages.

Everything a tenant names (a job id, a data set) is looked up within that tenant; another
tenant's job is simply not found.

This object is also the queue's `JobHost` (durable transitions, checkpoints, resolving a job
and loading its data) and one of its observers (progress for GetJob and WatchJob).
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint
from scheduler.datasets import BUILTIN_DATASETS, Dataset, builtin_shape, from_text, text_shape
from scheduler.job_queue import JobOutcome, JobQueue, QueuedJob
from scheduler.job_states import CANCELLED, QUEUED, RUNNING, SUCCEEDED, TERMINAL_STATES
from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord
from scheduler.storage import (
    DEFAULT_KEEP_CHECKPOINTS,
    JobStorage,
    load_weights,
    manifest_path,
    weights_bytes,
)
from scheduler.training import prepare_dataset, save_trained_weights
from services import uploads
from services.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.events import EventHub, JobEvent
from services.store import (
    DatasetRecord,
    JobRecord,
    ProgressSummary,
    Store,
    ValidationSummary,
    parse_page_token,
)
from services.validation import Limits, check_priority, upload_name, validate_spec
from worker.initial_weights import WeightsShape, weights_reference
from worker.resolved_job import DataShape, ResolvedJob, resolve
from worker.spec_error import SpecError

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
WATCH_HEARTBEAT_SECONDS = 15.0  # a quiet watch repeats the state: the client sees we live
PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress writes to the store, per job
MODEL_FORMATS = {"safetensors": ".safetensors", "npz": ".npz", "onnx": ".onnx"}
# How long an ended job's checkpoints stay for ResumeJob before the sweep deletes them.
DEFAULT_CHECKPOINT_RETENTION_SECONDS = 3 * 24 * 3600.0


@dataclass(frozen=True)
class ModelDownload:
    format: str
    data: bytes
    sha256: str
    model_spec_json: str
    manifest_json: str


@dataclass
class _LiveJob:
    """A running job's bookkeeping for progress: when this run started, and its first step."""

    started: float
    epochs: int = 0
    first_step: int | None = None
    last_write: float = 0.0
    validation: ValidationSummary | None = None


@dataclass
class _Ending:
    """A run's end while it is being recorded (retried until the store takes it): what the
    first attempt read or wrote, which a later attempt must not read or write again."""

    progress: ProgressSummary | None
    traceback_recorded: bool = False


class JobService:
    def __init__(self, store: Store, data_dir: str | Path, *, limits: Limits | None = None,
                 max_upload_bytes: int = uploads.DEFAULT_MAX_UPLOAD_BYTES,
                 upload_limits: uploads.UploadLimits | None = None,
                 keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
                 checkpoint_retention_seconds: float = DEFAULT_CHECKPOINT_RETENTION_SECONDS,
                 tenant_max_priority: dict[str, int] | None = None):
        """`tenant_max_priority`: the tenants whose priority cap is not `limits.max_priority`
        (from the token file)."""
        self.store = store
        self.data_dir = Path(data_dir)
        self.storage = JobStorage(self.data_dir, keep_checkpoints)
        self.checkpoint_retention_seconds = checkpoint_retention_seconds
        # Held while an ended job's files are judged and changed (resume, delete, the retention
        # sweep), so that the sweep never deletes the checkpoint a resume has just relied on.
        self._files_lock = threading.Lock()
        self.limits = limits or Limits()
        self.tenant_max_priority = dict(tenant_max_priority or {})
        self.max_upload_bytes = max_upload_bytes
        self.upload_limits = upload_limits or uploads.UploadLimits()
        self.events = EventHub()
        self.queue: JobQueue | None = None
        self._live: dict[str, _LiveJob] = {}
        self._ending: dict[str, _Ending] = {}
        # A job's newest checkpoint that the disk refused (full, say): written when the run's
        # end is recorded, unless a later one is written first.
        self._unsaved: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def attach_queue(self, queue: JobQueue) -> None:
        self.queue = queue

    def resume_queued_jobs(self) -> int:
        """At start-up: jobs left QUEUED (or RUNNING, when the last process was killed) run
        again, in queue order, each from its last checkpoint."""
        jobs = self.store.jobs_in_states([QUEUED, RUNNING])
        for job in jobs:
            if job.state == RUNNING:
                self.store.set_state(job.id, QUEUED, from_states={RUNNING})
        assert self.queue is not None
        self.queue.submit_all(QueuedJob(job.id, job.spec, job.tenant) for job in jobs)
        return len(jobs)

    # --- jobs --------------------------------------------------------------------------------

    def submit(self, tenant: str, spec: job_pb2.JobSpec, request_id: str = "") -> JobRecord:
        if len(request_id) > 128:
            raise InvalidArgument("request_id", f"at most 128 characters, got {len(request_id)}")
        validate_spec(spec, self._data_shape(tenant, spec.data.dataset), self.limits,
                      self._weights_shape(tenant, spec))
        check_priority(spec.priority, self._max_priority(tenant), tenant)
        record = JobRecord(id=f"job-{uuid.uuid4().hex[:12]}", tenant=tenant, spec=spec,
                           state=QUEUED, created_at=time.time(), request_id=request_id)
        digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()
        job, created = self.store.create_job(record, digest)
        if created:
            assert self.queue is not None
            self.queue.submit(QueuedJob(job.id, spec, tenant))
        return job

    def get(self, tenant: str, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id, tenant)
        if job is None:
            raise NotFound(f"job_id: no job {job_id!r}")
        if job.state == RUNNING:  # fresher than the store's throttled copy
            job.progress = self.events.latest_progress(job_id) or job.progress
        return job

    def list(self, tenant: str, states: Iterable[str] = (), page_size: int = 0,
             page_token: str = "") -> tuple[list[JobRecord], str]:
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be at most {MAX_PAGE_SIZE}, got "
                                               f"{page_size}")
        jobs, cursor = self.store.list_jobs(tenant, list(states), page_size or DEFAULT_PAGE_SIZE,
                                            parse_page_token(page_token))
        return jobs, "" if cursor is None else str(cursor)

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        job = self.get(tenant, job_id)
        if job.state in TERMINAL_STATES:
            return job
        assert self.queue is not None
        if not self.queue.cancel(job_id):  # not held by the queue (the server is stopping)
            # Compare-and-set: a job that ended meanwhile (SUCCEEDED, say) keeps its end.
            if self.store.set_state(job_id, CANCELLED, from_states={QUEUED, RUNNING},
                                    finished=True):
                self.events.publish(JobEvent(job_id, time.time(), "state", state=CANCELLED))
        return self.get(tenant, job_id)

    def resume(self, tenant: str, job_id: str, epochs: int = 0) -> JobRecord:
        """Run an ended job again under its id: a CANCELLED or FAILED one from its newest
        intact checkpoint (step 0 without one), a SUCCEEDED one from its final checkpoint for
        `epochs` more epochs. `epochs` grows the spec's data.epochs."""
        job = self.get(tenant, job_id)
        if job.state not in TERMINAL_STATES:
            raise FailedPrecondition(f"job_id: job {job_id} is {job.state}; only a CANCELLED, "
                                     f"FAILED or SUCCEEDED job can be resumed")
        if job.state == SUCCEEDED and epochs <= 0:
            raise InvalidArgument("epochs", f"job {job_id} SUCCEEDED; to continue it, give how "
                                            f"many more epochs to train")
        if job.spec.data.epochs + epochs > min(self.limits.max_epochs, 2**32 - 1):
            # Checked before the sum is stored: data.epochs is a uint32 (it overflowed here).
            raise InvalidArgument("epochs", f"{job.spec.data.epochs} + {epochs} epochs is over "
                                            f"this server's limit of {self.limits.max_epochs}")
        spec = job_pb2.JobSpec()
        spec.CopyFrom(job.spec)
        spec.data.epochs += epochs
        validate_spec(spec, self._data_shape(tenant, spec.data.dataset), self.limits,
                      self._weights_shape(tenant, spec))
        check_priority(spec.priority, self._max_priority(tenant), tenant)  # the cap may be new
        with self._files_lock:
            if job.state == SUCCEEDED and not self.storage.has_checkpoint(job_id):
                days = self.checkpoint_retention_seconds / 86400
                raise FailedPrecondition(
                    f"job_id: job {job_id} has no checkpoint left to continue from (an ended "
                    f"job's are kept {days:g} days); submit its spec again")
            if not self.store.requeue_ended_job(job_id, spec):
                self._raise_changed(tenant, job_id)
        assert self.queue is not None
        self.queue.submit(QueuedJob(job_id, spec, tenant))
        return self.get(tenant, job_id)

    def delete(self, tenant: str, job_id: str) -> None:
        """Delete an ended job: its record and events, its checkpoints and its model."""
        job = self.get(tenant, job_id)
        if job.state not in TERMINAL_STATES:
            raise FailedPrecondition(f"job_id: job {job_id} is {job.state}; cancel it first")
        with self._files_lock:
            if not self.store.delete_job(job_id):
                self._raise_changed(tenant, job_id)
            # The record goes first: a crash here leaves files without a job, which the
            # retention sweep deletes, never a job whose files are gone.
            self.storage.delete_checkpoints(job_id)
            self.storage.delete_model(job_id)
        self.events.forget(job_id)

    def _raise_changed(self, tenant: str, job_id: str) -> None:
        """A compare-and-set lost to a concurrent request: say what the job is now."""
        job = self.get(tenant, job_id)  # NotFound when it was deleted meanwhile
        raise FailedPrecondition(f"job_id: job {job_id} is {job.state} now")

    # builtins.list: below `def list`, the bare name is that method in this class's scope.
    def delete_expired_checkpoints(self, now: float | None = None) -> builtins.list[str]:
        """The retention sweep: delete the checkpoints of jobs that ended at least
        `checkpoint_retention_seconds` ago, and of jobs that no longer exist. The ids swept."""
        now = time.time() if now is None else now
        swept = []
        for job_id in self.storage.jobs_with_checkpoints():
            with self._files_lock:
                job = self.store.get_job(job_id)
                if job is not None and (job.state not in TERMINAL_STATES
                                        or job.finished_at is None
                                        or now - job.finished_at
                                        < self.checkpoint_retention_seconds):
                    continue
                self.storage.delete_checkpoints(job_id)
            swept.append(job_id)
        if swept:
            log.info("deleted the checkpoints of %d ended job(s) past their retention",
                     len(swept))
        return swept

    def watch(self, tenant: str, job_id: str, min_progress_interval: float = 0.0,
              poll_seconds: float = 1.0,
              is_active: Callable[[], bool] = lambda: True) -> Iterator[JobEvent]:
        """The job's current state (and latest progress), then its events until it ends, or
        until the server stops, or until `is_active()` says the client has gone: that is
        checked every `poll_seconds` even when no event comes, so a stream of a gone client
        gives its thread back within seconds, not at the next heartbeat."""
        with self.events.subscribe(job_id) as subscription:  # before reading: miss nothing
            job = self.get(tenant, job_id)
            now = time.time()
            yield JobEvent(job_id, now, "state", state=job.state, error=job.error)
            if job.progress is not None:
                yield JobEvent(job_id, now, "progress", progress=job.progress)
            if job.state in TERMINAL_STATES:
                return
            last_progress, last_sent = 0.0, time.monotonic()
            while not self.events.closed.is_set() and is_active():
                event = subscription.get(timeout=poll_seconds)
                if event is None:
                    if time.monotonic() - last_sent >= WATCH_HEARTBEAT_SECONDS:
                        job = self.get(tenant, job_id)
                        event = JobEvent(job_id, time.time(), "state", state=job.state,
                                         error=job.error)
                    else:
                        continue
                if event.kind == "progress":
                    if event.time - last_progress < min_progress_interval:
                        continue
                    last_progress = event.time
                last_sent = time.monotonic()
                yield event
                if event.kind == "state" and event.state in TERMINAL_STATES:
                    return

    # --- data sets -----------------------------------------------------------------------------

    def upload(self, tenant: str, header: uploads.UploadHeader | None,
               chunks: Iterable[bytes]) -> DatasetRecord:
        header = uploads.check_header(header, self.max_upload_bytes)
        if self.store.get_dataset(tenant, header.name) is not None:
            raise AlreadyExists(f"header.name: a data set named {header.name!r} already "
                                f"exists; delete it first (`chainrule datasets delete "
                                f"{header.name}`, Client.delete_dataset)")
        received = uploads.receive(header, chunks, self.data_dir / "tmp")
        folder = self.data_dir / "datasets" / _tenant_folder(tenant)
        suffix = uploads.STORED_SUFFIXES[header.format]
        stored = folder / f"{header.name}-{uuid.uuid4().hex[:8]}{suffix}"
        try:
            summary = uploads.store_upload(header, received, stored, self.upload_limits)
            record = uploads.record_for(tenant, header, stored, summary)
            self.store.add_dataset(record)
            return record
        except BaseException:
            stored.unlink(missing_ok=True)
            raise
        finally:
            received.unlink(missing_ok=True)

    def datasets(self, tenant: str) -> tuple[builtins.list[DatasetRecord], tuple[str, ...]]:
        return self.store.list_datasets(tenant), BUILTIN_DATASETS

    def delete_dataset(self, tenant: str, name: str) -> None:
        if self.store.get_dataset(tenant, name) is None:
            raise NotFound(f"name: no uploaded data set {name!r}")
        users = self.store.active_jobs_using(tenant, [name, f"upload:{name}"])
        users += [job.id for job in self.store.jobs_in_states([QUEUED, RUNNING])
                  if job.tenant == tenant and _initialises_from(job.spec, name)]
        if users:
            raise FailedPrecondition(f"name: data set {name!r} is used by queued or running "
                                     f"job(s) {', '.join(users)}")
        record = self.store.delete_dataset(tenant, name)
        if record is not None:
            Path(record.path).unlink(missing_ok=True)

    # --- models --------------------------------------------------------------------------------

    def download(self, tenant: str, job_id: str, format: str = "") -> ModelDownload:
        format = format or "safetensors"
        if format not in MODEL_FORMATS:
            raise InvalidArgument("format", f"must be 'safetensors', 'npz' or 'onnx', got "
                                            f"{format!r}")
        job = self.get(tenant, job_id)
        if job.state != SUCCEEDED or not job.weights_path:
            raise FailedPrecondition(f"job_id: job {job_id} is {job.state}; only a SUCCEEDED "
                                     f"job has a model")
        path = Path(job.weights_path)
        if format == "onnx":
            data = self._onnx_model(job_id, job.spec, path)
        elif MODEL_FORMATS[format] == path.suffix:
            data = path.read_bytes()
        else:
            data = weights_bytes(load_weights(path), MODEL_FORMATS[format])
        manifest = manifest_path(path)
        return ModelDownload(
            format=format, data=data, sha256=hashlib.sha256(data).hexdigest(),
            model_spec_json=json_format.MessageToJson(job.spec.model,
                                                      preserving_proto_field_name=True),
            manifest_json=manifest.read_text() if manifest.exists() else "{}",
        )

    @staticmethod
    def _onnx_model(job_id: str, spec: job_pb2.JobSpec, path: Path) -> bytes:
        from scheduler import onnx_export  # onnx takes half a second to import: when asked

        try:
            return onnx_export.export_weights_file(spec, path)
        except onnx_export.OnnxExportError as error:
            raise FailedPrecondition(f"format: job {job_id}'s model cannot be exported to "
                                     f"ONNX: {error}") from None

    # --- the queue's JobHost -------------------------------------------------------------------

    def prepare(self, job: QueuedJob) -> tuple[ResolvedJob, Dataset]:
        """The job resolved against its data set (validated at submit, so a spec error here
        is a bug), and the data set loaded, split and standardised for it."""
        name = upload_name(job.spec.data.dataset)
        loaded, text = None, None
        shape = builtin_shape(job.spec.data.dataset) if name is None else None
        if name is not None:
            record = self.store.get_dataset(job.tenant, name)
            if record is None:
                raise FileNotFoundError(f"data set {name!r} was deleted")
            if record.format == "text":  # cut into windows once the job's context is known
                text, shape = Path(record.path), text_shape(record.size_bytes)
            else:
                loaded = uploads.to_dataset(uploads.load_arrays(record.path), name=name)
                shape = loaded.shape
        assert shape is not None
        resolved = resolve(job.spec, shape, weights=self._weights_shape(job.tenant, job.spec))
        if text is not None:
            loaded = from_text(text.read_bytes(), resolved.context_length,
                               resolved.validation_fraction, name=name or "")
        with self._lock:  # progress says "epoch e of E"
            self._live.setdefault(job.job_id, _LiveJob(time.monotonic())).epochs = resolved.epochs
        return resolved, prepare_dataset(resolved, loaded)

    def load_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The newest intact checkpoint. A corrupt one is set aside and named in the job's
        events, and the one before it used; with none left the job starts again from step 0
        (a warning event): a bad file never fails a job."""
        latest = self.storage.latest_checkpoint(job_id)
        for corrupt in latest.set_aside:
            log.warning("job %s: checkpoint set aside as %s: %s", job_id, corrupt.renamed,
                        corrupt.reason)
            self.store.add_event(job_id, "checkpoint_corrupt", {
                "file": corrupt.original.name, "set_aside_as": corrupt.renamed.name,
                "reason": corrupt.reason})
        if latest.checkpoint is None or latest.path is None:
            if latest.set_aside:
                message = "no intact checkpoint left: the job starts again from step 0"
                log.warning("job %s: %s", job_id, message)
                self.store.add_event(job_id, "warning", {"message": message})
            return None
        self.store.add_event(job_id, "resumed", {"step": latest.checkpoint.step,
                                                 "file": latest.path.name})
        return latest.checkpoint

    def save_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> None:
        """Write a checkpoint. One the disk refuses (full, say) does not stop the job: the
        runner keeps its state in memory, the previous checkpoint stays on disk (an interrupted
        job resumes from it and replays to the same bits), and the refused one is written when
        the run's end is recorded."""
        try:
            self.storage.save_checkpoint(job_id, checkpoint)
        except OSError as error:
            with self._lock:
                self._unsaved[job_id] = checkpoint
            log.warning("job %s: the checkpoint of step %d was not written (%s); training goes "
                        "on", job_id, checkpoint.step, error)
            return
        with self._lock:
            self._unsaved.pop(job_id, None)

    def _write_unsaved_checkpoint(self, job_id: str) -> None:
        """The newest checkpoint the disk refused, if any, written now (OSError: not yet)."""
        with self._lock:
            checkpoint = self._unsaved.get(job_id)
        if checkpoint is None:
            return
        self.storage.save_checkpoint(job_id, checkpoint)
        with self._lock:
            if self._unsaved.get(job_id) is checkpoint:
                del self._unsaved[job_id]

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self._live[job_id] = _LiveJob(time.monotonic())  # its epochs once it is resolved
        if not self.store.set_state(job_id, RUNNING, from_states={QUEUED}, started=True):
            raise RuntimeError(f"job {job_id} is no longer QUEUED (cancelled meanwhile?): "
                               f"not started")

    def job_requeued(self, job_id: str) -> None:
        self._write_unsaved_checkpoint(job_id)  # the stop's own: the next start resumes there
        self._flush_progress(job_id)
        # Compare-and-set: a cancel that came while the job stopped stays CANCELLED.
        self.store.set_state(job_id, QUEUED, from_states={RUNNING})

    def job_finished(self, job_id: str, outcome: JobOutcome) -> None:
        """Record how a run ended: its last checkpoint and progress, its model when it
        SUCCEEDED, then its state, compare-and-set from QUEUED or RUNNING (an ended job keeps
        its end). Nothing is deleted here. The queue calls this again until it succeeds (a
        full disk, a locked store): the result stays in memory meanwhile, and what the first
        attempt read (the live progress) or recorded (a traceback) is not read or recorded
        twice."""
        ending = self._ending.get(job_id)
        if ending is None:  # the first attempt
            ending = self._ending[job_id] = _Ending(self._latest_progress(job_id))
            # This run's bookkeeping goes before its end is recorded: from then on a resume
            # may start the job's next run, whose own bookkeeping must stay.
            with self._lock:
                self._live.pop(job_id, None)
            self.events.forget(job_id)
        self._write_unsaved_checkpoint(job_id)
        if ending.progress is not None:
            self.store.set_progress(job_id, ending.progress)
        if outcome.traceback and not ending.traceback_recorded:
            # The job's log shows why it failed, before the FAILED state.
            self.store.add_event(job_id, "traceback", {"text": outcome.traceback})
            ending.traceback_recorded = True
        final, weights = None, ""
        result = outcome.result
        if outcome.state == SUCCEEDED and result is not None:
            job = self.store.get_job(job_id)
            assert job is not None
            if result.final_evaluation is not None:
                final = _validation(result.final_evaluation)
            path = save_trained_weights(self.storage.model_path(job_id), job.spec, result,
                                        job_id=job_id, private=True)
            weights = str(path)
        recorded = self.store.set_state(job_id, outcome.state, from_states={QUEUED, RUNNING},
                                        error=outcome.error, finished=True,
                                        final_validation=final, weights_path=weights)
        del self._ending[job_id]
        if not recorded:
            log.warning("job %s ended %s, but its record had ended already: kept as it was",
                        job_id, outcome.state)

    # --- the queue's observer ------------------------------------------------------------------

    def job_state_changed(self, job_id: str, state: str) -> None:
        job = self.store.get_job(job_id)
        self.events.publish(JobEvent(job_id, time.time(), "state", state=state,
                                     error=job.error if job is not None else ""))

    def job_step(self, job_id: str, record: StepRecord) -> None:
        now = time.monotonic()
        with self._lock:
            live = self._live.setdefault(job_id, _LiveJob(now))
            if live.first_step is None:
                live.first_step, live.started = record.step - 1, now - record.timings.wall
            done = record.step - live.first_step
            eta = (now - live.started) / done * (record.total_steps - record.step)
            validation, epochs = live.validation, live.epochs
            write = now - live.last_write >= PROGRESS_WRITE_INTERVAL
            if write:
                live.last_write = now
        progress = ProgressSummary(record.step, record.total_steps, record.epoch, epochs,
                                   record.loss, record.samples_per_second, eta, validation)
        self.events.publish(JobEvent(job_id, time.time(), "progress", progress=progress))
        if write:
            self.store.set_progress(job_id, progress)

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None:
        validation = _validation(record)
        with self._lock:
            if job_id in self._live:
                self._live[job_id].validation = validation
        self.store.add_event(job_id, "validation", validation.__dict__)
        self.events.publish(JobEvent(job_id, time.time(), "validation", validation=validation))

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None:
        """A recovery, as it happens: in the server's log, the job's stored events (its log)
        and its watchers' streams. Published first: a store that refuses the write (a full
        disk) must not keep it from the watchers."""
        log.warning("job %s: %s", job_id, record.message)
        self.events.publish(JobEvent(job_id, time.time(), "recovery", recovery=record))
        self.store.add_event(job_id, "recovery", {"step": record.step, "kind": record.kind,
                                                  "message": record.message})

    def _flush_progress(self, job_id: str) -> None:
        """The latest progress into the store (writes are throttled while running)."""
        progress = self._latest_progress(job_id)
        if progress is not None:
            self.store.set_progress(job_id, progress)

    def _latest_progress(self, job_id: str) -> ProgressSummary | None:
        """The running job's latest progress, with its latest validation."""
        progress = self.events.latest_progress(job_id)
        if progress is not None:
            with self._lock:
                live = self._live.get(job_id)
                if live is not None and live.validation is not None:
                    progress = ProgressSummary(**{**progress.__dict__,
                                                  "validation": live.validation})
        return progress

    # --- helpers -------------------------------------------------------------------------------

    def _max_priority(self, tenant: str) -> int:
        return self.tenant_max_priority.get(tenant, self.limits.max_priority)

    def _data_shape(self, tenant: str, dataset: str) -> DataShape | None:
        name = upload_name(dataset)
        if name is None:
            return builtin_shape(dataset) if dataset else None
        record = self.store.get_dataset(tenant, name)
        if record is None:
            return None
        if record.format == "safetensors":
            raise InvalidArgument("data.dataset", f"{name!r} is a safetensors upload: weights "
                                                  f"for model.init_from, not a data set")
        if record.format == "text":  # a text's samples are its bytes (resolve cuts windows)
            return text_shape(record.size_bytes)
        target_shape = record.target_shape
        if target_shape is None:  # a row from before the store kept it: the file's header
            target_shape = (() if record.task == "classification"
                            else uploads.stored_target_shape(record.path))
        return DataShape(record.samples, record.validation_samples, record.feature_shape,
                         record.integer_features, record.task, record.num_classes, target_shape)


    def _weights_shape(self, tenant: str, spec: job_pb2.JobSpec) -> WeightsShape | None:
        """The header of the upload a spec's model.init_from names (None without init_from),
        from the store's row: InvalidArgument when there is no such upload of weights."""
        if not spec.model.init_from:
            return None
        try:
            kind, name = weights_reference(spec.model.init_from)
        except SpecError as error:
            raise InvalidArgument(error.field_path, error.message) from error
        if kind == "file":
            raise InvalidArgument("model.init_from", "the service reads no local files: upload "
                                                     "the weights (chainrule upload "
                                                     "FILE.safetensors --format safetensors) "
                                                     "and name them as upload:NAME")
        record = self.store.get_dataset(tenant, name)
        if record is None:
            raise InvalidArgument("model.init_from", f"no uploaded weights {name!r}")
        if record.format != "safetensors" or record.tensors is None:
            raise InvalidArgument("model.init_from", f"{name!r} is a {record.format} upload, not "
                                                     f"weights (upload a .safetensors file with "
                                                     f"--format safetensors)")
        return WeightsShape(record.path, record.tensors, name)


def _initialises_from(spec: job_pb2.JobSpec, name: str) -> bool:
    """Whether the spec's model starts from the weights upload `name`."""
    try:
        return bool(spec.model.init_from) and weights_reference(spec.model.init_from) == (
            "upload", name)
    except SpecError:
        return False


def _validation(record: EvaluationRecord) -> ValidationSummary:
    return ValidationSummary(record.step, record.loss, record.accuracy, record.samples)


def _tenant_folder(tenant: str) -> str:
    # Tenant names come from the token file; never let one become a path.
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]

