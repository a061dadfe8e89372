"""A step's deadline follows the job's own pace (issue 12, "detection in seconds"): max(k x the
median step time, a floor). A worker that stops answering (SIGSTOP) is dropped within it, its
micro-batches recomputed by the others, with the same bits as an undisturbed run: that case is
in the chaos suite (tests/chaos/test_actor_faults.py).

Before: the deadline was a fixed 120 s, so a worker stopped for 60 s on a job of 1-2 ms steps
went unnoticed (one 60 s step)."""

from __future__ import annotations

import pytest

from scheduler.step_deadline import WARMUP_STEPS, StepDeadline
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
