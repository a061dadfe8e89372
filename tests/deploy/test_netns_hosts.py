"""Hosts on a real network (deploy/netns_hosts.py): three network namespaces with their own
hostnames and addresses, links capped by tc, a Ray node on each. A job spread over them takes
the cross-host path (direct connections between workers and shards) and gives the bits of one
host, and a host whose raylet is killed or that drops off the network mid-job is found within
seconds, at no cost to the weights.

Runs as root (CI does); everything it makes is torn down even when a test fails."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.chaos.recovery_report import report_recovery
from tests.deploy.conftest import DEPLOY, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

_spec = importlib.util.spec_from_file_location("netns_hosts", DEPLOY / "netns_hosts.py")
assert _spec is not None and _spec.loader is not None
netns_hosts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns_hosts)

DRIVER = [sys.executable, "-m", "tests.deploy.netns_driver"]


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def train(command: list[str], env: dict[str, str] | None = None,
          timeout: float = 180.0) -> list[dict]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return lines(done.stdout)


@pytest.fixture(scope="module")
def one_host_digest() -> str:
    return train([*DRIVER, "--workers", "1"])[-1]["digest"]


@pytest.fixture(scope="module")
def hosts():
    made = netns_hosts.Hosts(3, rate="200mbit")
    try:
        yield made.up()
    finally:
        made.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert made.prefix not in left


@pytest.fixture(scope="module")
def cluster(hosts):
    ray = netns_hosts.RayOnHosts(hosts, cpus_per_host=2)
    try:
        yield ray.up()
    finally:
        ray.down()


def on_host(cluster, host: int, *arguments: str) -> list[str]:
    return cluster.hosts.command(host, [*DRIVER, "--address", cluster.address, *arguments])


def test_each_host_has_its_own_name_and_address_and_a_capped_link(hosts):
    names = {hosts.run(i, ["hostname"], capture_output=True, text=True).stdout.strip()
             for i in range(3)}
    assert names == {hosts.hostname(i) for i in range(3)} and socket.gethostname() not in names
    # 4 MiB from host 1 to host 0 over a 200 Mbit/s link takes at least 0.16 s.
    receiver = hosts.start(0, [sys.executable, "-c", (
        "import socket, time; s = socket.create_server(('0.0.0.0', 7001)); c, _ = s.accept();"
        "n = 0\nwhile (b := c.recv(1 << 20)): n += len(b)\nprint(n)")],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    began = time.monotonic()
    hosts.run(1, [sys.executable, "-c", (
        f"import socket; c = socket.create_connection(('{hosts.address(0)}', 7001));"
        "c.sendall(bytes(4 << 20)); c.close()")], check=True, timeout=30)
    received, _ = receiver.communicate(timeout=30)
    elapsed = time.monotonic() - began
    assert int(received) == 4 << 20
    assert elapsed >= 4 * 8 * 2**20 / 200e6


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers_spread_over_hosts_give_the_bits_of_one_host(cluster, one_host_digest,
                                                             workers):
    out = train(on_host(cluster, 0, "--workers", str(workers)), cluster.env)
    placed = next(line for line in out if "workers" in line)
    assert placed["transport"] == "DirectTransport"
    assert len(set(placed["workers"] + placed["shards"])) >= min(workers + 1, 3)
    assert out[-1]["digest"] == one_host_digest


def run_with_a_lost_host(cluster, workers: int, lose) -> tuple[list[dict], float]:
    """A job whose host with a worker and no shard (not the head's) is lost at step 10 by
    `lose(host)`: the driver's JSON lines and when the host was lost."""
    driver = subprocess.Popen(on_host(cluster, 0, "--workers", str(workers)),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **cluster.env})
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.append(driver.stderr.read()), daemon=True).start()
    assert driver.stdout is not None
    out: list[dict] = []
    lost_at = None
    for raw in driver.stdout:
        if not raw.startswith("{"):
            continue
        out.append(json.loads(raw))
        placed = next((line for line in out if "workers" in line), None)
        if lost_at is None and placed and out[-1].get("step") == 10:
            # A host with a worker and no shard: its loss costs a worker, not the job's state.
            lost = next(ip for ip in placed["workers"]
                        if ip not in placed["shards"] and ip != cluster.hosts.address(0))
            lose(next(i for i in range(3) if cluster.hosts.address(i) == lost))
            lost_at = time.time()
    assert driver.wait(timeout=120) == 0, "".join(stderr)[-3000:]
    assert lost_at is not None, out[-3:]
    return out, lost_at


def steps_trained_again(out: list[dict]) -> int:
    steps = [line["step"] for line in out if "step" in line]
    return len(steps) - len(set(steps))


def test_a_hosts_raylet_killed_mid_job_is_found_within_3_s_and_costs_nothing(cluster,
                                                                             one_host_digest):
    killed: list[int] = []

    def kill_raylet(host: int) -> None:
        os.kill(cluster.raylet_pid(host), signal.SIGKILL)
        killed.append(host)

    try:
        out, killed_at = run_with_a_lost_host(cluster, 4, kill_raylet)
        lost = [line for line in out if line.get("recovery") == "worker_lost"]
        assert lost, out
        report_recovery("a host's raylet SIGKILL (3 namespace hosts)",
                        lost[0]["t"] - killed_at, steps_trained_again(out), lost[0]["message"])
        # Found in the evaluation that follows the kill, which hangs on the dead node's object
        # store, by chainrule's own check (worker/transport/liveness.py): `ray start --block`
        # takes the node's workers down with its raylet, so their heartbeat goes unanswered,
        # and 0.25 s later the raylet's port refuses a connection: lost, in 0.8 s measured at
        # a load of 18. Ray's own report of the dead actor came after 1.7 to 6.6 s (it was the
        # only way this loss was found before; the evaluation's wait had no heartbeats). A
        # worker that outlives its raylet (a plain `ray start`) says so in its heartbeat
        # (tests/worker/transport/test_raylet_watch.py). bench/chaos.py prints the seconds
        # against issue 12's 3 s; bounded here by Ray's own node timeout, halved.
        assert "its raylet is gone, found by its heartbeat" in lost[0]["message"], lost[0]
        assert lost[0]["t"] - killed_at < 15.0
        assert out[-1]["digest"] == one_host_digest
    finally:
        for host in killed:  # the next test needs all three hosts
            cluster.restart_node(host)


def test_a_host_off_the_network_is_found_within_3_s_and_costs_nothing(cluster,
                                                                      one_host_digest):
    # Runs last in this module: the host stays cut off.
    def cut_off(host: int) -> None:
        subprocess.run(["ip", "-n", cluster.hosts.namespace(host), "link", "set",
                        netns_hosts.INTERFACE, "down"], check=True)

    out, cut_at = run_with_a_lost_host(cluster, 2, cut_off)
    lost = [line for line in out if line.get("recovery") == "worker_lost"]
    assert lost, out
    report_recovery("a host off the network (3 namespace hosts)", lost[0]["t"] - cut_at,
                    steps_trained_again(out), lost[0]["message"])
    assert lost[0]["t"] - cut_at < 3.0
    assert out[-1]["digest"] == one_host_digest
