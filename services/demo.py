"""`chainrule demo`: the product's main path end to end, on real sockets, in one command.

Starts the service (embedded Ray, a free loopback port, a temporary data directory), submits
the digits MLP through the real gRPC client, shows its live progress from WatchJob, prints the
final validation accuracy and where the metrics are, downloads the model, and shuts down.
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from pathlib import Path

from chainrule.client import Client, state_name
from services.progress import watch_with_progress
from services.server import serve

DEMO_SPEC = Path(__file__).resolve().parent / "specs" / "digits-mlp.yaml"
TARGET_ACCURACY = 0.96


def run_demo(spec_path: str | Path | None = None, metrics_port: int = 0) -> int:
    spec_path = Path(spec_path or DEMO_SPEC)
    with tempfile.TemporaryDirectory(prefix="chainrule-demo-") as data_dir:
        started = time.perf_counter()
        server = serve("127.0.0.1:0", data_dir, metrics_port=metrics_port)
        try:
            print(f"service: gRPC on {server.address}, data in {data_dir} "
                  f"(ready in {time.perf_counter() - started:.1f} s)")
            print(f"metrics: {server.metrics_url or 'off (services.metrics not installed)'}")
            with Client(server.address) as client:
                job = client.submit(spec_path, request_id="demo")
                print(f"submitted {spec_path.name} as {job.id}")
                job = watch_with_progress(client, job.id, job.name or job.id)
                if state_name(job.state) != "SUCCEEDED":
                    print(f"{job.id} ended {state_name(job.state)}: {job.error}")
                    return 1
                accuracy = job.final_validation.accuracy
                seconds = job.finished_at.ToDatetime() - job.started_at.ToDatetime()
                print(f"{job.id} SUCCEEDED in {seconds.total_seconds():.1f} s: validation "
                      f"accuracy {accuracy:.4f} (target >= {TARGET_ACCURACY}), loss "
                      f"{job.final_validation.loss:.4f}")
                weights = Path(data_dir) / "digits-mlp.safetensors"
                header = client.download(job.id, weights)
                print(f"downloaded the model over gRPC: {header.size_bytes} bytes of "
                      f"safetensors (PyTorch key names) + the manifest JSON")
            if server.metrics_url:
                with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
                    lines = [line for line in response.read().decode().splitlines()
                             if line.startswith("chainrule_") and job.id in line]
                print(f"metrics: {len(lines)} series for this job at {server.metrics_url}, e.g.")
                for line in lines[:3]:
                    print(f"  {line}")
            return 0 if accuracy >= TARGET_ACCURACY else 1
        finally:
            server.stop()
            print("service stopped")
