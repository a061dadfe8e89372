"""Several Ray nodes (separate raylets on this machine, via ray.cluster_utils.Cluster): actors
spread across them, and the weights are those of a one-node run."""

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner

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


def train(workers: int, shards: int, transport: str = "auto"):
    spec = load_job_spec(SPEC)
    dataset = split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                    spec.data.validation_fraction, True, spec.seed)
    return JobRunner.for_spec(spec, dataset, workers=workers, parameter_servers=shards,
                              transport=transport).run()


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
