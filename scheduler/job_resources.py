"""What a job asks the cluster for: one bundle per worker (its CPUs and memory) and one per
parameter-server shard (a token CPU and its memory), as its spec's `resources` say. The queue
places these bundles (the scheduling policy) and the runner reserves the same ones in a Ray
placement group, on the nodes the policy chose.
"""

from __future__ import annotations

import math

from chainrule.v1 import job_pb2
from scheduler.placement import PARAMETER_SERVER_CPUS
from scheduler.scheduling_policy import Bundle

RAY_RESOURCE_PRECISION = 1000  # Ray keeps resource amounts to 1/1000


def worker_and_shard_counts(resources: job_pb2.ResourceSpec) -> tuple[int, int]:
    """0 means 1 for both, as job.proto says."""
    return resources.workers or 1, resources.parameter_servers or 1


def cpus_per_worker(resources: job_pb2.ResourceSpec, cluster_cpus: float) -> float:
    """The spec's CPUs per worker, or by default about one each: the job takes one CPU per
    worker in all, its shards' token CPUs included (so a 1-worker job takes 1 CPU and two run
    side by side on 2), or the whole cluster shared among its workers when it has fewer CPUs
    than the job has workers."""
    if resources.cpus_per_worker > 0:
        return resources.cpus_per_worker
    workers, shards = worker_and_shard_counts(resources)
    share = (min(float(workers), cluster_cpus) - shards * PARAMETER_SERVER_CPUS) / workers
    return max(math.floor(share * RAY_RESOURCE_PRECISION) / RAY_RESOURCE_PRECISION,
               1 / RAY_RESOURCE_PRECISION)


def job_bundles(resources: job_pb2.ResourceSpec, cluster_cpus: float) -> tuple[Bundle, ...]:
    """The job's actors' bundles, workers first then shards (the runner's bundle order)."""
    workers, shards = worker_and_shard_counts(resources)
    worker = Bundle(cpus_per_worker(resources, cluster_cpus), resources.memory_bytes_per_worker)
    shard = Bundle(PARAMETER_SERVER_CPUS, resources.memory_bytes_per_shard)
    return (worker,) * workers + (shard,) * shards


def spreads(resources: job_pb2.ResourceSpec) -> bool:
    """Whether the job asked for its actors on different nodes."""
    return resources.placement_strategy in ("SPREAD", "STRICT_SPREAD")
