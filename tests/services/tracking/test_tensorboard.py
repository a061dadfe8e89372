"""The TensorBoard observer on its own (no Ray): what a job reports is in its event files,
read back equal; the files are private; a resume purges what it replays; the job's thread
never waits for the writer; the download archive is the tenant's own files."""

from __future__ import annotations

import io
import stat
import tarfile
import threading
import time

import pytest

from chainrule.v1 import job_pb2
from scheduler.records import EvaluationRecord, RecoveryRecord
from scheduler.storage import JobStorage
from services.errors import FailedPrecondition, NotFound
from services.events import EventHub
from services.jobs import JobService
from services.store import JobRecord, Store
from services.tracking.tensorboard import TensorBoardFiles, tensorboard_archive
from tests.services.tracking.event_files import float32, read_folder
from tests.services.tracking.records import step_record

JOB = "job-0123456789ab"


@pytest.fixture
def storage(tmp_path):
    return JobStorage(tmp_path / "data")


@pytest.fixture
def tensorboard(storage):
    files = TensorBoardFiles(storage, histogram_every=5)
    yield files
    files.close()


def run_job(tensorboard: TensorBoardFiles, steps: range, total_steps: int = 20) -> list:
    tensorboard.job_state_changed(JOB, "RUNNING")
    records = [step_record(step, total_steps) for step in steps]
    for record in records:
        tensorboard.job_step(JOB, record)
    return records


def test_steps_evaluations_and_recoveries_read_back_equal_to_what_the_job_reported(
        tensorboard, storage):
    records = run_job(tensorboard, range(1, 21))
    tensorboard.job_evaluation(JOB, EvaluationRecord(step=10, epoch=1, loss=0.75,
                                                     accuracy=0.625, samples=30))
    tensorboard.job_evaluation(JOB, EvaluationRecord(step=20, epoch=2, loss=0.5,
                                                     accuracy=None, samples=30))
    tensorboard.job_recovery(JOB, RecoveryRecord(step=7, kind="worker_lost",
                                                 message="worker 1 lost at step 7"))
    tensorboard.job_state_changed(JOB, "SUCCEEDED")
    assert tensorboard.flush()

    logged = read_folder(storage.tensorboard_folder(JOB))
    assert logged.scalars["train/loss"] == [(r.step, float32(r.loss)) for r in records]
    assert logged.scalars["train/samples_per_second"] == [
        (r.step, float32(r.samples_per_second)) for r in records]
    assert logged.scalars["train/learning_rate"] == [(r.step, float32(0.01)) for r in records]
    assert logged.scalars["train/gradient_norm"] == [
        (r.step, float32(r.gradient_norm)) for r in records]
    # The per-parameter norms every 5 steps: three parameters each time.
    histograms = logged.histograms["gradients/parameter_norms"]
    assert [(step, count) for step, count, _ in histograms] == [(5, 3), (10, 3), (15, 3),
                                                                 (20, 3)]
    assert histograms[0][2] == pytest.approx(sum(records[4].parameter_gradient_norms.values()))
    assert logged.scalars["validation/loss"] == [(10, 0.75), (20, 0.5)]
    assert logged.scalars["validation/accuracy"] == [(10, 0.625)]  # the regression one: none
    assert logged.texts["recoveries/text_summary"] == [(7, "worker_lost: worker 1 lost at "
                                                           "step 7")]


def test_event_files_are_the_servers_users_alone(tensorboard, storage):
    run_job(tensorboard, range(1, 3))
    assert tensorboard.flush()
    folder = storage.tensorboard_folder(JOB)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in files)


def test_a_resumed_run_writes_its_own_file_that_purges_the_steps_it_replays(
        tensorboard, storage):
    run_job(tensorboard, range(1, 9))
    tensorboard.job_state_changed(JOB, "QUEUED")  # stopped by a shutdown after step 8
    # Resumed from the checkpoint of step 5; its steps differ, as they would with new data.
    tensorboard.job_state_changed(JOB, "RUNNING")
    replayed = [step_record(step, loss=2.0 + step) for step in range(6, 21)]
    for record in replayed:
        tensorboard.job_step(JOB, record)
    tensorboard.job_state_changed(JOB, "SUCCEEDED")
    assert tensorboard.flush()

    folder = storage.tensorboard_folder(JOB)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    # TensorBoard shows each step once: the first run's 1..5, then the resumed run's 6..20
    # (the first run's 6..8, which the resume replayed, purged).
    losses = read_folder(folder).scalars["train/loss"]
    assert [step for step, _ in losses] == list(range(1, 21))
    assert losses[5:] == [(r.step, float32(r.loss)) for r in replayed]


