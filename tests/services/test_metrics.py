"""The metrics exporter, fed by a real job on embedded Ray, read through a private registry."""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from chainrule.spec_file import load_job_spec
from scheduler.job_runner import JobRunner
from scheduler.records import (
    RECOVERY_KIND_DESCRIPTIONS,
    RECOVERY_KINDS,
    EvaluationRecord,
    StepRecord,
)
from scheduler.training import prepare_dataset, resolve_builtin_job
from services.metrics import (
    OTHER_PARAMETERS,
    ParameterSeries,
    TrainingMetrics,
    start_metrics_server,
)

SPEC = """
name: metrics-test
model: {layers: [{linear: {out_features: 16}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1, momentum: 0.9}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 3, validation_fraction: 0.2}
eval_interval_steps: 4
resources: {workers: 2, parameter_servers: 2}
seed: 1
"""
JOB = "job-1"
SCRAPE_AT_STEP = 5


@pytest.fixture(scope="module")
def trained(local_ray):
    """A real job trained with the exporter as its observer, its /metrics scraped mid-job."""
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    server, port = start_metrics_server(0, registry)
    steps: list[StepRecord] = []
    evaluations: list[EvaluationRecord] = []
    scraped: dict[str, object] = {}

    def on_step(record: StepRecord) -> None:
        metrics.job_step(JOB, record)
        steps.append(record)
        if record.step == SCRAPE_AT_STEP:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                scraped["text"] = reply.read().decode()
                scraped["content_type"] = reply.headers["Content-Type"]
            scraped["workers_up"] = registry.get_sample_value("chainrule_workers_up",
                                                              {"job_id": JOB})

    def on_evaluation(record: EvaluationRecord) -> None:
        metrics.job_evaluation(JOB, record)
        evaluations.append(record)

    spec = load_job_spec(SPEC)
    try:
        metrics.queue_depth(1)
        metrics.job_state_changed(JOB, "QUEUED")
        metrics.queue_depth(0)
        metrics.job_state_changed(JOB, "RUNNING")
        job = resolve_builtin_job(spec)
        JobRunner(job, prepare_dataset(job), on_step=on_step,
                  on_evaluation=on_evaluation).run()
        metrics.job_state_changed(JOB, "SUCCEEDED")
        yield registry, metrics, steps, evaluations, scraped
    finally:
        server.shutdown()
        server.server_close()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_step_records_of_a_real_job_become_counters_and_gauges(trained):
    registry, _, steps, _, _ = trained
    last = steps[-1]
    assert len(steps) == last.total_steps == 12
    assert value(registry, "chainrule_training_steps_total", job_id=JOB) == len(steps)
    assert value(registry, "chainrule_training_samples_total", job_id=JOB) == sum(
        r.samples for r in steps)
    assert value(registry, "chainrule_training_planned_steps", job_id=JOB) == last.total_steps
    assert value(registry, "chainrule_training_step", job_id=JOB) == last.step
    assert value(registry, "chainrule_training_epoch", job_id=JOB) == last.epoch == 2
    assert value(registry, "chainrule_training_loss", job_id=JOB) == pytest.approx(last.loss)
    assert value(registry, "chainrule_training_learning_rate", job_id=JOB) == pytest.approx(0.1)
    assert value(registry, "chainrule_training_gradient_norm", job_id=JOB) == pytest.approx(
        last.gradient_norm)
    assert value(registry, "chainrule_training_samples_per_second", job_id=JOB) == \
        pytest.approx(last.samples_per_second)
    assert value(registry, "chainrule_straggler_spread_seconds", job_id=JOB) == pytest.approx(
        last.timings.straggler_spread)
    assert value(registry, "chainrule_model_parameter_bytes", job_id=JOB) == last.parameter_bytes


