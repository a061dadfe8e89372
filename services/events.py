"""Live job events for WatchJob streams: a fan-out from the job threads to the watchers.

The store keeps the durable history (state changes, evaluations); this hub only carries what
is happening now, so a step's progress reaches every watcher without a database write per
step. Each watcher holds only the newest progress and validation (each supersedes the last)
besides its state changes and recoveries: a slow watcher loses superseded numbers, never a
state change, and never slows the job.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from scheduler.records import RecoveryRecord
from services.store import ProgressSummary, ValidationSummary

# Kinds a newer event of supersedes (each carries the latest numbers): a watcher is sent at
# most one per its interval, and only the newest. Every other kind is sent, in order.
COALESCED_KINDS = frozenset({"progress", "validation"})


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    time: float
    kind: str  # "state", "progress", "validation" or "recovery"
    state: str = ""
    error: str = ""
    progress: ProgressSummary | None = None
    validation: ValidationSummary | None = None
    recovery: RecoveryRecord | None = None


class Subscription:
    """One watcher's events. State changes and recoveries are kept, in order; of progress and
    validation only the newest not yet sent is kept, and it is ready once its time, or the
    hub's clock when later, is `min_interval` (or its tenant's share of events, when longer:
    EventHub) past the last one of its kind sent: the newest progress held back goes out
    within an interval even when no event follows (a long checkpoint's pause), then with the
    clock's time, so the times a watcher is sent are always an interval apart. A publish
    wakes the watcher only when it has something ready, and a waiting watcher wakes itself
    only when what it holds falls due: a job's every step costs a watcher a few operations
    under a lock, not a thread switch (200 watchers of a job of 40 steps a second were 8,000
    wake-ups a second of threads that mostly went back to sleep, with the GIL, in
    bench/hostile.py)."""

    def __init__(self, hub: EventHub, job_id: str, min_interval: float = 0.0,
                 tenant: str = ""):
        self.hub, self.job_id, self.tenant = hub, job_id, tenant
        self.min_interval = min_interval
        self._ready = threading.Condition(threading.Lock())
        self._ordered: deque[JobEvent | None] = deque()  # None: the hub closed
        self._newest: dict[str, JobEvent] = {}  # kind -> its newest not sent (coalesced kinds)
        self._last_sent: dict[str, float] = {}  # kind -> the time of the last one sent

    def get(self, timeout: float) -> JobEvent | None:
        """The next event to send, or None after `timeout` seconds or when the hub closes."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                if self._ordered:
                    return self._ordered.popleft()
                event = self._next_coalesced()
                if event is not None:
                    del self._newest[event.kind]
                    if not self._due_by_its_time(event):
                        # Due by the clock alone: nothing newer came (a long checkpoint's
                        # pause), so its numbers are still the job's now, and it says so.
                        event = replace(event, time=self.hub.clock())
                    self._last_sent[event.kind] = event.time
                    return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                # Woken by a publish, or when the event held back falls due.
                self._ready.wait(min(remaining, self._seconds_until_due()))

    def put(self, event: JobEvent | None) -> None:
        with self._ready:
            if event is not None and event.kind in COALESCED_KINDS:
                self._newest[event.kind] = event
                if self._is_due(event):
                    self._ready.notify()
                return
            if event is not None:
                # A state change or recovery comes after the progress and validation before it.
                for held in sorted(self._newest.values(), key=lambda held: held.time):
                    self._ordered.append(held)
                    self._last_sent[held.kind] = held.time
                self._newest.clear()
            self._ordered.append(event)
            self._ready.notify()

    def _is_due(self, event: JobEvent) -> bool:
        last = self._last_sent.get(event.kind)
        return last is None or max(event.time, self.hub.clock()) - last >= self._interval()

    def _due_by_its_time(self, event: JobEvent) -> bool:
        last = self._last_sent.get(event.kind)
        return last is None or event.time - last >= self._interval()

    def _interval(self) -> float:
        return max(self.min_interval, self.hub.share_interval(self.tenant))

    def _seconds_until_due(self) -> float:
        """How long until the first event held back may be sent (inf: none held)."""
        now = self.hub.clock()
        waits = [self._last_sent.get(kind, now) + self._interval() - now for kind in self._newest]
        return max(min(waits, default=math.inf), 0.0)

    def _next_coalesced(self) -> JobEvent | None:
        due = [event for event in self._newest.values() if self._is_due(event)]
        return min(due, key=lambda event: event.time) if due else None

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A tenant's watches together get at most this many progress (and as many validation) events a
# second: with more than 8 open, each gets its share, so a tenant's sends do not grow with the
# streams it holds (200 watches at 4 a second each were 1,300 sends a second in
# bench/hostile.py, every one a thread switch and a turn of the gRPC server's event thread).
TENANT_WATCH_EVENTS_PER_SECOND = 32.0


class EventHub:
    def __init__(self, tenant_events_per_second: float = TENANT_WATCH_EVENTS_PER_SECOND,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock`: the clock of the events' times (a test's may stand still)."""
        self.tenant_events_per_second = tenant_events_per_second
        self.clock = clock
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Subscription]] = defaultdict(list)
        self._watches: Counter[str] = Counter()  # tenant -> its subscriptions open
        self._latest_progress: dict[str, ProgressSummary] = {}
        self.closed = threading.Event()

    def subscribe(self, job_id: str, min_interval: float = 0.0,
                  tenant: str = "") -> Subscription:
        """A watcher of the job's events from now on; of its progress and validation events,
        at most one of each per `min_interval` seconds, or per the tenant's share of
        `tenant_events_per_second` when that is longer (by the events' times, or the clock when
        later), the newest."""
        subscription = Subscription(self, job_id, min_interval, tenant)
        with self._lock:
            self._subscribers[job_id].append(subscription)
            self._watches[tenant] += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subscribers = self._subscribers.get(subscription.job_id, [])
            if subscription in subscribers:
                subscribers.remove(subscription)
                self._watches[subscription.tenant] -= 1
                if not self._watches[subscription.tenant]:
                    del self._watches[subscription.tenant]
            if not subscribers:
                self._subscribers.pop(subscription.job_id, None)

    def share_interval(self, tenant: str) -> float:
        """The interval each of the tenant's watches gets from the tenant's events a second."""
        return self._watches[tenant] / self.tenant_events_per_second

    def publish(self, event: JobEvent) -> None:
        with self._lock:
            if event.kind == "progress" and event.progress is not None:
                self._latest_progress[event.job_id] = event.progress
            subscribers = list(self._subscribers.get(event.job_id, ()))
        for subscription in subscribers:
            subscription.put(event)

    def latest_progress(self, job_id: str) -> ProgressSummary | None:
        with self._lock:
            return self._latest_progress.get(job_id)

    def forget(self, job_id: str) -> None:
        """Drop a finished job's in-memory progress (the store has its final summary)."""
        with self._lock:
            self._latest_progress.pop(job_id, None)

    def close(self) -> None:
        """Server shutdown: wake every watcher so its stream can end."""
        self.closed.set()
        with self._lock:
            subscribers = [s for group in self._subscribers.values() for s in group]
        for subscription in subscribers:
            subscription.put(None)
