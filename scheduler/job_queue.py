"""Which job runs when, carried out: the scheduling policy (scheduler/scheduling_policy.py)
decides, this queue starts what it says, each job by its own `JobRunner` in its own thread.

A job starts when the cluster has room for all of its actors at once (its bundles: workers with
the CPUs its spec asks for, shards with a token CPU; scheduler/job_resources.py), as many jobs
at once as fit; between tenants by weighted fair share, within one by higher `priority` then
first in, first out. Room is the nodes' sizes (a `ClusterView`, polled every
`node_poll_seconds` so nodes that join or leave are seen at once) less what the running jobs
reserved. The queue decides again whenever a job is submitted, cancelled or ends and when the
nodes change. `max_concurrent_jobs` (0: none) caps how many run at once whatever room is left.

The queue knows nothing about gRPC or SQLite. It reports through two narrow interfaces:
  - a `JobHost` (services/job_lifecycle.py) that resolves a job and loads its data, keeps its
    checkpoints and records the transitions that must be durable (started, finished,
    requeued);
  - observers (metrics, live WatchJob streams) called with every state change, step,
    evaluation and recovery. Observers run in the job's thread between steps, so they must
    be quick; one that raises is logged and ignored, never allowed to fail the job.

Stopping: a runner polls `should_stop` at every step boundary; when it stops early it has
handed a checkpoint to the host. A cancelled job then ends CANCELLED; a job stopped by
`shutdown` goes back to QUEUED (the next server start resumes it from the checkpoint); a job
preempted (the policy's choice, to make room for a waiting job of higher priority) goes back to
QUEUED in this queue at its first arrival and resumes from the checkpoint once room is back; a
run longer than `max_run_seconds` ends FAILED, saying so (it can be resumed from the checkpoint).
A run whose chosen node left before its actors were placed there (NodeGone) goes back to QUEUED
the same way, with a "node_gone" recovery record, to be placed again on the nodes left.
A host that fails to record a run's end (a full disk) is asked again, with backoff, until it
records it: the result waits in memory, and the job is never left RUNNING with it lost.

Draining a node (`drain`, e.g. ahead of its maintenance or preemption): the queue places
nothing on it any more (it leaves the policy's view of the nodes, and placement groups are
pinned to the policy's nodes), and every running job with actors on it stops at its next step
boundary the way a shutdown stops it, checkpointed, and goes back to QUEUED at its first
arrival, to resume from that checkpoint on the other nodes. `undrain` gives the node back;
a drained node that leaves the cluster is forgotten.

Taking jobs back (`take_back_running`): when the Ray a run trains on is lost, its runner may
never return (its calls wait on processes that are gone). The run is given up without waiting:
from then on nothing it reports, checkpoints or returns is recorded, and it stops at its next
step boundary if it reaches one. The job gets a recovery record saying why and goes back to
QUEUED (compare-and-set from RUNNING: a job that ended meanwhile keeps its end), to run again
from its last checkpoint (after `pause`: in the next server's queue).

Attaching (`adopt`): a run whose runner lives outside this process (scheduler/detached_runner.py)
and outlived the server that started it is taken over by the next server's queue as it runs:
counted as running on the nodes its runner reports (its bundles' placement, so the room left
for other jobs and a drain of its nodes are as for a run started here), followed through
`runner_attacher`, its end recorded as any run's. A runner that dies (`RunnerLost`) sends its
job back to the queue, as a Ray lost does.

Leases (scheduler/job_lease.py): every run holds a lease on its job in the store, renewed from
its step boundaries. The queue checks for leases that ran out (`_check_leases`, the one place
that decides a runner is gone or wedged): such a run is given up the same way, and its job,
requeued compare-and-set on that lease with the reason, runs again from its checkpoint.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint
from scheduler.cluster_view import ClusterView, free_nodes
from scheduler.datasets import Dataset
from scheduler.detached_runner import RunnerFailed, RunnerLost
from scheduler.job_lease import Lease, LeaseOwners, LeaseTerms, lease_until
from scheduler.job_resources import job_bundles, spreads, worker_and_shard_counts
from scheduler.job_runner import JobRunner, TrainingResult
from scheduler.job_states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from scheduler.parquet_dataset import ParquetDataset
from scheduler.placement import PARAMETER_SERVER_CPUS, NodeGone
from scheduler.records import EvaluationRecord, RecoveryRecord, RunPlacement, StepRecord
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
from worker.resolved_job import ResolvedJob

log = logging.getLogger(__name__)


# Retrying to record a job's end: first after this long, doubling up to the maximum.
RECORD_RETRY_FIRST_SECONDS = 0.5
RECORD_RETRY_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class QueuedJob:
    """What the queue needs to run a job; the spec is already validated."""

    job_id: str
    spec: job_pb2.JobSpec
    tenant: str = "default"


@dataclass(frozen=True)
class JobOutcome:
    """How a job's run ended, handed to `JobHost.job_finished`."""

    state: str  # SUCCEEDED, FAILED or CANCELLED
    error: str = ""
    result: TrainingResult | None = None
    # A failure's formatted traceback, for the job's log (not only the server's stderr).
    traceback: str = ""


