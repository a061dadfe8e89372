"""The job store: idempotency keys, one transaction per write, paging (SQLite, no Ray)."""

from __future__ import annotations

import logging
import sqlite3
import time

import pytest

from scheduler.job_lease import Lease
from services import store as store_module
from services.convert import dataset_to_proto
from services.errors import AlreadyExists, InvalidArgument
from services.store import (
    DatasetRecord,
    JobRecord,
    ProgressSummary,
    Store,
    ValidationSummary,
    parse_page_token,
)
from tests.services.helpers import iris_spec


def _job(job_id: str, tenant: str = "default", request_id: str = "") -> JobRecord:
    return JobRecord(job_id, tenant, iris_spec(), "QUEUED", time.time(), request_id=request_id)


def test_a_request_id_maps_to_one_job_per_tenant(tmp_path):
    store = Store(tmp_path / "db")
    first, created = store.create_job(_job("job-1", request_id="r"), "digest")
    assert created
    again, created = store.create_job(_job("job-2", request_id="r"), "digest")
    assert not created and again.id == "job-1"
    other_tenant, created = store.create_job(_job("job-3", "acme", request_id="r"), "digest")
    assert created and other_tenant.id == "job-3"
    with pytest.raises(AlreadyExists, match="request_id 'r'"):
        store.create_job(_job("job-4", request_id="r"), "another digest")
    assert store.get_job("job-4") is None and store.get_job("job-2") is None


def test_a_failed_write_leaves_no_row(tmp_path):
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    before = store.snapshot()
    with pytest.raises(sqlite3.IntegrityError):
        store.create_job(_job("job-1"), "d")  # the id exists: the whole transaction rolls back
    assert store.snapshot() == before


def test_a_state_change_and_its_event_are_written_together(tmp_path):
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    store.set_state("job-1", "RUNNING", from_states={"QUEUED"}, started=True)
    store.set_state("job-1", "SUCCEEDED", from_states={"RUNNING"}, finished=True,
                    final_validation=ValidationSummary(3, 0.5, 0.9, 30))
    job = store.get_job("job-1")
    assert job.state == "SUCCEEDED" and job.started_at and job.finished_at
    assert job.final_validation.accuracy == 0.9
    assert [e.payload["state"] for e in store.events("job-1")] == ["QUEUED", "RUNNING",
                                                                   "SUCCEEDED"]


def test_the_time_running_sums_the_runs_and_not_the_waits_between_them(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: clock[0])
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    clock[0] = 1010.0  # queued 10 s
    store.set_state("job-1", "RUNNING", from_states={"QUEUED"}, started=True)
    clock[0] = 1015.0
    assert store.get_job("job-1").seconds_running(clock[0]) == 5.0
    store.set_state("job-1", "CANCELLED", from_states={"RUNNING"}, finished=True)
    clock[0] = 1100.0  # ended, then resumed 85 s later and queued
    store.requeue_ended_job("job-1", iris_spec())
    assert store.get_job("job-1").seconds_running(clock[0]) == 5.0
    clock[0] = 1200.0
    lease = Lease("runner-a", 1203.0)
    store.set_state("job-1", "RUNNING", from_states={"QUEUED"}, started=True, lease=lease)
    clock[0] = 1207.0  # its runner died; the lease ran out and the job was requeued
    assert store.requeue_expired("job-1", lease, "lease expired")
    clock[0] = 1300.0
    store.set_state("job-1", "RUNNING", from_states={"QUEUED"}, started=True)
    clock[0] = 1301.0
    store.set_state("job-1", "SUCCEEDED", from_states={"RUNNING"}, finished=True)
    job = store.get_job("job-1")
    assert job.started_at == 1010.0  # the first start
    assert job.seconds_running(5000.0) == 5.0 + 7.0 + 1.0


