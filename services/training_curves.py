"""Each running job's training-loss curve, for the web UI: a queue observer that keeps a bounded,
downsampled series of the loss per optimizer step.

The store keeps no per-step history (one write per step would cost more than the step), so the
curve is kept here, in memory: at most `max_points` points per job, each the mean loss of a run
of consecutive steps. When a job's series is full, neighbouring points are merged pairwise and
each point then covers twice as many steps, so a job of any length costs the same memory and
its whole run stays on the curve. At most `max_jobs` jobs are kept (the least recently stepped
go first). A server restart starts the curves afresh; the validation curves come from the
job's stored evaluations and survive it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from scheduler.records import StepRecord

DEFAULT_MAX_POINTS = 512
DEFAULT_MAX_JOBS = 64


@dataclass(frozen=True)
class CurvePoint:
    step: int  # the last optimizer step the point covers
    loss: float  # the mean training loss of the steps it covers
    steps: int  # how many steps it covers


class _Series:
    """One job's points, and the run of steps still being averaged into the next point."""

    def __init__(self) -> None:
        self.points: list[CurvePoint] = []
        self.steps_per_point = 1
        self.pending_loss = 0.0
        self.pending_steps = 0
        self.last_step = 0

    def add(self, step: int, loss: float, max_points: int) -> None:
        if step <= self.last_step:
            # A replay from a checkpoint (a lost shard, a resume): its steps replace the old.
            self._truncate(step - 1)
        self.pending_loss += loss
        self.pending_steps += 1
        self.last_step = step
        if self.pending_steps == self.steps_per_point:
            self.points.append(CurvePoint(step, self.pending_loss / self.pending_steps,
                                          self.pending_steps))
            self.pending_loss, self.pending_steps = 0.0, 0
        if len(self.points) > max_points:
            self.points = [_merge(self.points[i:i + 2]) for i in range(0, len(self.points), 2)]
            self.steps_per_point *= 2

    def snapshot(self) -> list[CurvePoint]:
        if self.pending_steps:
            return [*self.points, CurvePoint(self.last_step,
                                             self.pending_loss / self.pending_steps,
                                             self.pending_steps)]
        return list(self.points)

    def _truncate(self, last_kept_step: int) -> None:
        self.points = [point for point in self.points if point.step <= last_kept_step]
        self.pending_loss, self.pending_steps = 0.0, 0
        self.last_step = self.points[-1].step if self.points else 0


def _merge(points: list[CurvePoint]) -> CurvePoint:
    steps = sum(point.steps for point in points)
    return CurvePoint(points[-1].step, sum(p.loss * p.steps for p in points) / steps, steps)


class TrainingCurves:
    """A JobQueue observer (`job_step`); `points(job_id)` for readers on any thread."""

    def __init__(self, max_points: int = DEFAULT_MAX_POINTS, max_jobs: int = DEFAULT_MAX_JOBS):
        if max_points < 2 or max_jobs < 1:
            raise ValueError(f"need max_points >= 2 and max_jobs >= 1, got {max_points} and "
                             f"{max_jobs}")
        self.max_points = max_points
        self.max_jobs = max_jobs
        self._lock = threading.Lock()
        self._series: OrderedDict[str, _Series] = OrderedDict()

    def job_step(self, job_id: str, record: StepRecord) -> None:
        with self._lock:
            series = self._series.pop(job_id, None) or _Series()
            self._series[job_id] = series  # now the most recently stepped
            if len(self._series) > self.max_jobs:
                self._series.popitem(last=False)
            series.add(record.step, record.loss, self.max_points)

    def points(self, job_id: str) -> list[CurvePoint]:
        """The job's curve, oldest step first (the last point may cover fewer steps than the
        others: the run still being averaged). Empty for a job not seen since the start."""
        with self._lock:
            series = self._series.get(job_id)
            return series.snapshot() if series is not None else []
