"""Every recovery is an event (issue 12): a worker lost mid-job is in the job's WatchJob stream,
its stored events (its log), the server's log, `chainrule watch` and `chainrule train` output,
and counted in Prometheus as chainrule_recoveries_total{kind}; so is the replica that took its
place.

Before: a user saw nothing of it (at most Ray's own warnings); the job just went on.

A real server and real Ray; the worker is killed with a real SIGKILL of its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
import ray
from ray._private.state import actors

from chainrule.client import Client, state_name
from chainrule.spec_file import load_job_spec
from scheduler import training
from scheduler.job_runner import JobRunner
from services import cli
from services.server import serve
from tests.ray_faults import kill_and_wait_until_dead
from tests.services.helpers import DIGITS_SPEC, ROOT, wait_for, wait_until_done

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _long_digits():
    """Digits on 2 workers and 2 shards for 4800 steps: long enough to lose a worker mid-run
    and for its replacement (about a second to start) to join."""
    spec = load_job_spec(DIGITS_SPEC)
    spec.data.epochs = 400
    return spec


def _worker_pids() -> list[int]:
    """The processes of this driver's live model replicas (the job's workers)."""
    job = ray.get_runtime_context().get_job_id()
    return sorted(actor["Pid"] for actor in actors().values()
                  if actor["ActorClassName"] == "ModelReplica" and actor["State"] == "ALIVE"
                  and actor["JobID"] == job)


def _metric(url: str, name: str, kind: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{kind="{kind}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}{{kind={kind!r}}} in /metrics")


def test_a_worker_killed_mid_job_is_an_event_in_the_stream_log_watch_and_metrics(
        local_ray, tmp_path, caplog):
    server = serve("127.0.0.1:0", tmp_path / "data", metrics_port=0)
    try:
        with Client(server.address, timeout=30) as client:
            job = client.submit(_long_digits())
            watch = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "watch", job.id, "--server",
                 server.address], cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            streamed = []
            listener = threading.Thread(target=lambda: streamed.extend(client.watch(job.id)))
            listener.start()
            wait_for(lambda: client.get(job.id).progress.step >= 50, 120, what="50 steps")
            pids = _worker_pids()
            assert len(pids) == 2, pids
            os.kill(pids[1], signal.SIGKILL)
            done = wait_until_done(client, job.id, timeout=300)
            assert state_name(done.state) == "SUCCEEDED", done.error
            listener.join(30)
            watched, _ = watch.communicate(timeout=60)

        recoveries = [e.recovery for e in streamed if e.WhichOneof("kind") == "recovery"]
        print("\n".join(f"{r.kind} at step {r.step}: {r.message}" for r in recoveries))
        assert [r.kind for r in recoveries] == ["worker_lost", "worker_replaced"]
        lost, replaced = recoveries
        assert 50 <= lost.step < replaced.step < 4800
        assert lost.message.startswith("worker ") and f"lost at step {lost.step}" in lost.message
        # The kill lands mid-step, before its block was written (recomputed by the other
        # worker) or after (counted as delivered, nothing recomputed), or, less often, between
        # steps, e.g. during an evaluation, whose heartbeats find it (nothing to recompute
        # then): all the same loss, handled.
        assert "(its process died)" in lost.message
        assert any(cost in lost.message for cost in (
            "recomputed in-step", "had reached the shards: none recomputed",
            "found between steps, no block of it to recompute")), lost.message
        assert f"joined at step {replaced.step}" in replaced.message

        stored = [e.payload for e in server.service.store.events(job.id) if e.kind == "recovery"]
        assert [(e["kind"], e["step"], e["message"]) for e in stored] == [
            (r.kind, r.step, r.message) for r in recoveries]
        assert any(r.getMessage() == f"job {job.id}: {lost.message}" for r in caplog.records)
        assert f"recovered: {lost.message}" in " ".join(watched.split())  # rich wraps lines
        assert _metric(server.metrics_url, "chainrule_recoveries_total", "worker_lost") == 1
        assert _metric(server.metrics_url, "chainrule_recoveries_total", "worker_replaced") == 1
        assert _metric(server.metrics_url, "chainrule_recoveries_total", "shard_lost") == 0
    finally:
        server.stop()


class RunnerLosingWorkerOne(JobRunner):
    """Kills worker 1's actor after step 5, as an OOM kill would, and waits until it is dead:
    step 6 finds it gone (ray.kill alone lands a few ms later, or, on a loaded machine, so much
    later that an evaluation's heartbeats find it between steps instead)."""

    def _step(self, step, epoch, group):
        record = super()._step(step, epoch, group)
        if step == 5:
            kill_and_wait_until_dead(self.worker_group.replicas[1])
        return record


def test_chainrule_train_prints_each_recovery(local_ray, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "JobRunner", RunnerLosingWorkerOne)
    spec = tmp_path / "digits.yaml"
    spec.write_text(DIGITS_SPEC.read_text().replace("epochs: 20", "epochs: 3"))
    assert cli.main(["train", str(spec), "--workers", "2"]) == 0
    output = " ".join(capsys.readouterr().err.split())
    assert ("recovered: worker 1 lost at step 6 (its process died): its micro-batches "
            "recomputed in-step by worker(s) 0") in output, output
