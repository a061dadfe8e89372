"""The service's domain: what each API operation does, in terms of the store, the job queue,
the uploads and the live event hub. No protobuf service types and no gRPC here: the servicer
adapts requests to these calls and these results back to messages.

Everything a tenant names (a job id, a data set) is looked up within that tenant; another
tenant's job is simply not found.

The queue's side of a job's life (its start, checkpoints, progress and end) is recorded by
services/job_lifecycle.py, not here.
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
from scheduler.datasets import BUILTIN_DATASETS
from scheduler.job_queue import JobQueue, QueuedJob
from scheduler.job_states import CANCELLED, QUEUED, RUNNING, SUCCEEDED, TERMINAL_STATES
from scheduler.ray_cluster import alive_nodes
from scheduler.storage import (
    JobStorage,
    load_weights,
    manifest_path,
    weights_bytes,
)
from services import uploads
from services.auth import TenantSettings
from services.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.events import EventHub, JobEvent
from services.job_inputs import data_shape, initialises_from, weights_shape
from services.node_drain import DrainResult, drain_node
from services.parquet_upload import PARQUET_UPLOAD_PREFIX
from services.store import (
    DatasetRecord,
    JobRecord,
    Store,
    parse_page_token,
)
from services.submit_rate import QUOTA as SUBMIT_RATE_QUOTA
from services.submit_rate import UNLIMITED, SubmitRateLimiter
from services.validation import Limits, check_priority, validate_spec

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
WATCH_HEARTBEAT_SECONDS = 15.0  # a quiet watch repeats the state: the client sees we live
# A watch sends at most 4 progress and 4 validation events a second, whatever it asks for:
# each event costs the server a send on the stream's thread, and one tenant's 200 watches of a
# fast job asking for every step (3,500 sends/s) took another tenant's GetJob p99 from 5 to
# 140 ms (bench/hostile.py). The newest of each kind is sent; a progress event carries the
# latest validation too.
MIN_PROGRESS_INTERVAL_SECONDS = 0.25
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


class JobService:
    """What a caller may do with jobs, data sets and models. The queue runs the jobs; their
    life as it runs them is recorded by the lifecycle host (services/job_lifecycle.py), which
    shares this service's store, files and event hub."""

    def __init__(self, store: Store, data_dir: str | Path, storage: JobStorage,
                 events: EventHub, *, limits: Limits | None = None,
                 max_upload_bytes: int = uploads.DEFAULT_MAX_UPLOAD_BYTES,
                 upload_limits: uploads.UploadLimits | None = None,
                 checkpoint_retention_seconds: float = DEFAULT_CHECKPOINT_RETENTION_SECONDS,
                 tenant_max_priority: dict[str, int] | None = None,
                 tenant_min_priority: dict[str, int] | None = None,
                 tenant_settings: dict[str, TenantSettings] | None = None,
                 submit_rate: SubmitRateLimiter | None = None):
        """`tenant_max_priority`: the tenants whose priority cap is not `limits.max_priority`;
        `tenant_min_priority`: the tenants with a lowest priority; `tenant_settings`: the
        tenants with a weight or quotas (all from the token or configuration file);
        `submit_rate`: how fast each tenant may submit and resume jobs (default: no limit)."""
        self.store = store
        self.data_dir = Path(data_dir)
        self.storage = storage
        self.events = events
        self.checkpoint_retention_seconds = checkpoint_retention_seconds
        # Held while an ended job's files are judged and changed (resume, delete, the retention
        # sweep), so that the sweep never deletes the checkpoint a resume has just relied on.
        self._files_lock = threading.Lock()
        self.limits = limits or Limits()
        self.tenant_max_priority = dict(tenant_max_priority or {})
        self.tenant_min_priority = dict(tenant_min_priority or {})
        self.tenant_settings = dict(tenant_settings or {})
        self.max_upload_bytes = max_upload_bytes
        self.upload_limits = upload_limits or uploads.UploadLimits()
        self.submit_rate = submit_rate or SubmitRateLimiter(UNLIMITED)
        self.queue: JobQueue | None = None
        # Told of each submit refused for a quota (tenant, quota): the metrics count them.
        self.on_quota_rejection: Callable[[str, str], None] = lambda tenant, quota: None

    def attach_queue(self, queue: JobQueue) -> None:
        self.queue = queue

    # --- jobs --------------------------------------------------------------------------------

    def submit(self, tenant: str, spec: job_pb2.JobSpec, request_id: str = "") -> JobRecord:
        if len(request_id) > 128:
            raise InvalidArgument("request_id", f"at most 128 characters, got {len(request_id)}")
        digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()
        if request_id:
            # A retry of a submit that went through gets its job, and is not charged to the
            # submit rate: it queues nothing.
            earlier = self.store.job_of_request(tenant, request_id, digest)
            if earlier is not None:
                return earlier
        self._take_submit_token(tenant)  # before the spec is validated: a refusal is cheap
        validate_spec(spec, data_shape(self.store, tenant, spec), self.limits,
                      weights_shape(self.store, tenant, spec))
        self._check_priority(tenant, spec.priority)
        self._check_fits(tenant, spec)
        self._check_stored_bytes(tenant)
        record = JobRecord(id=f"job-{uuid.uuid4().hex[:12]}", tenant=tenant, spec=spec,
                           state=QUEUED, created_at=time.time(), request_id=request_id)
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
        elif job.state == QUEUED and self.queue is not None:
            place = self.queue.place_of(job_id)
            if place is not None:
                job.queue_position, job.wait_reason = place.position, place.reason
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

    def drain_node(self, node: str, undrain: bool = False) -> DrainResult:
        """Drain (or undrain) a Ray node for every tenant (services/node_drain.py); whether the
        caller may is the servicer's check (an admin)."""
        assert self.queue is not None
        return drain_node(self.queue, node, undrain, alive_nodes())

    def resume(self, tenant: str, job_id: str, epochs: int = 0) -> JobRecord:
        """Run an ended job again under its id: a CANCELLED or FAILED one from its newest
        intact checkpoint (step 0 without one), a SUCCEEDED one from its final checkpoint for
        `epochs` more epochs. `epochs` grows the spec's data.epochs."""
        self._take_submit_token(tenant)  # a resume queues a run, as a submit does
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
        validate_spec(spec, data_shape(self.store, tenant, spec), self.limits,
                      weights_shape(self.store, tenant, spec))
        self._check_priority(tenant, spec.priority)  # the range may be new
        self._check_fits(tenant, spec)
        self._check_stored_bytes(tenant)  # a resumed run writes checkpoints and a model too
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
        """Delete an ended job: its record and events, its checkpoints, its model and its
        TensorBoard files."""
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
            self.storage.delete_tensorboard(job_id)
        self.events.forget(job_id)

    def _raise_changed(self, tenant: str, job_id: str) -> None:
        """A compare-and-set lost to a concurrent request: say what the job is now."""
        job = self.get(tenant, job_id)  # NotFound when it was deleted meanwhile
        raise FailedPrecondition(f"job_id: job {job_id} is {job.state} now")

    # builtins.list: below `def list`, the bare name is that method in this class's scope.
    def delete_expired_checkpoints(self, now: float | None = None) -> builtins.list[str]:
        """The retention sweep: delete the checkpoints of jobs that ended at least
        `checkpoint_retention_seconds` ago, and of jobs that no longer exist (and those jobs'
        TensorBoard files). The ids whose checkpoints were swept."""
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
        for job_id in self.storage.jobs_with_tensorboard_files():
            with self._files_lock:
                # A deleted job's: its TensorBoard writer, a moment behind, wrote after delete.
                if self.store.get_job(job_id) is None:
                    self.storage.delete_tensorboard(job_id)
        return swept

    def watch(self, tenant: str, job_id: str, min_progress_interval: float = 0.0,
              poll_seconds: float = 1.0,
              is_active: Callable[[], bool] = lambda: True) -> Iterator[JobEvent]:
        """The job's current state (and latest progress), then its events until it ends, or
        until the server stops, or until `is_active()` says the client has gone: that is
        checked every `poll_seconds` even when no event comes, so a stream of a gone client
        gives its thread back within seconds, not at the next heartbeat."""
        min_progress_interval = max(min_progress_interval, MIN_PROGRESS_INTERVAL_SECONDS)
        # Subscribed before reading the job: nothing is missed between the two.
        with self.events.subscribe(job_id, min_progress_interval, tenant) as subscription:
            job = self.get(tenant, job_id)
            now = time.time()
            yield JobEvent(job_id, now, "state", state=job.state, error=job.error)
            if job.progress is not None:
                yield JobEvent(job_id, now, "progress", progress=job.progress)
            if job.state in TERMINAL_STATES:
                return
            last_sent = time.monotonic()
            while not self.events.closed.is_set() and is_active():
                event = subscription.get(timeout=poll_seconds)
                if event is None:
                    if time.monotonic() - last_sent < WATCH_HEARTBEAT_SECONDS:
                        continue
                    job = self.get(tenant, job_id)
                    event = JobEvent(job_id, time.time(), "state", state=job.state,
                                     error=job.error)
                last_sent = time.monotonic()
                yield event
                if event.kind == "state" and event.state in TERMINAL_STATES:
                    return

    # --- data sets -----------------------------------------------------------------------------

    def upload(self, tenant: str, header: uploads.UploadHeader | None,
               chunks: Iterable[bytes]) -> DatasetRecord:
        header = uploads.check_header(header, self.max_upload_bytes)
        self._check_stored_bytes(tenant, adding=header.size_bytes)
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
        users = self.store.active_jobs_using(tenant, [name, f"upload:{name}",
                                                      f"{PARQUET_UPLOAD_PREFIX}{name}"])
        users += [job.id for job in self.store.jobs_in_states([QUEUED, RUNNING])
                  if job.tenant == tenant and initialises_from(job.spec, name)]
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

    # --- helpers -------------------------------------------------------------------------------

    def _check_priority(self, tenant: str, priority: int) -> None:
        check_priority(priority, self.tenant_max_priority.get(tenant, self.limits.max_priority),
                       tenant, self.tenant_min_priority.get(tenant))

    def stored_bytes(self, tenant: str) -> int:
        """What the tenant keeps on this server's disk: its uploaded data sets, and its jobs'
        checkpoints and models."""
        files = [Path(record.path) for record in self.store.list_datasets(tenant)]
        for job_id in self.store.job_ids(tenant):
            files += [*self.storage.checkpoint_folder(job_id).glob("*"),
                      self.storage.model_path(job_id)]
        return sum(_size(path) for path in files)

    def _check_stored_bytes(self, tenant: str, adding: int = 0) -> None:
        """ResourceExhausted when the tenant keeps its quota of bytes already (a job would
        write checkpoints and a model), or would with `adding` more (an upload)."""
        quota = self.tenant_settings.get(tenant, TenantSettings()).max_stored_bytes
        if not quota:
            return
        kept = self.stored_bytes(tenant)
        if (kept + adding > quota) if adding else (kept >= quota):
            self.on_quota_rejection(tenant, "max_stored_bytes")
            over = (f"; this upload's {adding} bytes more would be over its quota of {quota}"
                    if adding else f", at or over its quota of {quota}")
            raise ResourceExhausted(f"max_stored_bytes: tenant {tenant} keeps {kept} bytes "
                                    f"(uploads, checkpoints, models){over}; delete data sets "
                                    f"or jobs first")

    def _unfit_field(self, spec: job_pb2.JobSpec) -> str:
        """The resource field to blame for a job that can never fit: its memory when the same
        job without memory would fit, else its CPUs."""
        assert self.queue is not None
        resources = spec.resources
        if resources.memory_bytes_per_worker or resources.memory_bytes_per_shard:
            without_memory = job_pb2.JobSpec()
            without_memory.CopyFrom(spec)
            without_memory.resources.ClearField("memory_bytes_per_worker")
            without_memory.resources.ClearField("memory_bytes_per_shard")
            if self.queue.never_fits(QueuedJob("", without_memory, "")) is None:
                return ("resources.memory_bytes_per_worker"
                        if resources.memory_bytes_per_worker else
                        "resources.memory_bytes_per_shard")
        return ("resources.cpus_per_worker" if resources.cpus_per_worker > 0
                else "resources.workers")

    def _take_submit_token(self, tenant: str) -> None:
        try:
            self.submit_rate.take(tenant)
        except ResourceExhausted:
            self.on_quota_rejection(tenant, SUBMIT_RATE_QUOTA)
            raise

    def _check_fits(self, tenant: str, spec: job_pb2.JobSpec) -> None:
        """A job that could never fit the cluster, or its tenant's running-CPU quota, would
        wait forever; one past the tenant's queued-jobs quota would be over it: refused now."""
        assert self.queue is not None
        job = QueuedJob("", spec, tenant)
        reason = self.queue.never_fits(job)
        if reason is not None:
            raise FailedPrecondition(f"{self._unfit_field(spec)}: the job can never run on "
                                     f"this cluster: {reason}")
        quota = self.tenant_settings.get(tenant, TenantSettings())
        cpus = self.queue.demanded_cpus(job)
        if cpus > quota.max_running_cpus:
            self.on_quota_rejection(tenant, "max_running_cpus")
            raise ResourceExhausted(f"max_running_cpus: the job needs {cpus:g} CPUs, more than "
                                    f"tenant {tenant}'s quota of {quota.max_running_cpus:g} "
                                    f"running CPUs")
        queued = self.queue.queued_jobs(tenant)
        if quota.max_queued_jobs and queued >= quota.max_queued_jobs:
            self.on_quota_rejection(tenant, "max_queued_jobs")
            raise ResourceExhausted(f"max_queued_jobs: tenant {tenant} has {queued} queued "
                                    f"job(s), its quota")



def _size(path: Path) -> int:
    """A file's bytes; 0 when it is gone (deleted since it was listed) or not a file."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _tenant_folder(tenant: str) -> str:
    # Tenant names come from the token file; never let one become a path.
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]

