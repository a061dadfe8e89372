"""The embedded Ray instance is this machine's alone: every process it starts listens on
loopback only, and it refuses callers without its token, which is private to the process that
started it, even when the environment asked for token authentication to be off."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
import ray
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from scheduler import ray_cluster

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def auth_disabled_in_environment():
    """The environment says RAY_AUTH_MODE=disabled and names a shared token: the embedded
    instance must ignore both."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.setenv("RAY_AUTH_TOKEN", "a-token-everyone-knows")
        yield


@pytest.fixture(scope="module")
def embedded_ray(auth_disabled_in_environment, local_ray):
    # One call through a worker, so that the worker processes are up and listening too.
    assert ray.get(ray.remote(lambda: 1).remote()) == 1


def descendants(pid: int) -> set[int]:
    """`pid` and every process under it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat_line = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat_line[stat_line.rindex(")") + 2:].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def listening_sockets(pids: set[int]) -> list[tuple[str, str]]:
    """(local address, process) of every TCP and UDP socket the processes listen on."""
    output = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True,
                            check=True).stdout
    sockets = []
    for line in output.splitlines():
        owners = [pid for pid in pids if f"pid={pid}," in line]
        if owners:
            fields = line.split()
            sockets.append((fields[4], line[line.index("users:"):]))
    return sockets


def is_loopback(local_address: str) -> bool:
    host = local_address.rsplit(":", 1)[0].strip("[]")
    return host.startswith(("127.", "::ffff:127.")) or host == "::1"


def test_every_process_of_the_embedded_instance_listens_on_loopback_only(embedded_ray):
    ray_processes = descendants(os.getpid())
    sockets = listening_sockets(ray_processes)
    names = " ".join(owner for _, owner in sockets)
    for name in ("gcs_server", "raylet", "ray::IDLE", "DashboardA", "RuntimeEnv"):
        assert name in names, f"{name} not found listening: the check would miss it"
    exposed = [(address, owner) for address, owner in sockets if not is_loopback(address)]
    assert not exposed, exposed
    assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"


def test_the_token_is_private_to_this_process_in_a_0600_file_in_a_0700_folder(embedded_ray):
    path = ray_cluster.private_token_path()
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert path != Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_text()) == 64


def test_the_gcs_refuses_a_call_without_the_token_even_though_the_environment_disabled_auth(
        embedded_ray):
    address = ray.get_runtime_context().gcs_address
    token = ray_cluster.private_token_path().read_text()
    with grpc.insecure_channel(address) as channel:
        node_info = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        request = gcs_service_pb2.GetClusterIdRequest()
        for metadata in ([], [("authorization", "Bearer a-token-everyone-knows")]):
            with pytest.raises(grpc.RpcError) as refused:
                node_info.GetClusterId(request, metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = node_info.GetClusterId(request, timeout=10,
                                       metadata=[("authorization", f"Bearer {token}")])
        assert reply.cluster_id
