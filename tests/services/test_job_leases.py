"""A RUNNING job always has a live runner (issue 12): each run holds a lease on its job in the
store, renewed from its step boundaries; a run that stops renewing (its runner gone or
wedged) is given up once the lease runs out, and its job requeued with the reason, to run
again from its checkpoint. A live run is never requeued. The service's own lifecycle host on
a real store; the runner is a stand-in (no Ray) that can wedge."""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np

from scheduler.checkpoint import Checkpoint
from scheduler.cluster_view import FixedNodes
from scheduler.job_lease import Lease, LeaseTerms
from scheduler.job_queue import JobQueue, QueuedJob
from scheduler.records import RunPlacement
from scheduler.scheduling_policy import Node
from scheduler.step_history import TrainingHistory
from scheduler.storage import JobStorage
from services.events import EventHub
from services.job_lifecycle import JobLifecycle
from services.store import JobRecord, Store
from tests.services.helpers import iris_spec, wait_for
from tests.services.test_final_progress import result, step_record

# Renewed every 0.5 s and checked as often; a generous start-up lease: loading the data set
# is no step.
TERMS = LeaseTerms(seconds=2.0, startup_seconds=30.0)
STEP_SECONDS = 0.05


class WedgingRunner:
    """Steps every STEP_SECONDS, reporting each step and checkpointing every second one, as
    JobRunner does. The first run of a job named "wedges" hangs before its step 4, reporting
    nothing, until `released`."""

    released = threading.Event()
    runs: list[str] = []

    def __init__(self, job, dataset, *, should_stop, on_step, on_checkpoint, resume_from,
                 **options):
        self.name, self.total = job.name, job.total_steps
        self.should_stop, self.on_step, self.on_checkpoint = should_stop, on_step, on_checkpoint
        self.start = resume_from.step if resume_from is not None else 0

    def run(self):
        WedgingRunner.runs.append(self.name)
        wedges = self.name == "wedges" and WedgingRunner.runs.count("wedges") == 1
        for step in range(self.start + 1, self.total + 1):
            if self.should_stop():
                return result(step - 1, TrainingHistory())  # stopped: recorded by no one
            if wedges and step == 4:
                WedgingRunner.released.wait()
            time.sleep(STEP_SECONDS)
            self.on_step(step_record(step))
            if step % 2 == 0:
                self.on_checkpoint(Checkpoint(step, np.zeros(3), step, {}, {}))
        return result(self.total, TrainingHistory())


def _submit(store: Store, queue: JobQueue, job_id: str, name: str, epochs: int) -> None:
    spec = iris_spec(epochs=epochs, name=name)  # 4 steps per epoch
    store.create_job(JobRecord(job_id, "default", spec, "QUEUED", time.time()), job_id)
    queue.submit(QueuedJob(job_id, spec))


def _states(store: Store, job_id: str) -> list[tuple[str, str]]:
    return [(e.payload["state"], e.payload["error"]) for e in store.events(job_id)
            if e.kind == "state"]


def test_a_wedged_runner_is_requeued_after_its_lease_expires_and_a_live_one_never_is(tmp_path):
    store, storage = Store(tmp_path / "chainrule.db"), JobStorage(tmp_path)
    lifecycle = JobLifecycle(store, storage, EventHub())
    WedgingRunner.runs = []
    queue = JobQueue(lifecycle, cluster=FixedNodes([Node("node", 4.0)]),
                     runner_factory=WedgingRunner, observers=[lifecycle], lease_terms=TERMS)
    try:
        _submit(store, queue, "job-00000000live", "live", epochs=20)  # 80 steps: 4 s > lease
        _submit(store, queue, "job-0000000wedge", "wedges", epochs=2)
        wait_for(lambda: store.get_job("job-0000000wedge").state == "SUCCEEDED", 20,
                 what="the wedged job, requeued, to finish")
        wait_for(lambda: store.get_job("job-00000000live").state == "SUCCEEDED", 20,
                 what="the live job to finish")
        WedgingRunner.released.set()  # the wedged run wakes up, finds itself given up
        time.sleep(0.5)

        wedged = _states(store, "job-0000000wedge")
        assert [state for state, _ in wedged] == ["QUEUED", "RUNNING", "QUEUED", "RUNNING",
                                                  "SUCCEEDED"]
        assert wedged[2][1].startswith("its runner stopped renewing its lease (expired")
        events = store.events("job-0000000wedge")
        recovery = [e.payload for e in events if e.kind == "recovery"]
        assert [r["kind"] for r in recovery] == ["lease_expired"]
        assert "given up at step 3" in recovery[0]["message"]
        assert [e.payload["step"] for e in events if e.kind == "resumed"] == [2]
        assert WedgingRunner.runs.count("wedges") == 2

        live = _states(store, "job-00000000live")
        assert live == [("QUEUED", ""), ("RUNNING", ""), ("SUCCEEDED", "")]  # renewed: kept
        assert WedgingRunner.runs.count("live") == 1
        assert store.lease_of("job-00000000live") is None  # an ended job holds no lease
    finally:
        WedgingRunner.released.set()
        queue.shutdown(timeout=5)
        store.close()


