"""Isolation: what a tenant names never becomes a path, and what the server keeps is its own.

Over a real server and real gRPC channels: a job's shared-memory folder is named by its job id
(the spec's name is the tenant's choice: `evil/../../../x` once put a job's arrays and pipes
outside /dev/shm); the data folder and every file in it are the server's user's alone (they
were world-readable); a unix socket's permissions decide who may call; a tenant's priority is
bounded by the server's configuration: its priority range and its quotas."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from chainrule.client import Client, state_name
from chainrule.v1 import training_service_pb2 as pb
from services.auth import Authenticator, TenantSettings, load_tokens
from services.server import serve
from services.server_config import load_server_config
from services.single_instance import AlreadyInUse
from services.store import Store
from services.validation import Limits
from tests.services.helpers import ROOT, iris_spec, rpc_error, wait_for, wait_until_done
from worker.shared_memory import SharedArrayGroup, shared_root

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def usual_umask():
    """The usual umask (022: files 0644, folders 0755 unless asked otherwise), whatever the
    test runner's, so that a private mode here is the server's doing."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory, usual_umask):
    # A folder the server makes itself (pytest's own are 0700 already).
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data") / "service-data")
    yield running
    running.stop()


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


# --- files and sockets ---------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_folder_is_private_and_every_file_in_it_is_the_server_users_only(
        server, client, tmp_path):
    upload = tmp_path / "points.npz"
    np.savez(upload, x=np.ones((16, 4)), y=np.arange(16) % 2)
    client.upload(upload, "points")
    job = wait_until_done(client, client.submit(iris_spec(epochs=2)).id)
    assert state_name(job.state) == "SUCCEEDED"
    client.download(job.id, tmp_path / "weights.safetensors")
    files = [path for path in server.data_dir.rglob("*") if path.is_file()]
    kinds = {path.suffix for path in files}
    assert {".db", ".npz", ".safetensors", ".json", ".lock"} <= kinds, kinds
    assert _mode(server.data_dir) == 0o700
    wider = {str(path.relative_to(server.data_dir)): oct(_mode(path)) for path in files
             if _mode(path) & 0o077}
    assert wider == {}
    assert any(path.name.startswith("events.out.tfevents.") for path in files)
    for folder in ("checkpoints", "models", "tensorboard"):
        assert _mode(server.data_dir / folder) == 0o700


def test_a_world_readable_data_folder_is_narrowed_at_start(local_ray, tmp_path, usual_umask):
    data = tmp_path / "old-data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    Store(data / "chainrule.db").close()
    (data / "chainrule.db").chmod(0o644)
    running = serve("127.0.0.1:0", data)
    try:
        assert _mode(data) == 0o700
        assert _mode(data / "chainrule.db") == 0o600
    finally:
        running.stop()


