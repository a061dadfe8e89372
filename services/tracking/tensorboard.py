"""TensorBoard event files per job: what a job reports, in the files TensorBoard reads.

    tensorboard = TensorBoardFiles(JobStorage(data_dir))   # one of the job queue's observers
    ...
    tensorboard.close()                                     # at server stop

Each run of a job (its first, and each resume) writes one event file in the job's folder,
`tensorboard/<job>/` in the data folder (scheduler/storage.py), with:
  - every step: `train/loss`, `train/samples_per_second`, `train/learning_rate` and
    `train/gradient_norm` (the global L2 norm of the reduced gradient, before clipping);
  - every `histogram_every` steps: `gradients/parameter_norms`, a histogram of the
    per-parameter gradient norms (where vanishing or exploding gradients show);
  - every evaluation: `validation/loss`, and `validation/accuracy` for classifiers;
  - every recovery: its message, as text under `recoveries`.
A resumed run's file starts by purging from its first step: TensorBoard then drops what the
interrupted run wrote past the checkpoint, which the resumed run replays.

Writing is off the job's thread. tensorboardX's SummaryWriter takes about 65 us per scalar, so
four per step would cost a millisecond-step job several percent; the observer methods only put
the record on a bounded queue (services/tracking/record_writer.py), and one thread writes
every job's files, with tensorboardX's own summary and event-file writers (synchronous: after
`flush` a reader sees it all). A writer that falls `queue_limit` records behind drops new ones
(counted in `dropped`, logged once) rather than ever making a step wait.

The files are tenant-private like the job's other files: 0600, in 0700 folders. `chainrule
delete` deletes them with the job; `tensorboard_archive` streams them to their tenant only.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from scheduler.job_states import QUEUED, TERMINAL_STATES
from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord
from scheduler.storage import JobStorage, make_private_folders
from services.errors import FailedPrecondition
from services.jobs import JobService
from services.tracking.record_writer import Record, RecordWriter

log = logging.getLogger(__name__)

EVENT_FILE_PREFIX = "events.out.tfevents."


# Equal-width bins over the norms' range (numpy's "auto" rule costs ten times as much).
HISTOGRAM_BINS = 30


class TensorBoardFiles:
    """The job queue's observer that writes each job's TensorBoard event files."""

    def __init__(self, storage: JobStorage, *, histogram_every: int = 10,
                 queue_limit: int = 10_000):
        if histogram_every < 1:
            raise ValueError(f"histogram_every must be at least 1, got {histogram_every}")
        self.storage = storage
        self.histogram_every = histogram_every
        self._runs: dict[str, _EventFile] = {}  # open files; the writer thread's alone
        self._writer = RecordWriter("TensorBoard files", self._write, limit=queue_limit,
                                    on_error=_log_failure, on_flush=self._flush_runs,
                                    on_stop=self._close_runs)

    @property
    def dropped(self) -> int:
        """Records not written because the writer thread fell behind."""
        return self._writer.dropped

    # --- the queue's observer: enqueue only, never wait ---------------------------------------

    def job_state_changed(self, job_id: str, state: str) -> None:
        if state == QUEUED or state in TERMINAL_STATES:  # this run is over: close its file
            self._writer.put("end", job_id, state)

    def job_step(self, job_id: str, record: StepRecord) -> None:
        self._writer.put("step", job_id, record)

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None:
        self._writer.put("evaluation", job_id, record)

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None:
        self._writer.put("recovery", job_id, record)

    # --- waiting for the writer (tests, shutdown) ---------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record put so far is written and on disk; False on timeout."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued, close every open file and end the writer thread; False when
        that took longer than `timeout` (what was still queued is lost)."""
        return self._writer.close(timeout)

    # --- the writer thread --------------------------------------------------------------------

    def _flush_runs(self) -> None:
        for run in self._runs.values():
            run.flush()

    def _close_runs(self) -> None:
        for job_id in list(self._runs):
            self._close(job_id)

    def _write(self, kind: str, job_id: str, payload: Any) -> None:
        if kind == "end":
            self._close(job_id)
            return
        run = self._run(job_id, payload.step)
        if kind == "step":
            record: StepRecord = payload
            step = record.step
            scalars = {"train/loss": record.loss,
                       "train/samples_per_second": record.samples_per_second,
                       "train/gradient_norm": record.gradient_norm}
            if math.isfinite(record.learning_rate):
                scalars["train/learning_rate"] = record.learning_rate
            run.write_scalars(step, scalars)
            norms = list(record.parameter_gradient_norms.values())
            if norms and (step % self.histogram_every == 0 or step == record.total_steps):
                run.write(step, summary.histogram("gradients/parameter_norms",
                                                  np.asarray(norms, dtype=np.float64),
                                                  HISTOGRAM_BINS))
        elif kind == "evaluation":
            evaluation: EvaluationRecord = payload
            run.write(evaluation.step, summary.scalar("validation/loss", evaluation.loss))
            if evaluation.accuracy is not None:
                run.write(evaluation.step,
                          summary.scalar("validation/accuracy", evaluation.accuracy))
        elif kind == "recovery":
            recovery: RecoveryRecord = payload
            run.write(recovery.step, summary.text("recoveries",
                                                  f"{recovery.kind}: {recovery.message}"))

    def _run(self, job_id: str, first_step: int) -> _EventFile:
        """The run's open file, made at its first record. A run after another (a resume)
        purges from its first step, replacing what the last run wrote past its checkpoint."""
        run = self._runs.get(job_id)
        if run is None:
            folder = self.storage.tensorboard_folder(job_id)
            make_private_folders(folder)
            earlier_runs = len(event_files(folder))
            run = self._runs[job_id] = _EventFile(folder, earlier_runs + 1)
            if earlier_runs:
                run.purge_from(first_step)
        return run

    def _close(self, job_id: str) -> None:
        run = self._runs.pop(job_id, None)
        if run is not None:
            run.close()


