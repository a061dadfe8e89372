"""The MLflow observer on its own (no Ray), against a real local MLflow store (sqlite) read
back with MlflowClient: a job is a run in its tenant's experiment with its spec as params,
its steps, evaluations, recoveries, end and model; steps are throttled; a resume continues
the run; a hung tracking server never holds the job's thread; MLflow missing is named."""

from __future__ import annotations

import socket
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from scheduler.records import EvaluationRecord, RecoveryRecord
from scheduler.storage import save_weights
from services.server import serve
from services.store import JobRecord, Store, ValidationSummary
from services.tracking.mlflow_runs import (
    MlflowMissing,
    MlflowRuns,
    flatten_spec,
    mlflow_client,
)
from tests.services.helpers import iris_spec
from tests.services.tracking.records import step_record


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "chainrule.db")
    yield store
    store.close()


def new_job(store: Store, job_id: str, tenant: str = "alice") -> JobRecord:
    record = JobRecord(id=job_id, tenant=tenant, spec=iris_spec(), state="QUEUED",
                       created_at=time.time())
    store.create_job(record, job_id)
    store.set_state(job_id, "RUNNING", from_states={"QUEUED"}, started=True)
    return record


def the_run(reader: MlflowClient, job_id: str, tenant: str = "alice"):
    experiment = reader.get_experiment_by_name(f"chainrule/{tenant}")
    runs = reader.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`chainrule.job_id` = '{job_id}'")
    assert len(runs) == 1
    return runs[0]


def history(reader: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in reader.get_metric_history(run_id, key)]


def test_a_succeeded_job_is_a_run_with_its_spec_steps_evaluations_recoveries_and_model(
        tracking_uri, store, tmp_path):
    job = new_job(store, "job-00000000000a")
    runs = MlflowRuns(mlflow_client(tracking_uri), store.get_job,
                      artifact_location=str(tmp_path / "artifacts"), metric_interval_seconds=0)
    runs.job_state_changed(job.id, "RUNNING")
    steps = [step_record(step, total_steps=6) for step in range(1, 7)]
    for record in steps:
        runs.job_step(job.id, record)
    runs.job_evaluation(job.id, EvaluationRecord(step=3, epoch=1, loss=0.9, accuracy=0.5,
                                                 samples=30))
    runs.job_recovery(job.id, RecoveryRecord(step=4, kind="worker_lost", message="lost"))
    runs.job_recovery(job.id, RecoveryRecord(step=5, kind="worker_replaced", message="back"))
    weights = save_weights(tmp_path / "models" / f"{job.id}.safetensors",
                           {"0.weight": np.arange(6, dtype=np.float32).reshape(2, 3)},
                           {"validation_accuracy": 0.75})
    store.set_state(job.id, "SUCCEEDED", from_states={"RUNNING"}, finished=True,
                    final_validation=ValidationSummary(6, 0.8, 0.75, 30),
                    weights_path=str(weights))
    runs.job_state_changed(job.id, "SUCCEEDED")
    assert runs.close()

    reader = MlflowClient(tracking_uri)
    run = the_run(reader, job.id)
    assert run.info.status == "FINISHED" and run.info.run_name == "iris-tiny"
    assert run.data.tags["chainrule.tenant"] == "alice"
    assert run.data.params == flatten_spec(job.spec)
    assert run.data.params["data.batch_size"] == "32"
    assert run.data.params["model.layers.2.linear.out_features"] == "3"
    run_id = run.info.run_id
    assert history(reader, run_id, "train_loss") == [(r.step, r.loss) for r in steps]
    assert history(reader, run_id, "gradient_norm") == [(r.step, r.gradient_norm)
                                                        for r in steps]
    assert history(reader, run_id, "samples_per_second") == [
        (r.step, r.samples_per_second) for r in steps]
    assert history(reader, run_id, "learning_rate") == [(r.step, 0.01) for r in steps]
    assert history(reader, run_id, "validation_loss") == [(3, 0.9)]
    assert history(reader, run_id, "validation_accuracy") == [(3, 0.5)]
    assert history(reader, run_id, "recoveries") == [(4, 1.0), (5, 2.0)]
    assert history(reader, run_id, "final_validation_loss") == [(6, 0.8)]
    assert history(reader, run_id, "final_validation_accuracy") == [(6, 0.75)]
    artifacts = sorted(info.path for info in reader.list_artifacts(run_id, "model"))
    assert artifacts == [f"model/{job.id}.safetensors", f"model/{job.id}.safetensors.json"]
    local = reader.download_artifacts(run_id, f"model/{job.id}.safetensors", str(tmp_path))
    assert open(local, "rb").read() == weights.read_bytes()


