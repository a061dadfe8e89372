"""How a job keeps its history bounded (`TrainingHistory`): a job of 10 million steps holds no
more records than one of ten thousand.

A `StepHistory` keeps
- the last `recent` steps in full (`StepRecord`s, a ring buffer: what tests and a person
  looking at the job now read), and
- the whole job's curve as at most `spans` `StepSpan`s, each summing up `stride` consecutive
  steps (sample-weighted mean loss, its min and max, samples, time). When the curve is full,
  neighbouring spans merge pairwise and the stride doubles, so the curve always covers every
  step from the first, at a resolution that halves each time the job doubles in length.

Evaluations are kept the same way as `Thinned` records: every `stride`-th one, the stride
doubling when the list fills, plus the latest.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar, overload

from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord

T = TypeVar("T")

# A StepRecord carries one gradient norm per parameter tensor: with many tensors, fewer recent
# steps are kept in full, so that the ring buffer holds at most this many norms.
RECENT_NORMS_BUDGET = 1 << 16  # about 4 MiB of floats in dicts
MIN_RECENT_STEPS = 16


@dataclass(frozen=True)
class StepSpan:
    """Consecutive steps summed up: one point of a long job's training curve."""

    first_step: int
    last_step: int
    epoch: int  # the last step's
    samples: int
    loss: float  # mean training loss over the span's samples
    min_loss: float  # of a step's mean loss
    max_loss: float
    train_correct: int
    wall_seconds: float
    max_gradient_norm: float

    @classmethod
    def of(cls, record: StepRecord) -> StepSpan:
        return cls(record.step, record.step, record.epoch, record.samples, record.loss,
                   record.loss, record.loss, record.train_correct, record.timings.wall,
                   record.gradient_norm)

    def merged(self, later: StepSpan) -> StepSpan:
        """This span and the one right after it, as one."""
        samples = self.samples + later.samples
        loss = ((self.loss * self.samples + later.loss * later.samples) / samples if samples
                else (self.loss + later.loss) / 2)
        return StepSpan(self.first_step, later.last_step, later.epoch, samples, loss,
                        min(self.min_loss, later.min_loss), max(self.max_loss, later.max_loss),
                        self.train_correct + later.train_correct,
                        self.wall_seconds + later.wall_seconds,
                        max(self.max_gradient_norm, later.max_gradient_norm))

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.wall_seconds if self.wall_seconds > 0 else 0.0


class StepHistory:
    """The last `recent` steps in full (fewer when each carries many per-parameter norms: at
    most RECENT_NORMS_BUDGET norms in all, and at least MIN_RECENT_STEPS steps) and the whole
    job as at most `spans` StepSpans.

    As a sequence it is the recent steps, oldest first (`history[-1]` is the latest step);
    `len()` counts those, `recorded` every step appended."""

    def __init__(self, recent: int = 1024, spans: int = 512):
        if spans < 2 or spans % 2:
            raise ValueError(f"spans must be an even number >= 2, got {spans}")
        self.recent_limit = max(1, recent)
        self.recent: deque[StepRecord] = deque(maxlen=self.recent_limit)
        self.capacity = spans
        self.curve: list[StepSpan] = []  # every span `stride` steps wide, the last may be less
        self.stride = 1
        self.recorded = 0

    def append(self, record: StepRecord) -> None:
        if self.recorded == 0:  # every step of a job has as many norms as its first
            norms = max(1, len(record.parameter_gradient_norms))
            fits = max(MIN_RECENT_STEPS, RECENT_NORMS_BUDGET // norms)
            self.recent = deque(maxlen=min(self.recent_limit, fits))
        self.recent.append(record)
        self.recorded += 1
        span = StepSpan.of(record)
        if self.curve and self.curve[-1].steps < self.stride:
            self.curve[-1] = self.curve[-1].merged(span)
            return
        if len(self.curve) == self.capacity:  # every span full: halve the resolution
            self.curve = [a.merged(b) for a, b in zip(self.curve[::2], self.curve[1::2])]
            self.stride *= 2
        self.curve.append(span)

    def copy(self) -> StepHistory:
        """A copy that later appends to either leave the other alone (records are frozen)."""
        twin = copy.copy(self)
        twin.recent = self.recent.copy()
        twin.curve = list(self.curve)
        return twin

    def __len__(self) -> int:
        return len(self.recent)

    @overload
    def __getitem__(self, index: int) -> StepRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[StepRecord]: ...
    def __getitem__(self, index: int | slice) -> StepRecord | list[StepRecord]:
        return list(self.recent)[index] if isinstance(index, slice) else self.recent[index]

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.recent)


class Thinned(Generic[T]):
    """At most `capacity` records spread over the whole run, and the latest: every
    `stride`-th record appended is kept, and when the list is full every other kept one is
    dropped and the stride doubles.

    As a sequence it is the kept records then the latest (when not kept already), oldest
    first; `recorded` counts every record appended."""

    def __init__(self, capacity: int = 1024):
        if capacity < 2 or capacity % 2:
            raise ValueError(f"capacity must be an even number >= 2, got {capacity}")
        self.capacity = capacity
        self.kept: list[T] = []
        self.latest: T | None = None
        self.stride = 1
        self.recorded = 0

    def append(self, record: T) -> None:
        if self.recorded % self.stride == 0:
            if len(self.kept) == self.capacity:
                self.kept = self.kept[::2]
                self.stride *= 2
            if self.recorded % self.stride == 0:
                self.kept.append(record)
        self.recorded += 1
        self.latest = record

    def copy(self) -> Thinned[T]:
        twin = copy.copy(self)
        twin.kept = list(self.kept)
        return twin

    def _records(self) -> list[T]:
        kept_latest = (self.recorded - 1) % self.stride == 0 and self.recorded > 0
        return self.kept if kept_latest or self.latest is None else [*self.kept, self.latest]

    def __len__(self) -> int:
        return len(self._records())

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        return self._records()[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._records())

    def __bool__(self) -> bool:
        return self.recorded > 0


@dataclass
class TrainingHistory:
    """What a run keeps of its steps, evaluations and recoveries, bounded whatever its length
    (recoveries are bounded by the failure policy's caps)."""

    steps: StepHistory = field(default_factory=StepHistory)
    evaluations: Thinned[EvaluationRecord] = field(default_factory=Thinned)
    worker_failures: int = 0
    shard_failures: int = 0  # each one restarted the job from its last checkpoint
    recoveries: list[RecoveryRecord] = field(default_factory=list)  # as they were carried out

    def copy(self) -> TrainingHistory:
        """A copy to go back to (a restart from a checkpoint forgets what came after it)."""
        return TrainingHistory(self.steps.copy(), self.evaluations.copy(), self.worker_failures,
                               self.shard_failures, list(self.recoveries))
