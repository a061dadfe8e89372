"""How long a step may take before a peer that has not answered counts as lost.

Every wait has a deadline in proportion to the job's own step time (BRIEF invariant 3). A
fixed one is wrong both ways: 120 s let a stopped worker of a 2 ms step go unnoticed for the
time of 60,000 steps, and would be too short for a model whose steps take minutes. So the
deadline follows the job: max(multiplier x the median of its last WINDOW step times, floor)
(the spec's resources.step_deadline, worker/resolved_job.py). The median, not the mean: a few
slow steps (a recomputation, a replacement's first block) do not move it.

Until WARMUP_STEPS steps are timed the start-up deadline applies instead: the first steps of
a run fault pages in and start threads, and can be far slower than the rest.
"""

from __future__ import annotations

import statistics
from collections import deque

from worker.resolved_job import StepDeadlineRule

WINDOW = 101  # recent steps the median is taken over (odd: the median is one of them)
WARMUP_STEPS = 5


class StepDeadline:
    def __init__(self, rule: StepDeadlineRule, startup_seconds: float):
        self.rule = rule
        self.startup_seconds = startup_seconds
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._seconds = startup_seconds

    def observe(self, step_seconds: float) -> None:
        """A step took `step_seconds` (its wall time, from plan to applied update)."""
        self._recent.append(step_seconds)
        if len(self._recent) >= WARMUP_STEPS:
            self._seconds = max(self.rule.multiplier * statistics.median(self._recent),
                                self.rule.floor_seconds)

    @property
    def seconds(self) -> float:
        """The deadline of the next step."""
        return self._seconds