def test_steps_are_throttled_yet_a_runs_first_and_last_step_are_sent(tracking_uri, store):
    job = new_job(store, "job-00000000000b")
    runs = MlflowRuns(mlflow_client(tracking_uri), store.get_job,
                      metric_interval_seconds=3600)
    runs.job_state_changed(job.id, "RUNNING")
    for step in range(1, 11):  # cancelled after step 10 of 20
        runs.job_step(job.id, step_record(step, total_steps=20))
    store.set_state(job.id, "CANCELLED", from_states={"RUNNING"}, finished=True)
    runs.job_state_changed(job.id, "CANCELLED")
    assert runs.close()

    reader = MlflowClient(tracking_uri)
    run = the_run(reader, job.id)
    assert run.info.status == "KILLED"
    assert [step for step, _ in history(reader, run.info.run_id, "train_loss")] == [1, 10]


def test_a_resumed_job_continues_its_own_run_and_a_failure_is_recorded(tracking_uri, store):
    job = new_job(store, "job-00000000000c", tenant="bob")
    runs = MlflowRuns(mlflow_client(tracking_uri), store.get_job, metric_interval_seconds=0)
    runs.job_state_changed(job.id, "RUNNING")
    runs.job_step(job.id, step_record(1))
    runs.job_state_changed(job.id, "CANCELLED")
    runs.job_state_changed(job.id, "RUNNING")  # resumed
    runs.job_step(job.id, step_record(2))
    store.set_state(job.id, "FAILED", from_states={"RUNNING"}, finished=True,
                    error="ValueError: the data set was deleted")
    runs.job_state_changed(job.id, "FAILED")
    assert runs.close()

    reader = MlflowClient(tracking_uri)
    run = the_run(reader, job.id, tenant="bob")  # one run, in bob's experiment
    assert run.info.status == "FAILED"
    assert run.data.tags["chainrule.error"] == "ValueError: the data set was deleted"
    assert [step for step, _ in history(reader, run.info.run_id, "train_loss")] == [1, 2]


def test_a_hung_tracking_server_never_holds_the_jobs_thread(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        job = new_job(store, "job-00000000000d")
        runs = MlflowRuns(mlflow_client(f"http://127.0.0.1:{silent.getsockname()[1]}"),
                          store.get_job, metric_interval_seconds=0, queue_limit=20)
        started = time.monotonic()
        runs.job_state_changed(job.id, "RUNNING")
        for step in range(1, 1001):
            runs.job_step(job.id, step_record(step, total_steps=1000))
        runs.job_state_changed(job.id, "SUCCEEDED")
        # 1002 calls that only enqueue (MLflow's first request hangs the whole time).
        assert time.monotonic() - started < 2.0
        assert runs.dropped >= 1000 - 21
        stopping = time.monotonic()
        assert runs.close(timeout=0.5) is False  # gives up rather than hold the server's stop
        assert time.monotonic() - stopping < 2.0
    finally:
        silent.close()


def test_a_tracking_uri_without_mlflow_installed_is_refused_naming_the_flag_and_the_extra(
        monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when absent
    with pytest.raises(MlflowMissing, match=r"--mlflow-tracking-uri: MLflow is not installed"
                                            r".*pip install 'chainrule\[tracking\]'"):
        mlflow_client("sqlite:///x.db")
    # serve() refuses it first thing: before it takes the data folder or starts Ray.
    with pytest.raises(MlflowMissing):
        serve("127.0.0.1:0", tmp_path / "data", mlflow_tracking_uri="sqlite:///x.db")
    assert not (tmp_path / "data").exists()


def test_a_tracking_uri_mlflow_cannot_use_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--mlflow-tracking-uri: MLflow cannot use"):
        mlflow_client("nosuchscheme://somewhere")
