"""Which waiting job starts next, where its actors go, and which running jobs make room for a
more urgent one. Pure decisions on plain records: no Ray, no threads, no clock. The queue feeds
it the cluster's nodes and the jobs it holds and carries out what it decides (placement groups,
checkpoint-and-requeue); the scheduler simulation runs the same code on a simulated cluster.

The rules, in the order they apply:
- Gang placement: a job starts only when every one of its actors (a bundle each: workers with
  their CPUs and memory, shards with a token CPU) fits on the nodes' free resources at once.
  Node sizes matter: bundles are placed on nodes, never on the cluster's sum.
- Weighted fair share between tenants: the next job comes from the tenant with waiting jobs
  whose running CPUs per unit of weight are lowest (ties: the tenant whose head job arrived
  first). Within a tenant, higher priority first, then first come first served.
- A tenant at its running-CPU quota starts nothing more until it is under it again.
- Backfill: when the chosen job does not fit now, smaller jobs behind it may start in the room
  left, unless the blocked job has waited `starvation_seconds`, or jobs are being preempted
  for it, or its tenant runs well below its weight's share: then it holds a reservation and
  nothing else starts until it has, so running jobs drain until it fits. No job waits
  forever, and a tenant of big jobs is not held below its share by others' small ones.
- Preemption: a job that cannot fit may take the room of running jobs of strictly lower
  priority, lowest priority first (newest first within a priority), only as many as it needs
  and only when evicting them is enough.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

EPSILON = 1e-9
DEFAULT_STARVATION_SECONDS = 600.0
# A tenant this far below its weight's share whose next job does not fit gets the room held for
# it: backfill alone lets small jobs of others take every freed CPU before a big one fits.
FAIR_SHARE_TOLERANCE = 0.05
BACKFILL_DEPTH = 16  # jobs looked at behind each tenant's head: a decision stays O(tenants)


@dataclass(frozen=True)
class Bundle:
    """What one actor needs on one node."""

    cpus: float
    memory_bytes: int = 0


@dataclass
class Node:
    node_id: str
    cpus: float  # free now
    memory_bytes: int = 0  # free now; 0 with total_memory_bytes 0: memory not tracked

    def fits(self, bundle: Bundle) -> bool:
        return (bundle.cpus <= self.cpus + EPSILON
                and bundle.memory_bytes <= self.memory_bytes)

    def take(self, bundle: Bundle) -> None:
        self.cpus -= bundle.cpus
        self.memory_bytes -= bundle.memory_bytes

    def give_back(self, bundle: Bundle) -> None:
        self.cpus += bundle.cpus
        self.memory_bytes += bundle.memory_bytes


@dataclass(frozen=True)
class JobDemand:
    """A job as the policy sees it."""

    job_id: str
    tenant: str
    priority: int
    arrival: float  # when it was queued (seconds on any clock the caller keeps consistent)
    bundles: tuple[Bundle, ...]
    spread: bool = False  # one bundle per node where possible (SPREAD), else packed

    @functools.cached_property
    def cpus(self) -> float:  # asked for many times in every decision
        return sum(bundle.cpus for bundle in self.bundles)

    @functools.cached_property
    def memory_bytes(self) -> int:
        return sum(bundle.memory_bytes for bundle in self.bundles)


@dataclass(frozen=True)
class RunningJob:
    demand: JobDemand
    placement: tuple[str, ...]  # the node of each bundle
    started: float


@dataclass(frozen=True)
class TenantPolicy:
    weight: float = 1.0
    max_running_cpus: float = math.inf


@dataclass(frozen=True)
class Start:
    job: JobDemand
    placement: tuple[str, ...]


@dataclass(frozen=True)
class Wait:
    """Why a job is not starting, in words a user can act on."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class Preemption:
    """A running job to checkpoint at its next step boundary and requeue, for `for_job`."""

    victim: str
    for_job: str


@dataclass
class Decision:
    starts: list[Start] = field(default_factory=list)
    preempt: list[Preemption] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)  # each tenant's blocked head, with why


