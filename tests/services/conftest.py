"""The service tests run against a real server on a free loopback port, with real embedded Ray
(one Ray per test module, as in tests/scheduler)."""

import pytest

from services.server import serve


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), max_concurrent_jobs=2)
    yield running
    running.stop()
