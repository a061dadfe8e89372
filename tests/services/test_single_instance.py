"""One service per data folder and per port (issue 12): a second `chainrule serve` on the same
folder, or on the same port with another folder, exits non-zero at once with a message naming
who holds the folder or which port is taken, and the first server keeps serving its clients.

Before: two servers on one folder both ran every queued job; a second one on the same port
bound too (gRPC's SO_REUSEPORT) and clients were split between two job stores at random.

Every server here is a real `chainrule serve` subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import Client, state_name
from tests.services.helpers import ROOT, iris_spec, wait_for, wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REFUSED_WITHIN_SECONDS = 20  # a refusal comes before Ray starts (which takes ~6 s alone)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(address: str, data_dir) -> list[str]:
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


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A running server: (its process, its address, its data folder)."""
    data_dir = tmp_path_factory.mktemp("first")
    address = f"127.0.0.1:{_free_port()}"
    process = subprocess.Popen(_command(address, data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: process.poll() is None and _serving(address), 90, interval=0.2,
                 what="the first server to serve")
        yield process, address, data_dir
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=90)
        assert process.returncode == 0, output


def _second(address: str, data_dir) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    second = subprocess.run(_command(address, data_dir), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    return second, time.monotonic() - start


def _still_serves(address: str) -> None:
    """The first server answers and runs a job to its end."""
    assert _serving(address)
    with Client(address, timeout=30) as client:
        done = wait_until_done(client, client.submit(iris_spec()).id)
        assert state_name(done.state) == "SUCCEEDED", done.error


def test_a_second_server_on_the_same_data_folder_exits_naming_the_holder(first, tmp_path):
    process, address, data_dir = first
    second, seconds = _second(f"127.0.0.1:{_free_port()}", data_dir)
    print(f"refused in {seconds:.1f} s: {second.stderr.strip()}")
    assert second.returncode == 1, second.stderr
    assert f"data folder {data_dir} is in use" in second.stderr
    assert f"PID {process.pid}" in second.stderr and f"serving {address}" in second.stderr
    assert "Traceback" not in second.stderr
    assert seconds < REFUSED_WITHIN_SECONDS
    _still_serves(address)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_second_server_on_the_same_port_exits_naming_the_port(first, tmp_path, host):
    # localhost resolves to 127.0.0.1 and ::1: gRPC alone would bind ::1 and call it a success,
    # so that clients of "localhost" would reach one server or the other.
    _, address, _ = first
    port = address.rsplit(":", 1)[1]
    second, seconds = _second(f"{host}:{port}", tmp_path / "other")
    print(f"refused in {seconds:.1f} s: {second.stderr.strip()}")
    assert second.returncode == 1, second.stderr
    assert f"port {port} is in use" in second.stderr
    assert "Traceback" not in second.stderr
    assert seconds < REFUSED_WITHIN_SECONDS
    assert not (tmp_path / "other" / "chainrule.db").exists()  # refused before the store opened
    _still_serves(address)
