"""The scheduler at scale: 100,000 queued jobs.

    python bench/scheduler.py [--queued 100000] [--seconds 5]

Targets (issue 13):
  - the dispatch decision (scheduler/scheduling_policy.decide) <= 5 ms p99 with 100,000 jobs
    waiting from 10 tenants on a simulated cluster of 100 nodes (4-16 CPUs) kept full;
  - SubmitJob >= 500 jobs/s from 4 client processes, through a real server on loopback;
  - ListJobs with a state filter <= 20 ms p99 with 100,000 jobs in the store (one client
    calling back to back while the submits' jobs are queued and one job trains).

Set-up of the service phases: the service in this process on embedded Ray (as `chainrule
serve` runs it), one job training (the cluster is busy, as it would be), and 100,000 QUEUED
rows written into its store directly (the same Store.create_job the API calls; through the API
they would take minutes). The clients are processes of their own, so their Python does not
share the server's GIL; each waits for the others before its clock starts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = 4
TENANTS = 10


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def bench_decisions(queued: int, decisions: int) -> tuple[float, float, int]:
    """p50 and p99 seconds of one decision after a running job ends, and the starts made."""
    from scheduler.scheduling_policy import RunningJob, TenantPolicy, WaitingJobs, decide
    from scheduler.simulation import cluster, trace

    nodes = cluster(seed=1)
    per_tenant = queued // TENANTS
    jobs = trace(seed=1, tenants={f"t{i}": per_tenant for i in range(TENANTS)}, horizon=1.0)
    tenants = {f"t{i}": TenantPolicy(weight=1.0 + i % 3) for i in range(TENANTS)}
    waiting = WaitingJobs()
    for job in jobs:
        waiting.push(job.demand)
    free = {node.node_id: node for node in nodes}
    running: dict[str, RunningJob] = {}
    rng = random.Random(1)
    times, starts = [], 0
    for i in range(decisions + 1):
        began = time.perf_counter()
        decision = decide(waiting, running.values(), list(free.values()), tenants, float(i))
        if i:  # the first fills the empty cluster: not a steady-state decision
            times.append(time.perf_counter() - began)
        for start in decision.starts:
            waiting.remove(start.job.job_id)
            for bundle, node_id in zip(start.job.bundles, start.placement, strict=True):
                free[node_id].take(bundle)
            running[start.job.job_id] = RunningJob(start.job, start.placement, float(i))
            starts += 1
        ended = running.pop(rng.choice(list(running)))  # the event each decision answers
        for bundle, node_id in zip(ended.demand.bundles, ended.placement, strict=True):
            free[node_id].give_back(bundle)
    return percentile(times, 0.5), percentile(times, 0.99), starts


def _client(address: str, kind: str, seconds: float, ready, go, results) -> None:
    import grpc

    from chainrule.client import Client
    from tests.services.helpers import iris_spec

    latencies, errors = [], 0
    spec = iris_spec()
    with Client(address, timeout=5.0) as client:
        client.list(page_size=1)  # connect and import before the clock starts
        ready.put(True)
        go.wait(timeout=120)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            began = time.perf_counter()
            try:
                if kind == "submit":
                    client.submit(spec)
                else:
                    client.list(states=["QUEUED"], page_size=50)
            except grpc.RpcError:
                errors += 1
            latencies.append(time.perf_counter() - began)
    results.put((latencies, errors))


def _load(address: str, kind: str, seconds: float, clients: int = CLIENTS
          ) -> tuple[float, float, int]:
    """Requests/s, p99 seconds and errors of `clients` processes calling as fast as they
    can."""
    context = multiprocessing.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    processes = [context.Process(target=_client, args=(address, kind, seconds, ready, go,
                                                       results)) for _ in range(clients)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=120)
    go.set()
    outcomes = [results.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(timeout=10)
    latencies = [x for lat, _ in outcomes for x in lat]
    return len(latencies) / seconds, percentile(latencies, 0.99), sum(e for _, e in outcomes)


def bench_service(queued: int, seconds: float) -> dict[str, float]:
    from chainrule.client import Client
    from services.server import configure_process, serve
    from services.store import JobRecord
    from services.submit_rate import UNLIMITED
    from tests.services.helpers import iris_spec, wait_for

    configure_process()
    data_dir = tempfile.mkdtemp(prefix="chainrule-bench-")
    # The per-tenant submit rate (5 a second by default) is off: this measures how many
    # submits the service can take, which is what a higher configured rate would meet.
    server = serve("127.0.0.1:0", data_dir, submit_rate=UNLIMITED)
    try:
        with Client(server.address) as client:
            busy = client.submit(iris_spec(epochs=10_000, name="keeps-the-cluster-busy"))
            wait_for(lambda: client.get(busy.id).progress.step > 0, 120, what="the busy job")
            store, spec, began = server.service.store, iris_spec(), time.perf_counter()
            for i in range(queued):
                store.create_job(JobRecord(f"job-q{i:010d}", "default", spec, "QUEUED",
                                           time.time()), "")
            filled = time.perf_counter() - began
            print(f"store filled with {queued:,} QUEUED jobs in {filled:.1f} s "
                  f"({queued / filled:,.0f}/s through Store.create_job)")
            submit_rate, submit_p99, submit_errors = _load(server.address, "submit", seconds)
            # One client: a page's own latency, not the queueing of a saturated server (four
            # clients as fast as they can keep both cores busy and wait on each other).
            list_rate, list_p99, list_errors = _load(server.address, "list", seconds, clients=1)
            client.cancel(busy.id)
    finally:
        server.stop()
    return {"submit_rate": submit_rate, "submit_p99": submit_p99,
            "submit_errors": submit_errors, "list_rate": list_rate, "list_p99": list_p99,
            "list_errors": list_errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--decisions", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load phase")
    args = parser.parse_args()
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    p50, p99, starts = bench_decisions(args.queued, args.decisions)
    print(f"dispatch decision, {args.queued:,} waiting from {TENANTS} tenants, 100 nodes: "
          f"p50 {1000 * p50:.2f} ms, p99 {1000 * p99:.2f} ms ({starts} starts)")
    service = bench_service(args.queued, args.seconds)
    print(f"SubmitJob from {CLIENTS} clients: {service['submit_rate']:,.0f} jobs/s, p99 "
          f"{1000 * service['submit_p99']:.1f} ms, {service['submit_errors']:.0f} errors")
    print(f"ListJobs state=QUEUED, 50 a page, {args.queued:,} in the store, 1 client: "
          f"{service['list_rate']:,.0f} req/s, p99 {1000 * service['list_p99']:.1f} ms, "
          f"{service['list_errors']:.0f} errors")

    print()
    print(f"{'':<34}{'measured':>12}{'target':>12}{'ratio':>10}")
    rows = [("dispatch decision p99, ms", 1000 * p99, "<= 5", 1000 * p99 / 5),
            ("SubmitJob, jobs/s", service["submit_rate"], ">= 500",
             service["submit_rate"] / 500),
            ("ListJobs p99, ms", 1000 * service["list_p99"], "<= 20",
             1000 * service["list_p99"] / 20)]
    for label, measured, target, ratio in rows:
        print(f"{label:<34}{measured:>12,.2f}{target:>12}{ratio:>10.2f}")
    ok = (p99 <= 0.005 and service["submit_rate"] >= 500 and service["list_p99"] <= 0.020
          and not service["submit_errors"] and not service["list_errors"])
    print("PASS" if ok else "MISS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
