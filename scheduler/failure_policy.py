"""What a job does when part of it fails: the one place that decides, and counts.

The transports (worker/transport/) and the worker group (worker_group.py) only notice and carry
out; the runner hands every failure to this policy and does what it says:

  workers lost in a step  -> RECOMPUTE: the survivors compute the lost workers' blocks in the
                             same step (the parameters have not moved: the same bits); FAIL
                             when no worker is left.
  a lost worker's slot    -> REPLACE at the next step boundary: a new replica in its placement
                             bundle, at most `max_worker_replacements` over the whole job (past
                             that the job goes on with the workers it has left). A slot whose
                             last `max_unconnected_in_a_row` workers were lost without ever
                             connecting to the shards (direct connections: its host cannot
                             reach them) is left vacant: another replica there would be lost
                             the same way at its first block, a recompute every round.
  a parameter-server shard lost, or a compressed job's worker (with its blocks' error
  feedback)               -> RESTART, at most `max_shard_restarts` times; then FAIL. (How is
                             the runner's mechanism: for a lost shard, new shards from the
                             state the shards kept after the last step when they keep one,
                             the step run again; else every actor from the last checkpoint,
                             or the job's start, and replay.)
  the job's own computation raised on a worker -> FAIL: recomputing it elsewhere would raise
                             the same error.
  a standby shard          -> KEEP one, once the job has run `standby_shard_after_seconds`
                             (where a lost shard's state is kept: shared memory, elementwise
                             rules), so that a lost shard's place is taken by a process that
                             has started already; a job that ends within seconds never pays
                             for an idle process. None: never.

The counters live here, for the whole job: a restart from a checkpoint starts new actors but
not a new allowance of replacements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from worker.transport.step import (
    ErrorFeedbackLost,
    LostBlockApplied,
    ShardLost,
    StepFailure,
    WorkerNotFenced,
    WorkersLost,
    describe,
)

MAX_SHARD_RESTARTS = 3  # a job losing more shards than this fails rather than loop
MAX_WORKER_REPLACEMENTS = 8  # past this, a job goes on with the workers it has left
# A slot whose workers this many times in a row could not connect gets no more replacements:
# once may be a passing fault, twice in a row is the slot's host.
MAX_UNCONNECTED_IN_A_ROW = 2
# A job running this long keeps a standby shard (an idle process, its imports done).
STANDBY_SHARD_AFTER_SECONDS = 10.0


class Decision(Enum):
    RECOMPUTE = "recompute the lost workers' blocks on survivors, in the same step"
    RESTART = "restart the shards from their kept state, or every actor from a checkpoint"
    FAIL = "fail the job"


class JobFailed(RuntimeError):
    """The failure policy gave up on the job; `failure` is what it gave up on."""

    def __init__(self, message: str, failure: StepFailure):
        super().__init__(message)
        self.failure = failure


@dataclass
class FailurePolicy:
    max_shard_restarts: int = MAX_SHARD_RESTARTS
    max_worker_replacements: int = MAX_WORKER_REPLACEMENTS
    worker_failures: int = 0  # workers lost since the job started
    worker_replacements: int = 0  # replicas started in place of lost ones
    max_unconnected_in_a_row: int = MAX_UNCONNECTED_IN_A_ROW
    # Slot -> its workers lost in a row without connecting to the shards (reset by a loss of
    # another kind: that worker had connected).
    unconnected_in_a_row: dict[int, int] = field(default_factory=dict)
    shard_restarts: int = 0  # restarts from a checkpoint after a lost shard
    standby_shard_after_seconds: float | None = STANDBY_SHARD_AFTER_SECONDS
    standby_shards_started: int = 0

    def decide(self, failure: StepFailure, survivors: int) -> Decision:
        """What to do about `failure`; `survivors` is how many workers would be left."""
        if isinstance(failure, WorkersLost):
            self.worker_failures += len(failure.workers)
            for worker in failure.workers:
                if worker in failure.unconnected:
                    self.unconnected_in_a_row[worker] = self.unconnected_in_a_row.get(worker,
                                                                                      0) + 1
                else:
                    self.unconnected_in_a_row.pop(worker, None)
            return Decision.RECOMPUTE if survivors > 0 else Decision.FAIL
        if isinstance(failure, ShardLost | ErrorFeedbackLost | LostBlockApplied
                                   | WorkerNotFenced):
            if self.shard_restarts >= self.max_shard_restarts:
                return Decision.FAIL
            self.shard_restarts += 1
            return Decision.RESTART
        # BlockFailed: the job's own error; recomputing the block elsewhere would raise it again.
        return Decision.FAIL

    def workers_to_replace(self, vacant_slots: list[int]) -> list[int]:
        """Which of the vacant worker slots get a new replica now (REPLACE), within the cap,
        leaving out slots whose workers keep failing to connect (why_not_replaced)."""
        allowed = max(0, self.max_worker_replacements - self.worker_replacements)
        chosen = [slot for slot in vacant_slots if self.why_not_replaced(slot) is None][:allowed]
        self.worker_replacements += len(chosen)
        return chosen

    def why_not_replaced(self, slot: int) -> str | None:
        """Why slot `slot` gets no more replacements, or None while it may get one."""
        failed = self.unconnected_in_a_row.get(slot, 0)
        if failed < self.max_unconnected_in_a_row:
            return None
        return (f"worker slot {slot} gets no more replacements: its last {failed} workers "
                f"could not connect to the parameter-server shards (at most "
                f"{self.max_unconnected_in_a_row} in a row)")

    def wants_standby_shard(self, seconds_running: float) -> bool:
        """Whether a job whose steps have run `seconds_running` starts a standby shard now (it
        has none). Counted: at most one more than the shard restarts allowed, over the whole
        job (each lost shard uses one, and so does one that fails to start: a node that cannot
        take one costs a few attempts, not a process a step)."""
        after = self.standby_shard_after_seconds
        if (after is None or seconds_running < after
                or self.standby_shards_started > self.max_shard_restarts):
            return False
        self.standby_shards_started += 1
        return True

    def why_failed(self, failure: StepFailure) -> str:
        if isinstance(failure, WorkersLost):
            return f"every worker of the job failed ({describe(failure)})"
        if isinstance(failure, ShardLost | ErrorFeedbackLost | LostBlockApplied
                                   | WorkerNotFenced):
            return (f"{describe(failure)}, after {self.shard_restarts} restarts from a "
                    f"checkpoint (at most {self.max_shard_restarts})")
        return describe(failure)
