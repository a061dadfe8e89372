"""A server stopped by SIGTERM checkpoints its running job and requeues it; the next start runs
every queued job again, the interrupted one resuming from its checkpoint (BRIEF invariant 2).

The server runs as a real subprocess (`chainrule serve`), stopped with a real signal."""

from __future__ import annotations

import signal
import subprocess

import pytest

from chainrule.client import Client, state_name
from chainrule.spec_file import load_job_spec
from scheduler.storage import JobStorage
from services.store import Store
from tests.services.helpers import (
    DIGITS_SPEC,
    free_port,
    iris_spec,
    start_serve_process,
    wait_for,
    wait_until_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=90)
    assert process.returncode == 0, output
    return output


def test_a_job_interrupted_by_sigterm_is_checkpointed_requeued_and_finished_after_restart(
        tmp_path):
    address = f"127.0.0.1:{free_port()}"
    running_spec = load_job_spec(DIGITS_SPEC)
    running_spec.data.epochs = 40
    running_spec.checkpoint.interval_steps = 1000  # only the stop's own checkpoint matters
    server = start_serve_process(address, tmp_path)
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

    server = start_serve_process(address, tmp_path)
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
