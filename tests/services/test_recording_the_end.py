"""A job whose training ended is never left RUNNING with its result lost (issue 12): when the end
cannot be recorded (a full disk, a store that refuses writes) the result is kept in memory and
recording is retried with backoff until it works; the job's checkpoints stay on disk meanwhile.

Before: on a full disk every step trained, recording the end failed once, and the job stayed
RUNNING 11250/11250 with no model for good.

The first tests use a stand-in runner and host (no Ray); the last fills a real 16 MiB tmpfs
under a real server mid-job (skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import logging
import sqlite3
import subprocess
import threading

import pytest

from chainrule.client import Client, state_name
from chainrule.spec_file import load_job_spec
from scheduler import job_queue
from scheduler.cluster_view import FixedNodes
from scheduler.job_queue import JobQueue, QueuedJob
from scheduler.scheduling_policy import Node
from scheduler.storage import JobStorage
from services.server import serve
from tests.services.helpers import DIGITS_SPEC, iris_spec, wait_for, wait_until_done
from tests.services.test_job_queue import FakeHost, FakeRunner
from tests.services.test_resume import assert_same_weights, downloaded


class HostWithAFullDisk(FakeHost):
    """Refuses to record an end until `space` is set, as a store on a full disk does."""

    def __init__(self):
        super().__init__()
        self.space = threading.Event()
        self.attempts = 0

    def job_finished(self, job_id, outcome):
        self.attempts += 1
        if not self.space.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        super().job_finished(job_id, outcome)


def test_a_failed_record_of_the_end_is_retried_until_it_works(monkeypatch):
    monkeypatch.setattr(job_queue, "RECORD_RETRY_FIRST_SECONDS", 0.01)
    host = HostWithAFullDisk()
    queue = JobQueue(host, cluster=FixedNodes([Node("node", 2.0)]),
                     runner_factory=FakeRunner)
    FakeRunner.step_seconds = 0.001
    queue.submit(QueuedJob("job-1", iris_spec()))
    wait_for(lambda: host.attempts >= 3, 10, what="three attempts")
    assert host.states["job-1"] == "RUNNING" and queue.running == ["job-1"]  # still held
    host.space.set()
    wait_for(lambda: host.states["job-1"] == "SUCCEEDED", 10, what="the end recorded")
    wait_for(lambda: queue.running == [], 5, what="the slot freed")


def test_a_shutdown_ends_the_retries_at_once_leaving_the_job_to_the_next_start(monkeypatch):
    monkeypatch.setattr(job_queue, "RECORD_RETRY_FIRST_SECONDS", 0.01)
    host = HostWithAFullDisk()
    queue = JobQueue(host, cluster=FixedNodes([Node("node", 2.0)]),
                     runner_factory=FakeRunner)
    queue.submit(QueuedJob("job-1", iris_spec()))
    wait_for(lambda: host.attempts >= 2, 10, what="two attempts")
    assert queue.shutdown(timeout=5)
    assert host.states["job-1"] == "RUNNING"  # in the store: the next start runs it again


# --- a real full disk under a real server ----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    # Lazy: the stopped server's idle RPC threads may still hold their SQLite connections.
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def _fill(path) -> None:
    """Write until the file system has no byte left."""
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(block[:size])
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


def _long_digits():
    """Digits, 2 workers and 2 shards, 2400 steps (several seconds) and a checkpoint every
    epoch (12 steps): the disk fills mid-run, with checkpoints written before."""
    spec = load_job_spec(DIGITS_SPEC)
    spec.data.epochs = 200
    return spec


@pytest.mark.slow
@pytest.mark.distributed
def test_a_job_ending_on_a_full_disk_succeeds_with_its_model_once_there_is_space(
        local_ray, small_disk, tmp_path, caplog):
    server = serve("127.0.0.1:0", small_disk / "data")
    storage = JobStorage(small_disk / "data")
    try:
        with Client(server.address, timeout=30) as client:
            reference = client.submit(_long_digits())
            done = wait_until_done(client, reference.id, timeout=300)
            assert state_name(done.state) == "SUCCEEDED", done.error
            undisturbed = downloaded(client, reference.id, tmp_path)
            client.delete(reference.id)  # its files go: room for the next job's

            job = client.submit(_long_digits())
            wait_for(lambda: client.get(job.id).progress.step >= 50, 120, what="50 steps")
            _fill(small_disk / "filler")
            wait_for(lambda: any("recording the end of job" in r.getMessage()
                                 for r in caplog.records), 300, what="the end to fail")
            assert any("was not written" in r.getMessage() for r in caplog.records)  # mid-run
            wait_for(lambda: any("failed again" in r.getMessage() for r in caplog.records), 30,
                     what="a retry")
            assert state_name(client.get(job.id).state) == "RUNNING"
            assert server.queue.running == [job.id]
            assert storage.checkpoints(job.id)  # nothing deleted while the end is unrecorded

            (small_disk / "filler").unlink()
            done = wait_until_done(client, job.id, timeout=60)
            assert state_name(done.state) == "SUCCEEDED", done.error
            assert done.progress.step == done.progress.total_steps == 2400
            assert_same_weights(downloaded(client, job.id, tmp_path), undisturbed)
            # The checkpoint of the last step, refused mid-run, was written with the end.
            assert storage.latest_checkpoint(job.id).checkpoint.step == 2400
    finally:
        server.stop()
    print("\n".join(r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and "job-" in r.getMessage())[:2000])
