"""The job queue's policy with a stand-in runner (no Ray): priorities, FIFO, the concurrency
limit, cancellation, failures and shutdown. The real runner is exercised end to end in
test_end_to_end.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from scheduler.datasets import builtin_shape
from scheduler.job_queue import JobQueue, QueuedJob
from tests.services.helpers import iris_spec, wait_for
from worker.resolved_job import resolve


@dataclass
class FakeResult:
    stopped_early: bool
    final_evaluation: None = None


class FakeRunner:
    """Runs `steps` steps of `step_seconds`, polling should_stop like JobRunner."""

    steps, step_seconds = 5, 0.01
    started: list = []

    def __init__(self, spec, dataset, *, should_stop, on_step, on_checkpoint, **options):
        self.spec, self.should_stop, self.on_checkpoint = spec, should_stop, on_checkpoint
        self.options = options

    def run(self):
        FakeRunner.started.append(self.spec.name)
        if self.spec.name == "broken":
            raise ValueError("no such thing")
        for _ in range(self.steps):
            if self.should_stop():
                self.on_checkpoint("checkpoint")
                return FakeResult(stopped_early=True)
            time.sleep(self.step_seconds)
        return FakeResult(stopped_early=False)


@dataclass
class FakeHost:
    states: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, job):
        return _resolved(job.spec), None  # the fake runner needs no data

    def load_checkpoint(self, job_id):
        return None

    def save_checkpoint(self, job_id, checkpoint):
        self.checkpoints[job_id] = checkpoint

    def job_started(self, job_id):
        self.states[job_id] = "RUNNING"

    def job_requeued(self, job_id):
        self.states[job_id] = "QUEUED"

    def job_finished(self, job_id, outcome):
        self.states[job_id] = outcome.state
        self.errors[job_id] = outcome.error


class Recorder:
    def __init__(self):
        self.calls, self.running, self.most_running = [], set(), 0

    def job_state_changed(self, job_id, state):
        self.calls.append((job_id, state))
        if state == "RUNNING":
            self.running.add(job_id)
        else:
            self.running.discard(job_id)
        self.most_running = max(self.most_running, len(self.running))


def _resolved(spec):
    return resolve(spec, builtin_shape(spec.data.dataset))


def _queue(host, max_concurrent_jobs=1, observers=()):
    FakeRunner.started = []
    return JobQueue(host, max_concurrent_jobs=max_concurrent_jobs, observers=observers,
                    runner_factory=FakeRunner)


def _job(name: str, priority: int = 0) -> QueuedJob:
    return QueuedJob(name, iris_spec(name=name, priority=priority))


def test_higher_priority_first_then_first_in_first_out():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("first"))  # starts at once: the only slot is free
    for name, priority in [("low-a", 0), ("high", 5), ("low-b", 0), ("mid", 1)]:
        queue.submit(_job(name, priority))
    wait_for(lambda: len(host.states) == 5 and set(host.states.values()) == {"SUCCEEDED"}, 10)
    assert FakeRunner.started == ["first", "high", "mid", "low-a", "low-b"]


def test_never_more_jobs_at_once_than_the_limit_and_cpus_are_divided():
    host, recorder = FakeHost(), Recorder()
    queue = JobQueue(host, max_concurrent_jobs=2, observers=[recorder], cluster_cpus=2.0,
                     runner_factory=FakeRunner)
    for i in range(8):
        queue.submit(_job(f"job-{i}"))
    wait_for(lambda: list(host.states.values()).count("SUCCEEDED") == 8, 10)
    assert recorder.most_running == 2
    spec = iris_spec()
    spec.resources.workers = 2
    job = _resolved(spec)
    assert queue._cpus_per_worker(job) == 0.495  # (2 CPUs / 2 slots - 1 shard's 0.01) / 2


def test_cancelling_a_waiting_job_ends_it_without_running_it():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.05
    queue.submit(_job("running"))
    queue.submit(_job("waiting"))
    assert queue.cancel("waiting")
    wait_for(lambda: host.states.get("running") == "SUCCEEDED", 10)
    assert host.states["waiting"] == "CANCELLED" and "waiting" not in FakeRunner.started


def test_cancelling_a_running_job_stops_it_at_a_step_boundary_with_a_checkpoint():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.05
    queue.submit(_job("long"))
    wait_for(lambda: host.states.get("long") == "RUNNING", 5)
    assert queue.cancel("long")
    wait_for(lambda: host.states.get("long") == "CANCELLED", 5)
    assert host.checkpoints["long"] == "checkpoint"


def test_a_failing_job_records_why_and_the_next_one_runs():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("broken"))
    queue.submit(_job("fine"))
    wait_for(lambda: host.states.get("fine") == "SUCCEEDED", 5)
    assert host.states["broken"] == "FAILED"
    assert host.errors["broken"] == "ValueError: no such thing"


def test_shutdown_requeues_running_jobs_after_their_checkpoint():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.2
    queue.submit(_job("interrupted"))
    queue.submit(_job("never-started"))
    wait_for(lambda: host.states.get("interrupted") == "RUNNING", 5)
    assert queue.shutdown(timeout=5)
    assert host.states == {"interrupted": "QUEUED"}
    assert host.checkpoints == {"interrupted": "checkpoint"}
    queue.submit(_job("after-shutdown"))  # stays queued in the store for the next start
    assert "after-shutdown" not in host.states


def test_an_observer_that_raises_does_not_fail_the_job():
    class Broken:
        def job_state_changed(self, job_id, state):
            raise RuntimeError("observer bug")

    host = FakeHost()
    queue = _queue(host, observers=[Broken()])
    FakeRunner.step_seconds = 0.0
    queue.submit(_job("ok"))
    wait_for(lambda: host.states.get("ok") == "SUCCEEDED", 5)


def test_a_submitted_job_is_reported_as_a_transition_to_queued():
    host, recorder = FakeHost(), Recorder()
    queue = JobQueue(host, observers=[recorder], runner_factory=FakeRunner)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("only"))
    wait_for(lambda: host.states.get("only") == "SUCCEEDED", 10)
    assert [state for _, state in recorder.calls] == ["QUEUED", "RUNNING", "SUCCEEDED"]
