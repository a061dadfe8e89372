"""A job's life as the queue lives it: the host the queue talks to (resolving a job and loading
its data when it starts, its checkpoints, its durable state transitions, the recording of its
end) and one of the queue's observers (progress for GetJob and WatchJob, the job's stored
events). The API (services/jobs.py) decides what a caller may do; this decides nothing a
caller asks for, and only records what the queue reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from scheduler.checkpoint import Checkpoint
from scheduler.datasets import Dataset, builtin_shape, from_text, text_shape
from scheduler.job_lease import Lease
from scheduler.job_queue import JobOutcome, JobQueue, QueuedJob
from scheduler.job_runner import TrainingResult
from scheduler.job_states import QUEUED, RUNNING, SUCCEEDED
from scheduler.parquet_dataset import ParquetDataset, is_parquet, load_parquet, parquet_shape
from scheduler.records import EvaluationRecord, RecoveryRecord, RunPlacement, StepRecord
from scheduler.storage import JobStorage
from scheduler.training import prepare_dataset, save_trained_weights
from services import uploads
from services.events import EventHub, JobEvent
from services.job_inputs import parquet_upload, weights_shape
from services.run_keeper import StoreRunKeeper
from services.store import ProgressSummary, Store, ValidationSummary
from services.validation import upload_name
from worker.resolved_job import ResolvedJob, resolve

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress writes to the store, per job


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


class JobLifecycle:
    """The queue's `JobHost` and an observer of its jobs, on the service's store and files."""

    def __init__(self, store: Store, storage: JobStorage, events: EventHub):
        self.store = store
        self.storage = storage
        self.events = events
        self._live: dict[str, _LiveJob] = {}
        self._ending: dict[str, _Ending] = {}
        # A job's newest checkpoint that the disk refused (full, say): written when the run's
        # end is recorded, unless a later one is written first.
        self._unsaved: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()

    def requeue_unfinished(self, queue: JobQueue,
                           live_runner: Callable[[str], RunPlacement | None] | None = None
                           ) -> tuple[int, int]:
        """At start-up: a RUNNING job whose runner still runs (`live_runner(job id)`, where a
        detached runner that outlived the last server placed the run; None when it has none)
        is adopted by the queue as it runs, there; jobs left QUEUED, or RUNNING with no runner
        (the last process was killed with it), run again, in queue order, each from its last
        checkpoint. A runner that cannot be read (`live_runner` raises: one of an older
        version, say) may still train: its job is adopted all the same, counted on its spec's
        demand, and goes back to the queue only if the runner turns out to be gone.
        (Jobs requeued, jobs adopted.)"""
        jobs = self.store.jobs_in_states([QUEUED, RUNNING])
        requeued, adopted = [], 0
        for job in jobs:
            lease = self.store.lease_of(job.id) if job.state == RUNNING else None
            placement: RunPlacement | None = None
            unreadable = False
            if lease is not None and live_runner is not None:
                try:
                    placement = live_runner(job.id)
                except Exception as error:  # any failure: it may still train
                    log.warning("job %s: its runner's placement could not be read (%s: %s); "
                                "attached to it, counted on its spec's demand", job.id,
                                type(error).__name__, error)
                    unreadable = True
            if placement is not None or unreadable:
                assert lease is not None
                with self._lock:  # progress says "epoch e of E", as the last server's did
                    self._live[job.id] = _LiveJob(
                        time.monotonic(), epochs=job.progress.epochs if job.progress else 0)
                queue.adopt(QueuedJob(job.id, job.spec, job.tenant), lease, placement)
                adopted += 1
                continue
            if job.state == RUNNING:
                self.store.set_state(job.id, QUEUED, from_states={RUNNING})
            requeued.append(job)
        queue.submit_all(QueuedJob(job.id, job.spec, job.tenant) for job in requeued)
        return len(requeued), adopted

    def run_keeper(self, job_id: str, lease_seconds: float) -> StoreRunKeeper:
        """What a detached run of `job_id` (started now: RUNNING under its lease) writes to
        the store from its own process."""
        lease = self.store.lease_of(job_id)
        if lease is None:
            raise RuntimeError(f"job {job_id} holds no lease: it is not running")
        return StoreRunKeeper(str(self.store.path), job_id, lease.owner, lease_seconds)

    def prepare(self, job: QueuedJob) -> tuple[ResolvedJob, Dataset | ParquetDataset]:
        """The job resolved against its data set (validated at submit, so a spec error here
        is a bug), and the data set loaded, split and standardised for it (a Parquet upload:
        prepared in one streaming pass, its training rows left in the stored file)."""
        if is_parquet(job.spec.data.dataset):
            record = parquet_upload(self.store, job.tenant, job.spec.data.dataset)
            if record is None:
                raise FileNotFoundError(f"data set {job.spec.data.dataset!r} was deleted")
            resolved = resolve(job.spec, parquet_shape(job.spec.data, job.spec.seed,
                                                       location=record.path),
                               weights=weights_shape(self.store, job.tenant, job.spec))
            self._note_epochs(job.job_id, resolved.epochs)
            return resolved, load_parquet(resolved, location=record.path)
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
        resolved = resolve(job.spec, shape, weights=weights_shape(self.store, job.tenant, job.spec))
        if text is not None:
            loaded = from_text(text.read_bytes(), resolved.context_length,
                               resolved.validation_fraction, name=name or "")
        self._note_epochs(job.job_id, resolved.epochs)
        return resolved, prepare_dataset(resolved, loaded)

    def _note_epochs(self, job_id: str, epochs: int) -> None:
        with self._lock:  # progress says "epoch e of E"
            self._live.setdefault(job_id, _LiveJob(time.monotonic())).epochs = epochs

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

    def job_started(self, job_id: str, lease: Lease) -> None:
        with self._lock:
            self._live[job_id] = _LiveJob(time.monotonic())  # its epochs once it is resolved
        if not self.store.set_state(job_id, RUNNING, from_states={QUEUED}, started=True,
                                    lease=lease):
            raise RuntimeError(f"job {job_id} is no longer QUEUED (cancelled meanwhile?): "
                               f"not started")

    def job_requeued(self, job_id: str) -> None:
        self._write_unsaved_checkpoint(job_id)  # the stop's own: the next start resumes there
        self._flush_progress(job_id)
        # Compare-and-set: a cancel that came while the job stopped stays CANCELLED.
        self.store.set_state(job_id, QUEUED, from_states={RUNNING})

    def renew_lease(self, job_id: str, lease: Lease) -> bool:
        return self.store.renew_lease(job_id, lease)

    def expired_leases(self) -> list[tuple[str, Lease]]:
        return self.store.expired_leases(time.time())

    def requeue_expired(self, job_id: str, lease: Lease, reason: str) -> QueuedJob | None:
        """A job whose lease ran out back to QUEUED with `reason` (compare-and-set on that
        lease), as the queue needs it to run it again; None when it was not requeued."""
        if not self.store.requeue_expired(job_id, lease, reason):
            return None
        with self._lock:
            self._live.pop(job_id, None)
        job = self.store.get_job(job_id)
        return QueuedJob(job.id, job.spec, job.tenant) if job is not None else None

    def job_taken_back(self, job_id: str, reason: str) -> bool:
        """A run the queue gave up (its Ray lost): its latest progress and any checkpoint the
        disk refused written, then QUEUED with `reason` as the state's error (GetJob and
        WatchJob show why until it runs again), compare-and-set from RUNNING."""
        try:
            self._write_unsaved_checkpoint(job_id)
        except OSError as error:  # the disk still refuses: resume from the one before
            log.warning("job %s: its newest checkpoint is still not written (%s)", job_id,
                        error)
        self._flush_progress(job_id)
        with self._lock:
            self._live.pop(job_id, None)
        return self.store.set_state(job_id, QUEUED, from_states={RUNNING}, error=reason)

    def job_finished(self, job_id: str, outcome: JobOutcome) -> None:
        """Record how a run ended: its last checkpoint and progress, its model when it
        SUCCEEDED, then its state, compare-and-set from QUEUED or RUNNING (an ended job keeps
        its end). Nothing is deleted here. The queue calls this again until it succeeds (a
        full disk, a locked store): the result stays in memory meanwhile, and what the first
        attempt read (the live progress) or recorded (a traceback) is not read or recorded
        twice."""
        ending = self._ending.get(job_id)
        if ending is None:  # the first attempt
            progress = self._latest_progress(job_id)
            if outcome.state == SUCCEEDED and outcome.result is not None:
                progress = self._completed(job_id, progress, outcome.result)
                self.events.publish(JobEvent(job_id, time.time(), "progress",
                                             progress=progress))
            ending = self._ending[job_id] = _Ending(progress)
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

    # --- the queue's observer: progress for GetJob and WatchJob, events for the job's log ---

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

    def _completed(self, job_id: str, progress: ProgressSummary | None,
                   result: TrainingResult) -> ProgressSummary:
        """A SUCCEEDED run's last progress: step = total = the steps the job took (fewer than
        planned when early stopping ended it), no time left, the final validation. Not simply
        the run's last step: a run resumed at the job's final checkpoint (its server was
        killed after it) takes no step, and the progress stored before was throttled, so
        possibly many steps behind."""
        if progress is None:
            job = self.store.get_job(job_id)
            progress = job.progress if job is not None else None
        with self._lock:
            live = self._live.get(job_id)
            epochs = live.epochs if live is not None and live.epochs else 0
        last = result.history.steps[-1] if result.history.steps else None
        if progress is None:
            progress = ProgressSummary(0, 0, 0, epochs, 0.0, 0.0, 0.0)
        epochs = epochs or progress.epochs
        final = result.final_evaluation
        return replace(
            progress, step=result.steps, total_steps=result.steps,
            # Without a step of its own, the run ended on the job's last step: in its last epoch.
            epoch=last.epoch if last is not None else max(epochs - 1, progress.epoch),
            epochs=epochs, loss=last.loss if last is not None else progress.loss,
            eta_seconds=0.0,
            validation=_validation(final) if final is not None else progress.validation)

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


def _validation(record: EvaluationRecord) -> ValidationSummary:
    return ValidationSummary(record.step, record.loss, record.accuracy, record.samples)
