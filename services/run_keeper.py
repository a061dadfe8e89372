"""What a job's runner outside the server writes to the store itself: its lease and its progress.

A detached runner (scheduler/detached_runner.py) trains on while no server runs; its lease must
not run out meanwhile (a restarted server would take it for dead), and its progress in the
store is what a restarted server, or anyone reading the store, sees first. This keeper is
pickled into the runner's process and opens the SQLite store there for each write (the same
host, the same data folder). Compare-and-set on the lease's owner: a run whose job was
requeued or ended meanwhile writes nothing and learns that it lost the lease.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from dataclasses import dataclass

from scheduler.records import StepRecord
from services.store import ProgressSummary

BUSY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class StoreRunKeeper:
    database: str  # the store's SQLite file
    job_id: str
    owner: str  # the run's lease owner
    lease_seconds: float

    def renew(self, record: StepRecord | None) -> bool:
        """Extend the lease by `lease_seconds` and, given a step, record it as the job's
        progress (keeping the epochs and validation the server recorded); False, writing
        nothing, when the job is no longer RUNNING under this owner."""
        with contextlib.closing(sqlite3.connect(self.database, timeout=BUSY_TIMEOUT_SECONDS,
                                                isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT progress FROM jobs WHERE id = ? AND state = 'RUNNING' AND "
                    "lease_owner = ?", (self.job_id, self.owner)).fetchone()
                if row is None:
                    return False
                progress = row[0]
                if record is not None:
                    progress = _progress_at(ProgressSummary.from_json(progress), record).to_json()
                db.execute(
                    "UPDATE jobs SET lease_expires_at = ?, progress = ? WHERE id = ? AND "
                    "state = 'RUNNING' AND lease_owner = ?",
                    (time.time() + self.lease_seconds, progress, self.job_id, self.owner))
            finally:
                db.execute("COMMIT")
        return True


def _progress_at(before: ProgressSummary | None, record: StepRecord) -> ProgressSummary:
    remaining = record.timings.wall * (record.total_steps - record.step)
    if before is None:
        return ProgressSummary(record.step, record.total_steps, record.epoch, 0, record.loss,
                               record.samples_per_second, remaining)
    return dataclasses.replace(before, step=record.step, total_steps=record.total_steps,
                               epoch=record.epoch, loss=record.loss,
                               samples_per_second=record.samples_per_second,
                               eta_seconds=remaining)
