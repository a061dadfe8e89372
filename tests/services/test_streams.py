"""Streams cannot starve the server. Every streaming call holds an RPC thread for as long as it
lasts; unbounded, one tenant's watch streams took every thread and other tenants' GetJob and
the health check timed out (reproduced on 16 threads with 32 streams). Now each tenant, and the
server in total, may hold only so many streams open (RESOURCE_EXHAUSTED naming the limit, at
once), fewer than the threads, and a stream whose client has gone gives its slot back within
seconds. Real server, real gRPC channels, three tenants."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule.client import Client
from chainrule.v1 import training_service_pb2 as pb
from services.server import serve
from services.streams import StreamLimits
from tests.services.helpers import iris_spec, wait_for

pytestmark = [pytest.mark.distributed]

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab",
          "carol": "carol-token-0123456789"}
THREADS = 16
LIMITS = StreamLimits(per_tenant=4, total=8)
CALL_SECONDS = 2.0  # what another tenant's unary call and the health check must answer within


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("config") / "tokens"
    tokens.write_text("".join(f"{tenant} {token}\n" for tenant, token in TOKENS.items()))
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens,
                    max_rpc_threads=THREADS, stream_limits=LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def clients(server):
    clients = {tenant: Client(server.address, token=token, timeout=CALL_SECONDS)
               for tenant, token in TOKENS.items()}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def long_jobs(clients):
    """A job per tenant that stays active through the module (minutes of training, or queued
    behind one), so that a watch stream stays open until its client cancels it."""
    jobs = {}
    for tenant, client in clients.items():
        spec = iris_spec(epochs=2000)
        spec.data.batch_size = 8
        jobs[tenant] = client.submit(spec).id
    yield jobs
    for tenant, client in clients.items():
        client.cancel(jobs[tenant])


@pytest.fixture(autouse=True)
def streams_closed_after_each_test(server):
    """Each test starts with no stream open: those it cancelled have given their slots back
    (within seconds: a watch notices its client has gone at its next poll)."""
    yield
    wait_for(lambda: server.streams.held() == 0, timeout=5, what="the streams' slots")


def _open_streams(client: Client, job_id: str, count: int) -> list:
    """`count` WatchJob calls left open (never read: a client that holds without reading)."""
    request = pb.WatchJobRequest(job_id=job_id, min_progress_interval_ms=60_000)
    return [client.stub.WatchJob(request, metadata=client.metadata) for _ in range(count)]


def _refused(calls: list, settle_seconds: float = 1.0) -> list:
    """The calls the server ended at once (each must be RESOURCE_EXHAUSTED); the others are
    open streams."""
    time.sleep(settle_seconds)
    ended = [call for call in calls if call.done()]
    for call in ended:
        assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, call.details()
    return ended


def _cancel(calls: list) -> None:
    for call in calls:
        call.cancel()


def _health(client: Client) -> int:
    stub = health_pb2_grpc.HealthStub(client.channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_SECONDS).status


def test_one_tenant_holding_many_streams_cannot_starve_another_tenants_calls(clients,
                                                                              long_jobs):
    alice, bob = clients["alice"], clients["bob"]
    calls = _open_streams(alice, long_jobs["alice"], 2 * THREADS)
    try:
        refused = _refused(calls)
        assert len(refused) == 2 * THREADS - LIMITS.per_tenant
        assert "per tenant" in refused[0].details()
        assert refused[0].details().startswith("streams: tenant 'alice' has 4 streams open")
        for _ in range(20):  # and every one of them answered in time
            start = time.perf_counter()
            assert bob.get(long_jobs["bob"]).id == long_jobs["bob"]
            assert [job.id for job in bob.jobs()] == [long_jobs["bob"]]
            assert _health(bob) == health_pb2.HealthCheckResponse.SERVING
            assert time.perf_counter() - start < CALL_SECONDS
    finally:
        _cancel(calls)


def test_the_servers_streams_are_bounded_in_total(clients, long_jobs):
    held = []
    try:
        for tenant in ("alice", "bob"):
            calls = _open_streams(clients[tenant], long_jobs[tenant], LIMITS.per_tenant)
            assert _refused(calls) == []
            held += calls
        carol = _open_streams(clients["carol"], long_jobs["carol"], 1)
        [refused] = _refused(carol)
        assert refused.details().startswith("streams: the server has 8 streams open, its "
                                            "limit in total")
        assert _health(clients["carol"]) == health_pb2.HealthCheckResponse.SERVING
    finally:
        _cancel(held)


def test_a_stream_whose_client_has_gone_gives_its_slot_back_within_seconds(clients, long_jobs):
    alice = clients["alice"]
    calls = _open_streams(alice, long_jobs["alice"], LIMITS.per_tenant)
    try:
        assert _refused(calls) == []
        calls[0].cancel()  # the client goes away without a word
        gone = time.monotonic()

        def a_new_stream_is_accepted():
            [call] = _open_streams(alice, long_jobs["alice"], 1)
            if _refused([call], settle_seconds=0.3):
                return None
            calls.append(call)
            return call

        wait_for(a_new_stream_is_accepted, timeout=5, what="the slot to come back")
        assert time.monotonic() - gone < 5
    finally:
        _cancel(calls)


def test_stream_limits_must_leave_threads_for_unary_calls(local_ray, tmp_path):
    with pytest.raises(ValueError, match="below the 8 RPC threads"):
        serve("127.0.0.1:0", tmp_path, max_rpc_threads=8, stream_limits=StreamLimits(2, 8))


def test_a_watch_gets_at_most_four_progress_and_validation_events_a_second_whatever_it_asks(
        clients, long_jobs):
    alice = clients["alice"]
    job_id = long_jobs["alice"]
    wait_for(lambda: alice.get(job_id).progress.step > 0, 120, what="alice's job to train")
    request = pb.WatchJobRequest(job_id=job_id, min_progress_interval_ms=0)  # "every step"
    call = alice.stub.WatchJob(request, metadata=alice.metadata)
    times: dict[str, list[float]] = {"progress": [], "validation": []}
    steps = []
    try:
        for event in call:
            kind = event.WhichOneof("kind")
            if kind in times:
                times[kind].append(event.time.ToDatetime().timestamp())
            if kind == "progress":
                steps.append(event.progress.step)
            if len(times["progress"]) == 6:
                break
    finally:
        call.cancel()
    for kind, sent in times.items():  # after the first: it may follow the watch's opening
        gaps = [later - earlier for earlier, later in zip(sent[1:], sent[2:])]
        assert all(gap >= 0.25 for gap in gaps), (kind, gaps)
    assert steps[-1] - steps[1] > 4, steps  # steps went by unsent: the floor held
