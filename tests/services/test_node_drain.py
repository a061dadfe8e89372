"""Draining a node through the API (DrainNode, `chainrule drain`), on a real two-node Ray cluster
(ray.cluster_utils.Cluster) under a real server: the jobs with actors on the node checkpoint at
their next step boundary, go back to QUEUED and resume on the other node with the bits of an
undisturbed run; nothing new is placed on the node until it is undrained. Only admins may."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import pytest
import ray
from ray.cluster_utils import Cluster

from chainrule.client import Client, state_name
from scheduler.job_states import RUNNING
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


class RunWatcher:
    """An observer of the queue: each job's runs (a run starts at each RUNNING), with the
    steps each reported, when its first step came and where its actors were then."""

    def __init__(self, queue):
        self.queue = queue
        self.runs: dict[str, list[list[int]]] = collections.defaultdict(list)
        self.first_steps: dict[str, list[tuple[float, set[str]]]] = collections.defaultdict(
            list)
        self.stepping = threading.Event()  # a run reported a step

    def job_state_changed(self, job_id: str, state: str) -> None:
        if state == RUNNING:
            self.runs[job_id].append([])

    def job_step(self, job_id: str, record) -> None:
        steps = self.runs[job_id][-1]
        if not steps:
            self.first_steps[job_id].append((time.monotonic(),
                                             self.queue.actor_nodes(job_id) or set()))
        steps.append(record.step)
        self.stepping.set()


def spec():
    # 800 steps of a few ms: a drain asked for after the first steps are seen lands mid-run
    # (the runner is stopped within a poll of the server, 0.1 s) with seconds to spare.
    return iris_spec(epochs=200, resources={"workers": 1, "parameter_servers": 1})


TOTAL_STEPS = 800


def test_a_drained_job_resumes_on_the_other_node_with_the_undisturbed_weights(
        server, tmp_path):
    with Client(server.address, ADMIN_TOKEN, timeout=30) as admin:
        undisturbed = admin.submit(spec())
        done = wait_until_done(admin, undisturbed.id, timeout=300)
        assert state_name(done.state) == "SUCCEEDED", done.error
        expected = downloaded(admin, undisturbed.id, tmp_path)

        watcher = RunWatcher(server.queue)
        server.queue.observers.append(watcher)
        job = admin.submit(spec())
        assert watcher.stepping.wait(300)
        [node, *_] = sorted(server.queue.actor_nodes(job.id) or ())
        drained_at = time.monotonic()
        drained = admin.drain_node(node)
        assert list(drained.node_ids) == [node] and list(drained.job_ids) == [job.id]
        done = wait_until_done(admin, job.id, timeout=300)
        assert state_name(done.state) == "SUCCEEDED", done.error
        states = [payload["state"] for payload in events(server, job.id, "state")]
        assert states[:4] == ["QUEUED", "RUNNING", "QUEUED", "RUNNING"], states
        recoveries = [payload for payload in events(server, job.id, "recovery")
                      if payload.get("kind") == "node_drained"]
        assert len(recoveries) == 1 and node in recoveries[0]["message"], recoveries
        # The run after the drain placed nothing on the node and resumed from the stop's
        # checkpoint at the step after the stop: no step was lost or trained twice. It ended
        # with the bits of the undisturbed run.
        stopped, resumed = watcher.runs[job.id]
        assert stopped[-1] < TOTAL_STEPS
        assert stopped + resumed == list(range(1, TOTAL_STEPS + 1))
        _, (resumed_at, resumed_nodes) = watcher.first_steps[job.id]
        assert resumed_nodes and node not in resumed_nodes
        assert_same_weights(downloaded(admin, job.id, tmp_path), expected)
        report_recovery("node drained", resumed_at - drained_at, 0, recoveries[0]["message"])

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