@pytest.fixture
def socket_folder():
    """A folder every user may enter (pytest's are 0700), so that only the socket's own mode
    stands between another user and the server."""
    folder = Path(tempfile.mkdtemp(prefix="chainrule-socket-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def _connects_as_nobody(socket_path: Path) -> bool:
    """Whether another user (nobody, uid 65534) can open a connection to the socket."""
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
    done = subprocess.run(["/usr/bin/python3", "-c", probe, str(socket_path)],
                          user=65534, group=65534, capture_output=True, timeout=30)
    assert done.returncode in (0, 13), done.stderr
    return done.returncode == 0


@pytest.mark.parametrize("mode, others_may_call", [(0o600, False), (0o666, True)])
def test_a_unix_socket_serves_and_its_file_mode_decides_who_may_call(
        local_ray, tmp_path, socket_folder, usual_umask, mode, others_may_call):
    path = socket_folder / "chainrule.sock"
    running = serve(f"unix:{path}", tmp_path / "data", socket_mode=mode)
    try:
        assert running.address == f"unix:{path}"
        assert _mode(path) == mode
        with Client(running.address, timeout=10) as client:
            assert client.submit(iris_spec(epochs=1)).id
        if os.geteuid() == 0:  # only root can be another user here
            assert _connects_as_nobody(path) is others_may_call
        with pytest.raises(AlreadyInUse, match="another server listens"):
            serve(f"unix:{path}", tmp_path / "other-data")
    finally:
        running.stop()
    assert not path.exists()


def test_chainrule_serve_takes_a_unix_socket_its_mode_and_the_limits(tmp_path, socket_folder):
    path = socket_folder / "api.sock"
    command = [sys.executable, "-m", "services.cli", "serve", "--address", f"unix:{path}",
               "--socket-mode", "660", "--data-dir", str(tmp_path / "data"),
               "--metrics-port", "0", "--max-priority", "2", "--streams-per-tenant", "2",
               "--metrics-parameter-series-by", "layer", "--max-upload-bytes", "300",
               "--max-csv-rows", "4", "--no-web"]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"chainrule: serving gRPC on unix:{path}"), line
        assert _mode(path) == 0o660
        with Client(f"unix:{path}", timeout=30) as client:
            error = rpc_error(lambda: client.submit(iris_spec(priority=3)))
            assert error.details().startswith("priority: must be at most 2")
            # The upload limits, lowered by flag: 5 rows, in under 300 bytes, are one too many.
            csv = tmp_path / "five-rows.csv"
            csv.write_text("a,b,label\n" + "".join(f"{i},{i + 1},{i % 2}\n" for i in range(5)))
            error = rpc_error(lambda: client.upload(csv, "five-rows", label_column="label"))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == ("header.format: the CSV has more than 4 sample rows, "
                                       "this server's limit for 3 columns")
            csv.write_text("a,b,label\n" + "1.0,2.0,0\n" * 30)  # 300 bytes and more
            error = rpc_error(lambda: client.upload(csv, "too-big", label_column="label"))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == (f"header.size_bytes: {csv.stat().st_size} bytes is over "
                                       f"this server's upload limit of 300")
    finally:
        server.terminate()
        server.wait(timeout=120)
    assert server.returncode == 0
    assert "chainrule: web UI at off\n" in server.stdout.read()  # --no-web


def test_chainrule_serve_refuses_streams_that_could_take_every_rpc_thread(tmp_path):
    done = subprocess.run([sys.executable, "-m", "services.cli", "serve", "--streams", "64",
                           "--data-dir", str(tmp_path / "data")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "must be below the 64 RPC threads" in done.stderr
    assert "Traceback" not in done.stderr


# --- priority ---------------------------------------------------------------------------------

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
CAROL = "carol-token-0123456789"


RANGED, KEEPER, WATCHER = ("ranged-token-01234567", "keeper-token-01234567",
                           "watcher-token-0123456")
MODELLER = "modeller-token-012345"
HASTY = "hasty-token-0123456789"


@pytest.fixture(scope="module")
def tenant_server(local_ray, tmp_path_factory):
    """Tenants of a configuration file (`serve --config`); test_tenancy.py's server reads the
    older token file."""
    config = tmp_path_factory.mktemp("config") / "server.yaml"
    config.write_text(f"tenants:\n"
                      f"  alice: {{tokens: [{ALICE}], max_priority: 5}}\n"
                      f"  bob: {{tokens: [{BOB}]}}\n"
                      f"  carol: {{tokens: [{CAROL}], max_running_cpus: 1, max_queued_jobs: 1,"
                      f" weight: 2}}\n"
                      f"  ranged: {{tokens: [{RANGED}], min_priority: 2, max_priority: 5}}\n"
                      f"  keeper: {{tokens: [{KEEPER}], max_stored_bytes: 1000}}\n"
                      f"  watcher: {{tokens: [{WATCHER}], max_streams: 1}}\n"
                      f"  modeller: {{tokens: [{MODELLER}], max_stored_bytes: 1}}\n"
                      # Refills once in 1,000 s: after its burst, every submit of a test is over.
                      f"  hasty: {{tokens: [{HASTY}], submit_rate: 0.001, submit_burst: 2}}\n")
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"),
                    tenancy=load_server_config(config), limits=Limits(max_priority=1),
                    metrics_port=0)
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
    (f"alice {ALICE} max_priority=high", "max_priority must be an integer of int32's range"),
    (f"alice {ALICE} max_priority=2147483648", "max_priority must be an integer"),
    (f"alice {ALICE} priority=3", "one of max_priority=N, weight=W, max_running_cpus=C"),
    (f"alice {ALICE} weight=0", "weight must be a number > 0, got '0'"),
    (f"alice {ALICE} max_running_cpus=-1", "max_running_cpus must be a number of CPUs > 0"),
    (f"alice {ALICE} max_queued_jobs=1.5", "max_queued_jobs must be a whole number > 0"),
    (f"alice {ALICE} role=root", "role must be user or admin, got 'root'"),
    (f"alice {ALICE} role=admin\nalice {BOB} role=user", "earlier line"),
    (f"alice {ALICE} weight=2\nalice {BOB} weight=3", "earlier line"),
    (f"alice {ALICE} max_priority=3\nalice {BOB} max_priority=4", "earlier line"),
])
def test_a_malformed_priority_cap_in_the_token_file_is_refused_naming_the_line(
        tmp_path, line, message):
    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_tokens(tokens)


