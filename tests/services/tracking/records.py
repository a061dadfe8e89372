"""Records as the job runner reports them, with chosen values, for the trackers' unit tests."""

from __future__ import annotations

from scheduler.records import StepRecord, StepTimings


def step_record(step: int, total_steps: int = 20, *, loss: float | None = None,
                learning_rate: float = 0.01) -> StepRecord:
    """Step `step` of a job: a loss, norms and timings that differ from step to step."""
    wall = 0.002 + step * 1e-5
    return StepRecord(
        step=step, total_steps=total_steps, epoch=1 + (step - 1) // 10, samples=32,
        loss=1.5 / step if loss is None else loss, train_correct=10 + step % 5,
        learning_rate=learning_rate, gradient_norm=0.5 + step / 100,
        parameter_gradient_norms={"0.weight": 0.3 + step / 1000, "0.bias": 0.1,
                                  "2.weight": 0.2 * step},
        timings=StepTimings(compute=wall / 2, reduce=wall / 8, apply=wall / 8, gather=0.0,
                            wait=wall / 4, wall=wall, straggler_spread=0.0),
        bytes_sent_per_worker=1000, bytes_received_per_worker=1000, parameter_bytes=1000,
        workers=1, worker_failures=0)
