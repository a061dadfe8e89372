"""A step's deadline follows the job's own pace (issue 12, "detection in seconds"): max(k x the
median step time, a floor), and a worker that stops answering (SIGSTOP) is dropped within it,
its micro-batches recomputed by the others, with the same bits as an undisturbed run.

Before: the deadline was a fixed 120 s, so a worker stopped for 60 s on a job of 1-2 ms steps
went unnoticed (one 60 s step)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray

from scheduler.job_runner import JobRunner
from scheduler.step_deadline import WARMUP_STEPS, StepDeadline
from tests.scheduler.test_job_runner import digits, spec_with, train
from worker.resolved_job import StepDeadlineRule

# --- the rule ----------------------------------------------------------------------------------


def test_the_first_steps_get_the_startup_deadline():
    deadline = StepDeadline(StepDeadlineRule(10.0, 3.0), startup_seconds=120.0)
    for _ in range(WARMUP_STEPS - 1):
        deadline.observe(0.002)
        assert deadline.seconds == 120.0


def test_the_deadline_is_k_median_steps_or_the_floor_whichever_is_longer():
    fast = StepDeadline(StepDeadlineRule(10.0, 3.0), startup_seconds=120.0)
    slow = StepDeadline(StepDeadlineRule(10.0, 3.0), startup_seconds=120.0)
    for _ in range(WARMUP_STEPS):
        fast.observe(0.002)
        slow.observe(1.5)
    assert fast.seconds == 3.0
    assert slow.seconds == 15.0


def test_a_few_slow_steps_do_not_move_the_deadline():
    deadline = StepDeadline(StepDeadlineRule(10.0, 0.5), startup_seconds=120.0)
    for step in range(100):
        deadline.observe(60.0 if step % 10 == 0 else 0.1)  # a recomputation now and then
    assert deadline.seconds == pytest.approx(1.0)


# --- a stopped worker on real Ray ----------------------------------------------------------------


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda replica: os.getpid()), timeout=30)


@pytest.fixture(scope="module")
def undisturbed(local_ray):
    return train(spec_with(), 1, 1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_a_stopped_worker_is_dropped_within_the_deadline_with_identical_weights(
        undisturbed, transport):
    spec = spec_with()  # the default deadline: 10 x the median step (ms), at least 3 s
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                transport=transport)
    stopped: dict[str, float] = {}

    def stop_worker_one(record):
        if record.step == 10:
            stopped["pid"] = _pid(runner.worker_group.replicas[1])
            stopped["deadline"] = runner.deadline.seconds
            os.kill(stopped["pid"], signal.SIGSTOP)
            stopped["at"] = time.monotonic()
        if record.step > 10:
            # A slower job, so that a replacement can join: Ray takes ~5 s to kill a stopped
            # process (its graceful exit times out first), and only then frees its bundle.
            time.sleep(0.3)

    runner.on_step = stop_worker_one
    try:
        result = runner.run()
    finally:
        if "pid" in stopped:
            try:
                os.kill(stopped["pid"], signal.SIGCONT)  # so that Ray can clean it up
            except ProcessLookupError:
                pass  # killed: dropped workers are
    stalled = result.history.steps[10]  # step 11, the first without worker 1
    print(f"{transport}: deadline {stopped['deadline']:.2f} s; step 11 took "
          f"{stalled.timings.wall:.2f} s; the median step "
          f"{np.median([r.timings.wall for r in result.history.steps]) * 1000:.1f} ms")
    assert stopped["deadline"] == 3.0  # the floor: 10 median steps are milliseconds
    if transport == "shared_memory":
        assert stopped["deadline"] <= stalled.timings.wall < stopped["deadline"] + 1.5
        why = "silent past the step's 3 s deadline"
    else:  # the heartbeats (worker/transport/liveness.py) find it first: 0.5 s + 2 s
        assert 2.0 <= stalled.timings.wall < 3.0
        why = "no answer to its heartbeat: its node or process is gone or stopped"
    assert result.history.worker_failures == 1
    lost, replaced = result.history.recoveries
    assert lost.message == (f"worker 1 lost at step 11 ({why}): its micro-batches recomputed "
                            f"in-step by worker(s) 0")
    assert replaced.kind == "worker_replaced" and replaced.step > 11
    workers = [record.workers for record in result.history.steps]
    assert workers[:10] == [2] * 10 and workers[10] == 1 and workers[-1] == 2
    for key, value in undisturbed.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key