def test_every_named_parameter_has_its_gradient_norm(trained):
    registry, _, steps, _, _ = trained
    names = set(steps[-1].parameter_gradient_norms)
    assert names == {"0.weight", "0.bias", "2.weight", "2.bias"}  # the model's own names
    for name, norm in steps[-1].parameter_gradient_norms.items():
        assert value(registry, "chainrule_training_parameter_gradient_norm", job_id=JOB,
                     parameter=name) == pytest.approx(norm)
        assert norm > 0


def test_step_duration_histogram_has_every_phase_once_per_step(trained):
    registry, _, steps, _, _ = trained
    phases = {"compute": "compute", "reduce": "reduce", "optimizer": "apply",
              "gather": "gather", "wait": "wait"}
    for phase, attribute in phases.items():
        labels = {"job_id": JOB, "phase": phase}
        assert value(registry, "chainrule_training_step_duration_seconds_count",
                     **labels) == len(steps)
        assert value(registry, "chainrule_training_step_duration_seconds_sum",
                     **labels) == pytest.approx(sum(getattr(r.timings, attribute)
                                                    for r in steps))
        assert value(registry, "chainrule_training_step_duration_seconds_bucket",
                     le="+Inf", **labels) == len(steps)
    assert value(registry, "chainrule_training_step_duration_seconds_sum", job_id=JOB,
                 phase="compute") > 0


def test_bytes_communicated_sum_over_workers_and_steps(trained):
    registry, _, steps, _, _ = trained
    assert value(registry, "chainrule_training_communication_bytes_total", job_id=JOB,
                 direction="sent") == sum(r.bytes_sent_per_worker * r.workers for r in steps)
    assert value(registry, "chainrule_training_communication_bytes_total", job_id=JOB,
                 direction="received") == sum(r.bytes_received_per_worker * r.workers
                                              for r in steps)
    assert sum(r.bytes_sent_per_worker for r in steps) > 0
    for direction, per_worker in (("sent", steps[-1].bytes_sent_per_worker),
                                  ("received", steps[-1].bytes_received_per_worker)):
        assert value(registry, "chainrule_training_step_communication_bytes", job_id=JOB,
                     direction=direction) == per_worker


def test_validation_metrics_follow_the_last_evaluation(trained):
    registry, _, _, evaluations, _ = trained
    assert len(evaluations) >= 3
    last = evaluations[-1]
    assert value(registry, "chainrule_validation_loss", job_id=JOB) == pytest.approx(last.loss)
    assert value(registry, "chainrule_validation_accuracy_ratio", job_id=JOB) == \
        pytest.approx(last.accuracy)
    assert 0.5 < last.accuracy <= 1.0


def test_workers_up_while_running_and_zero_after_the_job_ends(trained):
    registry, _, _, _, scraped = trained
    assert scraped["workers_up"] == 2
    assert value(registry, "chainrule_workers_up", job_id=JOB) == 0
    assert value(registry, "chainrule_worker_failures_total", job_id=JOB) == 0
    assert value(registry, "chainrule_worker_recoveries_total", job_id=JOB) == 0


def test_job_states_and_queue_depth(trained):
    registry, _, _, _, _ = trained
    assert value(registry, "chainrule_jobs", state="SUCCEEDED") == 1
    assert value(registry, "chainrule_jobs", state="RUNNING") == 0
    assert value(registry, "chainrule_jobs", state="QUEUED") == 0
    assert value(registry, "chainrule_job_state", job_id=JOB, state="SUCCEEDED") == 1
    assert value(registry, "chainrule_job_state", job_id=JOB, state="RUNNING") == 0
    for state in ("QUEUED", "RUNNING", "SUCCEEDED"):
        assert value(registry, "chainrule_job_transitions_total", state=state) == 1
    assert value(registry, "chainrule_job_transitions_total", state="FAILED") == 0
    assert value(registry, "chainrule_queue_depth") == 0


