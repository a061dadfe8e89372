"""A tenant's submit rate as a token bucket, on a clock the test moves: a burst goes through at
once, then one submit per 1/rate seconds; each tenant has its own bucket; a retried submit
(same request_id) is not charged. What a real server answers over gRPC is in
test_isolation.py."""

from __future__ import annotations

import math

import pytest

from scheduler.cluster_view import FixedNodes
from scheduler.job_queue import JobQueue
from scheduler.scheduling_policy import Node
from scheduler.storage import JobStorage
from services.auth import TenantSettings
from services.errors import AlreadyExists, ResourceExhausted
from services.events import EventHub
from services.job_lifecycle import JobLifecycle
from services.jobs import JobService
from services.store import Store
from services.submit_rate import SubmitRate, SubmitRateLimiter, tenant_rates
from tests.services.helpers import iris_spec


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_through_then_one_submit_per_interval():
    clock = Clock()
    limiter = SubmitRateLimiter(SubmitRate(per_second=2, burst=3), clock=clock)
    for _ in range(3):
        limiter.take("alice")
    with pytest.raises(ResourceExhausted) as refused:
        limiter.take("alice")
    assert refused.value.message == ("submit_rate: tenant 'alice' may submit 2 jobs a second "
                                     "(bursts of 3); retry in 0.5 s")
    clock.now += 0.25  # half a token: still refused, and the refusal spends nothing
    with pytest.raises(ResourceExhausted, match="retry in 0.25 s"):
        limiter.take("alice")
    clock.now += 0.25
    limiter.take("alice")
    with pytest.raises(ResourceExhausted):
        limiter.take("alice")


def test_a_quiet_spell_refills_the_bucket_up_to_its_burst_only():
    clock = Clock()
    limiter = SubmitRateLimiter(SubmitRate(per_second=10, burst=2), clock=clock)
    limiter.take("alice")
    clock.now += 3600
    limiter.take("alice")
    limiter.take("alice")
    with pytest.raises(ResourceExhausted):
        limiter.take("alice")


def test_each_tenant_has_its_own_bucket_and_its_own_rate():
    clock = Clock()
    default = SubmitRate(per_second=1, burst=1)
    limiter = SubmitRateLimiter(default, tenant_rates(default, {
        "sweeper": TenantSettings(submit_burst=3),
        "free": TenantSettings(submit_rate=math.inf),
        "quiet": TenantSettings(max_streams=2),  # no rate of its own: the default
    }), clock=clock)
    assert limiter.rate_of("sweeper") == SubmitRate(1, 3)
    assert limiter.rate_of("quiet") == default
    limiter.take("alice")
    with pytest.raises(ResourceExhausted):
        limiter.take("alice")
    limiter.take("bob")  # alice's empty bucket is not bob's
    for _ in range(3):
        limiter.take("sweeper")
    for _ in range(1000):
        limiter.take("free")


@pytest.mark.parametrize("per_second, burst", [(0, 1), (-1, 1), (float("nan"), 1), (1, 0)])
def test_a_rate_that_could_never_submit_is_refused(per_second, burst):
    with pytest.raises(ValueError, match="per_second > 0 and burst >= 1"):
        SubmitRate(per_second, burst)


def test_a_retried_submit_gets_its_job_without_spending_a_token(tmp_path):
    store, storage, events = Store(tmp_path / "chainrule.db"), JobStorage(tmp_path), EventHub()
    limiter = SubmitRateLimiter(SubmitRate(per_second=1, burst=1), clock=Clock())
    service = JobService(store, tmp_path, storage, events, submit_rate=limiter)
    queue = JobQueue(JobLifecycle(store, storage, events),
                     cluster=FixedNodes([Node("node", 2.0)]))
    queue.pause()  # nothing runs: only the submits are under test
    service.attach_queue(queue)
    try:
        job = service.submit("alice", iris_spec(), request_id="sweep-1")
        for _ in range(3):  # the client did not hear the answer, and asks again
            assert service.submit("alice", iris_spec(), request_id="sweep-1").id == job.id
        with pytest.raises(AlreadyExists, match="request_id 'sweep-1' was already used"):
            service.submit("alice", iris_spec(seed=1), request_id="sweep-1")
        with pytest.raises(ResourceExhausted):  # a new submit still pays for its token
            service.submit("alice", iris_spec(), request_id="sweep-2")
    finally:
        queue.shutdown(timeout=5)
        store.close()
