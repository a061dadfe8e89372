"""A server stopped by SIGTERM checkpoints its running job and requeues it; the next start runs
every queued job again, the interrupted one resuming from its checkpoint (BRIEF invariant 2).

The server runs as a real subprocess (`chainrule serve`), stopped with a real signal."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import Client, state_name
from chainrule.spec_file import load_job_spec
from scheduler.storage import JobStorage
from services.store import Store
from tests.services.helpers import DIGITS_SPEC, ROOT, iris_spec, wait_for, wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(address: str, data_dir) -> subprocess.Popen:
    command = [sys.executable, "-m", "services.cli", "serve", "--address", address,
               "--data-dir", str(data_dir), "--metrics-port", "0", "--web-address", "127.0.0.1:0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def serving() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            with grpc.insecure_channel(address) as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
                return response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    wait_for(serving, 90, interval=0.2, what="the server to serve")
    return process


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    return output


def test_a_job_interrupted_by_sigterm_is_checkpointed_requeued_and_finished_after_restart(
        tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    running_spec = load_job_spec(DIGITS_SPEC)
    running_spec.data.epochs = 40
    running_spec.checkpoint.interval_steps = 1000  # only the stop's own checkpoint matters
    server = _start(address, tmp_path)
    try:
        with Client(address, timeout=10) as client:
            interrupted = client.submit(running_spec)
            queued = client.submit(iris_spec(name="waiting"))  # concurrency 1: it waits
            wait_for(lambda: client.get(interrupted.id).progress.step >= 20, 60,
                     what="20 steps")
    finally:
        output = _stop(server)
    assert "serving gRPC on" in output and "metrics at http://127.0.0.1:" in output
    assert "web UI at http://127.0.0.1:" in output  # --web-address 127.0.0.1:0: a free port

    store = Store(tmp_path / "chainrule.db")
    stopped = store.get_job(interrupted.id)
    assert stopped.state == "QUEUED"
    assert store.get_job(queued.id).state == "QUEUED"
    stopped_at = stopped.progress.step
    assert 20 <= stopped_at < stopped.progress.total_steps
    newest = JobStorage(tmp_path).latest_checkpoint(interrupted.id).checkpoint
    assert newest is not None and newest.step == stopped_at  # the stop's own checkpoint
    store.close()

    server = _start(address, tmp_path)
    try:
        with Client(address, timeout=10) as client:
            done = wait_until_done(client, interrupted.id, timeout=120)
            assert state_name(done.state) == "SUCCEEDED", done.error
            assert done.final_validation.accuracy >= 0.96
            assert state_name(wait_until_done(client, queued.id).state) == "SUCCEEDED"
    finally:
        _stop(server)
    store = Store(tmp_path / "chainrule.db")
    states = [e.payload["state"] for e in store.events(interrupted.id) if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    # the second run started from the checkpoint taken at the stop, not from step 0
    resumed = [e.payload["step"] for e in store.events(interrupted.id) if e.kind == "resumed"]
    assert resumed == [stopped_at]
    store.close()
