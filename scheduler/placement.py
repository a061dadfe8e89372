"""Where a job's actors go: one placement group reserving a bundle per worker and per shard.

Workers get the CPUs (their forward/backward is the work); a parameter-server shard works only
while the workers wait for it, so it reserves a token fraction of a CPU. With several nodes the
bundles are spread across them, else packed on the one node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from scheduler.ray_cluster import alive_nodes, cluster_cpus

PARAMETER_SERVER_CPUS = 0.01


class PlacementError(RuntimeError):
    """The cluster cannot hold the job's actors."""


@dataclass(frozen=True)
class Placement:
    group: PlacementGroup
    workers: int
    shards: int
    worker_cpus: float
    strategy: str

    @property
    def blas_threads(self) -> int:
        return max(1, math.floor(self.worker_cpus + 1e-9))

    def worker_options(self, index: int) -> dict:
        return {"num_cpus": self.worker_cpus, "scheduling_strategy": self._bundle(index)}

    def shard_options(self, index: int) -> dict:
        return {"num_cpus": PARAMETER_SERVER_CPUS,
                "scheduling_strategy": self._bundle(self.workers + index)}

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index
        )

    def release(self) -> None:
        remove_placement_group(self.group)


def reserve(workers: int, shards: int, cpus_per_worker: float = 0.0, strategy: str = "",
            timeout_seconds: float = 30.0) -> Placement:
    """Reserve bundles for `workers` workers and `shards` shards, or raise PlacementError.

    cpus_per_worker 0 shares the cluster's CPUs evenly among the workers (at most 1 each).
    strategy "" picks SPREAD on a multi-node cluster and PACK on one node.
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
    bundles = ([{"CPU": cpus_per_worker}] * workers
               + [{"CPU": PARAMETER_SERVER_CPUS}] * shards)
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=timeout_seconds)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise PlacementError(
            f"no room for {workers} workers and {shards} shards ({strategy}) within "
            f"{timeout_seconds:g} s"
        ) from None
    return Placement(group, workers, shards, cpus_per_worker, strategy)