def test_a_state_change_from_another_state_than_expected_writes_nothing(tmp_path):
    # Compare-and-set: a cancel that lost the race to the job's end must not overwrite it.
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    assert store.set_state("job-1", "RUNNING", from_states={"QUEUED"}, started=True)
    assert store.set_state("job-1", "SUCCEEDED", from_states={"QUEUED", "RUNNING"},
                           finished=True, weights_path="/models/job-1.safetensors")
    before = store.snapshot()
    assert not store.set_state("job-1", "CANCELLED", from_states={"QUEUED", "RUNNING"},
                               finished=True)
    assert store.snapshot() == before
    assert store.get_job("job-1").state == "SUCCEEDED"


def test_a_jobs_validation_events_stay_bounded_and_evenly_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_VALIDATION_EVENTS", 16)
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    for step in range(1, 201):
        store.add_event("job-1", "validation", {"step": step})
        if step == 100:
            store.add_event("job-1", "recovery", {"step": step})
    events = store.events("job-1")
    steps = [e.payload["step"] for e in events if e.kind == "validation"]
    assert len(steps) <= 16 and steps[0] == 1 and steps[-1] == 200
    # Spread over the job: no gap wider than twice an even spacing of 8 between 1 and 200.
    assert max(b - a for a, b in zip(steps, steps[1:])) <= 2 * 199 / 8
    assert [e.kind for e in events].count("recovery") == 1  # other kinds are all kept
    assert events[0].kind == "state"


def test_progress_round_trips(tmp_path):
    store = Store(tmp_path / "db")
    store.create_job(_job("job-1"), "d")
    progress = ProgressSummary(2, 10, 0, 5, 0.7, 1000.0, 4.0, ValidationSummary(2, 0.6, None, 9))
    store.set_progress("job-1", progress)
    assert store.get_job("job-1").progress == progress


def test_jobs_page_newest_first_within_a_tenant(tmp_path):
    store = Store(tmp_path / "db")
    for i in range(5):
        store.create_job(_job(f"job-{i}"), "d")
    store.create_job(_job("job-x", "acme"), "d")
    page, cursor = store.list_jobs("default", limit=3)
    assert [j.id for j in page] == ["job-4", "job-3", "job-2"]
    page, cursor = store.list_jobs("default", limit=3, before=cursor)
    assert [j.id for j in page] == ["job-1", "job-0"] and cursor is None
    assert store.get_job("job-x", "default") is None
    with pytest.raises(InvalidArgument, match="page_token"):
        parse_page_token("abc")


@pytest.mark.parametrize("states", [(), ("QUEUED",), ("QUEUED", "RUNNING")])
def test_a_page_of_jobs_reads_an_index_in_order_instead_of_sorting_the_tenants_jobs(
        tmp_path, states):
    # One tenant's 100,000 jobs took 170 ms to sort for a page of 50 without a state filter.
    store = Store(tmp_path / "db")
    store.create_job(_job("job-0"), "d")
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)
    store.list_jobs("default", list(states), limit=50)
    query = next(sql for sql in statements if sql.lstrip().startswith("SELECT"))
    plan = sqlite3.connect(tmp_path / "db").execute(f"EXPLAIN QUERY PLAN {query}").fetchall()
    details = " | ".join(row[-1] for row in plan)
    assert "USING INDEX" in details
    if len(states) <= 1:  # several states: their rows are merged, at most one page per state
        assert "TEMP B-TREE" not in details, details


def test_a_data_set_name_is_unique_per_tenant(tmp_path):
    store = Store(tmp_path / "db")
    record = DatasetRecord("default", "d", "npz", 10, "0" * 64, "/x", 4, 0, (2,), False,
                           "classification", 2)
    store.add_dataset(record)
    with pytest.raises(AlreadyExists, match="header.name"):
        store.add_dataset(record)
    store.add_dataset(DatasetRecord(**{**record.__dict__, "tenant": "acme"}))
    assert [d.name for d in store.list_datasets("acme")] == ["d"]
    assert store.delete_dataset("default", "d") is not None
    assert store.list_datasets("default") == []


