"""A job's history stays bounded however long it runs (issue 11): the last steps in full, the
whole job as a curve of spans whose width doubles as it fills, evaluations thinned the same way.
Driven directly with synthetic records (no Ray)."""

from __future__ import annotations

import math
import tracemalloc

import pytest

from scheduler.records import EvaluationRecord, StepRecord, StepTimings
from scheduler.step_history import (
    MIN_RECENT_STEPS,
    RECENT_NORMS_BUDGET,
    StepHistory,
    Thinned,
    TrainingHistory,
)

TIMINGS = StepTimings(compute=0.001, reduce=0.0, apply=0.0, gather=0.0, wait=0.0, wall=0.002,
                      straggler_spread=0.0)
NORMS = {"0.weight": 1.0, "0.bias": 0.5}


def _step(step: int, samples: int = 32, norms: dict[str, float] = NORMS) -> StepRecord:
    return StepRecord(step=step, total_steps=10**7, epoch=step // 100, samples=samples,
                      loss=1.0 / step, train_correct=step % 17, learning_rate=0.01,
                      gradient_norm=float(step % 13), parameter_gradient_norms=norms,
                      timings=TIMINGS, bytes_sent_per_worker=8, bytes_received_per_worker=8,
                      parameter_bytes=8, workers=2, worker_failures=0)


def _steps(history: StepHistory, first: int, last: int) -> None:
    for step in range(first, last + 1):
        # Uneven sample counts (a short last batch), so that a span's mean must weigh them.
        history.append(_step(step, samples=32 if step % 7 else 5))


def test_a_long_run_keeps_the_last_steps_whole_and_a_curve_over_every_step():
    history = StepHistory(recent=8, spans=16)
    steps = 20_000
    _steps(history, 1, steps)
    assert [r.step for r in history] == list(range(steps - 7, steps + 1))
    assert history[-1].step == steps and len(history) == 8 and history.recorded == steps
    assert [r.step for r in history[:2]] == [steps - 7, steps - 6]
    # The curve covers steps 1..20000 without a gap or an overlap, in at most 16 spans, all
    # `stride` wide but the last; its width doubled each time it filled: 2048 steps here.
    curve = history.curve
    assert len(curve) <= 16 and history.stride == 2048
    assert curve[0].first_step == 1 and curve[-1].last_step == steps
    assert all(a.last_step + 1 == b.first_step for a, b in zip(curve, curve[1:]))
    assert all(span.steps == history.stride for span in curve[:-1])
    # Each span's loss is the sample-weighted mean of its steps', its extremes theirs.
    for span in curve:
        records = [_step(s, samples=32 if s % 7 else 5)
                   for s in range(span.first_step, span.last_step + 1)]
        samples = sum(r.samples for r in records)
        assert span.samples == samples
        assert math.isclose(span.loss, sum(r.loss * r.samples for r in records) / samples,
                            rel_tol=1e-12)
        assert (span.min_loss, span.max_loss) == (min(r.loss for r in records),
                                                  max(r.loss for r in records))
        assert span.train_correct == sum(r.train_correct for r in records)
        assert span.max_gradient_norm == max(r.gradient_norm for r in records)
        assert math.isclose(span.wall_seconds, 0.002 * span.steps, rel_tol=1e-9)
        assert span.epoch == span.last_step // 100


def test_memory_stops_growing_once_the_history_is_full():
    """The history holds as much after 8,192 steps as after 2,048 (a new step's record
    replaces the oldest; spans merge pairwise): 10 million steps hold the same. Small sizes,
    so that both points are full (64 spans of 32 and of 128 steps) within a short test."""
    history = StepHistory(recent=64, spans=64)
    tracemalloc.start()  # from the start: what is freed later must have been counted
    try:
        _steps(history, 1, 2_048)
        before, _ = tracemalloc.get_traced_memory()
        _steps(history, 2_049, 8_192)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(history) == 64 and len(history.curve) == 64 and history.stride == 128
    assert abs(after - before) < 4 * 1024, f"grew by {after - before} bytes over 6,144 steps"


def test_a_step_with_many_parameter_norms_keeps_fewer_recent_steps():
    many = {f"{i}.weight": 1.0 for i in range(RECENT_NORMS_BUDGET // 64)}
    history = StepHistory()
    for step in range(1, 101):
        history.append(_step(step, norms=many))
    assert len(history) == 64
    huge = {f"{i}.weight": 1.0 for i in range(RECENT_NORMS_BUDGET // 8)}
    history = StepHistory()
    for step in range(1, 101):
        history.append(_step(step, norms=huge))
    assert len(history) == MIN_RECENT_STEPS


def test_evaluations_are_thinned_evenly_and_the_latest_is_always_there():
    evaluations: Thinned[EvaluationRecord] = Thinned(capacity=16)
    for step in range(1, 30_001):
        evaluations.append(EvaluationRecord(step, 0, 1.0 / step, None, 10))
        assert evaluations[-1].step == step
    steps = [e.step for e in evaluations]
    assert len(steps) <= 17 and steps[0] == 1 and steps[-1] == 30_000
    kept = steps[:-1] if (30_000 - 1) % evaluations.stride else steps
    assert {b - a for a, b in zip(kept, kept[1:])} == {evaluations.stride}
    few: Thinned[int] = Thinned(capacity=16)
    for value in range(5):
        few.append(value)
    assert list(few) == [0, 1, 2, 3, 4] and few[1:3] == [1, 2]
    assert not Thinned()


def test_a_copy_is_what_a_restart_goes_back_to():
    history = TrainingHistory(steps=StepHistory(recent=4, spans=4),
                              evaluations=Thinned(capacity=4))
    _steps(history.steps, 1, 10)
    history.evaluations.append(EvaluationRecord(10, 0, 0.5, None, 10))
    at_checkpoint = history.copy()
    _steps(history.steps, 11, 30)
    history.evaluations.append(EvaluationRecord(20, 0, 0.4, None, 10))
    assert [r.step for r in at_checkpoint.steps] == [7, 8, 9, 10]
    assert at_checkpoint.steps.curve[-1].last_step == 10 and at_checkpoint.steps.recorded == 10
    assert [e.step for e in at_checkpoint.evaluations] == [10]
    # Replaying from the copy gives the same history as the uninterrupted run.
    replayed = at_checkpoint.copy()
    _steps(replayed.steps, 11, 30)
    assert replayed.steps.curve == history.steps.curve
    assert list(replayed.steps) == list(history.steps)


@pytest.mark.parametrize("spans", [0, 3])
def test_the_curve_needs_an_even_number_of_spans(spans):
    with pytest.raises(ValueError, match="even number"):
        StepHistory(spans=spans)
