"""Shared pieces of the service tests: tiny specs, waiting for a job, the store's contents."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict, load_job_spec
from chainrule.v1 import job_pb2
from scheduler import ray_head
from scheduler.storage import load_weights

ROOT = Path(__file__).resolve().parents[2]
DIGITS_SPEC = ROOT / "services" / "specs" / "digits-mlp.yaml"


def iris_spec(epochs: int = 1, **overrides) -> job_pb2.JobSpec:
    """A job that trains in well under a second: iris, one small hidden layer, one worker."""
    data = {
        "name": "iris-tiny",
        "model": {"layers": [{"linear": {"out_features": 8}}, {"relu": {}},
                             {"linear": {"out_features": 3}}]},
        "loss": "cross_entropy",
        "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": "sklearn:iris", "batch_size": 32, "epochs": epochs,
                 "validation_fraction": 0.2},
        "resources": {"workers": 1, "parameter_servers": 1},
        "seed": 0,
    }
    data.update(overrides)
    return job_spec_from_dict(data)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_until_done(client: Client, job_id: str, timeout: float = 120.0):
    return wait_for(lambda: (lambda job: job if state_name(job.state) in
                             ("SUCCEEDED", "FAILED", "CANCELLED") else None)(client.get(job_id)),
                    timeout, interval=0.1, what=f"{job_id} to end")


def data_files(data_dir: Path) -> list[str]:
    """Every file under the data dir except SQLite's own (compared before and after)."""
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.is_file() and not p.name.startswith("chainrule.db"))


def rpc_error(call) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded; expected an error")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve_process(address: str, data_dir, *options: str,
                        environment: dict[str, str] | None = None) -> subprocess.Popen:
    """A real `chainrule serve` subprocess (its output, merged, on .stdout), once it serves,
    with its metrics and web UI on free ports; `environment` is added to this process's."""
    command = [sys.executable, "-m", "services.cli", "serve", "--address", address,
               "--data-dir", str(data_dir), "--metrics-port", "0",
               "--web-address", "127.0.0.1:0", *options]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1",
                                    **(environment or {})})

    def serving() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            with grpc.insecure_channel(address) as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
                return response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    try:
        wait_for(serving, 90, interval=0.2, what="the server to serve")
    except BaseException:  # not left running (with its Ray) for the rest of the session
        process.kill()
        process.wait()
        head = ray_head.find(Path(data_dir))
        if head is not None:  # its own session: not killed with the server
            ray_head.stop(head, Path(data_dir))
        raise
    return process


# --- one long job, stopped mid-run and compared bitwise with its undisturbed run ---------------


def long_spec() -> job_pb2.JobSpec:
    """Digits, 240 steps of 2 workers and 2 shards, a checkpoint every 6 steps: long enough to
    be stopped mid-run with two checkpoints on disk."""
    spec = load_job_spec(DIGITS_SPEC)
    spec.data.epochs = 20
    spec.checkpoint.interval_steps = 6
    return spec


# Undisturbed weights by spec: trained once per test session, by whichever module asks first
# (replay is deterministic, so every server trains the same bits; nor does how often a job is
# checkpointed change them).
_UNDISTURBED: dict[bytes, dict[str, np.ndarray]] = {}


def undisturbed_weights(client: Client, spec: job_pb2.JobSpec,
                        folder: Path) -> dict[str, np.ndarray]:
    """The weights of `spec` trained from start to end without interruption."""
    unchecked = job_pb2.JobSpec()
    unchecked.CopyFrom(spec)
    unchecked.ClearField("checkpoint")
    key = unchecked.SerializeToString(deterministic=True)
    if key not in _UNDISTURBED:
        job = client.submit(spec)
        done = wait_until_done(client, job.id, timeout=300)
        assert state_name(done.state) == "SUCCEEDED", done.error
        _UNDISTURBED[key] = downloaded(client, job.id, folder)
    return _UNDISTURBED[key]


def downloaded(client: Client, job_id: str, folder: Path) -> dict[str, np.ndarray]:
    path = folder / f"{job_id}.safetensors"
    client.download(job_id, path)
    return load_weights(path)


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(actual[key], expected[key]), key


def stopped_mid_run(client: Client, spec: job_pb2.JobSpec) -> str:
    """Submit, let it train 20 steps, cancel: a CANCELLED job with checkpoints on disk."""
    job = client.submit(spec)
    wait_for(lambda: client.get(job.id).progress.step >= 20, 120, what="20 steps")
    client.cancel(job.id)
    done = wait_until_done(client, job.id)
    assert state_name(done.state) == "CANCELLED", done.error
    assert done.progress.step < done.progress.total_steps
    return job.id


def events(server, job_id: str, kind: str) -> list[dict]:
    """The payloads of the job's stored events of `kind` (an in-process server's store)."""
    return [event.payload for event in server.service.store.events(job_id) if event.kind == kind]
