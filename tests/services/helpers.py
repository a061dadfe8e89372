"""Shared pieces of the service tests: tiny specs, waiting for a job, the store's contents."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict
from chainrule.v1 import job_pb2

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
