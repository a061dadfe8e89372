"""The service's durable state: jobs, their events, uploaded data sets and idempotency keys, in
one SQLite file (WAL) under the data directory.

Every write is one transaction, so a failed request never leaves half a record: a job row and
its idempotency key are written together or not at all, as are a state change and its event.
WAL lets the many reader threads of the gRPC server (GetJob, ListJobs) run while a job thread
writes. Each thread gets its own connection (sqlite3 connections are not shared across threads).

The records here are plain dataclasses; protobuf conversion lives in `services/convert.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chainrule.v1 import job_pb2
from scheduler.job_lease import Lease
from services.errors import AlreadyExists, InvalidArgument

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    spec BLOB NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress TEXT,
    final_validation TEXT,
    weights_path TEXT NOT NULL DEFAULT '',
    -- A RUNNING job's lease (scheduler/job_lease.py): its runner's id and when it runs out.
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_expires_at REAL,
    -- Seconds spent RUNNING in the runs that ended, and when the current run started: the
    -- time a job waited between runs (queued again after a resume, a restart, a preemption)
    -- is not time it ran.
    running_seconds REAL NOT NULL DEFAULT 0,
    run_started_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, state);
-- A tenant's jobs newest first without sorting them all (ListJobs without a state filter: one
-- tenant's 100,000 jobs took 170 ms to sort for a page of 50), and the jobs in a state in queue
-- order (the start-up requeue, the queued jobs' users of a data set).
CREATE INDEX IF NOT EXISTS jobs_newest_by_tenant ON jobs (tenant);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS datasets (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    format TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    samples INTEGER NOT NULL,
    validation_samples INTEGER NOT NULL,
    feature_shape TEXT NOT NULL,
    integer_features INTEGER NOT NULL,
    task TEXT NOT NULL,
    num_classes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    target_shape TEXT,
    tensors TEXT,
    PRIMARY KEY (tenant, name)
);
-- Rows of `datasets` that could not be served (written before uploads were validated as they
-- are now): moved here when the store opens, with why, for the operator to look at.
CREATE TABLE IF NOT EXISTS quarantined_datasets (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    reason TEXT NOT NULL,
    row TEXT NOT NULL,
    quarantined_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    spec_digest TEXT NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
"""


log = logging.getLogger(__name__)

ENDED_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
ENDED_CACHE_SIZE = 10_000
MAX_VALIDATION_EVENTS = 2048  # per job; older ones are thinned evenly past it


@dataclass(frozen=True)
class ValidationSummary:
    step: int
    loss: float
    accuracy: float | None
    samples: int


@dataclass(frozen=True)
class ProgressSummary:
    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float
    samples_per_second: float
    eta_seconds: float
    validation: ValidationSummary | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> ProgressSummary | None:
        if not text:
            return None
        data = json.loads(text)
        validation = data.pop("validation", None)
        return cls(**data, validation=ValidationSummary(**validation) if validation else None)


@dataclass
class JobRecord:
    id: str
    tenant: str
    spec: job_pb2.JobSpec
    state: str
    created_at: float
    request_id: str = ""
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    progress: ProgressSummary | None = None
    final_validation: ValidationSummary | None = None
    weights_path: str = ""
    # Seconds RUNNING in the ended runs, and the start of the current run (None unless RUNNING).
    running_seconds: float = 0.0
    run_started_at: float | None = None
    # While QUEUED, from the queue (JobService.get): its place among its tenant's queued jobs
    # (1: next) and why it waits. Not stored.
    queue_position: int = 0
    wait_reason: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def seconds_running(self, now: float) -> float:
        """Time spent RUNNING over every run, the current one up to `now`."""
        current = max(0.0, now - self.run_started_at) if self.run_started_at is not None else 0.0
        return self.running_seconds + current


@dataclass(frozen=True)
class DatasetRecord:
    tenant: str
    name: str
    format: str
    size_bytes: int
    sha256: str
    path: str
    samples: int
    validation_samples: int
    feature_shape: tuple[int, ...]
    integer_features: bool  # token ids (for an embedding) rather than float features
    task: str
    num_classes: int
    created_at: float = field(default_factory=time.time)
    # () for class labels, (k,) for k regression targets; None in rows stored before it was
    # kept (read it from the file's header then).
    target_shape: tuple[int, ...] | None = None
    # A safetensors upload's (key, shape) per tensor, in the file's order (for checking a
    # spec's model.init_from); None for data sets. A text's length is size_bytes.
    tensors: tuple[tuple[str, tuple[int, ...]], ...] | None = None


