"""The `chainrule serve` process itself, a real subprocess stopped by real signals.

SIGTERM mid-job is a preemption notice: every running job stops at its next step boundary
with a checkpoint of that step (not its last interval checkpoint: here the interval is
longer than the job) and goes back to QUEUED; the next start runs every queued job again, the
interrupted one from that step, so no step is lost, and it ends with bitwise the weights of
the undisturbed run (BRIEF invariant 2).

One service per data folder and per port: a second `chainrule serve` on the same folder, or
on the same port with another folder, exits non-zero at once naming who holds the folder or
which port is taken, and the first keeps serving. Before: two servers on one folder both ran
every queued job; a second one on the same port bound too (gRPC's SO_REUSEPORT) and clients
were split between two job stores at random."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import Client, state_name
from scheduler.storage import JobStorage
from services.store import Store
from tests.chaos.recovery_report import report_recovery
from tests.services.helpers import (
    ROOT,
    assert_same_weights,
    downloaded,
    free_port,
    iris_spec,
    long_spec,
    start_serve_process,
    undisturbed_weights,
    wait_for,
    wait_until_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REFUSED_WITHIN_SECONDS = 20  # a refusal comes before Ray starts (which takes ~6 s alone)


def _command(address: str, data_dir) -> list[str]:
    """A second server: no web UI (the first holds one on a free port; the refusal here must
    be about the folder or the gRPC port)."""
    return [sys.executable, "-m", "services.cli", "serve", "--address", address,
            "--data-dir", str(data_dir), "--metrics-port", "0", "--no-web"]


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1)
            return response.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A running server: (its process, its address, its data folder)."""
    data_dir = tmp_path_factory.mktemp("first")
    address = f"127.0.0.1:{free_port()}"
    process = start_serve_process(address, data_dir)
    try:
        yield process, address, data_dir
    finally:
        if process.poll() is None:
            _stop(process)


# --- a second server -----------------------------------------------------------------------------


def _second(address: str, data_dir) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    second = subprocess.run(_command(address, data_dir), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    return second, time.monotonic() - start


def _still_serves(address: str) -> None:
    assert _serving(address)
    with Client(address, timeout=30) as client:
        client.list()


def test_a_second_server_on_the_same_data_folder_exits_naming_the_holder(first, tmp_path):
    process, address, data_dir = first
    second, seconds = _second(f"127.0.0.1:{free_port()}", data_dir)
    assert second.returncode == 1, second.stderr
    assert f"data folder {data_dir} is in use" in second.stderr
    assert f"PID {process.pid}" in second.stderr and f"serving {address}" in second.stderr
    assert "Traceback" not in second.stderr
    assert seconds < REFUSED_WITHIN_SECONDS
    _still_serves(address)
    report_recovery("second server, same folder", seconds, 0, second.stderr.strip())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_second_server_on_the_same_port_exits_naming_the_port(first, tmp_path, host):
    # localhost resolves to 127.0.0.1 and ::1: gRPC alone would bind ::1 and call it a success,
    # so that clients of "localhost" would reach one server or the other.
    _, address, _ = first
    port = address.rsplit(":", 1)[1]
    second, seconds = _second(f"{host}:{port}", tmp_path / "other")
    assert second.returncode == 1, second.stderr
    assert f"port {port} is in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert seconds < REFUSED_WITHIN_SECONDS
    assert not (tmp_path / "other" / "chainrule.db").exists()  # refused before the store opened
    _still_serves(address)
    report_recovery(f"second server, same port ({host})", seconds, 0, second.stderr.strip())


# --- SIGTERM: a preemption notice ----------------------------------------------------------------


def test_sigterm_checkpoints_each_running_job_at_its_next_step_and_a_restart_finishes_it(
        first, tmp_path):
    process, address, data_dir = first
    spec = long_spec()
    spec.checkpoint.interval_steps = 1000  # longer than the job: only the stop's own counts
    with Client(address, timeout=10) as client:
        interrupted = client.submit(spec)
        # The first job takes both of the machine's CPUs (a CPU per worker): this one waits.
        queued = client.submit(iris_spec(name="waiting"))
        wait_for(lambda: client.get(interrupted.id).progress.step >= 20, 60, interval=0.02,
                 what="20 steps")
        at_sigterm = client.get(interrupted.id).progress.step
    signalled = time.monotonic()
    output = _stop(process)
    assert "serving gRPC on" in output and "metrics at http://127.0.0.1:" in output
    assert "web UI at http://127.0.0.1:" in output  # --web-address 127.0.0.1:0: a free port

    store = Store(data_dir / "chainrule.db")
    stopped = store.get_job(interrupted.id)
    assert stopped.state == "QUEUED" and store.get_job(queued.id).state == "QUEUED"
    stopped_at = stopped.progress.step
    assert at_sigterm <= stopped_at < stopped.progress.total_steps
    # One checkpoint, of the last step done: the stop's, at the step boundary after the signal.
    storage = JobStorage(data_dir)
    assert len(storage.checkpoints(interrupted.id)) == 1
    newest = storage.latest_checkpoint(interrupted.id).checkpoint
    assert newest is not None and newest.step == stopped_at
    store.close()

    server = start_serve_process(address, data_dir)
    try:
        with Client(address, timeout=10) as client:
            wait_for(lambda: client.get(interrupted.id).progress.step > stopped_at, 120,
                     interval=0.02, what="the resumed job to train")
            recovered = time.monotonic() - signalled
            done = wait_until_done(client, interrupted.id, timeout=120)
            assert state_name(done.state) == "SUCCEEDED", done.error
            assert state_name(wait_until_done(client, queued.id).state) == "SUCCEEDED"
            assert_same_weights(downloaded(client, interrupted.id, tmp_path),
                                undisturbed_weights(client, long_spec(), tmp_path))
    finally:
        _stop(server)
    store = Store(data_dir / "chainrule.db")
    states = [e.payload["state"] for e in store.events(interrupted.id) if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    # the second run started from the checkpoint taken at the stop, not from step 0
    resumed = [e.payload["step"] for e in store.events(interrupted.id) if e.kind == "resumed"]
    assert resumed == [stopped_at]
    store.close()
    report_recovery("service SIGTERM, restarted", recovered, 0,
                    f"checkpointed at step {stopped_at} (signal at step {at_sigterm}); "
                    f"includes starting a new server and its Ray")
