"""A SUCCEEDED job's recorded progress is total/total with no time left, however its last run
went (issue 14: one showed 11121/11250). The lifecycle host's own code on a real store, driven
as the queue drives it; no Ray."""

from __future__ import annotations

import time

import numpy as np

from scheduler.job_lease import Lease
from scheduler.job_queue import JobOutcome, QueuedJob
from scheduler.job_runner import TrainingResult
from scheduler.records import EvaluationRecord, StepRecord, StepTimings
from scheduler.step_history import TrainingHistory
from scheduler.storage import JobStorage
from services.events import EventHub
from services.job_lifecycle import JobLifecycle
from services.store import JobRecord, Store
from tests.services.helpers import iris_spec

JOB = "job-0123456789ab"
TOTAL = 12  # iris: 120 training samples in batches of 32, 3 epochs


def step_record(step: int) -> StepRecord:
    timings = StepTimings(0.001, 0, 0, 0, 0, wall=0.002, straggler_spread=0)
    return StepRecord(step, TOTAL, (step - 1) // 4, 32, loss=1.0 / step, train_correct=0,
                      learning_rate=0.01, gradient_norm=1.0, parameter_gradient_norms={},
                      timings=timings, bytes_sent_per_worker=0, bytes_received_per_worker=0,
                      parameter_bytes=0, workers=1, worker_failures=0)


def result(steps: int, history: TrainingHistory) -> TrainingResult:
    final = EvaluationRecord(steps, (steps - 1) // 4, 0.25, 0.9, 30)
    return TrainingResult({"0.weight": np.zeros((8, 4), np.float32)}, history, final, steps,
                          stopped_early=False, actor_nodes={})


def started(store: Store, storage: JobStorage, events: EventHub) -> JobLifecycle:
    """A server's lifecycle host starting the job's run, as the queue does."""
    lifecycle = JobLifecycle(store, storage, events)
    job = store.get_job(JOB)
    assert job is not None
    lifecycle.job_started(JOB, Lease("test", time.time() + 60))
    lifecycle.prepare(QueuedJob(JOB, job.spec, job.tenant))
    return lifecycle


def test_a_job_resumed_at_its_final_checkpoint_ends_at_total_over_total(tmp_path):
    store, storage = Store(tmp_path / "chainrule.db"), JobStorage(tmp_path)
    store.create_job(JobRecord(JOB, "default", iris_spec(epochs=3), "QUEUED", time.time()), "d")
    first = started(store, storage, EventHub())
    history = TrainingHistory()
    for step in range(1, TOTAL + 1):  # fast steps: the store's progress is written throttled
        history.steps.append(step_record(step))
        first.job_step(JOB, history.steps[-1])
    # The server is killed after the final checkpoint, before the end is recorded: the next
    # server requeues the job, which resumes at that checkpoint and takes no step.
    assert store.get_job(JOB).progress.step < TOTAL
    store.set_state(JOB, "QUEUED", from_states={"RUNNING"})
    events = EventHub()
    second = started(store, storage, events)
    with events.subscribe(JOB) as watcher:
        second.job_finished(JOB, JobOutcome("SUCCEEDED", result=result(TOTAL, TrainingHistory())))
        streamed = watcher.get(timeout=1)

    progress = store.get_job(JOB).progress
    assert (progress.step, progress.total_steps, progress.eta_seconds) == (TOTAL, TOTAL, 0.0)
    assert (progress.epoch, progress.epochs) == (2, 3)  # the last of 3 epochs, 0-based
    assert progress.validation.loss == 0.25 and progress.validation.step == TOTAL
    assert streamed.kind == "progress" and streamed.progress == progress  # watchers see it too


def test_a_job_ended_by_early_stopping_ends_at_its_own_step_count_over_itself(tmp_path):
    store, storage = Store(tmp_path / "chainrule.db"), JobStorage(tmp_path)
    store.create_job(JobRecord(JOB, "default", iris_spec(epochs=3), "QUEUED", time.time()), "d")
    lifecycle = started(store, storage, EventHub())
    history = TrainingHistory()
    for step in range(1, 9):
        history.steps.append(step_record(step))
        lifecycle.job_step(JOB, history.steps[-1])
    lifecycle.job_finished(JOB, JobOutcome("SUCCEEDED", result=result(8, history)))
    progress = store.get_job(JOB).progress
    assert (progress.step, progress.total_steps, progress.eta_seconds) == (8, 8, 0.0)
    assert (progress.epoch, progress.loss) == (1, 1.0 / 8)
