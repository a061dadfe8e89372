"""The path docker compose and Kubernetes rely on, for real on this machine: a Ray head started
with `ray start --head`, a second node joining it with `ray start --address=...`, token
authentication on (RAY_AUTH_MODE=token), and a driver in another process joining the cluster
by address to train a job whose workers land on both nodes.

Everything stays on this machine (Ray may advertise the interface address, never another
host). The cluster lives in its own temp dir with its own ports, and is torn down by the ids
of the processes this test started: `ray stop` would kill every Ray on the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RAY = str(Path(sys.executable).with_name("ray"))
SPEC = """
name: multinode-deploy
model: {layers: [{linear: {out_features: 16}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1, momentum: 0.9}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 5, validation_fraction: 0.2}
resources: {workers: 2, parameter_servers: 1, cpus_per_worker: 0.5}
seed: 2
"""
DRIVER = """
import json, sys
import ray
from chainrule.spec_file import load_job_spec
from scheduler.training import train_job
result = train_job(load_job_spec(sys.argv[1]), ray_address=sys.argv[2])
print(json.dumps({
    "steps": result.steps,
    "accuracy": result.final_evaluation.accuracy,
    "actor_nodes": result.actor_nodes,
    "alive_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
}))
"""


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
        """SIGTERM every process of our groups (all, or the ones given), SIGKILL what is left
        after a grace period."""
        groups = set(self.groups) if groups is None else groups
        for signum, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self.processes(groups):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.processes(groups) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.processes(groups):
                return


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


def test_a_driver_joins_the_cluster_by_address_and_trains_on_both_nodes(two_node_cluster,
                                                                         tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    run = subprocess.run([sys.executable, "-c", DRIVER, str(spec), two_node_cluster.address],
                         env=two_node_cluster.environment, cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(result["alive_nodes"]) == 2
    assert result["steps"] == 20  # 120 training samples / 32 per batch = 4 steps x 5 epochs
    assert result["accuracy"] > 0.8
    workers = result["actor_nodes"]["workers"]
    assert set(workers) == set(result["alive_nodes"])  # one worker on each node
    assert set(result["actor_nodes"]["shards"]) <= set(result["alive_nodes"])


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
