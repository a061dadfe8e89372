"""When the embedded Ray under `chainrule serve` dies (its raylet or its GCS server SIGKILLed),
the server says so in its log within 5 s, records it in the running job's log and state, starts
again in place with a new Ray and finishes the job from its checkpoint, with weights bitwise
equal to an undisturbed run's (issue 12). Ray on its own ended the server 13 s (raylet) or 62 s
(GCS) later, silently. A Ray that keeps dying makes the server exit non-zero, saying why, for
a supervisor or a person.

A real `chainrule serve` subprocess on its own embedded Ray; only the Ray processes that this
server started (the children of its `ray start`, scheduler/ray_head.py) are killed. The tests
share the server and run in this order: it starts with one restart already on record, so the
third loss is one too many."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from chainrule.client import Client, state_name
from scheduler import ray_head
from scheduler.ray_liveness import embedded_processes
from services.ray_recovery import MAX_RESTARTS, RAY_LOST_EXIT_STATUS, RESTARTS_VARIABLE
from services.store import Store
from tests.services.helpers import (
    free_port,
    iris_spec,
    start_serve_process,
    wait_for,
    wait_until_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DETECTION_SECONDS = 5.0
LOST_LINE = "was lost ("  # services/ray_recovery.py's ERROR line
SERVING_LINE = "chainrule: serving gRPC on"


def _spec():
    """600 short steps, checkpointed every 50: long enough to be hit mid-run."""
    spec = iris_spec(epochs=150)
    spec.checkpoint.interval_steps = 50
    return spec


class ServerLog:
    """The server's output lines as they come, read on a thread."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def first(self, text: str, start: int) -> str | None:
        """The first line from `start` on that holds `text`."""
        return next((line for line in self.lines[start:] if text in line), None)

    @staticmethod
    def logged_at(line: str) -> float:
        """The time the server logged `line` (logging's asctime, local time, milliseconds)."""
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Serving:
    process: subprocess.Popen
    log: ServerLog
    client: Client
    data_dir: Path
    undisturbed: dict[str, np.ndarray]  # the weights of an undisturbed run of _spec()


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    address = f"127.0.0.1:{free_port()}"
    process = start_serve_process(address, data_dir,
                                  environment={RESTARTS_VARIABLE: str(time.time())})
    log = ServerLog(process)
    try:
        with Client(address, timeout=30) as client:
            undisturbed = client.submit(_spec())
            assert state_name(wait_until_done(client, undisturbed.id).state) == "SUCCEEDED"
            yield Serving(process, log, client, data_dir,
                          _weights(client, undisturbed.id, data_dir))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def _weights(client: Client, job_id: str, folder: Path) -> dict[str, np.ndarray]:
    path = folder / f"{job_id}.npz"
    client.download(job_id, path)
    with np.load(path, allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def _kill_mid_run(serving: Serving, process_name: str) -> tuple[str, str, float, int]:
    """Kill one of the server's Ray processes 60 steps into a job: (job id, the server's
    line saying so, when it was killed, the victim's pid)."""
    client, log = serving.client, serving.log
    job = client.submit(_spec())
    wait_for(lambda: client.get(job.id).progress.step >= 60, 60, what="60 steps")
    head = ray_head.find(serving.data_dir)
    assert head is not None
    victim = next(p for p in embedded_processes(head.pid) if p.name == process_name)
    seen = len(log.lines)
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()
    lost = wait_for(lambda: log.first(LOST_LINE, seen), 30, what="the server to log the loss")
    # The others of its session may have followed it by the time the server looked.
    assert f"{process_name} (pid {victim.pid})" in lost and "exited" in lost
    assert log.logged_at(lost) - killed_at <= DETECTION_SECONDS, lost
    return job.id, lost, killed_at, victim.pid


def _finishes_with_the_undisturbed_weights(serving: Serving, process_name: str,
                                           tmp_path: Path) -> None:
    job_id, lost, _, _ = _kill_mid_run(serving, process_name)
    client, log = serving.client, serving.log
    # It starts again in place (the same process) with a new Ray, and serves again.
    wait_for(lambda: log.first(SERVING_LINE, log.lines.index(lost)), 90,
             what="the server to serve again")
    done = wait_until_done(client, job_id, timeout=120)
    assert state_name(done.state) == "SUCCEEDED", done.error
    assert serving.process.poll() is None
    weights = _weights(client, job_id, tmp_path)
    assert weights.keys() == serving.undisturbed.keys()
    for key, value in weights.items():
        assert np.array_equal(value, serving.undisturbed[key]), key  # bitwise

    entries = list(client.logs(job_id))
    recovery = [e.message for e in entries if e.kind == "recovery"]
    # Its session's other processes may have followed it by the time the server looked.
    assert len(recovery) == 1 and f"{process_name} (pid" in recovery[0], recovery
    states = [e.message for e in entries if e.kind == "state"]
    assert states[:2] == ["QUEUED", "RUNNING"] and states[3:] == ["RUNNING", "SUCCEEDED"]
    assert states[2].startswith("QUEUED: the embedded Ray was lost (its"), states  # with why
    resumed = [e.message for e in entries if e.kind == "resumed"]
    assert len(resumed) == 1  # from its checkpoint, not from step 0


def test_a_killed_raylet_is_noticed_in_seconds_and_the_job_finishes_with_the_same_weights(
        serving, tmp_path):
    _finishes_with_the_undisturbed_weights(serving, "raylet", tmp_path)


def test_a_killed_gcs_server_is_noticed_in_seconds_and_the_job_finishes_with_the_same_weights(
        serving, tmp_path):
    _finishes_with_the_undisturbed_weights(serving, "gcs_server", tmp_path)


def test_a_ray_that_keeps_dying_makes_the_server_exit_non_zero_saying_why(serving):
    assert MAX_RESTARTS == 3  # one on record at start, two by the tests above
    job_id, lost, _, victim = _kill_mid_run(serving, "raylet")
    assert serving.process.wait(timeout=30) == RAY_LOST_EXIT_STATUS
    assert f"exiting with status {RAY_LOST_EXIT_STATUS} so that a supervisor restarts" in lost
    after = serving.log.lines[serving.log.lines.index(lost):]
    assert [line for line in after if " ERROR " in line] == [lost]  # one line says why
    store = Store(serving.data_dir / "chainrule.db")
    job = store.get_job(job_id)
    assert job is not None and job.state == "QUEUED"  # the next start resumes it
    assert job.error.startswith("the embedded Ray was lost (its ")
    assert f"raylet (pid {victim})" in job.error
    store.close()
