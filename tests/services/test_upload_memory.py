"""What an upload costs the server in memory is bounded by what it stores, not by what a file
claims (issue 11): measured as the peak resident memory of a real `chainrule serve` process.

Before these uploads were streamed, a 95 KiB zip bomb grew the server by 855 MiB and a 34 MiB
CSV by 1.46 GiB. Each case here resets the kernel's peak-RSS mark of the server process
(/proc/PID/clear_refs), uploads over a real gRPC channel, and reads the new peak (VmHWM)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from chainrule.client import Client
from chainrule.v1 import training_service_pb2 as pb
from tests.services.helpers import ROOT, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

MiB = 1024 * 1024
# Slack for what any upload costs whatever its size: gRPC's buffers (1 MiB chunks, a few in
# flight), the reader thread's stack, the CSV parser's block of rows.
FIXED_SLACK = 24 * MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `chainrule serve` child with its own embedded Ray; yields (address, pid)."""
    folder = tmp_path_factory.mktemp("served")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--address", address,
         "--data-dir", str(folder / "data"), "--metrics-port", "0", "--no-web"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def serving() -> bool:
        assert process.poll() is None, (folder / "server.log").read_text()
        return "serving gRPC on" in (folder / "server.log").read_text()

    try:
        wait_for(serving, 90, interval=0.2, what="the server to serve")
        with Client(address, timeout=60) as client:  # warm up: imports, first buffers
            client.upload_stream(*_upload("warm-npz", _npz(x=np.ones((64, 4)),
                                                           y=np.arange(64) % 2)))
            client.upload_stream(*_upload("warm-csv", _csv(64, 4), "csv"))
        yield address, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _upload(name: str, data: bytes, format: str = "npz"):
    header = pb.DatasetHeader(name=name, format=format, size_bytes=len(data),
                              sha256=hashlib.sha256(data).hexdigest(),
                              label_column="label" if format == "csv" else "")
    return header, (data[i:i + MiB] for i in range(0, len(data), MiB))


def _npz(compressed: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _csv(rows: int, features: int) -> bytes:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((rows, features)).round(6)
    labels = rng.integers(0, 3, rows)
    header = ",".join(f"f{i}" for i in range(features)) + ",label\n"
    lines = [header] + [",".join(f"{v:.6f}" for v in row) + f",{label}\n"
                        for row, label in zip(values, labels)]
    return "".join(lines).encode()


def _peak_growth(pid: int, call) -> tuple[int, float, object]:
    """(growth of the process's peak RSS over its RSS before, seconds, call's result or
    RpcError)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib(pid, "VmRSS")
    start = time.perf_counter()
    try:
        result = call()
    except grpc.RpcError as error:
        result = error
    seconds = time.perf_counter() - start
    return (_status_kib(pid, "VmHWM") - before) * 1024, seconds, result


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of the process so far (/proc/PID/stat's utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_95_kib_zip_bomb_is_refused_from_its_headers_fast_and_costs_no_memory(server):
    address, pid = server
    bomb = _npz(compressed=True, x=np.zeros((94 * 1024, 1024), dtype=np.uint8),
                y=np.zeros(94 * 1024, dtype=np.int64))
    assert len(bomb) < 96 * 1024
    with Client(address, timeout=30) as client:
        cpu_before = _cpu_seconds(pid)
        growth, seconds, error = _peak_growth(
            pid, lambda: client.upload_stream(*_upload("bomb", bomb)))
        cpu = _cpu_seconds(pid) - cpu_before
    print(f"zip bomb of {len(bomb) / 1024:.0f} KiB: refused in {seconds * 1000:.0f} ms "
          f"({cpu * 1000:.0f} ms of the server's CPU), server peak RSS +{growth / MiB:.1f} MiB")
    assert isinstance(error, grpc.RpcError), "the bomb was accepted"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("x: declares 94.0 MiB uncompressed"), error.details()
    # Fast: in the server's CPU seconds, which a loaded machine does not stretch as it does
    # the wall clock (a load of 20 made a refusal wait seconds for a core).
    assert cpu < 1.0, f"{cpu:.2f} s of the server's CPU"
    assert growth < FIXED_SLACK


def test_a_multi_mib_csv_costs_at_most_a_small_multiple_of_what_it_stores(server):
    address, pid = server
    data = _csv(rows=300_000, features=10)  # about 26 MiB of text
    with Client(address, timeout=120) as client:
        growth, seconds, info = _peak_growth(
            pid, lambda: client.upload_stream(*_upload("big-csv", data, "csv")))
    assert not isinstance(info, grpc.RpcError), info.details()
    stored = 300_000 * 11 * 8  # x float64 and y int64, as the .npz holds them
    print(f"CSV of {len(data) / MiB:.1f} MiB ({stored / MiB:.1f} MiB stored): {seconds:.1f} s, "
          f"server peak RSS +{growth / MiB:.1f} MiB")
    assert (info.samples, tuple(info.feature_shape), info.num_classes) == (300_000, (10,), 3)
    assert growth <= 0.5 * stored + FIXED_SLACK


def test_integer_features_are_not_widened_while_uploading(server):
    address, pid = server
    tokens = np.random.default_rng(1).integers(0, 200, (4096, 8192), dtype=np.uint8)  # 32 MiB
    data = _npz(x=tokens, y=np.arange(4096) % 2)
    with Client(address, timeout=120) as client:
        growth, seconds, info = _peak_growth(
            pid, lambda: client.upload_stream(*_upload("tokens", data)))
    assert not isinstance(info, grpc.RpcError), info.details()
    print(f"uint8 npz of {len(data) / MiB:.1f} MiB: {seconds:.1f} s, server peak RSS "
          f"+{growth / MiB:.1f} MiB (int64 would be {tokens.size * 8 / MiB:.0f} MiB)")
    assert tuple(info.feature_shape) == (8192,)
    assert growth <= 0.5 * len(data) + FIXED_SLACK