def test_over_quota_submits_are_refused_resource_exhausted_naming_the_quota(tenant_server):
    with Client(tenant_server.address, token=CAROL) as client:
        big = iris_spec()
        big.resources.cpus_per_worker = 1.5
        error = rpc_error(lambda: client.submit(big))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == ("max_running_cpus: the job needs 1.51 CPUs, more than "
                                   "tenant carol's quota of 1 running CPUs")
        running = client.submit(iris_spec(epochs=10_000))  # 1 CPU: carol's whole quota
        # (Other tests' cancelled jobs may still hold the cluster for a moment.)
        wait_for(lambda: state_name(client.get(running.id).state) == "RUNNING", 60)
        queued = client.submit(iris_spec(epochs=10_000))
        try:
            assert client.get(queued.id).wait_reason == (
                "tenant carol runs 1 CPUs of its quota of 1; this job needs 1")
            error = rpc_error(lambda: client.submit(iris_spec()))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == ("max_queued_jobs: tenant carol has 1 queued job(s), its "
                                       "quota")
            with urllib.request.urlopen(tenant_server.metrics_url, timeout=10) as reply:
                scraped = reply.read().decode()
            for quota in ("max_running_cpus", "max_queued_jobs"):
                assert (f'chainrule_quota_rejections_total{{quota="{quota}",tenant="carol"}} '
                        f'1.0') in scraped
        finally:
            for job in (queued, running):
                client.cancel(job.id)
            for job in (queued, running):
                wait_until_done(client, job.id)