def test_a_running_jobs_lease_is_renewed_by_its_owner_only(tmp_path):
    store = Store(tmp_path / "chainrule.db")
    store.create_job(JobRecord("job-0123456789ab", "default", iris_spec(), "QUEUED",
                               time.time()), "d")
    lifecycle = JobLifecycle(store, JobStorage(tmp_path), EventHub())
    lease = Lease("host:1:abc/1", time.time() + 60)
    lifecycle.job_started("job-0123456789ab", lease)
    assert store.lease_of("job-0123456789ab") == lease
    later = Lease(lease.owner, lease.expires_at + 30)
    assert store.renew_lease("job-0123456789ab", later)
    assert not store.renew_lease("job-0123456789ab", Lease("host:1:abc/2", time.time() + 90))
    assert store.expired_leases(time.time()) == []
    assert store.expired_leases(later.expires_at + 1) == [("job-0123456789ab", later)]
    # Compare-and-set on the lease: one renewed since it was found expired stays RUNNING.
    assert not store.requeue_expired("job-0123456789ab", lease, "ran out")
    assert store.get_job("job-0123456789ab").state == "RUNNING"
    store.close()


def test_an_old_database_opens_and_gets_the_lease_columns(tmp_path):
    path = tmp_path / "chainrule.db"
    old = sqlite3.connect(path)  # the jobs table as servers before leases made it
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT "
                "NULL, state TEXT NOT NULL, priority INTEGER NOT NULL, dataset TEXT NOT NULL, "
                "spec BLOB NOT NULL, request_id TEXT NOT NULL DEFAULT '', error TEXT NOT NULL "
                "DEFAULT '', created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
                "progress TEXT, final_validation TEXT, weights_path TEXT NOT NULL DEFAULT '')")
    old.execute("INSERT INTO jobs (id, tenant, name, state, priority, dataset, spec, "
                "created_at) VALUES ('job-0123456789ab', 'default', 'old', 'RUNNING', 0, "
                "'sklearn:iris', ?, 1.0)", (iris_spec().SerializeToString(),))
    old.commit()
    old.close()

    store = Store(path)
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")}
    assert {"lease_owner", "lease_expires_at"} <= columns
    assert store.get_job("job-0123456789ab").state == "RUNNING"
    assert store.lease_of("job-0123456789ab") is None
    # A RUNNING job with no lease (a server before leases) never expires by lease: the
    # next start requeues it (JobLifecycle.requeue_unfinished).
    assert store.expired_leases(time.time() + 1e6) == []
    store.close()


class FollowedRun:
    """A run adopted from an earlier server that goes on until told to stop."""

    def __init__(self, job_id, *, should_stop, **callbacks):
        self.should_stop = should_stop

    def run(self):
        while not self.should_stop():
            time.sleep(0.01)
        return result(0, TrainingHistory())


def test_a_runner_that_cannot_say_where_it_runs_is_adopted_on_its_spec_and_never_requeued(
        tmp_path):
    store = Store(tmp_path / "chainrule.db")
    lifecycle = JobLifecycle(store, JobStorage(tmp_path), EventHub())
    old_version, mismatched = "job-0000000000old", "job-00000mismatch"
    for job_id in (old_version, mismatched):  # RUNNING under the last server's leases
        store.create_job(JobRecord(job_id, "default", iris_spec(), "QUEUED", time.time()),
                         job_id)
        lifecycle.job_started(job_id, Lease(f"earlier-server/{job_id}", time.time() + 60))

    def live_runner(job_id):
        if job_id == old_version:  # what Ray raises for a method the actor's class lacks
            raise AttributeError("'ActorHandle' object has no attribute 'placement'")
        return RunPlacement(1.0, ("node",))  # one bundle, where its spec asks for two

    queue = JobQueue(lifecycle, cluster=FixedNodes([Node("node", 4.0)]),
                     runner_factory=WedgingRunner, observers=[lifecycle],
                     runner_attacher=FollowedRun)
    try:
        assert lifecycle.requeue_unfinished(queue, live_runner) == (0, 2)
        for job_id in (old_version, mismatched):
            assert store.get_job(job_id).state == "RUNNING"
            assert queue.actor_nodes(job_id) == {"node"}  # counted where its spec would go
    finally:
        queue.shutdown(timeout=5)
        store.close()
