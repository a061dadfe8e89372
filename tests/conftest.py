"""Fixtures shared by every test folder."""

import pytest
import ray

from chainrule.client import Client
from scheduler import ray_cluster


@pytest.fixture(scope="module")
def local_ray():
    """Real embedded Ray, one instance per test module (modules that need a cluster of their
    own, e.g. ray.cluster_utils.Cluster, shut it down first)."""
    if ray.is_initialized():
        ray.shutdown()
    ray_cluster.connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def client(server):
    """A client of the `server` fixture of the requesting test's module or folder (each
    defines its own, with the options it tests)."""
    with Client(server.address, timeout=30) as c:
        yield c