@pytest.mark.parametrize("priority", [1, 6])
def test_a_priority_outside_the_tenants_range_is_refused_naming_the_range(tenant_server,
                                                                          priority):
    with Client(tenant_server.address, token=RANGED) as client:
        error = rpc_error(lambda: client.submit(iris_spec(priority=priority)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith(
            f"priority: must be from 2 to 5 for tenant 'ranged' on this server, got {priority}")
        inside = client.submit(iris_spec(priority=2))
        client.cancel(inside.id)


def test_a_tenant_at_its_stored_bytes_quota_can_neither_upload_nor_submit(tenant_server,
                                                                         tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("a" * 1000)  # stored as sent: exactly the quota
    with Client(tenant_server.address, token=KEEPER) as client:
        client.upload(text, "corpus")
        error = rpc_error(lambda: client.upload(text, "again"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "max_stored_bytes: tenant keeper keeps 1000 bytes (uploads, checkpoints, models); "
            "this upload's 1000 bytes more would be over its quota of 1000; delete data sets "
            "or jobs first")
        error = rpc_error(lambda: client.submit(iris_spec()))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details().startswith("max_stored_bytes: tenant keeper keeps 1000 bytes "
                                          "(uploads, checkpoints, models), at or over its "
                                          "quota of 1000")
        client.delete_dataset("corpus")
        client.cancel(client.submit(iris_spec()).id)  # room again
    assert scraped_rejections(tenant_server, "keeper", "max_stored_bytes") == 2.0


def test_a_jobs_checkpoints_and_model_count_against_its_tenants_stored_bytes(tenant_server):
    with Client(tenant_server.address, token=MODELLER) as client:
        done = client.submit(iris_spec())  # allowed: the tenant keeps nothing yet
        wait_until_done(client, done.id)
        assert state_name(client.get(done.id).state) == "SUCCEEDED"
        for refused in (lambda: client.submit(iris_spec()),
                        lambda: client.resume(done.id, epochs=1)):
            error = rpc_error(refused)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.fullmatch(r"max_stored_bytes: tenant modeller keeps [0-9]{4,} bytes "
                                r"\(uploads, checkpoints, models\), at or over its quota of 1; "
                                r"delete data sets or jobs first", error.details()
                                ), error.details()
        client.delete(done.id)
        client.cancel(client.submit(iris_spec()).id)  # nothing kept: room again


def test_a_stream_over_the_tenants_streams_quota_is_refused_naming_it(tenant_server):
    release = threading.Event()

    def stalled_chunks():
        release.wait(60)
        yield b"x"

    header = pb.DatasetHeader(name="stalled", format="text", size_bytes=1, sha256="0" * 64)
    with Client(tenant_server.address, token=WATCHER) as client:
        first = threading.Thread(target=lambda: rpc_error(
            lambda: client.upload_stream(header, stalled_chunks())))
        first.start()
        try:
            wait_for(lambda: tenant_server.streams.held("watcher") == 1, 30,
                     what="the first stream to hold its slot")
            error = rpc_error(lambda: client.upload_stream(header, iter([b"x"])))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith("max_streams: tenant 'watcher' has 1 streams "
                                              "open, its quota")
        finally:
            release.set()
            first.join(60)
    assert scraped_rejections(tenant_server, "watcher", "max_streams") == 1.0


def test_submits_over_the_tenants_rate_are_refused_naming_it_before_the_spec_is_read(
        tenant_server):
    unfit = iris_spec()
    unfit.data.batch_size = 0  # INVALID_ARGUMENT, and still a submit the rate counts
    with Client(tenant_server.address, token=HASTY) as client:
        for _ in range(2):  # the burst
            assert rpc_error(lambda: client.submit(unfit)).code() == (
                grpc.StatusCode.INVALID_ARGUMENT)
        for refused in (lambda: client.submit(iris_spec()),
                        lambda: client.resume("job-000000000000", epochs=1)):
            error = rpc_error(refused)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.fullmatch(r"submit_rate: tenant 'hasty' may submit 0\.001 jobs a second "
                                r"\(bursts of 2\); retry in [0-9.]+ s", error.details()
                                ), error.details()
        assert list(client.jobs()) == []
    with Client(tenant_server.address, token=BOB) as client:  # the server's default: 50 at once
        for _ in range(3):
            assert rpc_error(lambda: client.submit(unfit)).code() == (
                grpc.StatusCode.INVALID_ARGUMENT)
    assert scraped_rejections(tenant_server, "hasty", "submit_rate") == 2.0
    assert scraped_rejections(tenant_server, "bob", "submit_rate") == 0.0


def scraped_rejections(server, tenant: str, quota: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    line = f'chainrule_quota_rejections_total{{quota="{quota}",tenant="{tenant}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_a_job_asking_more_memory_than_the_cluster_has_is_refused_with_the_numbers(
        tenant_server):
    with Client(tenant_server.address, token=BOB) as client:
        spec = iris_spec()
        spec.resources.memory_bytes_per_worker = 64 << 40
        error = rpc_error(lambda: client.submit(spec))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert re.fullmatch(
        r"resources\.memory_bytes_per_worker: the job can never run on this cluster: 1 "
        r"worker\(s\) x 0\.99 CPUs and 70368744177664 bytes of memory and 1 shard\(s\) x "
        r"0\.01: needs 64 TiB of memory; the cluster has [0-9.]+ GiB", error.details()
    ), error.details()


def test_the_token_file_maps_tokens_to_tenants_and_tenants_to_their_caps(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# tenant token [max_priority=N]\nalice {ALICE} max_priority=-2\n"
                      f"bob {BOB}\ncarol {CAROL} weight=2.5 max_running_cpus=8\n"
                      f"carol {CAROL}x max_queued_jobs=100  # a second token, more settings\n")
    loaded = load_tokens(tokens)
    assert loaded.tenants == {ALICE: "alice", BOB: "bob", CAROL: "carol", CAROL + "x": "carol"}
    assert loaded.max_priority == {"alice": -2}
    assert loaded.settings == {"carol": TenantSettings(weight=2.5, max_running_cpus=8.0,
                                                       max_queued_jobs=100)}
    assert loaded.admins == frozenset()


def test_role_admin_in_the_token_file_makes_a_tenant_an_admin(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops {ALICE} role=admin\nbob {BOB} role=user\ncarol {CAROL}\n")
    loaded = load_tokens(tokens)
    assert loaded.admins == frozenset({"ops"}) and not loaded.settings
    auth = Authenticator(loaded.tenants, loaded.admins)
    assert auth.is_admin("ops") and not auth.is_admin("bob") and not auth.is_admin("carol")
    assert Authenticator().is_admin("default")  # no tokens: loopback only, its owner's