@dataclass(frozen=True)
class EventRecord:
    seq: int
    job_id: str
    time: float
    # "state", "validation", "resumed" (from a checkpoint, at payload["step"]),
    # "checkpoint_corrupt" (payload["file"] set aside), "warning" (payload["message"]),
    # "recovery" (payload["step"], ["kind"], ["message"]: scheduler/records.py) or "traceback"
    kind: str
    payload: dict


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Every tenant's specs: the server's user's only. SQLite gives the -wal and -shm files
        # the database's mode; an older, wider database is narrowed here.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._local = threading.local()
        # Ended jobs never change again: keep their records, so GetJob and ListJobs (the
        # hottest calls) skip parsing the spec and the JSON columns. Bounded, oldest out.
        self._ended: OrderedDict[str, JobRecord] = OrderedDict()
        self._ended_lock = threading.Lock()
        self._connection().executescript(SCHEMA)  # idempotent; executescript commits itself
        self._add_missing_columns()
        self._quarantine_unservable_datasets()

    def _add_missing_columns(self) -> None:
        """Columns added since a database was created (CREATE TABLE IF NOT EXISTS keeps an old
        table as it was)."""
        db = self._connection()
        job_columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        if "lease_owner" not in job_columns:
            db.execute("ALTER TABLE jobs ADD COLUMN lease_owner TEXT NOT NULL DEFAULT ''")
        if "lease_expires_at" not in job_columns:
            db.execute("ALTER TABLE jobs ADD COLUMN lease_expires_at REAL")
        if "running_seconds" not in job_columns:
            db.execute("ALTER TABLE jobs ADD COLUMN running_seconds REAL NOT NULL DEFAULT 0")
        if "run_started_at" not in job_columns:
            db.execute("ALTER TABLE jobs ADD COLUMN run_started_at REAL")
        columns = {row["name"] for row in db.execute("PRAGMA table_info(datasets)")}
        if "target_shape" not in columns:
            db.execute("ALTER TABLE datasets ADD COLUMN target_shape TEXT")
        if "tensors" not in columns:
            db.execute("ALTER TABLE datasets ADD COLUMN tensors TEXT")

    def _quarantine_unservable_datasets(self) -> None:
        """Move aside the data set rows that no answer can carry, each with a warning in the
        log. Older servers stored some (a class label >= 2**32 made num_classes too wide for
        DatasetInfo), and one such row made ListDatasets fail for its tenant on every call.
        Their files stay where they are; the tenant can upload the data again, fixed."""
        for row in self._connection().execute("SELECT * FROM datasets").fetchall():
            reason = _unservable_dataset(row)
            if reason is None:
                continue
            with self._transaction() as db:
                db.execute("INSERT INTO quarantined_datasets VALUES (?, ?, ?, ?, ?)",
                           (row["tenant"], row["name"], reason, json.dumps(dict(row)),
                            time.time()))
                db.execute("DELETE FROM datasets WHERE tenant = ? AND name = ?",
                           (row["tenant"], row["name"]))
            log.warning("data set %r of tenant %r cannot be listed or used (%s): moved to the "
                        "table quarantined_datasets of %s; upload it again to use it",
                        row["name"], row["tenant"], reason, self.path)

    # --- connections and transactions ----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            # isolation_level=None: we issue BEGIN ourselves, so a transaction is exactly the
            # `with self._transaction()` block.
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks
        try:
            yield db
            # In WAL mode the pages reach the disk at COMMIT: a full disk fails here, and the
            # transaction (with its write lock) stays open unless rolled back below.
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, IOERR)
                db.execute("ROLLBACK")
            raise

    # --- jobs --------------------------------------------------------------------------------

    def create_job(self, job: JobRecord, spec_digest: str) -> tuple[JobRecord, bool]:
        """Insert a job (and its idempotency key), or return the job an earlier request with
        the same request_id created: (job, created)."""
        with self._transaction() as db:
            if job.request_id:
                existing = self._job_of_request(db, job.tenant, job.request_id, spec_digest)
                if existing is not None:
                    return existing, False
            db.execute(
                "INSERT INTO jobs (id, tenant, name, state, priority, dataset, spec, request_id, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.tenant, job.spec.name, job.state, job.spec.priority,
                 job.spec.data.dataset, job.spec.SerializeToString(), job.request_id,
                 job.created_at))
            self._add_event(db, job.id, "state", {"state": job.state, "error": ""}, job.created_at)
            if job.request_id:
                db.execute("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?)",
                           (job.tenant, job.request_id, job.id, spec_digest))
        return job, True

    def job_of_request(self, tenant: str, request_id: str, spec_digest: str
                       ) -> JobRecord | None:
        """The job an earlier submit with this request_id created, or None (AlreadyExists when
        that submit had another spec)."""
        return self._job_of_request(self._connection(), tenant, request_id, spec_digest)

    def _job_of_request(self, db: sqlite3.Connection, tenant: str, request_id: str,
                        spec_digest: str) -> JobRecord | None:
        row = db.execute("SELECT job_id, spec_digest FROM idempotency_keys WHERE "
                         "tenant = ? AND request_id = ?", (tenant, request_id)).fetchone()
        if row is None:
            return None
        if row["spec_digest"] != spec_digest:
            raise AlreadyExists(f"request_id {request_id!r} was already used for job "
                                f"{row['job_id']} with a different spec")
        existing = self._job_row(db, row["job_id"], tenant)
        assert existing is not None
        return existing

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when it does not exist or belongs to another tenant."""
        return self._job_row(self._connection(), job_id, tenant)

    def list_jobs(self, tenant: str, states: Sequence[str] = (), limit: int = 50,
                  before: int | None = None) -> tuple[list[JobRecord], int | None]:
        """The tenant's jobs newest first, at most `limit`, starting below the row `before`;
        and the cursor of the next page (None on the last one)."""
        query = "SELECT rowid, * FROM jobs WHERE tenant = ?"
        arguments: list = [tenant]
        if states:
            query += f" AND state IN ({', '.join('?' * len(states))})"
            arguments += list(states)
        if before is not None:
            query += " AND rowid < ?"
            arguments.append(before)
        query += " ORDER BY rowid DESC LIMIT ?"
        arguments.append(limit + 1)
        rows = self._connection().execute(query, arguments).fetchall()
        cursor = rows[limit - 1]["rowid"] if len(rows) > limit else None
        return [self._record(row) for row in rows[:limit]], cursor

    def job_ids(self, tenant: str) -> list[str]:
        """Every job id of the tenant (for what its jobs keep on disk)."""
        rows = self._connection().execute("SELECT id FROM jobs WHERE tenant = ?",
                                          [tenant]).fetchall()
        return [row["id"] for row in rows]

    def jobs_in_states(self, states: Sequence[str]) -> list[JobRecord]:
        """Every tenant's jobs in these states, in queue order (priority, then arrival)."""
        rows = self._connection().execute(
            f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(states))}) "
            "ORDER BY priority DESC, rowid ASC", list(states)).fetchall()
        return [_job(row) for row in rows]

    def active_jobs_using(self, tenant: str, dataset_names: Sequence[str]) -> list[str]:
        rows = self._connection().execute(
            f"SELECT id FROM jobs WHERE tenant = ? AND state IN ('QUEUED', 'RUNNING') AND "
            f"dataset IN ({', '.join('?' * len(dataset_names))})",
            [tenant, *dataset_names]).fetchall()
        return [row["id"] for row in rows]

    def set_state(self, job_id: str, state: str, *, from_states: Collection[str],
                  error: str = "", started: bool = False, finished: bool = False,
                  final_validation: ValidationSummary | None = None,
                  weights_path: str = "", lease: Lease | None = None) -> bool:
        """A state change and its event, in one transaction. Compare-and-set: only a job in
        one of `from_states` changes; otherwise nothing is written and the answer is False
        (a cancel that lost the race to the job's end never overwrites SUCCEEDED). The job's
        lease becomes `lease` (a change to RUNNING takes one), or none."""
        if not from_states:
            raise ValueError("from_states: name the states the change may start from")
        self._forget(job_id)
        now = time.time()
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET state = ?, error = ?, "
                f"started_at = CASE WHEN ? THEN coalesce(started_at, ?) ELSE started_at END, "
                f"finished_at = CASE WHEN ? THEN ? ELSE NULL END, "
                f"{_RUN_CLOCK}, "
                f"final_validation = coalesce(?, final_validation), "
                f"weights_path = CASE WHEN ? != '' THEN ? ELSE weights_path END, "
                f"lease_owner = ?, lease_expires_at = ? "
                f"WHERE id = ? AND state IN ({', '.join('?' * len(from_states))})",
                (state, error, started, now, finished, now, now, state, now,
                 json.dumps(asdict(final_validation)) if final_validation else None,
                 weights_path, weights_path, lease.owner if lease else "",
                 lease.expires_at if lease else None, job_id, *sorted(from_states))).rowcount
            if changed:
                self._add_event(db, job_id, "state", {"state": state, "error": error}, now)
        self._forget(job_id)  # a reader may have cached the row meanwhile
        return bool(changed)

    def renew_lease(self, job_id: str, lease: Lease) -> bool:
        """Extend a RUNNING job's lease to `lease.expires_at`; only its owner may. False when
        the job is no longer RUNNING under that owner (its lease expired and it was requeued)."""
        with self._transaction() as db:
            return bool(db.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND state = 'RUNNING' AND "
                "lease_owner = ?", (lease.expires_at, job_id, lease.owner)).rowcount)

    def lease_of(self, job_id: str) -> Lease | None:
        row = self._connection().execute(
            "SELECT lease_owner, lease_expires_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["lease_expires_at"] is None:
            return None
        return Lease(row["lease_owner"], row["lease_expires_at"])

    def expired_leases(self, now: float) -> list[tuple[str, Lease]]:
        """The RUNNING jobs whose lease ran out before `now`, with it."""
        rows = self._connection().execute(
            "SELECT id, lease_owner, lease_expires_at FROM jobs WHERE state = 'RUNNING' AND "
            "lease_expires_at < ?", (now,)).fetchall()
        return [(row["id"], Lease(row["lease_owner"], row["lease_expires_at"])) for row in rows]

    def requeue_expired(self, job_id: str, lease: Lease, reason: str) -> bool:
        """A job whose lease ran out back to QUEUED with `reason`, and its event.
        Compare-and-set on the same lease: False, and nothing written, when the job left
        RUNNING or its owner renewed meanwhile."""
        now = time.time()
        self._forget(job_id)
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET state = 'QUEUED', error = ?, lease_owner = '', "
                f"lease_expires_at = NULL, {_RUN_CLOCK} WHERE id = ? AND state = 'RUNNING' AND "
                f"lease_owner = ? AND lease_expires_at = ?",
                (reason, now, "QUEUED", now, job_id, lease.owner, lease.expires_at)).rowcount
            if changed:
                self._add_event(db, job_id, "state", {"state": "QUEUED", "error": reason}, now)
        self._forget(job_id)
        return bool(changed)

    def set_progress(self, job_id: str, progress: ProgressSummary) -> None:
        self._forget(job_id)
        with self._transaction() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress.to_json(), job_id))

    def add_event(self, job_id: str, kind: str, payload: dict) -> None:
        with self._transaction() as db:
            self._add_event(db, job_id, kind, payload, time.time())
            if kind == "validation":
                _thin_validation_events(db, job_id)

    def requeue_ended_job(self, job_id: str, spec: job_pb2.JobSpec) -> bool:
        """An ended job back to QUEUED with `spec` (ResumeJob; the spec may ask for more
        epochs), and its state event. Compare-and-set: False, and nothing written, when the
        job is not in an ended state (any more)."""
        now = time.time()
        self._forget(job_id)
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET state = 'QUEUED', spec = ?, error = '', finished_at = NULL, "
                f"final_validation = NULL, weights_path = '' WHERE id = ? AND state IN "
                f"({', '.join('?' * len(ENDED_STATES))})",
                (spec.SerializeToString(), job_id, *sorted(ENDED_STATES))).rowcount
            if changed:
                self._add_event(db, job_id, "state", {"state": "QUEUED", "error": ""}, now)
        self._forget(job_id)  # a reader may have cached the ended row meanwhile
        return bool(changed)

    def delete_job(self, job_id: str) -> bool:
        """Delete an ended job's row, events and idempotency key. Compare-and-set: False,
        and nothing deleted, when the job does not exist or has not ended."""
        self._forget(job_id)
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] not in ENDED_STATES:
                return False
            db.execute("DELETE FROM idempotency_keys WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM job_events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._forget(job_id)
        return True

    def events(self, job_id: str) -> list[EventRecord]:
        rows = self._connection().execute(
            "SELECT * FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,)).fetchall()
        return [EventRecord(row["seq"], row["job_id"], row["time"], row["kind"],
                            json.loads(row["payload"])) for row in rows]

    @staticmethod
    def _add_event(db: sqlite3.Connection, job_id: str, kind: str, payload: dict,
                   now: float) -> None:
        db.execute("INSERT INTO job_events (job_id, time, kind, payload) VALUES (?, ?, ?, ?)",
                   (job_id, now, kind, json.dumps(payload)))

    def _job_row(self, db: sqlite3.Connection, job_id: str,
                 tenant: str | None) -> JobRecord | None:
        with self._ended_lock:
            ended = self._ended.get(job_id)
        if ended is not None:
            return ended if tenant is None or ended.tenant == tenant else None
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        return self._record(row)

    def _forget(self, job_id: str) -> None:
        with self._ended_lock:
            self._ended.pop(job_id, None)

    def _record(self, row: sqlite3.Row) -> JobRecord:
        """The row's JobRecord; an ended job's from (or into) the cache. Callers must not
        modify a returned record."""
        if row["state"] not in ENDED_STATES:
            return _job(row)
        with self._ended_lock:
            record = self._ended.get(row["id"])
        if record is None:
            record = _job(row)
            with self._ended_lock:
                self._ended[record.id] = record
                while len(self._ended) > ENDED_CACHE_SIZE:
                    self._ended.popitem(last=False)
        return record

    # --- data sets -----------------------------------------------------------------------------

    def add_dataset(self, record: DatasetRecord) -> None:
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO datasets (tenant, name, format, size_bytes, sha256, path, "
                    "samples, validation_samples, feature_shape, integer_features, task, "
                    "num_classes, created_at, target_shape, tensors) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.tenant, record.name, record.format, record.size_bytes,
                     record.sha256, record.path, record.samples, record.validation_samples,
                     json.dumps(list(record.feature_shape)), record.integer_features,
                     record.task, record.num_classes, record.created_at,
                     None if record.target_shape is None
                     else json.dumps(list(record.target_shape)),
                     None if record.tensors is None
                     else json.dumps([[key, list(shape)] for key, shape in record.tensors])))
        except sqlite3.IntegrityError as error:
            raise AlreadyExists(f"header.name: a data set named {record.name!r} already "
                                f"exists; delete it first (`chainrule datasets delete "
                                f"{record.name}`, Client.delete_dataset)") from error

    def get_dataset(self, tenant: str, name: str) -> DatasetRecord | None:
        row = self._connection().execute(
            "SELECT * FROM datasets WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
        return _dataset(row) if row is not None else None

    def list_datasets(self, tenant: str) -> list[DatasetRecord]:
        rows = self._connection().execute(
            "SELECT * FROM datasets WHERE tenant = ? ORDER BY name", (tenant,)).fetchall()
        return [_dataset(row) for row in rows]

    def delete_dataset(self, tenant: str, name: str) -> DatasetRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM datasets WHERE tenant = ? AND name = ?",
                             (tenant, name)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM datasets WHERE tenant = ? AND name = ?", (tenant, name))
        return _dataset(row)

    # --- for tests and diagnostics -------------------------------------------------------------

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, to compare the store before and after a request."""
        db = self._connection()
        return {table: [tuple(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY 1")]
                for table in ("jobs", "job_events", "datasets", "quarantined_datasets",
                              "idempotency_keys")}

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


# The run clock in one state change (SET's right-hand sides read the row before it): a run
# that ends adds its seconds, and one that starts is timed from now. Parameters: now, the new
# state, now.
_RUN_CLOCK = ("running_seconds = running_seconds + CASE WHEN state = 'RUNNING' AND "
              "run_started_at IS NOT NULL THEN max(0, ? - run_started_at) ELSE 0 END, "
              "run_started_at = CASE WHEN ? = 'RUNNING' THEN ? ELSE NULL END")


def _job(row: sqlite3.Row) -> JobRecord:
    final = json.loads(row["final_validation"]) if row["final_validation"] else None
    return JobRecord(
        id=row["id"], tenant=row["tenant"], spec=job_pb2.JobSpec.FromString(row["spec"]),
        state=row["state"], created_at=row["created_at"], request_id=row["request_id"],
        error=row["error"], started_at=row["started_at"], finished_at=row["finished_at"],
        progress=ProgressSummary.from_json(row["progress"]),
        final_validation=ValidationSummary(**final) if final else None,
        weights_path=row["weights_path"], running_seconds=row["running_seconds"],
        run_started_at=row["run_started_at"],
    )


def _dataset(row: sqlite3.Row) -> DatasetRecord:
    return DatasetRecord(
        tenant=row["tenant"], name=row["name"], format=row["format"],
        size_bytes=row["size_bytes"], sha256=row["sha256"], path=row["path"],
        samples=row["samples"], validation_samples=row["validation_samples"],
        feature_shape=tuple(json.loads(row["feature_shape"])),
        integer_features=bool(row["integer_features"]), task=row["task"],
        num_classes=row["num_classes"], created_at=row["created_at"],
        target_shape=(None if row["target_shape"] is None
                      else tuple(json.loads(row["target_shape"]))),
        tensors=(None if row["tensors"] is None
                 else tuple((key, tuple(shape)) for key, shape in json.loads(row["tensors"]))),
    )


def _thin_validation_events(db: sqlite3.Connection, job_id: str) -> None:
    """Keep a job's validation events bounded (a job may evaluate at every one of its
    millions of steps): past MAX_VALIDATION_EVENTS, keep the first, the latest, and between
    them about half as many spread evenly over the job's steps; delete the rest."""
    count = db.execute("SELECT COUNT(*) FROM job_events WHERE job_id = ? AND kind = "
                       "'validation'", (job_id,)).fetchone()[0]
    if count <= MAX_VALIDATION_EVENTS:
        return
    events = [(row[0], json.loads(row[1]).get("step", 0)) for row in db.execute(
        "SELECT seq, payload FROM job_events WHERE job_id = ? AND kind = 'validation' "
        "ORDER BY seq", (job_id,))]
    # The job's steps so far cut into MAX_VALIDATION_EVENTS // 2 equal spans: the first event
    # of each span is kept (and the latest); the others, and steps a resume replayed, go.
    first = events[0][1]
    spacing = max(1e-9, (events[-1][1] - first) / (MAX_VALIDATION_EVENTS // 2))
    seen_spans, deleted = {0}, []
    for seq, step in events[1:-1]:
        span = math.floor((step - first) / spacing)
        if span in seen_spans or step < first:
            deleted.append((seq,))
        seen_spans.add(span)
    db.executemany("DELETE FROM job_events WHERE seq = ?", deleted)


UINT32_END = 2**32  # DatasetInfo's num_classes and feature_shape are uint32


def _unservable_dataset(row: sqlite3.Row) -> str | None:
    """Why a stored data set row cannot be read or answered (DatasetInfo), or None."""
    try:
        record = _dataset(row)
    except (ValueError, TypeError) as error:  # JSON columns an older server wrote otherwise
        return f"unreadable row: {error}"
    if not 0 <= record.num_classes < UINT32_END:
        return f"num_classes {record.num_classes} (a class label of {record.num_classes - 1})"
    if not all(isinstance(size, int) and 0 <= size < UINT32_END
               for size in record.feature_shape):
        return f"feature_shape {list(record.feature_shape)}"
    for field_name in ("samples", "validation_samples", "size_bytes"):
        if getattr(record, field_name) < 0:
            return f"{field_name} {getattr(record, field_name)}"
    return None


PAGE_TOKEN = re.compile(r"[1-9][0-9]{0,18}")  # a rowid: positive, below SQLite's 2**63


def parse_page_token(token: str) -> int | None:
    if not token:
        return None
    if not PAGE_TOKEN.fullmatch(token) or int(token) >= 2**63:
        shown = token if len(token) <= 40 else f"{token[:40]}..."
        raise InvalidArgument("page_token", f"not a token this server issued: {shown!r}")
    return int(token)