def test_object_store_bytes_are_read_from_ray(trained):
    registry, _, _, _, scraped = trained
    deadline = time.monotonic() + 20
    while value(registry, "chainrule_object_store_capacity_bytes") is None:
        assert time.monotonic() < deadline, "no object-store reading from Ray"
        time.sleep(0.1)
    assert value(registry, "chainrule_object_store_capacity_bytes") > 0
    # An object of known size must show in the reading (refreshed in the background).
    held = ray.put(np.zeros(8 << 20, dtype=np.uint8))
    while (value(registry, "chainrule_object_store_used_bytes") or 0) < 8 << 20:
        assert time.monotonic() < deadline + 20, "8 MiB put in the object store never showed"
        time.sleep(0.2)
    del held


def test_live_scrape_during_a_real_job_passes_promtool_check_metrics(trained):
    _, _, _, _, scraped = trained
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make prometheus`"
    text = scraped["text"]
    assert scraped["content_type"].startswith("text/plain")
    assert f'chainrule_training_steps_total{{job_id="{JOB}"}} {SCRAPE_AT_STEP}.0' in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and check.stdout == "" and check.stderr == "", (
        check.stdout + check.stderr)


def test_series_never_carry_step_sample_or_request_ids(trained):
    _, _, _, _, scraped = trained
    allowed = {"job_id", "phase", "parameter", "direction", "state", "method", "code", "kind",
               "le"}
    for line in scraped["text"].splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        labels = line[line.index("{") + 1:line.rindex("}")]
        names = {pair.split("=", 1)[0] for pair in labels.split('",') if pair}
        assert names <= allowed, line


# --- label lifetime ---------------------------------------------------------------------------


def test_series_of_a_finished_job_disappear_after_the_ttl(trained):
    _, _, steps, evaluations, _ = trained
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, job_series_ttl_seconds=0.2)
    for job in ("done", "running"):
        metrics.job_state_changed(job, "RUNNING")
        for record in steps[:3]:
            metrics.job_step(job, record)
        metrics.job_evaluation(job, evaluations[0])
    metrics.job_state_changed("done", "FAILED")
    assert value(registry, "chainrule_training_steps_total", job_id="done") == 3
    time.sleep(0.3)
    text = "\n".join(f"{s.name} {s.labels}" for m in registry.collect() for s in m.samples)
    assert "'done'" not in text
    assert value(registry, "chainrule_training_steps_total", job_id="running") == 3
    assert value(registry, "chainrule_training_parameter_gradient_norm", job_id="running",
                 parameter=next(iter(steps[0].parameter_gradient_norms))) is not None
    # The per-state totals outlive the job's own series.
    assert value(registry, "chainrule_jobs", state="FAILED") == 1
    assert value(registry, "chainrule_jobs", state="RUNNING") == 1
    assert value(registry, "chainrule_job_transitions_total", state="FAILED") == 1


def test_a_job_that_runs_again_before_its_ttl_keeps_its_series(trained):
    _, _, steps, _, _ = trained
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, job_series_ttl_seconds=0.2)
    metrics.job_state_changed("resumed", "RUNNING")
    metrics.job_step("resumed", steps[0])
    metrics.job_state_changed("resumed", "CANCELLED")
    metrics.job_state_changed("resumed", "RUNNING")
    time.sleep(0.3)
    assert value(registry, "chainrule_training_steps_total", job_id="resumed") == 1


def test_cumulative_worker_failures_count_once(trained):
    _, _, steps, _, _ = trained
    import dataclasses

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    for failures in (0, 1, 1, 2, 2):
        metrics.job_step("j", dataclasses.replace(steps[0], worker_failures=failures, workers=1))
    assert value(registry, "chainrule_worker_failures_total", job_id="j") == 2
    assert value(registry, "chainrule_worker_recoveries_total", job_id="j") == 2
    assert value(registry, "chainrule_workers_up", job_id="j") == 1


def test_gauges_appear_only_once_they_hold_a_value(trained):
    _, _, steps, evaluations, _ = trained
    import dataclasses

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    metrics.job_state_changed("new", "RUNNING")
    assert value(registry, "chainrule_training_steps_total", job_id="new") == 0  # rates start
    assert value(registry, "chainrule_training_loss", job_id="new") is None  # not a fake 0
    assert value(registry, "chainrule_validation_loss", job_id="new") is None
    metrics.job_step("new", steps[0])
    assert value(registry, "chainrule_training_loss", job_id="new") == pytest.approx(
        steps[0].loss)
    metrics.job_evaluation("new", dataclasses.replace(evaluations[0], accuracy=None))
    assert value(registry, "chainrule_validation_loss", job_id="new") == pytest.approx(
        evaluations[0].loss)
    assert value(registry, "chainrule_validation_accuracy_ratio", job_id="new") is None


def test_a_replay_from_a_checkpoint_counts_a_recovered_shard_and_moves_progress_back(trained):
    _, _, steps, _, _ = trained
    import dataclasses

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    replayed = steps[3:8]
    if hasattr(steps[0], "shard_failures"):  # records that count the failures themselves
        replayed = [dataclasses.replace(r, shard_failures=1) for r in replayed]
    for record in steps[:6] + replayed:  # shard lost after step 6; checkpoint at step 3
        metrics.job_step("j", record)
    assert value(registry, "chainrule_parameter_server_failures_total", job_id="j") == 1
    assert value(registry, "chainrule_parameter_server_recoveries_total", job_id="j") == 1
    assert value(registry, "chainrule_training_steps_total", job_id="j") == 11  # work done
    assert value(registry, "chainrule_training_step", job_id="j") == 8  # where the job is


def test_an_unknown_state_is_refused_with_its_name():
    with pytest.raises(ValueError, match="'PAUSED'"):
        TrainingMetrics(CollectorRegistry()).job_state_changed("j", "PAUSED")


def test_exporter_works_without_ray():
    code = (
        "import time\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from services.metrics import TrainingMetrics\n"
        "r = CollectorRegistry(); m = TrainingMetrics(r); m.queue_depth(3)\n"
        "generate_latest(r); time.sleep(0.5); text = generate_latest(r).decode()\n"
        "assert 'chainrule_queue_depth 3.0' in text, text\n"
        "assert 'object_store' not in text, text\n"
        "import ray\n"  # (waits for the reader thread's own import of it to finish)
        "assert not ray.is_initialized()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr


# --- gRPC -------------------------------------------------------------------------------------


@pytest.fixture
def health_server():
    """A real gRPC server on loopback with the standard health service and the interceptor."""
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[metrics.grpc_interceptor()])
    servicer = health.HealthServicer()
    servicer.set("chainrule.v1.JobService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Bytes", {
        "Count": grpc.stream_unary_rpc_method_handler(_count),
        "Echo": grpc.stream_stream_rpc_method_handler(_echo),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield registry, channel
    channel.close()
    server.stop(None)


def _count(requests, context):
    """Client streaming: the number of messages; INVALID_ARGUMENT for an empty message."""
    count = 0
    for request in requests:
        if not request:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty message")
        count += 1
    return str(count).encode()


def _echo(requests, context):
    """Bidirectional streaming: every message back; a failure after the first one."""
    for request in requests:
        if request == b"boom":
            raise RuntimeError("a servicer bug")
        yield request


CHECK = "/grpc.health.v1.Health/Check"
WATCH = "/grpc.health.v1.Health/Watch"


def test_interceptor_counts_unary_calls_by_method_and_code(health_server):
    registry, channel = health_server
    stub = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        reply = stub.Check(health_pb2.HealthCheckRequest(service="chainrule.v1.JobService"),
                           timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert value(registry, "chainrule_grpc_requests_total", method=CHECK, code="OK") == 3
    assert value(registry, "chainrule_grpc_requests_total", method=CHECK,
                 code="NOT_FOUND") == 1
    assert value(registry, "chainrule_grpc_request_duration_seconds_count", method=CHECK) == 4
    assert 0 < value(registry, "chainrule_grpc_request_duration_seconds_sum", method=CHECK) < 5


def test_interceptor_times_a_stream_until_the_client_cancels_it(health_server):
    registry, channel = health_server
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="chainrule.v1.JobService"), timeout=10)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    time.sleep(0.2)
    stream.cancel()
    deadline = time.monotonic() + 10
    while value(registry, "chainrule_grpc_request_duration_seconds_count", method=WATCH) != 1:
        assert time.monotonic() < deadline, "the cancelled stream was never recorded"
        time.sleep(0.05)
    assert value(registry, "chainrule_grpc_requests_total", method=WATCH,
                 code="CANCELLED") == 1
    assert value(registry, "chainrule_grpc_request_duration_seconds_sum", method=WATCH) >= 0.2


def test_calls_to_methods_that_do_not_exist_share_one_label(health_server):
    registry, channel = health_server
    for name in ("/made.up.Service/A", "/made.up.Service/B"):
        call = channel.unary_unary(name)
        with pytest.raises(grpc.RpcError) as error:
            call(b"", timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert value(registry, "chainrule_grpc_requests_total", method="unknown",
                 code="UNIMPLEMENTED") == 2
    text = "\n".join(str(s.labels) for m in registry.collect() for s in m.samples)
    assert "made.up" not in text


def test_interceptor_counts_client_and_bidirectional_streams(health_server):
    registry, channel = health_server
    count = channel.stream_unary("/test.Bytes/Count")
    echo = channel.stream_stream("/test.Bytes/Echo")
    assert count(iter([b"a", b"b", b"c"]), timeout=5) == b"3"
    with pytest.raises(grpc.RpcError) as error:
        count(iter([b"a", b""]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(echo(iter([b"x", b"y"]), timeout=5)) == [b"x", b"y"]
    with pytest.raises(grpc.RpcError) as error:
        list(echo(iter([b"x", b"boom"]), timeout=5))
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    deadline = time.monotonic() + 10
    while value(registry, "chainrule_grpc_requests_total", method="/test.Bytes/Echo",
                code="UNKNOWN") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert value(registry, "chainrule_grpc_requests_total", method="/test.Bytes/Count",
                 code="OK") == 1
    assert value(registry, "chainrule_grpc_requests_total", method="/test.Bytes/Count",
                 code="INVALID_ARGUMENT") == 1
    assert value(registry, "chainrule_grpc_requests_total", method="/test.Bytes/Echo",
                 code="OK") == 1
    assert value(registry, "chainrule_grpc_request_duration_seconds_count",
                 method="/test.Bytes/Echo") == 2


# --- bounded series ---------------------------------------------------------------------------


def _parameter_norms(registry: CollectorRegistry, job_id: str) -> dict[str, float]:
    return {sample.labels["parameter"]: sample.value
            for family in registry.collect() for sample in family.samples
            if sample.name == "chainrule_training_parameter_gradient_norm"
            and sample.labels["job_id"] == job_id}


def test_a_model_of_50000_parameter_tensors_exports_the_largest_norms_and_the_rest_as_one(
        trained):
    _, _, steps, _, _ = trained
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, parameter_series=ParameterSeries(limit=32))
    norms = {f"{i}.weight": float(i) for i in range(50_000)}
    metrics.job_step("big", dataclasses.replace(steps[0], parameter_gradient_norms=norms))
    exported = _parameter_norms(registry, "big")
    assert set(exported) == {f"{i}.weight" for i in range(49_968, 50_000)} | {OTHER_PARAMETERS}
    assert exported[OTHER_PARAMETERS] == pytest.approx(math.sqrt(sum(i * i
                                                                     for i in range(49_968))))
    assert len(generate_latest(registry)) < 64 * 1024  # the audit's scrape was 4.7 MiB
    # The next step's largest norms are others: the series of the old ones are removed.
    norms = {f"{i}.weight": float(50_000 - i) for i in range(50_000)}
    metrics.job_step("big", dataclasses.replace(steps[1], parameter_gradient_norms=norms))
    assert set(_parameter_norms(registry, "big")) == (
        {f"{i}.weight" for i in range(32)} | {OTHER_PARAMETERS})


def test_parameter_series_by_layer_export_each_layers_norm(trained):
    _, _, steps, _, _ = trained
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, parameter_series=ParameterSeries(by="layer", limit=8))
    norms = {"0.weight": 3.0, "0.bias": 4.0, "2.layers.1.weight": 1.0}
    metrics.job_step("layers", dataclasses.replace(steps[0], parameter_gradient_norms=norms))
    assert _parameter_norms(registry, "layers") == {"0": 5.0, "2.layers.1": 1.0}


def test_the_metrics_endpoint_listens_on_loopback_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("CHAINRULE_METRICS_ADDRESS", raising=False)
    server, _ = start_metrics_server(0, CollectorRegistry())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_scheduling_metrics_follow_queue_waits_tenant_usage_and_preemptions():
    """The queue (with its stand-in runner) feeds the observer: each tenant's queued jobs and
    running CPUs, how long each job queued, and preemptions by the victim's tenant."""
    from tests.services.helpers import wait_for
    from tests.services.test_job_queue import FakeHost, FakeRunner, _job, _queue

    registry = CollectorRegistry()
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("node", 2.0)],
                   observers=[TrainingMetrics(registry)])
    FakeRunner.step_seconds = 0.1
    queue.submit(_job("low", priority=0, cpus_per_worker=1.5))
    assert value(registry, "chainrule_tenant_running_cpus", tenant="default") == 1.51
    submitted = time.time()
    queue.submit(_job("urgent", priority=1, cpus_per_worker=1.5))  # preempts "low"
    # urgent (high) until low stops for it, then low (normal) queued again: one job either way
    queued = {priority_class: value(registry, "chainrule_tenant_queued_jobs", tenant="default",
                                    priority_class=priority_class)
              for priority_class in ("high", "normal", "low")}
    assert sum(queued.values()) == 1 and queued["low"] == 0, queued
    oldest = "chainrule_tenant_oldest_queued_job_timestamp_seconds"
    assert submitted - 0.5 <= value(registry, oldest, tenant="default") <= time.time()
    wait_for(lambda: host.states.get("low") == "SUCCEEDED", 10, what="low's second run")
    assert value(registry, "chainrule_preemptions_total", tenant="default") == 1
    # low's first start and its start after the preemption, then urgent's:
    assert value(registry, "chainrule_queue_wait_seconds_count", tenant="default",
                 priority_class="normal") == 2
    assert value(registry, "chainrule_queue_wait_seconds_count", tenant="default",
                 priority_class="high") == 1
    wait_for(lambda: value(registry, "chainrule_tenant_running_cpus", tenant="default") == 0,
             5, what="nothing running")
    for priority_class in ("high", "normal", "low"):
        assert value(registry, "chainrule_tenant_queued_jobs", tenant="default",
                     priority_class=priority_class) == 0
    assert value(registry, oldest, tenant="default") is None  # nothing queued to be old


def test_a_metrics_port_in_use_is_refused_naming_the_option_before_ray_starts(tmp_path):
    # Two servers on one host both defaulting to 9464: the second crashed ~10 s later, after
    # starting Ray, with a traceback from the exporter's bind.
    import socket

    from services.server import serve
    from services.single_instance import AlreadyInUse

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = ray.is_initialized()
        with pytest.raises(AlreadyInUse, match=f"port {port} is in use .*--metrics-port"):
            serve("127.0.0.1:0", tmp_path / "data", metrics_port=port)
        assert ray.is_initialized() == started


def test_the_recoveries_help_says_what_every_kind_means():
    registry = CollectorRegistry()
    TrainingMetrics(registry)
    (family,) = [f for f in registry.collect() if f.name == "chainrule_recoveries"]
    for kind, meaning in RECOVERY_KIND_DESCRIPTIONS.items():
        assert f"{kind} ({meaning})" in family.documentation
    assert {sample.labels["kind"] for sample in family.samples} >= set(RECOVERY_KINDS)
