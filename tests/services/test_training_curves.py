"""The web UI's training-loss curves: bounded per job and in jobs, each point the mean of the
steps it covers, a replay replacing the steps it repeats."""

import pytest

from scheduler.records import StepRecord, StepTimings
from services.training_curves import TrainingCurves
from services.web_ui import downsample

TIMINGS = StepTimings(0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.0)


def step(number: int, loss: float) -> StepRecord:
    return StepRecord(step=number, total_steps=10_000, epoch=1, samples=32, loss=loss,
                      train_correct=0, learning_rate=0.01, gradient_norm=1.0,
                      parameter_gradient_norms={}, timings=TIMINGS, bytes_sent_per_worker=0,
                      bytes_received_per_worker=0, parameter_bytes=0, workers=1,
                      worker_failures=0)


def test_a_long_job_keeps_at_most_max_points_each_the_mean_of_its_steps():
    curves = TrainingCurves(max_points=8)
    for number in range(1, 1001):
        curves.job_step("job-a", step(number, float(number)))
    points = curves.points("job-a")
    assert len(points) <= 9  # max_points, and the run still being averaged
    assert sum(point.steps for point in points) == 1000  # every step is on the curve once
    assert points[-1].step == 1000
    first = 0
    for point in points:
        covered = range(first + 1, point.step + 1)
        assert point.steps == len(covered)
        assert point.loss == pytest.approx(sum(covered) / len(covered))
        first = point.step


def test_a_replay_from_a_checkpoint_replaces_the_steps_it_repeats():
    curves = TrainingCurves()
    for number in range(1, 11):
        curves.job_step("job-a", step(number, 1.0))
    for number in range(7, 9):  # restarted from the checkpoint of step 6
        curves.job_step("job-a", step(number, 2.0))
    points = curves.points("job-a")
    assert [point.step for point in points] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [point.loss for point in points] == [1.0] * 6 + [2.0, 2.0]


def test_the_least_recently_stepped_job_is_forgotten_beyond_max_jobs():
    curves = TrainingCurves(max_jobs=2)
    curves.job_step("job-a", step(1, 1.0))
    curves.job_step("job-b", step(1, 1.0))
    curves.job_step("job-a", step(2, 1.0))
    curves.job_step("job-c", step(1, 1.0))
    assert curves.points("job-b") == []
    assert len(curves.points("job-a")) == 2 and len(curves.points("job-c")) == 1


def test_downsampling_spreads_the_points_and_keeps_both_ends():
    points = list(range(10_000))
    kept = downsample(points, 512)
    assert len(kept) == 512 and kept[0] == 0 and kept[-1] == 9999
    assert kept == sorted(set(kept))
    assert downsample(points[:5], 512) == points[:5]