def place(bundles: Sequence[Bundle], nodes: Sequence[Node], spread: bool = False
          ) -> tuple[str, ...] | None:
    """Node ids for every bundle at once, or None. The nodes are not changed. Largest bundles
    first; packed onto the fullest node that fits (fewest nodes used), or spread onto the
    emptiest (and a node already used by this job last)."""
    # The common answers on a busy cluster, without trying each node:
    if sum(bundle.cpus for bundle in bundles) > sum(node.cpus for node in nodes) + EPSILON:
        return None
    if max((b.cpus for b in bundles), default=0.0) > max((n.cpus for n in nodes),
                                                         default=0.0) + EPSILON:
        return None
    free = {node.node_id: Node(node.node_id, node.cpus, node.memory_bytes) for node in nodes}
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].cpus,
                                                       -bundles[i].memory_bytes))
    placed: list[str] = [""] * len(bundles)
    used: dict[str, int] = {}
    for i in order:
        bundle = bundles[i]
        candidates = [node for node in free.values() if node.fits(bundle)]
        if not candidates:
            return None
        if spread:
            best = min(candidates, key=lambda n: (used.get(n.node_id, 0), -n.cpus, n.node_id))
        else:
            best = min(candidates, key=lambda n: (n.cpus, n.node_id))
        best.take(bundle)
        placed[i] = best.node_id
        used[best.node_id] = used.get(best.node_id, 0) + 1
    return tuple(placed)


def fits_ever(demand: JobDemand, capacity: Sequence[Node]) -> str | None:
    """None when the job fits the whole (empty) cluster, else why not, with the numbers."""
    if place(demand.bundles, capacity, demand.spread) is not None:
        return None
    total = sum(node.cpus for node in capacity)
    largest = max((node.cpus for node in capacity), default=0.0)
    biggest = max((bundle.cpus for bundle in demand.bundles), default=0.0)
    if demand.cpus > total + EPSILON:
        return f"needs {demand.cpus:g} CPUs; the cluster has {total:g}"
    if biggest > largest + EPSILON:
        return f"an actor needs {biggest:g} CPUs; the largest node has {largest:g}"
    total_memory = sum(node.memory_bytes for node in capacity)
    largest_memory = max((node.memory_bytes for node in capacity), default=0)
    biggest_memory = max((bundle.memory_bytes for bundle in demand.bundles), default=0)
    if demand.memory_bytes > total_memory:
        return (f"needs {_bytes(demand.memory_bytes)} of memory; the cluster has "
                f"{_bytes(total_memory)}")
    if biggest_memory > largest_memory:
        return (f"an actor needs {_bytes(biggest_memory)} of memory; the largest node has "
                f"{_bytes(largest_memory)}")
    return (f"its {len(demand.bundles)} actors ({demand.cpus:g} CPUs) do not fit the cluster's "
            f"{len(capacity)} node(s) together")


