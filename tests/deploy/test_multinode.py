"""The path docker compose and Kubernetes rely on, for real on this machine: a Ray head started
with `ray start --head`, a second node joining it with `ray start --address=...`, token
authentication on (RAY_AUTH_MODE=token), and `chainrule serve --ray-address` in another
process joining the cluster by address to train a job whose workers land on both nodes. Its
jobs outlive it: SIGKILLed mid-job, its job's runner (a detached actor on the server's node)
trains on with no server, and the next server on the same address and data folder attaches to
the run, counts its actors on the nodes its runner reports (one worker on each), and records
its end at once, with the weights of an undisturbed run and no step trained twice. (Ray's own
placement over several nodes, for `train_job` without a server: tests/scheduler/
test_multinode.py.)

Everything stays on this machine (Ray may advertise the interface address, never another
host). The cluster lives in its own temp dir with its own ports, and is torn down by the ids
of the processes this test started: `ray stop` would kill every Ray on the machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from chainrule.client import Client, state_name
from services.store import Store
from tests.chaos.recovery_report import report_recovery
from tests.deploy.conftest import ROOT, free_port
from tests.services.helpers import (
    assert_same_weights,
    downloaded,
    long_spec,
    start_serve_process,
    undisturbed_weights,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RAY = str(Path(sys.executable).with_name("ray"))


class LocalRayCluster:
    """`ray start` processes of this test only, each in its own session (process group)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.environment = {**os.environ, "RAY_AUTH_MODE": "token",
                            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        self.groups: list[int] = []
        self.address = ""

    def start_head(self) -> None:
        def head_arguments() -> list[str]:
            self.address = f"127.0.0.1:{free_port()}"
            return ["--head", f"--port={self.address.rsplit(':', 1)[1]}",
                    f"--temp-dir={self.directory}", "--include-dashboard=false",
                    f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]

        self._ray_start(head_arguments)

    def add_node(self) -> None:
        self._ray_start(lambda: [f"--address={self.address}"])

    def _ray_start(self, arguments, attempts: int = 2) -> None:
        """`ray start` with fresh free ports; a second try if a port was taken meanwhile (other
        Ray instances may start on this machine at the same time)."""
        for attempt in range(attempts):
            command = [RAY, "start", "--num-cpus=1", "--disable-usage-stats",
                       f"--dashboard-agent-listen-port={free_port()}",
                       f"--dashboard-agent-grpc-port={free_port()}",
                       f"--metrics-export-port={free_port()}",
                       f"--runtime-env-agent-port={free_port()}", *arguments()]
            # A new session: `ray start` and every process it leaves behind share its group id.
            process = subprocess.Popen(command, env=self.environment, cwd=self.directory,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True)
            self.groups.append(process.pid)
            output, _ = process.communicate(timeout=120)
            if process.returncode == 0:
                return
            self.stop({process.pid})  # what the failed attempt left behind, nothing else
            assert attempt + 1 < attempts, f"{' '.join(command)}\n{output[-3000:]}"

    def processes(self, groups: set[int]) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[2]) in groups and fields[0] != "Z":  # pgrp, state
                pids.append(int(entry.name))
        return pids

    def stop(self, groups: set[int] | None = None) -> None:
        """SIGKILL every process of our groups (all, or the ones given), and wait for them to
        go. Nothing of a test's cluster needs a clean exit, and some of its processes took the
        whole 5 s grace a SIGTERM was given."""
        groups = set(self.groups) if groups is None else groups
        for pid in self.processes(groups):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10.0
        while self.processes(groups) and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def two_node_cluster():
    # Short path: Ray's unix sockets live under the temp dir (108-byte limit).
    directory = Path(tempfile.mkdtemp(prefix="cr-", dir="/tmp"))
    cluster = LocalRayCluster(directory)
    try:
        cluster.start_head()
        cluster.add_node()
        yield cluster
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


ATTACH_BOUND_SECONDS = 5.0  # target 2 s (bench/chaos.py); room here for a loaded machine
ATTACHED = re.compile(r"job (\S+): attached to its run, its actors counted on node\(s\) "
                      r"(.+), where its runner reports them")


def test_a_server_on_the_cluster_sigkilled_mid_job_leaves_it_training_and_the_next_attaches(
        two_node_cluster, tmp_path):
    data_dir = tmp_path / "data"
    address = f"127.0.0.1:{free_port()}"

    def serve() -> subprocess.Popen:
        return start_serve_process(address, data_dir, "--ray-address", two_node_cluster.address,
                                   environment=two_node_cluster.environment)

    process = serve()
    try:
        with Client(address, timeout=10) as client:
            job = client.submit(long_spec())  # 2 workers of ~1 CPU: one on each node
            at_kill = wait_for(lambda: (lambda step: step >= 20 and step)(
                client.get(job.id).progress.step), 60, interval=0.02, what="20 steps")
    finally:
        process.kill()
        process.communicate(timeout=30)
    # It trains to its end with no server (its runner writes its progress to the store); the
    # result waits in the runner for a server.
    store = Store(data_dir / "chainrule.db")
    ended = wait_for(lambda: (lambda record: record.progress.step == record.progress
                              .total_steps and record)(store.get_job(job.id)),
                     60, interval=0.1, what="the run to end with no server")
    assert ended.state == "RUNNING" and at_kill < ended.progress.total_steps
    store.close()

    server = serve()
    serving_at = time.monotonic()
    try:
        with Client(address, timeout=10) as client:
            wait_for(lambda: state_name(client.get(job.id).state) == "SUCCEEDED", 30,
                     interval=0.02, what="the new server to record the run's end")
            attached = time.monotonic() - serving_at
            assert attached <= ATTACH_BOUND_SECONDS
            assert_same_weights(downloaded(client, job.id, tmp_path),
                                undisturbed_weights(client, long_spec(), tmp_path))
    finally:
        server.kill()  # nothing runs on it any more; its log is what is left to read
        output, _ = server.communicate(timeout=30)
    # The new server counted the run's actors where its runner placed them: on both nodes.
    adopted = {match.group(1): match.group(2).split(", ") for match in ATTACHED.finditer(output)}
    assert list(adopted) == [job.id] and len(set(adopted[job.id])) == 2, output[-3000:]
    store = Store(data_dir / "chainrule.db")
    states = [e.payload["state"] for e in store.events(job.id) if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]  # attached, never requeued
    assert not [e for e in store.events(job.id) if e.kind == "resumed"]  # nor replayed
    store.close()
    report_recovery("service SIGKILL on a --ray-address cluster, restarted", attached, 0,
                    f"steps {at_kill}-{ended.progress.total_steps} trained with no server; "
                    f"seconds: from the new server serving to it recording the run's end")


def test_a_driver_without_token_auth_is_refused(two_node_cluster):
    # Ray retries a refused GCS connection once a second, 20 times by default: 3 is plenty.
    environment = {**two_node_cluster.environment, "RAY_AUTH_MODE": "disabled",
                   "RAY_gcs_server_port_wait_time_s": "3"}
    code = ("import ray, sys\n"
            "ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)\n")
    run = subprocess.run([sys.executable, "-c", code, two_node_cluster.address],
                         env=environment, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "InvalidAuthToken" in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