def test_deleting_the_jobs_files_removes_its_folder(tensorboard, storage):
    run_job(tensorboard, range(1, 3))
    tensorboard.job_state_changed(JOB, "SUCCEEDED")
    assert tensorboard.flush()
    storage.delete_tensorboard(JOB)
    assert not storage.tensorboard_folder(JOB).exists()


class StuckDisk(JobStorage):
    """A data folder whose first write never returns until released (a hung disk)."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        self.release = threading.Event()

    def tensorboard_folder(self, job_id):
        self.release.wait()
        return super().tensorboard_folder(job_id)


def test_the_jobs_thread_never_waits_for_a_stuck_writer_and_new_records_are_dropped(tmp_path):
    storage = StuckDisk(tmp_path / "data")
    tensorboard = TensorBoardFiles(storage, queue_limit=50)
    try:
        started = time.monotonic()
        run_job(tensorboard, range(1, 2001), total_steps=2000)
        elapsed = time.monotonic() - started
        # 2000 calls that each only try to enqueue; a writer that blocked would take forever.
        assert elapsed < 2.0
        assert 2000 - 51 <= tensorboard.dropped <= 2000 - 49
    finally:
        storage.release.set()
        tensorboard.close()
    logged = read_folder(storage.tensorboard_folder(JOB))
    assert len(logged.scalars["train/loss"]) == 2000 - tensorboard.dropped


def test_the_archive_holds_the_tenants_own_event_files_and_no_one_elses(tmp_path):
    store = Store(tmp_path / "chainrule.db")
    service = JobService(store, tmp_path / "data", JobStorage(tmp_path / "data"), EventHub())
    store.create_job(JobRecord(id=JOB, tenant="alice", spec=job_pb2.JobSpec(name="tiny"),
                               state="QUEUED", created_at=time.time()), "digest")
    tensorboard = TensorBoardFiles(service.storage)
    with pytest.raises(FailedPrecondition, match="no TensorBoard files yet"):
        list(tensorboard_archive(service, tensorboard, "alice", JOB))

    run_job(tensorboard, range(1, 4))  # still running: the download flushes what it reported
    with pytest.raises(NotFound):
        list(tensorboard_archive(service, tensorboard, "bob", JOB))

    data = b"".join(tensorboard_archive(service, tensorboard, "alice", JOB))
    folder = service.storage.tensorboard_folder(JOB)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [f"{JOB}/{p.name}" for p in sorted(folder.iterdir())]
        for member in members:
            extracted = archive.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (folder / member.name.split("/")[1]).read_bytes()
    assert len(read_folder(folder).scalars["train/loss"]) == 3
    tensorboard.close()
    store.close()


def test_the_sweep_deletes_files_written_for_a_job_after_it_was_deleted(tmp_path):
    store = Store(tmp_path / "chainrule.db")
    service = JobService(store, tmp_path / "data", JobStorage(tmp_path / "data"), EventHub())
    store.create_job(JobRecord(id=JOB, tenant="alice", spec=job_pb2.JobSpec(name="kept"),
                               state="QUEUED", created_at=time.time()), "digest")
    tensorboard = TensorBoardFiles(service.storage)
    run_job(tensorboard, range(1, 3))  # JOB, which exists
    deleted = "job-ba0000000000"  # its record deleted before the writer reached its records
    tensorboard.job_step(deleted, step_record(1))
    tensorboard.close()
    assert service.storage.tensorboard_folder(deleted).exists()

    service.delete_expired_checkpoints()
    assert not service.storage.tensorboard_folder(deleted).exists()
    assert list(service.storage.tensorboard_folder(JOB).iterdir())
    store.close()