class JobHost(Protocol):
    """The durable side of a job (implemented by the service's store adapter)."""

    def prepare(self, job: QueuedJob) -> tuple[ResolvedJob, Dataset | ParquetDataset]:
        """The job resolved against its data set, and the data set split for it."""
        ...

    def load_checkpoint(self, job_id: str) -> Checkpoint | None: ...

    def save_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> None: ...

    def job_started(self, job_id: str, lease: Lease) -> None: ...

    def job_requeued(self, job_id: str) -> None: ...

    def job_finished(self, job_id: str, outcome: JobOutcome) -> None: ...

    def renew_lease(self, job_id: str, lease: Lease) -> bool:
        """Extend the lease; False when the job is no longer RUNNING under its owner."""
        ...

    def expired_leases(self) -> list[tuple[str, Lease]]:
        """The RUNNING jobs whose lease has run out, with it."""
        ...

    def requeue_expired(self, job_id: str, lease: Lease, reason: str) -> QueuedJob | None:
        """Back to QUEUED with `reason` if it still holds that lease; the job to run again."""
        ...

    def job_taken_back(self, job_id: str, reason: str) -> bool:
        """A run given up without its runner's word: back to QUEUED with `reason`, only from
        RUNNING. False when the job had left RUNNING meanwhile (ended, cancelled)."""
        ...


class JobObserver(Protocol):
    """Anything that follows jobs: metrics, live event streams. Every method is optional."""

    def job_state_changed(self, job_id: str, state: str) -> None: ...

    def job_step(self, job_id: str, record: StepRecord) -> None: ...

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None: ...

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def tenant_usage(self, usage: dict[str, TenantUsage]) -> None:
        """Each tenant's queued jobs (in all and by priority), running CPUs and oldest queued
        job, after every scheduling decision."""
        ...

    def job_waited(self, tenant: str, priority: int, seconds: float) -> None:
        """A job of this priority started after `seconds` queued."""
        ...

    def job_preempted(self, tenant: str, victim: str, for_job: str) -> None: ...


RunnerFactory = Callable[..., Any]  # JobRunner's signature; tests pass a fake


@dataclass(frozen=True)
class TenantUsage:
    queued_jobs: int
    running_cpus: float
    oldest_queued_at: float | None  # Unix time its longest-waiting queued job was queued
    queued_by_priority: Mapping[int, int] = field(default_factory=dict)  # priority -> jobs


@dataclass(frozen=True)
class QueuePlace:
    """Where a QUEUED job stands: `position` 1 is its tenant's next job to start."""

    position: int
    reason: str


