"""Ray for the runtime tests: one embedded instance per test module, started for real."""

import pytest
import ray

from scheduler import ray_cluster


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray_cluster.connect(num_cpus=2)
    yield
    ray.shutdown()
