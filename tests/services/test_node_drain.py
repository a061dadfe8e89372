"""Draining a node through the API (DrainNode, `chainrule drain`), on a real two-node Ray cluster
(ray.cluster_utils.Cluster) under a real server: the jobs with actors on the node checkpoint at
their next step boundary, go back to QUEUED and resume on the other node with the bits of an
undisturbed run; nothing new is placed on the node until it is undrained. Only admins may."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray
from ray.cluster_utils import Cluster

from chainrule.client import Client, state_name
from services import cli
from services.server import serve
from tests.chaos.recovery_report import report_recovery
from tests.services.helpers import (
    assert_same_weights,
    downloaded,
    events,
    iris_spec,
    rpc_error,
    wait_until_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ADMIN_TOKEN = "admin-token-0123456789"
USER_TOKEN = "alice-token-0123456789"
HELD_AT_STEP = 12  # of 60


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, include_dashboard=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def server(two_nodes, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"ops {ADMIN_TOKEN} role=admin\nalice {USER_TOKEN}\n")
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens)
    yield running
    running.stop()


class StepGate:
    """An observer that holds the job's thread after step `at`, between steps (where drains
    and shutdowns are seen), until released: the drain lands mid-run however fast the job.
    Then it notes the steps reported, when the first came, and where the actors of the run
    that computed it are."""

    def __init__(self, queue, at: int):
        self.queue, self.at = queue, at
        self.reached, self.release = threading.Event(), threading.Event()
        self.job_id = ""
        self.steps_after: list[int] = []
        self.resumed_at = 0.0  # time.monotonic() of the first step after the release
        self.next_run_nodes: set[str] | None = None

    def job_step(self, job_id: str, record) -> None:
        if not self.reached.is_set():
            if record.step == self.at:
                self.job_id = job_id
                self.reached.set()
                self.release.wait(300)
            return
        if job_id != self.job_id:
            return
        if not self.steps_after:
            self.resumed_at = time.monotonic()
            self.next_run_nodes = self.queue.actor_nodes(job_id)
        self.steps_after.append(record.step)


def spec():
    return iris_spec(epochs=15, resources={"workers": 1, "parameter_servers": 1})


def test_a_drained_job_resumes_on_the_other_node_with_the_undisturbed_weights(
        server, tmp_path):
    with Client(server.address, ADMIN_TOKEN, timeout=30) as admin:
        undisturbed = admin.submit(spec())
        done = wait_until_done(admin, undisturbed.id, timeout=300)
        assert state_name(done.state) == "SUCCEEDED", done.error
        expected = downloaded(admin, undisturbed.id, tmp_path)

        gate = StepGate(server.queue, HELD_AT_STEP)
        server.queue.observers.append(gate)
        try:
            job = admin.submit(spec())
            assert gate.reached.wait(300)
            [node, *_] = sorted(server.queue.actor_nodes(job.id) or ())
            drained_at = time.monotonic()
            drained = admin.drain_node(node)
        finally:
            gate.release.set()
        assert list(drained.node_ids) == [node] and list(drained.job_ids) == [job.id]
        done = wait_until_done(admin, job.id, timeout=300)
        assert state_name(done.state) == "SUCCEEDED", done.error
        states = [payload["state"] for payload in events(server, job.id, "state")]
        assert states[:4] == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"], states
        recoveries = [payload for payload in events(server, job.id, "recovery")
                      if payload.get("kind") == "node_drained"]
        assert len(recoveries) == 1 and node in recoveries[0]["message"], recoveries
        # The run after the drain placed nothing on the node and resumed from the stop's
        # checkpoint, at the step it stopped at: no step was lost or trained twice. It ended
        # with the bits of the undisturbed run.
        assert gate.next_run_nodes and node not in gate.next_run_nodes
        assert gate.steps_after == list(range(HELD_AT_STEP + 1, 61))
        assert_same_weights(downloaded(admin, job.id, tmp_path), expected)
        report_recovery("node drained", gate.resumed_at - drained_at, 0, recoveries[0]["message"])

        undrained = admin.drain_node(node, undrain=True)
        assert list(undrained.node_ids) == [node] and not server.queue.drained_nodes()


def test_draining_is_for_admins_and_names_a_live_node(server, capsys):
    with Client(server.address, USER_TOKEN, timeout=30) as user:
        denied = rpc_error(lambda: user.drain_node(ray.nodes()[0]["NodeID"]))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role=admin" in denied.details()
    assert not server.queue.drained_nodes()
    with Client(server.address, ADMIN_TOKEN, timeout=30) as admin:
        unknown = rpc_error(lambda: admin.drain_node("10.9.9.9"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert unknown.details().startswith("node: no live node has the id or address "
                                            "'10.9.9.9'")
        empty = rpc_error(lambda: admin.drain_node(" "))
        assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert empty.details().startswith("node: ")
    # The command, by address: every node at it (here both raylets share this host's IP).
    address = ray.nodes()[0]["NodeManagerAddress"]
    arguments = ["--server", server.address]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHAINRULE_TOKEN", ADMIN_TOKEN)
        assert cli.main(["drain", address, *arguments]) == 0
        assert len(server.queue.drained_nodes()) == 2
        assert cli.main(["drain", address, "--undrain", *arguments]) == 0
    assert not server.queue.drained_nodes()
    output = capsys.readouterr().out
    assert "nothing new is placed there; jobs stopping at their next step boundary to queue " \
           "again: none" in output
    assert "jobs may be placed there again" in output
