"""Isolation: what a tenant names never becomes a path, and what the server keeps is its own.

Over a real server and real gRPC channels: a job's shared-memory folder is named by its job id
(the spec's name is the tenant's choice: `evil/../../../x` once put a job's arrays and pipes
outside /dev/shm); a tenant's priority is capped by the server's configuration."""

from __future__ import annotations

import grpc
import pytest

from chainrule.client import Client, state_name
from services.auth import load_tokens
from services.server import serve
from services.validation import Limits
from tests.services.helpers import iris_spec, rpc_error, wait_for, wait_until_done
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


# --- priority ---------------------------------------------------------------------------------

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


@pytest.fixture(scope="module")
def tenant_server(local_ray, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("config") / "tokens"
    tokens.write_text(f"alice {ALICE} max_priority=5\nbob {BOB}\n")
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens,
                    limits=Limits(max_priority=1))
    yield running
    running.stop()


@pytest.mark.parametrize("token, cap", [(ALICE, 5), (BOB, 1)])
def test_a_priority_above_the_tenants_cap_is_refused_naming_priority(tenant_server, token, cap):
    with Client(tenant_server.address, token=token) as client:
        before = [job.id for job in client.jobs()]
        error = rpc_error(lambda: client.submit(iris_spec(priority=cap + 1)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(f"priority: must be at most {cap} for tenant ")
        assert f"got {cap + 1}" in error.details()
        assert [job.id for job in client.jobs()] == before
        for priority in (cap, -7):  # at the cap, and below anyone's: accepted
            job = client.submit(iris_spec(priority=priority))
            assert client.get(job.id).spec.priority == priority
            client.cancel(job.id)


@pytest.mark.parametrize("line, message", [
    (f"alice {ALICE} max_priority=high", "max_priority=N"),
    (f"alice {ALICE} max_priority=2147483648", "max_priority=N"),
    (f"alice {ALICE} priority=3", "max_priority=N"),
    (f"alice {ALICE} max_priority=3\nalice {BOB} max_priority=4", "earlier line"),
])
def test_a_malformed_priority_cap_in_the_token_file_is_refused_naming_the_line(
        tmp_path, line, message):
    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_tokens(tokens)


def test_the_token_file_maps_tokens_to_tenants_and_tenants_to_their_caps(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# tenant token [max_priority=N]\nalice {ALICE} max_priority=-2\n"
                      f"bob {BOB}\n")
    loaded = load_tokens(tokens)
    assert loaded.tenants == {ALICE: "alice", BOB: "bob"}
    assert loaded.max_priority == {"alice": -2}
