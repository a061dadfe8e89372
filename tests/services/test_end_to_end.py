"""The service's main path over a real gRPC channel: submit, watch, download, reload the
weights in the engine; idempotency, cancellation, 20 concurrent submissions, failures,
health checking and reflection."""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chainrule.client import state_name
from chainrule.spec_file import load_job_spec
from scheduler.storage import JobStorage, load_weights
from scheduler.training import prepare_dataset, resolve_builtin_job
from tests.services.helpers import DIGITS_SPEC, iris_spec, rpc_error, wait_for, wait_until_done
from worker.backprop import Tensor
from worker.backprop.tensor import no_grad
from worker.model_builder import build_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_digits_job_trains_over_grpc_and_its_downloaded_weights_reproduce_its_accuracy(
        client, tmp_path):
    job = client.submit(DIGITS_SPEC, request_id="digits-e2e")
    assert state_name(job.state) == "QUEUED" and job.id.startswith("job-")

    events = list(client.watch(job.id))
    kinds = [event.WhichOneof("kind") for event in events]
    assert kinds[0] == "state"
    states = [state_name(e.state.state) for e in events if e.HasField("state")]
    assert states[-1] == "SUCCEEDED" and "RUNNING" in states
    steps = [e.progress.step for e in events if e.HasField("progress")]
    # At most 4 progress events a second (services/jobs.py), the final one always.
    assert steps == sorted(steps) and len(steps) >= 2
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress[-1].step == progress[-1].total_steps == 240
    assert progress[-1].epochs == 20 and progress[-1].samples_per_second > 0
    assert any(p.eta_seconds > 0 for p in progress[:-1])
    assert any(e.HasField("validation") for e in events)

    job = client.get(job.id)
    assert state_name(job.state) == "SUCCEEDED", job.error
    reported = job.final_validation.accuracy
    assert reported >= 0.96
    assert job.started_at.seconds and job.finished_at.seconds

    for suffix in (".safetensors", ".npz"):
        path = tmp_path / f"digits{suffix}"
        header = client.download(job.id, path)
        manifest = json.loads(header.manifest_json)
        assert manifest["validation_accuracy"] == pytest.approx(reported)
        assert json.loads(header.model_spec_json)["layers"][0]["linear"]["out_features"] == 128
        # The engine, rebuilt from the spec alone, gives the accuracy the service reported.
        spec = load_job_spec(DIGITS_SPEC)
        dataset = prepare_dataset(resolve_builtin_job(spec))
        np.testing.assert_allclose(manifest["feature_mean"], dataset.feature_mean)
        model = build_model(spec.model, dataset.feature_shape, seed=0)
        model.load_state_dict(load_weights(path))
        model.eval()
        with no_grad():
            logits = model(Tensor(dataset.x_val)).data
        accuracy = float((logits.argmax(axis=-1) == dataset.y_val).mean())
        assert accuracy == pytest.approx(reported, abs=1e-12)