def test_a_database_from_before_target_shapes_gains_the_column_and_keeps_its_rows(tmp_path):
    path = tmp_path / "db"
    with sqlite3.connect(path) as old:  # the datasets table as the first release created it
        old.execute("CREATE TABLE datasets (tenant TEXT NOT NULL, name TEXT NOT NULL, "
                    "format TEXT NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, "
                    "path TEXT NOT NULL, samples INTEGER NOT NULL, validation_samples INTEGER "
                    "NOT NULL, feature_shape TEXT NOT NULL, integer_features INTEGER NOT NULL, "
                    "task TEXT NOT NULL, num_classes INTEGER NOT NULL, created_at REAL NOT NULL, "
                    "PRIMARY KEY (tenant, name))")
        old.execute("INSERT INTO datasets VALUES ('default', 'old', 'npz', 10, ?, '/x', 4, 0, "
                    "'[2]', 0, 'regression', 0, 1.0)", ("0" * 64,))
    old.close()
    store = Store(path)
    legacy = store.get_dataset("default", "old")
    assert (legacy.feature_shape, legacy.target_shape) == ((2,), None)  # unknown: not guessed
    store.add_dataset(DatasetRecord("default", "new", "npz", 10, "0" * 64, "/y", 4, 0, (2,),
                                    False, "regression", 0, target_shape=(3,)))
    assert store.get_dataset("default", "new").target_shape == (3,)


def test_an_old_row_with_a_label_past_two_to_the_32_is_quarantined_and_listing_works(
        tmp_path, caplog):
    path = tmp_path / "db"
    with sqlite3.connect(path) as old:  # the datasets table as the first release created it
        old.execute("CREATE TABLE datasets (tenant TEXT NOT NULL, name TEXT NOT NULL, "
                    "format TEXT NOT NULL, size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, "
                    "path TEXT NOT NULL, samples INTEGER NOT NULL, validation_samples INTEGER "
                    "NOT NULL, feature_shape TEXT NOT NULL, integer_features INTEGER NOT NULL, "
                    "task TEXT NOT NULL, num_classes INTEGER NOT NULL, created_at REAL NOT NULL, "
                    "PRIMARY KEY (tenant, name))")
        # Labels 0 and 2**32 + 7 were accepted then: num_classes is the largest label + 1.
        for name, classes, shape in (("good", 3, "[4]"), ("huge-label", 2**32 + 8, "[4]"),
                                     ("wide", 2, f"[{2**32}]"), ("garbled", 2, "[4")):
            old.execute("INSERT INTO datasets VALUES ('default', ?, 'npz', 10, ?, '/x', 4, 0, "
                        "?, 0, 'classification', ?, 1.0)", (name, "0" * 64, shape, classes))
    old.close()
    with caplog.at_level(logging.WARNING, logger="services.store"):
        store = Store(path)
    # What ListDatasets answers: every remaining row converts to a DatasetInfo.
    listed = [dataset_to_proto(record) for record in store.list_datasets("default")]
    assert [info.name for info in listed] == ["good"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert any("'huge-label' of tenant 'default'" in w and "num_classes 4294967304 (a class "
               "label of 4294967303)" in w and "upload it again" in w for w in warnings)
    quarantined = sqlite3.connect(path).execute(
        "SELECT name, reason FROM quarantined_datasets ORDER BY name").fetchall()
    assert [name for name, _ in quarantined] == ["garbled", "huge-label", "wide"]
    store.close()
    caplog.clear()
    Store(path).close()  # once moved, never again
    assert caplog.records == []


@pytest.mark.parametrize("token", ["0", "007", str(2**63), "1e3", "\u0661"])
def test_a_page_token_is_a_positive_rowid_below_two_to_the_63(token):
    with pytest.raises(InvalidArgument, match="page_token"):
        parse_page_token(token)
    assert parse_page_token(str(2**63 - 1)) == 2**63 - 1