def _log_failure(record: Record, error: Exception) -> None:
    # A full disk, say: the job goes on without its TensorBoard file.
    kind, job_id, _ = record
    log.error("TensorBoard files: writing a %s of job %s failed", kind, job_id,
              exc_info=error)


class _EventFile:
    """One run's event file, written synchronously (the observer's thread is the queue)."""

    def __init__(self, folder: Path, run: int):
        # tensorboardX names a file by the second and the host: the run number keeps two
        # runs made in one second apart.
        self.writer = EventsWriter(str(folder / "events"), filename_suffix=f".run{run}")
        for path in event_files(folder):  # opened with the umask's mode: made private
            path.chmod(0o600)

    def purge_from(self, step: int) -> None:
        """TensorBoard discards what earlier files logged at `step` and after."""
        self.writer.write_event(Event(step=step, wall_time=time.time(),
                                      session_log=SessionLog(status=SessionLog.START)))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """The step's scalars in one event (one record to frame and checksum, not four)."""
        # The message tensorboardX's summary.scalar makes, without its per-value NaN scan.
        values = [Summary.Value(tag=tag, simple_value=number) for tag, number in scalars.items()]
        self.writer.write_event(Event(step=step, wall_time=time.time(),
                                      summary=Summary(value=values)))

    def write(self, step: int, *summaries: Summary) -> None:
        now = time.time()
        for value in summaries:
            self.writer.write_event(Event(step=step, wall_time=now, summary=value))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def event_files(folder: Path) -> list[Path]:
    """A job's event files, oldest run first (by name: the second each was made, then run)."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir()
                  if path.name.startswith(EVENT_FILE_PREFIX) and path.is_file())


# --- the download ------------------------------------------------------------------------------

ARCHIVE_CHUNK_BYTES = 1024 * 1024
FLUSH_TIMEOUT_SECONDS = 5.0  # a download waits this long at most for the writer to catch up
_TAR_BLOCK = 512


def tensorboard_archive(service: JobService, tensorboard: TensorBoardFiles, tenant: str,
                        job_id: str) -> Iterator[bytes]:
    """The job's event files as an uncompressed tar, `<job id>/<event file>` per member, in
    pieces of at most ARCHIVE_CHUNK_BYTES (memory stays at one piece, whatever the files'
    size): extracted into a folder, `tensorboard --logdir FOLDER` shows each job downloaded
    there as one run. Everything the job reported before the request is in it (the writer is
    flushed first; a live job's later records are left for the next download). NotFound for
    another tenant's job; FailedPrecondition for a job that has written none yet."""
    service.get(tenant, job_id)  # NOT_FOUND for another tenant's job, before any byte
    if not tensorboard.flush(timeout=FLUSH_TIMEOUT_SECONDS):
        log.warning("TensorBoard files: the writer did not catch up within %g s; job %s's "
                    "download has what is on disk", FLUSH_TIMEOUT_SECONDS, job_id)
    files = event_files(service.storage.tensorboard_folder(job_id))
    if not files:
        raise FailedPrecondition(f"job_id: job {job_id} has no TensorBoard files yet: they "
                                 f"are written from its first step")
    for path in files:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            # The size read now: what a live writer appends later is left for the next
            # download, never half-copied into this one.
            member = tarfile.TarInfo(f"{job_id}/{path.name}")
            member.size, member.mtime, member.mode = status.st_size, int(status.st_mtime), 0o600
            yield member.tobuf(format=tarfile.PAX_FORMAT)
            remaining = status.st_size
            while remaining > 0:
                chunk = handle.read(min(ARCHIVE_CHUNK_BYTES, remaining))
                if not chunk:  # never for an append-only file; keep the archive whole anyway
                    chunk = bytes(min(ARCHIVE_CHUNK_BYTES, remaining))
                remaining -= len(chunk)
                yield chunk
            yield bytes(-status.st_size % _TAR_BLOCK)  # a member's data fills whole blocks
    yield bytes(2 * _TAR_BLOCK)  # the end of the archive