def test_a_retried_submit_with_the_same_request_id_returns_the_same_job(client):
    spec = iris_spec()
    first = client.submit(spec, request_id="retry-me")
    again = client.submit(spec, request_id="retry-me")
    assert again.id == first.id
    assert sum(job.request_id == "retry-me" for job in client.jobs()) == 1
    other = iris_spec(seed=1)
    error = rpc_error(lambda: client.submit(other, request_id="retry-me"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in error.details()
    assert client.submit(spec).id != first.id  # no request_id: a new job every time
    wait_until_done(client, first.id)


def test_concurrent_retries_with_one_request_id_create_one_job(client):
    spec, ids = iris_spec(), []

    def submit():
        ids.append(client.submit(spec, request_id="racing").id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    wait_until_done(client, ids[0])


def test_a_cancelled_running_job_ends_cancelled_at_a_step_boundary_with_a_checkpoint(
        client, server):
    spec = load_job_spec(DIGITS_SPEC)
    spec.data.epochs = 500  # far longer than the test waits
    job = client.submit(spec)
    wait_for(lambda: client.get(job.id).progress.step >= 5, 60, what="5 steps")
    cancelled = client.cancel(job.id)
    assert state_name(cancelled.state) in ("RUNNING", "CANCELLED")
    events = list(client.watch(job.id, timeout=60))
    assert state_name(events[-1].state.state) == "CANCELLED"
    job = client.get(job.id)
    assert state_name(job.state) == "CANCELLED" and job.finished_at.seconds
    assert 5 <= job.progress.step < job.progress.total_steps
    newest = JobStorage(server.data_dir).latest_checkpoint(job.id).checkpoint
    assert newest is not None and newest.step == job.progress.step  # the stop's checkpoint
    # cancelling again changes nothing; the model of a cancelled job cannot be downloaded
    assert state_name(client.cancel(job.id).state) == "CANCELLED"
    error = rpc_error(lambda: client.download(job.id, server.data_dir / "x.safetensors"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_six_jobs_submitted_at_once_all_finish_two_at_a_time(client, server):
    started = time.monotonic()
    jobs = [client.submit(iris_spec(epochs=2, seed=i)) for i in range(6)]
    most_running = 0
    while True:
        most_running = max(most_running, len(server.queue.running))
        states = [state_name(client.get(job.id).state) for job in jobs]
        if all(state in ("SUCCEEDED", "FAILED", "CANCELLED") for state in states):
            break
        assert time.monotonic() - started < 180, states
        time.sleep(0.02)
    assert states == ["SUCCEEDED"] * 6, [client.get(j.id).error for j in jobs]
    assert most_running == 2
    # FIFO: equal priorities start in submission order
    starts = [client.get(job.id).started_at.ToNanoseconds() for job in jobs]
    assert starts == sorted(starts)


def test_a_failing_job_says_why_and_the_service_keeps_serving(client, server, monkeypatch):
    original = server.lifecycle.prepare

    def prepare(job):
        if job.spec.name == "doomed":
            raise RuntimeError("the disk is on fire")
        return original(job)

    monkeypatch.setattr(server.lifecycle, "prepare", prepare)
    job = client.submit(iris_spec(name="doomed"))
    events = list(client.watch(job.id, timeout=60))
    assert state_name(events[-1].state.state) == "FAILED"
    assert "the disk is on fire" in events[-1].state.error
    assert "the disk is on fire" in client.get(job.id).error
    healthy = client.submit(iris_spec())
    assert state_name(wait_until_done(client, healthy.id).state) == "SUCCEEDED"


def test_a_late_watcher_gets_the_current_state_first_and_the_stream_ends(client):
    job = client.submit(iris_spec())
    wait_until_done(client, job.id)
    events = list(client.watch(job.id, timeout=10))
    assert events[0].WhichOneof("kind") == "state"
    assert state_name(events[0].state.state) == "SUCCEEDED"
    assert events[1].progress.step == events[1].progress.total_steps


def test_list_jobs_filters_by_state_and_pages_newest_first(client):
    ids = [client.submit(iris_spec()).id for _ in range(3)]
    for job_id in ids:
        wait_until_done(client, job_id)
    first = client.list(page_size=2)
    assert len(first.jobs) == 2 and first.next_page_token
    assert [job.id for job in first.jobs] == ids[::-1][:2]
    second = client.list(page_size=2, page_token=first.next_page_token)
    assert second.jobs[0].id == ids[0]
    every = [job.id for job in client.jobs()]
    assert len(every) == len(set(every))
    assert all(state_name(job.state) == "SUCCEEDED" for job in client.jobs(["SUCCEEDED"]))
    assert not list(client.jobs(["QUEUED", "RUNNING"]))


def test_health_checking_says_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chainrule.v1.TrainingService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_training_service(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert "chainrule.v1.TrainingService" in names
        assert "grpc.health.v1.Health" in names


def test_unknown_job_is_not_found(client):
    for call in (lambda: client.get("job-000000000000"),
                 lambda: client.cancel("job-000000000000"),
                 lambda: list(client.watch("job-000000000000", timeout=5))):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "job_id" in error.details()


def test_serving_as_a_library_leaves_process_wide_settings_alone(server):
    # `chainrule serve` tunes the GIL switch interval (services.server.configure_process);
    # serve() itself must not, or an application embedding it would be changed behind its back.
    assert sys.getswitchinterval() == pytest.approx(0.005)


def test_a_job_that_could_never_fit_the_cluster_is_refused_with_the_numbers(client):
    spec = iris_spec()
    spec.resources.cpus_per_worker = 3  # the test cluster is one node of 2 CPUs
    error = rpc_error(lambda: client.submit(spec))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "resources.cpus_per_worker: the job can never run on this cluster: 1 worker(s) x 3 "
        "CPUs and 1 shard(s) x 0.01: needs 3.01 CPUs; the cluster has 2")


def test_a_queued_job_shows_its_place_and_why_it_waits(client):
    from services.cli import _job_line

    spec = iris_spec(epochs=10_000)  # runs until cancelled
    spec.resources.cpus_per_worker = 1.5
    running = client.submit(spec)
    waiting = client.submit(spec)
    try:
        job = client.get(waiting.id)
        assert state_name(job.state) == "QUEUED" and job.queue_position == 1
        assert job.wait_reason == "waiting for 1.51 CPUs in 2 actors; 0.49 free"
        assert "queued #1: waiting for 1.51 CPUs in 2 actors; 0.49 free" in _job_line(job)
        assert client.get(running.id).queue_position == 0  # running: no place in the queue
    finally:
        for job_id in (waiting.id, running.id):
            client.cancel(job_id)
        for job_id in (waiting.id, running.id):
            wait_until_done(client, job_id)


def test_a_preempted_job_resumes_later_and_ends_with_the_bits_of_an_unpreempted_run(
        client, tmp_path):
    from tests.services.test_resume import assert_same_weights, downloaded

    def job(priority: int, seed: int):
        spec = iris_spec(epochs=12, seed=seed, priority=priority)  # 48 steps
        spec.resources.cpus_per_worker = 1.5  # one such job at a time on the 2 test CPUs
        return spec

    low = client.submit(job(priority=-1, seed=3))
    wait_for(lambda: client.get(low.id).progress.step >= 3, 60, what="3 steps")
    urgent = client.submit(job(priority=0, seed=4))  # fits only in the low one's room
    wait_for(lambda: state_name(client.get(low.id).state) == "QUEUED", 30, what="preemption")
    stopped_at = client.get(low.id).progress.step
    events = list(client.watch(low.id, timeout=120))  # to its end, after the urgent job's
    states = [(i, state_name(e.state.state)) for i, e in enumerate(events) if e.HasField("state")]
    assert [state for _, state in states] == ["QUEUED", "RUNNING", "SUCCEEDED"]
    resumed = next(e.progress.step for e in events[states[1][0]:] if e.HasField("progress"))
    assert 3 <= stopped_at < resumed  # from the stop's checkpoint, not from step 0
    urgent_job, low_job = client.get(urgent.id), client.get(low.id)
    assert state_name(urgent_job.state) == "SUCCEEDED"
    assert urgent_job.finished_at.ToNanoseconds() <= low_job.finished_at.ToNanoseconds()
    alone = client.submit(job(priority=-1, seed=3), request_id="the same, unpreempted")
    assert state_name(wait_until_done(client, alone.id).state) == "SUCCEEDED"
    assert_same_weights(downloaded(client, low.id, tmp_path),
                        downloaded(client, alone.id, tmp_path))
