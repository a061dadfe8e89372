"""The scheduling policy's rules, one at a time, on small hand-made clusters (no Ray)."""

from __future__ import annotations

from scheduler.scheduling_policy import (
    Bundle,
    JobDemand,
    Node,
    RunningJob,
    TenantPolicy,
    WaitingJobs,
    decide,
    fits_ever,
    place,
)


def job(job_id: str, tenant: str = "a", cpus: tuple[float, ...] = (1.0,), priority: int = 0,
        arrival: float = 0.0) -> JobDemand:
    return JobDemand(job_id, tenant, priority, arrival, tuple(Bundle(c) for c in cpus))


def queue(*jobs: JobDemand) -> WaitingJobs:
    waiting = WaitingJobs()
    for demand in jobs:
        waiting.push(demand)
    return waiting


def started(decision) -> list[str]:
    return [start.job.job_id for start in decision.starts]


def test_a_job_starts_only_when_every_actor_fits_on_a_node_at_once():
    nodes = [Node("four", 4.0), Node("one", 1.0)]
    # 5 CPUs free in all, but a 3-CPU actor and a 2-CPU actor cannot share the 4-CPU node.
    assert place([Bundle(3.0), Bundle(2.0)], nodes) is None
    assert place([Bundle(3.0), Bundle(1.0)], nodes) == ("four", "four")
    assert place([Bundle(3.0), Bundle(1.0)], nodes, spread=True) == ("four", "one")
    decision = decide(queue(job("j", cpus=(3.0, 2.0))), [], nodes, {}, now=0.0)
    assert started(decision) == []
    assert decision.waits[0].reason == "waiting for 5 CPUs in 2 actors; 5 free"


def test_a_job_that_can_never_fit_is_named_with_the_numbers():
    nodes = [Node("four", 4.0), Node("one", 1.0)]
    assert fits_ever(job("j", cpus=(6.0,)), nodes) == "needs 6 CPUs; the cluster has 5"
    assert fits_ever(job("j", cpus=(4.5,)), nodes) == (
        "an actor needs 4.5 CPUs; the largest node has 4")
    assert fits_ever(job("j", cpus=(2.0, 2.0, 1.0)), nodes) is None


GiB = 1 << 30


def test_memory_is_placed_and_counted_like_cpus():
    nodes = [Node("big", 4.0, 8 * GiB), Node("small", 4.0, 2 * GiB)]
    hungry = JobDemand("j", "a", 0, 0.0, (Bundle(1.0, 3 * GiB), Bundle(1.0, 3 * GiB)))
    assert place(hungry.bundles, nodes, spread=True) == ("big", "big")  # small has too little
    assert fits_ever(hungry, [Node("small", 4.0, 2 * GiB)]) == (
        "needs 6 GiB of memory; the cluster has 2 GiB")
    assert fits_ever(hungry, [Node("a", 4.0, 2 * GiB), Node("b", 4.0, 2 * GiB),
                              Node("c", 4.0, 2 * GiB)]) == (
        "an actor needs 3 GiB of memory; the largest node has 2 GiB")
    running = RunningJob(JobDemand("r", "a", 0, 0.0, (Bundle(1.0, 6 * GiB),)), ("big",), 0.0)
    free = [Node("big", 3.0, 2 * GiB), Node("small", 4.0, 2 * GiB)]  # CPUs enough, memory not
    decision = decide(queue(hungry), [running], free, {}, now=0.0)
    assert started(decision) == []
    assert decision.waits[0].reason == (
        "waiting for 2 CPUs and 6 GiB in 2 actors; 7 CPUs and 4 GiB free")


def test_jobs_keep_starting_while_room_remains():
    nodes = [Node("n", 4.0)]
    decision = decide(queue(*(job(f"j{i}", arrival=i) for i in range(6))), [], nodes, {}, 0.0)
    assert started(decision) == ["j0", "j1", "j2", "j3"]


def test_one_tenants_twenty_jobs_do_not_starve_anothers_one():
    many = [job(f"a{i}", "a", arrival=i) for i in range(20)]
    decision = decide(queue(*many, job("b0", "b", arrival=100.0)), [], [Node("n", 2.0)],
                      {}, now=100.0)
    assert started(decision) == ["a0", "b0"]


def test_shares_follow_the_weights():
    jobs = [job(f"{t}{i}", t, arrival=i) for t in "ab" for i in range(10)]
    decision = decide(queue(*jobs), [], [Node("n", 9.0)],
                      {"a": TenantPolicy(weight=2.0), "b": TenantPolicy(weight=1.0)}, 0.0)
    tenants = [start.job.tenant for start in decision.starts]
    assert (tenants.count("a"), tenants.count("b")) == (6, 3)


