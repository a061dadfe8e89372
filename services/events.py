"""Live job events for WatchJob streams: a fan-out from the job threads to the watchers.

The store keeps the durable history (state changes, evaluations); this hub only carries what
is happening now, so a step's progress reaches every watcher without a database write per
step. Each watcher holds only the newest progress and validation (each supersedes the last)
besides its state changes and recoveries: a slow watcher loses superseded numbers, never a
state change, and never slows the job.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass

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
    validation only the newest not yet sent is kept, and it is ready once its time is
    `min_interval` past the last one of its kind sent. A publish wakes the watcher only when
    it has something ready: a job's every step costs a watcher a few operations under a lock,
    not a thread switch (200 watchers of a job of 40 steps a second were 8,000 wake-ups a
    second of threads that mostly went back to sleep, with the GIL, in bench/hostile.py)."""

    def __init__(self, hub: EventHub, job_id: str, min_interval: float = 0.0):
        self.hub, self.job_id, self.min_interval = hub, job_id, min_interval
        self._ready = threading.Condition(threading.Lock())
        self._ordered: deque[JobEvent | None] = deque()  # None: the hub closed
        self._newest: dict[str, JobEvent] = {}  # kind -> its newest not sent (coalesced kinds)
        self._last_sent: dict[str, float] = {}  # kind -> the time of the last one sent

    def get(self, timeout: float) -> JobEvent | None:
        """The next event to send, or None after `timeout` seconds or when the hub closes."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._ordered or self._next_coalesced(),
                                        timeout):
                return None
            if self._ordered:
                return self._ordered.popleft()
            event = self._next_coalesced()
            assert event is not None
            del self._newest[event.kind]
            self._last_sent[event.kind] = event.time
            return event

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
        return last is None or event.time - last >= self.min_interval

    def _next_coalesced(self) -> JobEvent | None:
        due = [event for event in self._newest.values() if self._is_due(event)]
        return min(due, key=lambda event: event.time) if due else None

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Subscription]] = defaultdict(list)
        self._latest_progress: dict[str, ProgressSummary] = {}
        self.closed = threading.Event()

    def subscribe(self, job_id: str, min_interval: float = 0.0) -> Subscription:
        """A watcher of the job's events from now on; of its progress and validation events,
        at most one of each per `min_interval` seconds (by the events' times), the newest."""
        subscription = Subscription(self, job_id, min_interval)
        with self._lock:
            self._subscribers[job_id].append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            subscribers = self._subscribers.get(subscription.job_id, [])
            if subscription in subscribers:
                subscribers.remove(subscription)
            if not subscribers:
                self._subscribers.pop(subscription.job_id, None)

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
