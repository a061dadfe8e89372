"""A job's state changes are compare-and-set (issue 12): a cancel racing the job's end never
overwrites SUCCEEDED, and a cancel racing a shutdown is not lost when the stopped job would
go back to QUEUED. The service's own code on a real store; the queue is a stand-in that lets
each race happen at its worst moment (no Ray)."""

from __future__ import annotations

import time

from scheduler.job_lease import Lease
from scheduler.job_queue import JobOutcome
from scheduler.storage import JobStorage
from services.events import EventHub
from services.job_lifecycle import JobLifecycle
from services.jobs import JobService
from services.store import JobRecord, Store
from tests.services.helpers import iris_spec


class QueueThatLosesTheRace:
    """cancel() finds the job no longer held: `meanwhile` has just happened (the job's end
    recorded, or nothing when the server is stopping)."""

    def __init__(self, meanwhile=lambda job_id: None):
        self.meanwhile = meanwhile

    def cancel(self, job_id: str) -> bool:
        self.meanwhile(job_id)
        return False


def _running_job(tmp_path) -> tuple[JobService, JobLifecycle, str]:
    store, storage, events = Store(tmp_path / "chainrule.db"), JobStorage(tmp_path), EventHub()
    service = JobService(store, tmp_path, storage, events)
    lifecycle = JobLifecycle(store, storage, events)
    store.create_job(JobRecord("job-0123456789ab", "default", iris_spec(), "QUEUED",
                               time.time()), "digest")
    lifecycle.job_started("job-0123456789ab", Lease("test", time.time() + 60))
    return service, lifecycle, "job-0123456789ab"


def _states(service: JobService, job_id: str) -> list[str]:
    return [e.payload["state"] for e in service.store.events(job_id) if e.kind == "state"]


def test_a_cancel_that_loses_the_race_to_the_jobs_end_never_overwrites_succeeded(tmp_path):
    service, lifecycle, job_id = _running_job(tmp_path)
    service.attach_queue(QueueThatLosesTheRace(
        lambda job_id: lifecycle.job_finished(job_id, JobOutcome("SUCCEEDED"))))
    job = service.cancel("default", job_id)  # read RUNNING, then the job ended
    assert job.state == "SUCCEEDED"
    assert _states(service, job_id) == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_a_cancel_while_the_server_stops_stays_cancelled_when_the_job_is_requeued(tmp_path):
    service, lifecycle, job_id = _running_job(tmp_path)
    service.attach_queue(QueueThatLosesTheRace())  # draining: the queue holds no job
    assert service.cancel("default", job_id).state == "CANCELLED"
    lifecycle.job_requeued(job_id)  # the runner stopped at its step boundary for the shutdown
    assert service.get("default", job_id).state == "CANCELLED"
    assert _states(service, job_id) == ["QUEUED", "RUNNING", "CANCELLED"]