class JobQueue:
    def __init__(
        self,
        host: JobHost,
        *,
        cluster: ClusterView,
        max_concurrent_jobs: int = 0,
        tenants: dict[str, TenantPolicy] | None = None,
        observers: Sequence[Any] = (),
        runner_factory: RunnerFactory = JobRunner,
        placement_timeout_seconds: float = 120.0,
        max_run_seconds: float = math.inf,
        node_poll_seconds: float = 1.0,
        lease_terms: LeaseTerms | None = None,
        runner_attacher: RunnerFactory | None = None,
    ):
        """`cluster` gives the nodes' sizes (scheduler/cluster_view.py); `tenants` each
        tenant's weight and running-CPU quota (TenantPolicy() for a tenant not named);
        `max_concurrent_jobs` 0 lets as many jobs run as fit. `max_run_seconds` bounds one run
        of a job, from its start (or resume) to its end. `lease_terms`: how long a run's lease
        lasts (LeaseTerms()). `runner_attacher(job_id, callbacks...)`: a runner that follows a
        run already going outside this process (`adopt`)."""
        if max_concurrent_jobs < 0:
            raise ValueError(f"max_concurrent_jobs must be >= 0, got {max_concurrent_jobs}")
        self.host = host
        self.cluster = cluster
        self.max_concurrent_jobs = max_concurrent_jobs
        self.tenants = dict(tenants or {})
        self.observers = list(observers)
        self.runner_factory = runner_factory
        self.runner_attacher = runner_attacher
        self.placement_timeout_seconds = placement_timeout_seconds
        self.max_run_seconds = max_run_seconds
        self.node_poll_seconds = node_poll_seconds
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[QueuedJob, JobDemand]] = {}
        self._demands = WaitingJobs()  # the policy's view of _waiting
        self._queued_per_tenant: Counter[str] = Counter()
        self._queued_per_priority: Counter[tuple[str, int]] = Counter()  # (tenant, priority)
        # Each tenant's queued jobs by arrival (heap entries of jobs gone are dropped when on top)
        self._arrivals: dict[str, list[tuple[float, str]]] = {}
        self._wait_reasons: dict[str, str] = {}  # the last decision's, by job id
        self._last_arrival = 0.0
        self._running: dict[str, _RunningJob] = {}
        self._stopping: dict[str, str] = {}  # preempted job -> the job it makes room for
        self._capacity: list[Node] = cluster.nodes()
        self._drained: set[str] = set()  # node ids nothing is placed on (`drain`)
        self._draining = False
        self._paused = False  # no job starts: the Ray jobs would run on is gone
        self._idle = threading.Condition(self._lock)
        self.lease_terms = lease_terms or LeaseTerms()
        self._lease_owners = LeaseOwners()
        self._stop_polling = threading.Event()
        threading.Thread(target=self._poll_nodes, name="job-queue-nodes", daemon=True).start()
        threading.Thread(target=self._check_leases, name="job-queue-leases", daemon=True).start()

    # --- the public operations ---------------------------------------------------------------

    def submit(self, job: QueuedJob) -> None:
        """Queue a job (its record must already say QUEUED); it starts when it fits."""
        with self._lock:
            if self._draining:
                return  # stays QUEUED in the store: the next start runs it
            self._enqueue(job, self._demand(job, self._next_arrival()))
            depth = len(self._waiting)
        self._notify("job_state_changed", job.job_id, QUEUED)  # counted like every transition
        self._notify("queue_depth", depth)
        self._dispatch()

    def submit_all(self, jobs: Iterable[QueuedJob]) -> None:
        for job in jobs:
            self.submit(job)

    def adopt(self, job: QueuedJob, lease: Lease, placement: RunPlacement | None) -> None:
        """Take over a run that is going on outside this process (its job RUNNING under
        `lease`, its actors where `placement` says, as its runner reported): it counts as
        running there, and is followed until it ends. A runner that could not say where
        (`placement` None: one of an older version, say) or whose report does not match its
        spec is counted on its spec's demand, where the policy would place that now."""
        if self.runner_attacher is None:
            raise ValueError("this queue has no runner_attacher: it cannot adopt runs")
        resources = job_pb2.ResourceSpec()
        resources.CopyFrom(job.spec.resources)
        if placement is not None:
            # The worker share the starting server gave it (a default share depends on the
            # cluster's size, which may have changed since).
            resources.cpus_per_worker = placement.cpus_per_worker
        with self._lock:
            demand = self._demand(job, self._next_arrival(), resources)
            if placement is not None and len(placement.nodes) != len(demand.bundles):
                log.warning("job %s: its runner reports %d placed bundles for the %d of its "
                            "spec: counted on its spec's demand instead", job.job_id,
                            len(placement.nodes), len(demand.bundles))
                placement = None
            if placement is None:
                demand = self._demand(job, demand.arrival)
                nodes = self._guessed_placement(demand)
                counted = "guessed from its spec (its runner could not say where it runs)"
            else:
                nodes = placement.nodes
                counted = "where its runner reports them"
            adopted = _RunningJob(job, RunningJob(demand, nodes, time.monotonic()),
                                  time.monotonic() + self.max_run_seconds)
            adopted.lease, adopted.adopted = lease, True
            self._running[job.job_id] = adopted
        log.info("job %s: attached to its run, its actors counted on node(s) %s, %s",
                 job.job_id, ", ".join(sorted(set(nodes))), counted)
        adopted.thread = threading.Thread(target=self._run, args=(adopted,),
                                          name=f"job-{job.job_id}", daemon=True)
        adopted.thread.start()

    def _guessed_placement(self, demand: JobDemand) -> tuple[str, ...]:
        """Where a run whose placement is not known is counted (under the lock): where the
        policy would place it now, else on the nodes as if nothing else ran, else on none
        (it then holds no room: its runner is followed all the same)."""
        running = [job.record for job in self._running.values()]
        return (place(demand.bundles, free_nodes(self._capacity, running), demand.spread)
                or place(demand.bundles, self._capacity, demand.spread)
                or ("",) * len(demand.bundles))

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step boundary.
        False when the queue does not hold the job (already finished, or unknown)."""
        with self._lock:
            job = self._dequeue(job_id)
            running = self._running.get(job_id)
            if running is not None:
                running.cancelled.set()
            depth = len(self._waiting)
        if job is not None:
            self.host.job_finished(job_id, JobOutcome(CANCELLED))
            self._notify("job_state_changed", job_id, CANCELLED)
            self._notify("queue_depth", depth)
            self._dispatch()  # the cancelled job may have held a reservation
            return True
        return running is not None

    def never_fits(self, job: QueuedJob) -> str | None:
        """None when the job fits the cluster's nodes (when empty), else why not with the
        numbers: such a job would wait forever."""
        with self._lock:
            demand = self._demand(job, 0.0)
            capacity = list(self._capacity)
        reason = fits_ever(demand, capacity)
        if reason is None:
            return None
        workers, shards = worker_and_shard_counts(job.spec.resources)
        worker, shard = demand.bundles[0], demand.bundles[-1]
        return (f"{workers} worker(s) x {worker.cpus:g} CPUs{_memory(worker)} and {shards} "
                f"shard(s) x {PARAMETER_SERVER_CPUS:g}{_memory(shard)}: {reason}")

    def demanded_cpus(self, job: QueuedJob) -> float:
        """All the CPUs the job's actors reserve while it runs."""
        with self._lock:
            return self._demand(job, 0.0).cpus

    def queued_jobs(self, tenant: str) -> int:
        with self._lock:
            return self._queued_per_tenant[tenant]

    def place_of(self, job_id: str) -> QueuePlace | None:
        """A queued job's position among its tenant's queued jobs (higher priority, then
        earlier, first) and why it is not running; None when the queue does not hold it
        queued."""
        with self._lock:
            entry = self._waiting.get(job_id)
            if entry is None:
                return None
            demand = entry[1]
            key = (-demand.priority, demand.arrival)
            ahead = sum(1 for _, other in self._waiting.values()
                        if other.tenant == demand.tenant
                        and (-other.priority, other.arrival) < key)
            reason = self._wait_reasons.get(job_id, "")
        if not reason:
            reason = (f"{ahead} job(s) of tenant {demand.tenant} go first (higher priority or "
                      f"queued earlier)" if ahead else "waiting for the next scheduling decision")
        return QueuePlace(ahead + 1, reason)

    def is_active(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._waiting or job_id in self._running

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop taking jobs; running jobs stop at their next step boundary, checkpointed, and
        go back to QUEUED. True when every job thread ended within `timeout`."""
        self._stop_polling.set()
        with self._lock:
            self._draining = True
            for running in self._running.values():
                running.interrupted.set()
            self._waiting.clear()
            self._demands = WaitingJobs()
            self._queued_per_tenant.clear()
            self._queued_per_priority.clear()
            return self._idle.wait_for(lambda: not self._running, timeout=timeout)

    def drain(self, node_ids: Iterable[str]) -> list[str]:
        """Place nothing on these nodes until `undrain`, and stop every running job with
        actors on them at its next step boundary, back to the queue. The ids of the jobs
        stopped."""
        nodes = set(node_ids)
        with self._lock:
            self._drained |= nodes
            stopped = []
            for job_id, running in self._running.items():
                if running.actor_nodes() & nodes and not running.drained.is_set():
                    running.drained.set()
                    stopped.append(job_id)
        for job_id in stopped:
            log.info("job %s has actors on a drained node: it stops at its next step boundary "
                     "and queues again", job_id)
            self._notify("job_recovery", job_id, RecoveryRecord(
                self._running_step(job_id), "node_drained",
                f"node(s) {', '.join(sorted(nodes))} drained: the job stops at its next step "
                f"boundary, checkpointed, and queues again to resume on other nodes"))
        return stopped

    def _running_step(self, job_id: str) -> int:
        with self._lock:
            running = self._running.get(job_id)
            return running.last_step if running is not None else 0

    def undrain(self, node_ids: Iterable[str]) -> None:
        """Place jobs on these nodes again."""
        with self._lock:
            self._drained -= set(node_ids)
        self._dispatch()

    def actor_nodes(self, job_id: str) -> set[str] | None:
        """The Ray node ids of a running job's actors (None: not running)."""
        with self._lock:
            running = self._running.get(job_id)
        return running.actor_nodes() if running is not None else None

    def drained_nodes(self) -> set[str]:
        with self._lock:
            return set(self._drained)

    def pause(self) -> None:
        """Start no more jobs (submitted ones wait; running ones go on): the Ray they would
        run on is gone, and the process is about to restart or exit."""
        with self._lock:
            self._paused = True

    def take_back_running(self, kind: str, reason: str) -> list[str]:
        """Give up every running run at once, without waiting for its runner (see the module
        docstring): each job gets a recovery record (`kind`, one of RECOVERY_KINDS, and
        `reason`) and goes back to the queue. The ids of the jobs requeued."""
        with self._lock:
            runs = list(self._running.values())
            self._running.clear()
            self._stopping.clear()
            self._idle.notify_all()
        return [running.job.job_id for running in runs
                if self._take_back(running, kind, reason)]

    def _take_back(self, running: _RunningJob, kind: str, reason: str) -> bool:
        """Give one run up (no longer in `_running`) and requeue its job; True if requeued."""
        with running.starting:  # a run that had not started stays unstarted
            running.abandoned.set()
        job_id = running.job.job_id
        self._notify("job_recovery", job_id, RecoveryRecord(
            running.last_step, kind, f"{reason}: the run was given up at step "
            f"{running.last_step}; the job goes back to the queue and resumes from its "
            f"last checkpoint"))
        try:
            taken_back = self.host.job_taken_back(job_id, reason)
        except Exception:  # the store refused: the next start finds it RUNNING, requeues it
            log.exception("job %s: requeueing it failed", job_id)
            return False
        if taken_back:
            self.submit(running.job)
        return taken_back

    # --- deciding ------------------------------------------------------------------------------

    def _demand(self, job: QueuedJob, arrival: float,
                resources: job_pb2.ResourceSpec | None = None) -> JobDemand:
        """The job's demand, from its spec's resources or `resources` in their place."""
        if resources is None:
            resources = job.spec.resources
        cluster_cpus = sum(node.cpus for node in self._capacity)
        return JobDemand(job.job_id, job.tenant, job.spec.priority, arrival,
                         job_bundles(resources, cluster_cpus), spreads(resources))

    def _next_arrival(self) -> float:
        """Seconds on the monotonic clock, strictly increasing: first in, first out."""
        self._last_arrival = max(time.monotonic(), self._last_arrival + 1e-6)
        return self._last_arrival

    def _enqueue(self, job: QueuedJob, demand: JobDemand) -> None:
        self._waiting[job.job_id] = (job, demand)
        self._demands.push(demand)
        self._queued_per_tenant[job.tenant] += 1
        self._queued_per_priority[job.tenant, demand.priority] += 1
        heapq.heappush(self._arrivals.setdefault(job.tenant, []), (demand.arrival, job.job_id))

    def _dequeue(self, job_id: str) -> QueuedJob | None:
        entry = self._waiting.pop(job_id, None)
        if entry is None:
            return None
        self._demands.remove(job_id)
        self._queued_per_tenant[entry[0].tenant] -= 1
        key = (entry[0].tenant, entry[1].priority)
        self._queued_per_priority[key] -= 1
        if not self._queued_per_priority[key]:  # kept to the priorities queued now
            del self._queued_per_priority[key]
        return entry[0]

    def _dispatch(self) -> None:
        """Decide, and start every job the policy says (called on submit and cancel, when a
        job ends and when the nodes change)."""
        with self._lock:
            if self._draining or self._paused:
                return
            now = time.monotonic()
            running = [job.record for job in self._running.values()]
            open_nodes = [node for node in self._capacity if node.node_id not in self._drained]
            decision = decide(self._demands, running, free_nodes(open_nodes, running),
                              self.tenants, now, stopping=dict(self._stopping))
            starts, preemptions = decision.starts, decision.preempt
            reasons = {wait.job_id: wait.reason for wait in decision.waits}
            if self.max_concurrent_jobs:
                room = max(self.max_concurrent_jobs - len(self._running), 0)
                for start in starts[room:]:
                    reasons[start.job.job_id] = (
                        f"waiting for a job slot: this server runs at most "
                        f"{self.max_concurrent_jobs} job(s) at once")
                if len(starts) > room:
                    # The policy counted the starts the cap holds back as running: room it
                    # found missing for others is not missing, and nothing is preempted.
                    starts, preemptions = starts[:room], []
            self._wait_reasons = reasons
            preempted = []
            for preemption in preemptions:
                victim = self._running.get(preemption.victim)
                if victim is not None and not victim.preempted.is_set():
                    victim.preempted.set()  # it stops at its next step boundary
                    self._stopping[preemption.victim] = preemption.for_job
                    preempted.append((victim.job.tenant, preemption))
            launched = []
            for start in starts:
                job = self._dequeue(start.job.job_id)
                assert job is not None
                launched.append(_RunningJob(job, RunningJob(start.job, start.placement, now),
                                            now + self.max_run_seconds))
                self._running[job.job_id] = launched[-1]
            depth = len(self._waiting)
            usage = self._tenant_usage()
        for victim_tenant, preemption in preempted:
            log.info("job %s is preempted for job %s: it stops at its next step boundary "
                     "and queues again", preemption.victim, preemption.for_job)
            self._notify("job_preempted", victim_tenant, preemption.victim, preemption.for_job)
        for running_job in launched:
            self._notify("job_waited", running_job.job.tenant,
                         running_job.record.demand.priority,
                         now - running_job.record.demand.arrival)
        self._notify("tenant_usage", usage)
        if launched:
            self._notify("queue_depth", depth)
        for running_job in launched:
            running_job.thread = threading.Thread(target=self._run, args=(running_job,),
                                                  name=f"job-{running_job.job.job_id}",
                                                  daemon=True)
            running_job.thread.start()

    def _tenant_usage(self) -> dict[str, TenantUsage]:
        """Each tenant's queued jobs, running CPUs and oldest queued job. Caller holds the
        lock."""
        cpus: dict[str, float] = {}
        for running in self._running.values():
            tenant = running.job.tenant
            cpus[tenant] = cpus.get(tenant, 0.0) + running.record.demand.cpus
        by_priority: dict[str, dict[int, int]] = {}
        for (tenant, priority), count in self._queued_per_priority.items():
            by_priority.setdefault(tenant, {})[priority] = count
        wall_clock_offset = time.time() - time.monotonic()
        usage = {}
        for tenant in set(cpus) | {t for t, n in self._queued_per_tenant.items() if n}:
            oldest = self._oldest_arrival(tenant)
            usage[tenant] = TenantUsage(
                self._queued_per_tenant[tenant], cpus.get(tenant, 0.0),
                None if oldest is None else oldest + wall_clock_offset,
                by_priority.get(tenant, {}))
        return usage

    def _oldest_arrival(self, tenant: str) -> float | None:
        heap = self._arrivals.get(tenant, [])
        while heap and heap[0][1] not in self._waiting:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _poll_nodes(self) -> None:
        """Every `node_poll_seconds`: a node that joined or left makes the queue decide again
        at once (waiting jobs may fit now, or a job's room went with its node)."""
        while not self._stop_polling.wait(self.node_poll_seconds):
            try:
                nodes = self.cluster.nodes()
            except Exception as error:  # Ray shut down or unreachable: keep the last view
                log.debug("reading the cluster's nodes failed: %s", error)
                continue
            with self._lock:
                changed = _sizes(nodes) != _sizes(self._capacity)
                self._capacity = nodes
                self._drained &= {node.node_id for node in nodes}  # a node that left is gone
            if changed:
                log.info("the cluster's nodes changed: %d node(s), %g CPUs", len(nodes),
                         sum(node.cpus for node in nodes))
                self._dispatch()

    # --- running jobs --------------------------------------------------------------------------

    def _run(self, running: _RunningJob) -> None:
        job = running.job
        job_id = job.job_id
        outcome: JobOutcome | None = None
        callbacks = dict(
            on_step=lambda record: self._on_step(running, record),
            on_evaluation=lambda record: self._notify_unless_abandoned(
                running, "job_evaluation", record),
            on_recovery=lambda record: self._notify_unless_abandoned(
                running, "job_recovery", record),
            should_stop=running.should_stop,
            on_checkpoint=lambda checkpoint: self._save_checkpoint(running, checkpoint))
        try:
            if running.adopted:  # going on already, started by another process
                assert self.runner_attacher is not None
                self._notify("job_state_changed", job_id, RUNNING)
                runner = self.runner_attacher(job_id, **callbacks)
            else:
                with running.starting:
                    if running.abandoned.is_set():
                        return
                    running.lease = lease_until(self.lease_terms.startup_seconds,
                                                self._lease_owners.next())
                    self.host.job_started(job_id, running.lease)
                self._notify("job_state_changed", job_id, RUNNING)
                resolved, dataset = self.host.prepare(job)
                resume_from = self.host.load_checkpoint(job_id)
                if resume_from is not None:
                    running.last_step = resume_from.step
                runner = self.runner_factory(
                    resolved, dataset, **callbacks,
                    resume_from=resume_from,
                    cpus_per_worker=running.record.demand.bundles[0].cpus,
                    nodes=running.record.placement,  # each bundle on the node the policy chose
                    placement_timeout_seconds=self.placement_timeout_seconds,
                    job_id=job_id,
                )
            result = runner.run()
            if not result.stopped_early:
                outcome = JobOutcome(SUCCEEDED, result=result)
            elif running.cancelled.is_set():
                outcome = JobOutcome(CANCELLED, result=result)
            elif running.timed_out.is_set():
                outcome = JobOutcome(FAILED, result=result, error=(
                    f"stopped after running longer than this server's limit of "
                    f"{self.max_run_seconds:g} s; resume it to continue from its checkpoint"))
        except NodeGone as error:  # not the job's doing: placed again on the nodes left
            running.unplaced.set()
            self._notify_unless_abandoned(running, "job_recovery", RecoveryRecord(
                running.last_step, "node_gone", f"{error}: the job queues again, to be placed "
                                                f"on the nodes left"))
        except RunnerLost as lost:  # its process gone: back to the queue, as for a Ray lost
            with self._lock:
                ours = self._running.get(job_id) is running
                if ours:
                    del self._running[job_id]
                self._stopping.pop(job_id, None)
                self._idle.notify_all()
            if ours and not running.abandoned.is_set():
                self._take_back(running, "runner_lost", str(lost))
            self._dispatch()
            return
        except Exception as error:  # a failed job must never take the service down
            # A detached runner's exception that could not be pickled: named by RunnerFailed.
            kind = error.error_type if isinstance(error, RunnerFailed) else type(error).__name__
            if running.abandoned.is_set():  # its Ray gone under it: expected, not the job's
                log.info("job %s: a run given up ended (%s: %s)", job_id, kind, error)
                return
            log.exception("job %s failed", job_id)
            message = str(error) or kind
            # A detached runner's exception comes with the traceback of its process.
            outcome = JobOutcome(FAILED, error=f"{kind}: {message}", traceback=getattr(
                error, "remote_traceback", "") or traceback.format_exc())
        if running.abandoned.is_set():  # the job is back in the queue: this run's end is moot
            log.info("job %s: a run given up ended", job_id)
            return
        state = None
        try:
            state = self._record_end(running, outcome)
            if state is not None:
                self._notify("job_state_changed", job_id, state)
        finally:
            with self._lock:
                # Once its end is recorded a job may be resumed, and its next run started,
                # before this thread gets here: remove this run only.
                if self._running.get(job_id) is running:
                    del self._running[job_id]
                self._stopping.pop(job_id, None)
                if (outcome is None and state == QUEUED and not self._draining
                        and (running.preempted.is_set() or running.drained.is_set()
                             or running.unplaced.is_set())):
                    # Back in the queue at its first arrival: it resumes from the stop's
                    # checkpoint once room is back (off the drained node), ahead of its
                    # tenant's later jobs.
                    self._enqueue(job, running.record.demand)
                self._idle.notify_all()
            self._dispatch()

    def _record_end(self, running: _RunningJob, outcome: JobOutcome | None) -> str | None:
        """Have the host record how the run ended (outcome None: stopped by shutdown, back to
        QUEUED), and return the state recorded. A failure to record (a full disk, a locked
        store) is retried with backoff, the result kept in memory meanwhile, until it works:
        a job whose training ended never stays RUNNING with its result lost. Only a shutdown
        ends the retries (None): the job is still RUNNING in the store then, and the next start
        runs it again from its last checkpoint."""
        job_id = running.job.job_id
        delay = RECORD_RETRY_FIRST_SECONDS
        for attempt in itertools.count(1):
            try:
                if outcome is None:  # stopped by shutdown: resumed from its checkpoint next start
                    self.host.job_requeued(job_id)
                    return QUEUED
                self.host.job_finished(job_id, outcome)
                return outcome.state
            except Exception as error:
                if attempt == 1:
                    log.exception("recording the end of job %s failed; retrying until it "
                                  "works", job_id)
                else:
                    log.warning("recording the end of job %s failed again (attempt %d): %s",
                                job_id, attempt, error)
            if running.interrupted.wait(delay):
                log.warning("job %s: its end is not recorded; the next start runs it again "
                            "from its last checkpoint", job_id)
                return None
            delay = min(2 * delay, RECORD_RETRY_MAX_SECONDS)
        raise AssertionError("unreachable")

    def _on_step(self, running: _RunningJob, record: StepRecord) -> None:
        running.last_step = record.step
        self._renew_lease(running)
        self._notify_unless_abandoned(running, "job_step", record)

    def _renew_lease(self, running: _RunningJob) -> None:
        """From the run's own thread, at a step boundary: at most every `renew_every` seconds
        (the first step's at once: it ends the longer start-up lease). A run whose lease was
        taken from it (expired, its job requeued) stops at once, recording nothing."""
        now = time.monotonic()
        if running.lease is None or (running.renewed_at is not None
                                     and now - running.renewed_at < self.lease_terms.renew_every):
            return
        running.renewed_at = now
        lease = lease_until(self.lease_terms.seconds, running.lease.owner)
        try:
            renewed = self.host.renew_lease(running.job.job_id, lease)
        except Exception as error:  # a store that refuses now: again after renew_every
            log.warning("job %s: renewing its lease failed: %s", running.job.job_id, error)
            return
        if renewed:
            running.lease = lease
        elif not running.abandoned.is_set():
            log.warning("job %s: this run lost its lease (it ran out and the job was "
                        "requeued): it stops", running.job.job_id)
            running.abandoned.set()

    def _check_leases(self) -> None:
        """Every `check_every` seconds: a run whose lease ran out is given up (module
        docstring), and its job requeued with the reason, to resume from its checkpoint."""
        while not self._stop_polling.wait(self.lease_terms.check_every):
            try:
                expired = self.host.expired_leases()
            except Exception as error:  # the store refused: look again next time
                log.warning("checking the jobs' leases failed: %s", error)
                continue
            for job_id, lease in expired:
                self._requeue_expired(job_id, lease)

    def _requeue_expired(self, job_id: str, lease: Lease) -> None:
        with self._lock:
            running = self._running.get(job_id)
            if running is not None and running.lease is not None \
                    and running.lease.owner == lease.owner:
                del self._running[job_id]
                self._idle.notify_all()
            else:
                running = None  # not this queue's run (another process's): requeued all the same
        if running is not None:
            with running.starting:
                running.abandoned.set()
        late = time.time() - lease.expires_at
        reason = (f"its runner stopped renewing its lease (expired {late:.1f} s ago): the "
                  f"runner is gone or wedged")
        try:
            job = self.host.requeue_expired(job_id, lease, reason)
        except Exception:  # the store refused: found expired again next time
            log.exception("job %s: requeueing it after its lease expired failed", job_id)
            return
        if job is None:  # renewed or ended meanwhile
            return
        step = running.last_step if running is not None else 0
        self._notify("job_recovery", job_id, RecoveryRecord(
            step, "lease_expired", f"{reason}: the run was given up at step {step}; the job "
            f"goes back to the queue and resumes from its last checkpoint"))
        self.submit(job)

    def _notify_unless_abandoned(self, running: _RunningJob, method: str, *args: Any) -> None:
        if not running.abandoned.is_set():
            self._notify(method, running.job.job_id, *args)

    def _save_checkpoint(self, running: _RunningJob, checkpoint: Checkpoint) -> None:
        """A run given up writes no more checkpoints: the job's next run writes its own."""
        if not running.abandoned.is_set():
            self.host.save_checkpoint(running.job.job_id, checkpoint)

    def _notify(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            callback = getattr(observer, method, None)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:  # an observer's bug must not fail a job
                log.exception("observer %r failed in %s", observer, method)


def _sizes(nodes: Sequence[Node]) -> list[tuple[str, float, int]]:
    return sorted((node.node_id, node.cpus, node.memory_bytes) for node in nodes)


class _RunningJob:
    def __init__(self, job: QueuedJob, record: RunningJob, deadline: float = math.inf):
        self.job = job
        self.record = record  # its bundles and the nodes the policy placed them on
        self.deadline = deadline  # time.monotonic()
        self.cancelled = threading.Event()
        self.interrupted = threading.Event()  # by shutdown
        self.preempted = threading.Event()  # to make room for a job of higher priority
        self.timed_out = threading.Event()
        self.drained = threading.Event()  # a node it has actors on is drained
        self.unplaced = threading.Event()  # a node chosen for it left before it was placed
        # Given up (take_back_running): nothing it reports is recorded any more. Set under
        # `starting`, which the run holds while it records its start: a run is either given
        # up before it starts, or started and then taken back.
        self.abandoned = threading.Event()
        self.starting = threading.Lock()
        self.last_step = 0  # the last step it reported (or resumed from)
        self.lease: Lease | None = None  # held from its start
        self.renewed_at: float | None = None  # time.monotonic() of its last renewal
        self.thread: threading.Thread | None = None
        self.adopted = False  # started by another process, followed here (JobQueue.adopt)

    def should_stop(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.timed_out.set()
        return (self.cancelled.is_set() or self.interrupted.is_set()
                or self.preempted.is_set() or self.timed_out.is_set()
                or self.drained.is_set() or self.abandoned.is_set())

    def actor_nodes(self) -> set[str]:
        """The Ray node ids of its actors: the nodes the policy placed its bundles on, which
        its placement group is pinned to (an adopted run's: as its runner reported them)."""
        return set(self.record.placement)


def _memory(bundle: Bundle) -> str:
    """A bundle's memory as the never-fits message adds it to its CPUs ("" when none)."""
    return f" and {bundle.memory_bytes} bytes of memory" if bundle.memory_bytes else ""
