"""What a job's spec asks the cluster for: a bundle per worker and per shard."""

from __future__ import annotations

from chainrule.v1 import job_pb2
from scheduler.job_resources import cpus_per_worker, job_bundles
from scheduler.scheduling_policy import Bundle


def _resources(**fields) -> job_pb2.ResourceSpec:
    return job_pb2.ResourceSpec(**fields)


def test_the_cpus_asked_for_are_taken_as_asked_whatever_the_cluster():
    assert cpus_per_worker(_resources(cpus_per_worker=1.5), cluster_cpus=2.0) == 1.5
    assert job_bundles(_resources(workers=2, parameter_servers=1, cpus_per_worker=1.5), 2.0) == (
        Bundle(1.5), Bundle(1.5), Bundle(0.01))


def test_by_default_a_job_takes_one_cpu_per_worker_its_shards_token_cpus_included():
    assert cpus_per_worker(_resources(), cluster_cpus=64.0) == 0.99  # 1 worker, 1 shard
    assert cpus_per_worker(_resources(workers=2, parameter_servers=2), 64.0) == 0.99
    bundles = job_bundles(_resources(workers=4, parameter_servers=2), 64.0)
    assert round(sum(bundle.cpus for bundle in bundles), 6) == 4.0  # 4 x 0.995 + 2 x 0.01


def test_by_default_a_job_with_more_workers_than_cpus_shares_the_cluster():
    assert cpus_per_worker(_resources(workers=4), cluster_cpus=2.0) == 0.497  # (2 - 0.01) / 4
    assert sum(b.cpus for b in job_bundles(_resources(workers=4), 2.0)) <= 2.0


def test_memory_asked_for_is_in_every_workers_and_every_shards_bundle():
    resources = _resources(workers=2, parameter_servers=1, cpus_per_worker=1.0,
                           memory_bytes_per_worker=3 << 30, memory_bytes_per_shard=1 << 20)
    assert job_bundles(resources, 8.0) == (Bundle(1.0, 3 << 30), Bundle(1.0, 3 << 30),
                                           Bundle(0.01, 1 << 20))
