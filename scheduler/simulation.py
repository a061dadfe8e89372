"""The scheduling policy on a simulated cluster: a trace of jobs (size, duration, tenant,
priority, arrival) run against nodes that exist only here, event by event, with the real
decision code (scheduler/scheduling_policy.py). What it measures: utilisation, each tenant's
share of the running CPUs, every job's wait, and the time each decision took. Used by the
simulation test and by bench/scheduler.py; nothing in the service imports it.
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field

from scheduler.scheduling_policy import (
    Bundle,
    JobDemand,
    Node,
    RunningJob,
    TenantPolicy,
    WaitingJobs,
    decide,
)


@dataclass(frozen=True)
class TracedJob:
    demand: JobDemand
    duration: float  # seconds of running it needs (kept across preemptions)


@dataclass
class SimulationResult:
    waits: dict[str, float]  # job id -> seconds from arrival to its (last) start
    unfinished: list[str]
    busy_cpu_seconds: float  # running CPUs integrated over the time everything was backlogged
    capacity_cpu_seconds: float
    tenant_cpu_seconds: dict[str, float]  # the same integral per tenant
    preemptions: int
    decision_seconds: list[float] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        return self.busy_cpu_seconds / self.capacity_cpu_seconds

    def shares(self) -> dict[str, float]:
        total = sum(self.tenant_cpu_seconds.values())
        return {tenant: cpu / total for tenant, cpu in self.tenant_cpu_seconds.items()}


def cluster(seed: int, nodes: int = 100) -> list[Node]:
    """Nodes of mixed sizes: 4, 8 and 16 CPUs."""
    rng = random.Random(seed)
    return [Node(f"node-{i}", float(rng.choice([4, 4, 8, 8, 16]))) for i in range(nodes)]


def trace(seed: int, tenants: dict[str, int], horizon: float) -> list[TracedJob]:
    """Jobs arriving over `horizon` seconds: per tenant, its count of jobs; 1-8 workers of 1-4
    CPUs with a shard each at a token CPU, durations of 30-600 s, one in twenty at priority 1."""
    rng = random.Random(seed)
    jobs = []
    for tenant, count in tenants.items():
        for i in range(count):
            workers = rng.choice([1, 1, 2, 2, 4, 8])
            cpus = float(rng.choice([1, 1, 2, 4]))
            bundles = (Bundle(cpus),) * workers + (Bundle(0.01),)
            demand = JobDemand(f"{tenant}-{i}", tenant, 0 if rng.random() < 0.95 else 1,
                               rng.uniform(0.0, horizon), bundles, spread=workers > 1)
            jobs.append(TracedJob(demand, rng.uniform(30.0, 600.0)))
    return jobs


def simulate(jobs: list[TracedJob], nodes: list[Node], tenants: dict[str, TenantPolicy],
             starvation_seconds: float = 1800.0, preemption_delay: float = 1.0
             ) -> SimulationResult:
    """Run the trace to the end. Preempted jobs stop `preemption_delay` seconds later (their
    next step boundary) and go back to waiting with the work they have left."""
    free = {node.node_id: Node(node.node_id, node.cpus, node.memory_bytes) for node in nodes}
    capacity = sum(node.cpus for node in nodes)
    arrivals = sorted(jobs, key=lambda job: job.demand.arrival)
    left = {job.demand.job_id: job.duration for job in jobs}
    waiting = WaitingJobs()
    running: dict[str, tuple[RunningJob, float]] = {}  # job id -> (job, its end time)
    stopping: dict[str, str] = {}  # preempted job id -> the job it makes room for
    events: list[tuple[float, int, str, str]] = []  # (time, order, kind, job id)
    order = 0
    for job in arrivals:
        events.append((job.demand.arrival, order, "arrive", job.demand.job_id))
        order += 1
    heapq.heapify(events)
    by_id = {job.demand.job_id: job for job in jobs}
    waits: dict[str, float] = {}
    finished: set[str] = set()
    busy, tenant_cpu, observed = 0.0, {t: 0.0 for t in tenants}, 0.0
    preemptions, decision_seconds = 0, []
    now = 0.0

    def stop(job_id: str) -> None:
        active, _ = running.pop(job_id)
        for bundle, node_id in zip(active.demand.bundles, active.placement, strict=True):
            free[node_id].give_back(bundle)

    while events:
        at = events[0][0]
        # Integrate the running CPUs since the last event, while every tenant had work waiting
        # (fair share is a promise between tenants that all want more than they get).
        backlogged = {demand.tenant for demand in (waiting.first(t, 1)[0]
                                                   for t in waiting.tenants())}
        if backlogged >= set(tenants):
            for active, _ in running.values():
                busy += active.demand.cpus * (at - now)
                tenant_cpu[active.demand.tenant] += active.demand.cpus * (at - now)
            observed += capacity * (at - now)
        now = at
        while events and events[0][0] == now:
            _, _, kind, job_id = heapq.heappop(events)
            if kind == "arrive":
                waiting.push(by_id[job_id].demand)
            elif kind == "end" and job_id in running and running[job_id][1] == now:
                stop(job_id)
                finished.add(job_id)
            elif kind == "preempted" and job_id in running:
                victim, end = running[job_id]
                left[job_id] = end - now
                stop(job_id)
                del stopping[job_id]
                waiting.push(victim.demand)
        began = time.perf_counter()
        decision = decide(waiting, [active for active, _ in running.values()], list(free.values()),
                          tenants, now, stopping=stopping,
                          starvation_seconds=starvation_seconds)
        decision_seconds.append(time.perf_counter() - began)
        for start in decision.starts:
            job_id = start.job.job_id
            waiting.remove(job_id)
            for bundle, node_id in zip(start.job.bundles, start.placement, strict=True):
                free[node_id].take(bundle)
            end = now + left[job_id]
            running[job_id] = (RunningJob(start.job, start.placement, now), end)
            waits[job_id] = now - start.job.arrival
            heapq.heappush(events, (end, order, "end", job_id))
            order += 1
        for preemption in decision.preempt:
            preemptions += 1
            stopping[preemption.victim] = preemption.for_job
            heapq.heappush(events, (now + preemption_delay, order, "preempted",
                                    preemption.victim))
            order += 1
    unfinished = [job.demand.job_id for job in jobs if job.demand.job_id not in finished]
    return SimulationResult(waits, unfinished, busy, observed, tenant_cpu, preemptions,
                            decision_seconds)