class WaitingJobs:
    """The queued jobs, by tenant: each tenant's a heap in (priority desc, arrival) order.
    Pushing and popping cost O(log n); a decision looks only at each tenant's first jobs.
    Removal is lazy: an entry is dropped when it reaches the top. Each push numbers its entry,
    so a job removed and pushed again (preempted, then requeued) has one live entry, not two."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, float, int, str]]] = {}
        self._jobs: dict[str, JobDemand] = {}
        self._entry: dict[str, int] = {}  # job id -> the number of its live heap entry
        self._pushes = itertools.count()

    def push(self, demand: JobDemand) -> None:
        number = next(self._pushes)
        self._jobs[demand.job_id] = demand
        self._entry[demand.job_id] = number
        heapq.heappush(self._heaps.setdefault(demand.tenant, []),
                       (-demand.priority, demand.arrival, number, demand.job_id))

    def remove(self, job_id: str) -> JobDemand | None:
        self._entry.pop(job_id, None)
        return self._jobs.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def tenants(self) -> list[str]:
        return [tenant for tenant in list(self._heaps) if self.first(tenant, 1)]

    def _live(self, entry: tuple[int, float, int, str]) -> bool:
        return self._entry.get(entry[3]) == entry[2]

    def first(self, tenant: str, count: int) -> list[JobDemand]:
        """The tenant's first `count` waiting jobs in order (dead entries are dropped on the
        way)."""
        heap = self._heaps.get(tenant)
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if not heap:
            self._heaps.pop(tenant, None)
            return []
        if count == 1:
            return [self._jobs[heap[0][3]]]
        # Popped and pushed back: O(count log n), where a sorted copy would cost O(n).
        popped: list[tuple[int, float, int, str]] = []
        found: list[JobDemand] = []
        while heap and len(found) < count:
            entry = heapq.heappop(heap)
            if self._live(entry):
                popped.append(entry)
                found.append(self._jobs[entry[3]])
        for entry in popped:
            heapq.heappush(heap, entry)
        return found


def decide(waiting: WaitingJobs, running: Iterable[RunningJob], nodes: Sequence[Node],
           tenants: dict[str, TenantPolicy], now: float, *,
           stopping: dict[str, str] | None = None,
           starvation_seconds: float = DEFAULT_STARVATION_SECONDS,
           preemption: bool = True) -> Decision:
    """What to start now (and where), what to preempt, and why each tenant's head waits.

    `nodes` carry the free resources now; they are not changed. `stopping` maps each running
    job already asked to make room (preempted, not yet stopped) to the job it makes room for:
    that job is served before any other, and no more is preempted for it."""
    stopping = stopping or {}
    free = [Node(node.node_id, node.cpus, node.memory_bytes) for node in nodes]
    by_id = {node.node_id: node for node in free}
    running = list(running)
    usage: dict[str, float] = {}
    for job in running:
        usage[job.demand.tenant] = usage.get(job.demand.tenant, 0.0) + job.demand.cpus
    decision = Decision()
    blocked: dict[str, JobDemand] = {}  # each tenant's head that waits, by tenant
    reserved: list[JobDemand] = []  # heads nothing may take room from
    taken: set[str] = set()  # started by this decision
    taken_from: dict[str, int] = {}  # how many of each tenant's jobs it started

    def policy(tenant: str) -> TenantPolicy:
        return tenants.get(tenant, TenantPolicy())

    def share(tenant: str) -> float:
        return usage.get(tenant, 0.0) / max(policy(tenant).weight, EPSILON)

    capacity = sum(node.cpus for node in free) + sum(usage.values())
    active = set(usage) | set(waiting.tenants())
    total_weight = sum(max(policy(tenant).weight, EPSILON) for tenant in active)

    def fair(tenant: str) -> float:
        return capacity * max(policy(tenant).weight, EPSILON) / total_weight

    def below_its_share(tenant: str, tolerance: float = 0.0) -> bool:
        return usage.get(tenant, 0.0) < fair(tenant) * (1.0 - tolerance)

    def held_below_its_share(tenant: str) -> bool:
        """Below its share while another tenant runs above its own: room that is this
        tenant's by weight is held by another's jobs."""
        return below_its_share(tenant, FAIR_SHARE_TOLERANCE) and any(
            usage.get(other, 0.0) > fair(other) for other in active if other != tenant)

    def over_quota(demand: JobDemand) -> bool:
        return usage.get(demand.tenant, 0.0) + demand.cpus > (
            policy(demand.tenant).max_running_cpus + EPSILON)

    def wait(demand: JobDemand, reason: str) -> None:
        if demand.tenant not in blocked:
            blocked[demand.tenant] = demand
            decision.waits.append(Wait(demand.job_id, reason))

    def no_room(demand: JobDemand) -> str:
        if not demand.memory_bytes:
            return (f"waiting for {_cpus(demand.cpus)} CPUs in {len(demand.bundles)} actors; "
                    f"{_cpus(sum(node.cpus for node in free))} free")
        return (f"waiting for {_cpus(demand.cpus)} CPUs and {_bytes(demand.memory_bytes)} in "
                f"{len(demand.bundles)} actors; {_cpus(sum(node.cpus for node in free))} CPUs "
                f"and {_bytes(sum(node.memory_bytes for node in free))} free")

    def quota_reason(demand: JobDemand) -> str:
        tenant = demand.tenant
        return (f"tenant {tenant} runs {_cpus(usage.get(tenant, 0.0))} CPUs of its quota of "
                f"{_cpus(policy(tenant).max_running_cpus)}; this job needs "
                f"{_cpus(demand.cpus)}")

    # Room only shrinks within a decision: a shape that did not fit will not fit later in it.
    # (Thousands of waiting jobs come in a few dozen shapes; this keeps a decision's cost to
    # one placement attempt per shape.)
    no_fit: set[tuple[tuple[Bundle, ...], bool]] = set()

    def try_start(demand: JobDemand) -> bool:
        if reserved:  # the cluster drains for a reserved head: nothing else takes room
            return False
        shape = (demand.bundles, demand.spread)
        if shape in no_fit:
            return False
        placement = place(demand.bundles, free, demand.spread)
        if placement is None:
            no_fit.add(shape)
            return False
        for bundle, node_id in zip(demand.bundles, placement, strict=True):
            by_id[node_id].take(bundle)
        usage[demand.tenant] = usage.get(demand.tenant, 0.0) + demand.cpus
        taken.add(demand.job_id)
        taken_from[demand.tenant] = taken_from.get(demand.tenant, 0) + 1
        decision.starts.append(Start(demand, placement))
        return True

    # First the heads that waited too long, or that jobs are being preempted for: each starts
    # now or keeps its room from everything after it.
    making_room_for = set(stopping.values())
    heads = [jobs[0] for tenant in waiting.tenants() if (jobs := waiting.first(tenant, 1))]
    arrived = {head.tenant: head.arrival for head in heads}  # ties between equal shares
    # (A tenant at its share waits because the others want theirs, not for room: its heads
    # are served by fair share, or the reservations would undo it.)
    urgent = sorted((head for head in heads if head.job_id in making_room_for
                     or (now - head.arrival >= starvation_seconds
                         and below_its_share(head.tenant))),
                    key=lambda head: (-head.priority, head.arrival))
    for head in urgent:
        if over_quota(head):
            wait(head, quota_reason(head))
        elif not try_start(head):
            wait(head, no_room(head))
            reserved.append(head)

    # Then fair share: the tenant furthest below its weight next, backfilling behind a head
    # that does not fit; a tenant whose head holds a reservation waits with it.
    candidates = set(arrived) - {head.tenant for head in reserved}
    while candidates:
        tenant = min(candidates, key=lambda t: (share(t), arrived[t]))
        jobs = [job for job in waiting.first(tenant, BACKFILL_DEPTH + taken_from.get(tenant, 0))
                if job.job_id not in taken]
        started = False
        for position, demand in enumerate(jobs):
            if over_quota(demand):
                if position == 0:
                    wait(demand, quota_reason(demand))
                break
            if try_start(demand):
                started = True
                break
            if position == 0:
                wait(demand, no_room(demand))
                if held_below_its_share(tenant):
                    reserved.append(demand)
                    break
        if not started:
            candidates.discard(tenant)

    if preemption and running:
        # Lowest priority first, newest first within one: the order victims are taken in.
        pool = sorted(running, key=lambda job: (job.demand.priority, -job.started))
        for head in sorted(blocked.values(), key=lambda d: (-d.priority, d.arrival)):
            if head.priority <= pool[0].demand.priority:
                break  # nothing runs below this head, nor below the ones after it
            if head.job_id in taken or head.job_id in making_room_for or over_quota(head):
                continue
            excluded = set(stopping) | {p.victim for p in decision.preempt}
            decision.preempt.extend(Preemption(victim, head.job_id)
                                    for victim in _victims(head, pool, free, excluded))
    return decision


def _cpus(count: float) -> str:
    """A CPU count for people: sums of fractions leave float dust (1.7e-17 free is 0 free)."""
    return f"{max(0.0, round(count, 3)):g}"


def _bytes(count: int) -> str:
    """A memory size for people, in the largest binary unit it has one of."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.4g} {unit}"
    return f"{max(count, 0)} bytes"


def _victims(head: JobDemand, pool: Sequence[RunningJob], free: Sequence[Node],
             excluded: set[str]) -> list[str]:
    """The fewest running jobs of `pool` (in the order they are to be taken) below the head's
    priority whose room, added to what is free, lets the head fit; [] when none would."""
    trial = [Node(n.node_id, n.cpus, n.memory_bytes) for n in free]
    by_id = {node.node_id: node for node in trial}
    chosen: list[str] = []
    for job in pool:
        if job.demand.priority >= head.priority:
            break
        if job.demand.job_id in excluded:
            continue
        for bundle, node_id in zip(job.demand.bundles, job.placement, strict=True):
            if node_id in by_id:
                by_id[node_id].give_back(bundle)
        chosen.append(job.demand.job_id)
        if place(head.bundles, trial, head.spread) is not None:
            return chosen
    return []
