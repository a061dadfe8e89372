"""Where a job's actors go: one placement group reserving a bundle per worker and per shard.

Workers get the CPUs (their forward/backward is the work); a parameter-server shard works only
while the workers wait for it, so it reserves a token fraction of a CPU. Each bundle may also
reserve memory (Ray's `memory` resource). The service's queue names the node of every bundle
(the scheduling policy's choice): each bundle is pinned there with a label selector on Ray's
node-id label, so what the policy counts as taken is what Ray reserves. Without nodes (a run
outside the service), the bundles are spread across several nodes, else packed on the one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from scheduler.ray_cluster import alive_nodes, cluster_cpus

PARAMETER_SERVER_CPUS = 0.01
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node's label with its own id (Ray 2.49 and later)


NODE_CHECK_SECONDS = 1.0  # while a pinned group waits: how often its nodes are looked at


class PlacementError(RuntimeError):
    """The cluster cannot hold the job's actors."""


class NodeGone(PlacementError):
    """A node the job's bundles were pinned to left before they were placed: the bundles
    would wait for it forever. Not the job's fault: it can be placed again elsewhere."""


@dataclass(frozen=True)
class Placement:
    group: PlacementGroup
    workers: int
    shards: int
    worker_cpus: float
    strategy: str
    worker_memory_bytes: int = 0
    shard_memory_bytes: int = 0

    @property
    def blas_threads(self) -> int:
        return max(1, math.floor(self.worker_cpus + 1e-9))

    def worker_options(self, index: int) -> dict:
        return {"num_cpus": self.worker_cpus, **_memory(self.worker_memory_bytes),
                "scheduling_strategy": self._bundle(index)}

    def shard_options(self, index: int) -> dict:
        return {"num_cpus": PARAMETER_SERVER_CPUS, **_memory(self.shard_memory_bytes),
                "scheduling_strategy": self._bundle(self.workers + index)}

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index
        )

    def release(self) -> None:
        remove_placement_group(self.group)


def reserve(workers: int, shards: int, cpus_per_worker: float = 0.0, strategy: str = "",
            timeout_seconds: float = 30.0, *, worker_memory_bytes: int = 0,
            shard_memory_bytes: int = 0, nodes: Sequence[str] | None = None) -> Placement:
    """Reserve bundles for `workers` workers and `shards` shards, or raise PlacementError.

    cpus_per_worker 0 shares the cluster's CPUs evenly among the workers (at most 1 each).
    strategy "" picks SPREAD on a multi-node cluster and PACK on one node. `nodes`: the node
    id of each bundle, workers first, each bundle pinned to its node.
    """
    total = cluster_cpus()
    if cpus_per_worker <= 0:
        cpus_per_worker = min(1.0, (total - shards * PARAMETER_SERVER_CPUS) / workers)
        cpus_per_worker = math.floor(cpus_per_worker * 1000) / 1000  # Ray's resource precision
    needed = workers * cpus_per_worker + shards * PARAMETER_SERVER_CPUS
    if cpus_per_worker <= 0 or needed > total + 1e-9:
        raise PlacementError(
            f"{workers} workers x {cpus_per_worker} CPU and {shards} shards need {needed:.2f} "
            f"CPUs; the cluster has {total:g}"
        )
    if not strategy:
        strategy = "SPREAD" if len(alive_nodes()) > 1 else "PACK"
    bundles = ([_bundle(cpus_per_worker, worker_memory_bytes)] * workers
               + [_bundle(PARAMETER_SERVER_CPUS, shard_memory_bytes)] * shards)
    if nodes is not None and len(nodes) != len(bundles):
        raise ValueError(f"{len(nodes)} nodes for {len(bundles)} bundles")
    selectors = None if nodes is None else [{NODE_ID_LABEL: node} for node in nodes]
    group = placement_group(bundles, strategy=strategy, bundle_label_selector=selectors)
    try:
        _wait_until_placed(group, nodes, timeout_seconds)
    except PlacementError:
        remove_placement_group(group)
        raise
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        where = f" on nodes {', '.join(sorted(set(nodes)))}" if nodes is not None else ""
        raise PlacementError(
            f"no room for {workers} workers and {shards} shards ({strategy}){where} within "
            f"{timeout_seconds:g} s"
        ) from None
    return Placement(group, workers, shards, cpus_per_worker, strategy, worker_memory_bytes,
                     shard_memory_bytes)


def _wait_until_placed(group: PlacementGroup, nodes: Sequence[str] | None,
                       timeout_seconds: float) -> None:
    """Until Ray has reserved every bundle; NodeGone as soon as a node a bundle is pinned to
    is no longer alive; GetTimeoutError after `timeout_seconds`."""
    ready = group.ready()
    deadline = time.monotonic() + timeout_seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ray.exceptions.GetTimeoutError("placement group not ready")
        if ray.wait([ready], timeout=min(NODE_CHECK_SECONDS, left))[0]:
            ray.get(ready)
            return
        if nodes is not None:
            gone = set(nodes) - {node["NodeID"] for node in alive_nodes()}
            if gone:
                raise NodeGone(f"node(s) {', '.join(sorted(gone))} left before the job's "
                               f"actors were placed there")


def _bundle(cpus: float, memory_bytes: int) -> dict[str, float]:
    return {"CPU": cpus, "memory": float(memory_bytes)} if memory_bytes else {"CPU": cpus}


def _memory(memory_bytes: int) -> dict[str, int]:
    """An actor's `memory` option: the bundle's memory, claimed by the actor in it."""
    return {"memory": memory_bytes} if memory_bytes else {}
