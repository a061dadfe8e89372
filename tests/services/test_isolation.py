"""Isolation: what a tenant names never becomes a path, and what the server keeps is its own.

Over a real server and real gRPC channels: a job's shared-memory folder is named by its job id
(the spec's name is the tenant's choice: `evil/../../../x` once put a job's arrays and pipes
outside /dev/shm)."""

from __future__ import annotations

import pytest

from chainrule.client import Client, state_name
from services.server import serve
from tests.services.helpers import iris_spec, wait_for, wait_until_done
from worker.shared_memory import SharedArrayGroup, shared_root

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with Client(server.address, timeout=30) as c:
        yield c


def test_a_running_jobs_shared_memory_folder_is_named_by_its_job_id_only(client):
    spec = iris_spec(name="tenant-chosen-name", epochs=500)
    spec.data.batch_size = 8  # 7,500 steps: running for as long as the test looks
    job = client.submit(spec)
    try:
        folders = wait_for(lambda: [p.name for p in shared_root().glob(f"chainrule-{job.id}-*")],
                           timeout=120, what=f"{job.id}'s shared-memory folder")
        assert state_name(client.get(job.id).state) == "RUNNING"
        assert len(folders) == 1
        assert not list(shared_root().glob("*tenant-chosen-name*"))
    finally:
        client.cancel(job.id)
    wait_until_done(client, job.id)
    assert not list(shared_root().glob(f"chainrule-{job.id}-*"))  # removed with the job


@pytest.mark.parametrize("job_id", ["a/b", "evil/../../../x", "..", ""])
def test_a_shared_memory_folder_refuses_anything_but_a_job_id(job_id):
    with pytest.raises(ValueError, match="not a job id"):
        SharedArrayGroup(job_id)
