"""Several Ray nodes (separate raylets on this machine, via ray.cluster_utils.Cluster): actors
spread across them, and the weights are those of a one-node run; bundles go to the nodes the
scheduling policy chose; a node lost on the object-store path is found within 3 s and costs
nothing but its worker."""

import os
import signal
import time

import numpy as np
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner
from scheduler.placement import NodeGone, reserve
from tests.chaos.recovery_report import report_recovery

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SPEC = """
name: multinode
model: {layers: [{linear: {out_features: 16}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1, momentum: 0.9}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 4, validation_fraction: 0.2,
       micro_batches: 2}
seed: 3
"""


def runner(workers: int, shards: int, transport: str = "auto", step_deadline_floor: float = 0,
           **options) -> JobRunner:
    spec = load_job_spec(SPEC)
    spec.resources.step_deadline.floor_seconds = step_deadline_floor  # 0: the default
    dataset = split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                    spec.data.validation_fraction, True, spec.seed)
    return JobRunner.for_spec(spec, dataset, workers=workers, parameter_servers=shards,
                              transport=transport, **options)


LOST_NODE_PIDS: list[int] = []


def train(workers: int, shards: int, transport: str = "auto"):
    return runner(workers, shards, transport).run()


@pytest.fixture(scope="module")
def one_node_result():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    result = train(2, 1)
    ray.shutdown()
    return result


@pytest.fixture(scope="module")
def three_nodes(one_node_result):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    for pid in LOST_NODE_PIDS:  # stopped by the lost-node test: the node is gone for good
        os.kill(pid, signal.SIGKILL)
    cluster.shutdown()


@pytest.mark.parametrize("transport", ["auto", "object_store"])
def test_workers_and_shards_spread_over_three_nodes_give_the_one_node_weights(
        one_node_result, three_nodes, transport):
    # "auto" finds every node on this host and uses shared memory; "object_store" is the
    # path actors on separate machines take.
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    result = train(2, 1, transport)
    nodes = result.actor_nodes["workers"] + result.actor_nodes["shards"]
    assert len(set(nodes)) == 3, nodes  # every actor on its own node
    for key, value in one_node_result.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


@ray.remote(num_cpus=0)
class NodeReporter:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def test_bundles_are_pinned_to_the_nodes_the_policy_chose_with_their_memory(three_nodes):
    # SPREAD alone would put the two workers on two nodes; the policy's nodes say otherwise.
    head = three_nodes.head_node.node_id
    first, second = [n.node_id for n in three_nodes.list_all_nodes() if n.node_id != head]
    chosen = (second, second, first)  # 2 workers of 0.4 CPU, then the shard
    placement = reserve(2, 1, 0.4, "SPREAD", 60, worker_memory_bytes=64 << 20,
                        shard_memory_bytes=1 << 20, nodes=chosen)
    try:
        table = placement_group_table(placement.group)
        assert tuple(table["bundles_to_node_id"][index] for index in range(3)) == chosen
        assert [bundle.get("memory") for bundle in table["bundles"].values()] == [
            64 << 20, 64 << 20, 1 << 20]
        # An actor in a bundle claims its memory, and runs on the bundle's node.
        reporter = NodeReporter.options(**placement.worker_options(1)).remote()
        assert ray.get(reporter.node.remote(), timeout=60) == second
        ray.kill(reporter)
    finally:
        placement.release()
    # A node that is not (or no longer) alive: found gone at once, not waited for until the
    # timeout; the queue places the job again (tests/services/test_job_queue.py).
    started = time.monotonic()
    with pytest.raises(NodeGone, match=f"node\\(s\\) {'ab' * 28} left before"):
        reserve(1, 1, 0.4, timeout_seconds=60, nodes=("ab" * 28,) * 2)
    assert time.monotonic() - started < 30


def test_a_lost_node_is_found_within_3_s_and_the_weights_are_the_one_node_ones(
        one_node_result, three_nodes):
    # A node lost as a machine that hangs or drops off the network is: its raylet and every
    # process it started stop (a real SIGSTOP), so nothing answers and no connection is refused.
    # Ray's own heartbeat declares such a node dead after ~15 s, and the step's deadline here
    # is a minute (as for a job of slow steps): only the runner's heartbeats
    # (worker/transport/liveness.py) find it in time. (Processes SIGKILLed on this machine
    # refuse connections, which Ray reports at once as a dead actor; a SIGKILL of the raylet
    # alone leaves its workers computing, small results not passing through it.) Runs last:
    # the node stays lost.
    lost_after_step = 6  # of 16
    lost_at: list[float] = []
    steps_at: list[float] = []  # when each step after the loss ended
    recoveries: list[tuple[float, str, str]] = []
    job = runner(2, 1, "object_store", step_deadline_floor=60.0,
                 on_recovery=lambda record: recoveries.append(
                     (time.monotonic(), record.kind, record.message)))
    head = three_nodes.head_node

    def lose_a_workers_node(record):
        if lost_at:
            steps_at.append(time.monotonic())
        if record.step != lost_after_step or lost_at:
            return
        nodes = job.actor_nodes
        node = next(n for n in three_nodes.list_all_nodes() if n is not head
                    and n.node_id in nodes["workers"] and n.node_id not in nodes["shards"])
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        for process in [raylet, *raylet.children(recursive=True)]:
            os.kill(process.pid, signal.SIGSTOP)
            LOST_NODE_PIDS.append(process.pid)
        lost_at.append(time.monotonic())

    job.on_step = lose_a_workers_node
    result = job.run()

    lost = [(at, message) for at, kind, message in recoveries if kind == "worker_lost"]
    assert len(lost) == 1, recoveries
    found_at, message = lost[0]
    report_recovery("lost node (object store)", steps_at[0] - lost_at[0], 0,
                    f"found in {found_at - lost_at[0]:.2f} s: {message}")
    assert found_at - lost_at[0] < 3.0, message
    assert "heartbeat" in message and f"step {lost_after_step + 1}" in message
    assert result.steps == one_node_result.steps and result.history.worker_failures == 1
    for key, value in one_node_result.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key
