"""A job whose training ended is never left RUNNING with its result lost (issue 12): when the end
cannot be recorded (a full disk, a store that refuses writes) the result is kept in memory and
recording is retried with backoff until it works; the job's checkpoints stay on disk meanwhile.

Before: on a full disk every step trained, recording the end failed once, and the job stayed
RUNNING 11250/11250 with no model for good.

These tests use a stand-in runner and host (no Ray). A real 16 MiB tmpfs filled under a real
server mid-job is a case of the chaos suite (tests/chaos/test_storage_faults.py)."""

from __future__ import annotations

import sqlite3
import threading

from scheduler import job_queue
from scheduler.cluster_view import FixedNodes
from scheduler.job_queue import JobQueue, QueuedJob
from scheduler.scheduling_policy import Node
from tests.services.helpers import iris_spec, wait_for
from tests.services.test_job_queue import FakeHost, FakeRunner


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