def test_within_a_tenant_higher_priority_first_then_first_come():
    jobs = [job("low", priority=0, arrival=0), job("high", priority=5, arrival=2),
            job("high-later", priority=5, arrival=3)]
    assert started(decide(queue(*jobs), [], [Node("n", 2.0)], {}, 10.0)) == [
        "high", "high-later"]


def test_a_tenant_at_its_quota_waits_saying_so():
    running = [RunningJob(job("r", "a", cpus=(3.0,)), ("n",), 0.0)]
    decision = decide(queue(job("j", "a", cpus=(2.0,))), running, [Node("n", 5.0)],
                      {"a": TenantPolicy(max_running_cpus=4.0)}, 0.0)
    assert started(decision) == []
    assert decision.waits[0].reason == (
        "tenant a runs 3 CPUs of its quota of 4; this job needs 2")


def test_smaller_jobs_backfill_behind_a_head_that_does_not_fit():
    jobs = [job("big", cpus=(4.0,), arrival=0), job("small", arrival=1)]
    assert started(decide(queue(*jobs), [], [Node("n", 2.0)], {}, now=5.0)) == ["small"]


def test_a_tenant_held_below_its_share_by_anothers_jobs_gets_the_room_held_for_it():
    running = [RunningJob(job("a-big", "a", cpus=(3.0,)), ("n",), 0.0)]
    waiting = queue(job("b-big", "b", cpus=(2.0,), arrival=0), job("a-small", "a", arrival=1))
    decision = decide(waiting, running, [Node("n", 1.0)], {}, now=5.0)
    assert started(decision) == []  # the CPU a's job would take is b's to wait for
    alone = queue(job("a-bigger", "a", cpus=(2.0,), arrival=0), job("a-small", "a", arrival=1))
    assert started(decide(alone, [], [Node("n", 1.0)], {}, now=5.0)) == ["a-small"]


def test_a_head_that_waited_too_long_holds_its_room():
    jobs = [job("big", cpus=(4.0,), arrival=0), job("small", "b", arrival=1)]
    decision = decide(queue(*jobs), [], [Node("n", 2.0)], {}, now=1000.0,
                      starvation_seconds=600.0)
    assert started(decision) == []  # the cluster drains for it
    decision = decide(queue(*jobs), [], [Node("n", 4.0)], {}, now=1000.0,
                      starvation_seconds=600.0)
    assert started(decision) == ["big"]


def test_preemption_takes_the_fewest_lowest_priority_jobs_it_needs():
    running = [RunningJob(job("p0-old", "b", cpus=(2.0,), priority=0), ("n",), started=1.0),
               RunningJob(job("p0-new", "b", cpus=(2.0,), priority=0), ("n",), started=2.0),
               RunningJob(job("p1", "b", cpus=(2.0,), priority=1), ("n",), started=0.0),
               RunningJob(job("p9", "b", cpus=(2.0,), priority=9), ("n",), started=0.0)]
    urgent = job("urgent", "a", cpus=(2.0,), priority=5)
    decision = decide(queue(urgent), running, [Node("n", 0.0)], {}, now=0.0)
    assert [(p.victim, p.for_job) for p in decision.preempt] == [("p0-new", "urgent")]
    # While it stops, no more is preempted for the same job, and nothing else starts.
    decision = decide(queue(urgent, job("other", "c")), running, [Node("n", 0.0)], {},
                      now=1.0, stopping={"p0-new": "urgent"})
    assert decision.preempt == [] and started(decision) == []


def test_no_preemption_for_an_equal_priority_or_when_eviction_would_not_be_enough():
    running = [RunningJob(job("r", "b", cpus=(2.0,), priority=3), ("n",), 0.0)]
    assert decide(queue(job("same", priority=3, cpus=(2.0,))), running, [Node("n", 0.0)],
                  {}, 0.0).preempt == []
    assert decide(queue(job("huge", priority=9, cpus=(3.0,))), running, [Node("n", 0.0)],
                  {}, 0.0).preempt == []


def test_a_job_removed_and_queued_again_is_waiting_once():
    waiting = queue(job("a0", arrival=0), job("a1", arrival=1))
    waiting.remove("a0")  # started, then preempted and requeued at its first arrival
    waiting.push(job("a0", arrival=0))
    assert [demand.job_id for demand in waiting.first("a", 5)] == ["a0", "a1"]
    assert len(waiting) == 2


def test_a_wait_reason_has_no_float_dust():
    # 0.99 + 0.01 taken from 1.0 left 1.7e-17 CPUs "free" in the message.
    node = Node("n", 1.0)
    for taken in (0.33, 0.33, 0.33, 0.01):
        node.take(Bundle(taken))
    decision = decide(queue(job("j", cpus=(1.0,))), [], [node], {}, now=0.0)
    assert decision.waits[0].reason == "waiting for 1 CPUs in 1 actors; 0 free"
