"""Live job events for WatchJob streams: a fan-out from the job threads to the watchers.

The store keeps the durable history (state changes, evaluations); this hub only carries what
is happening now, so a step's progress reaches every watcher without a database write per
step. Each watcher has its own bounded queue: a slow watcher loses old progress events
(the next one supersedes them), never a state change, and never slows the job.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from dataclasses import dataclass

from scheduler.records import RecoveryRecord
from services.store import ProgressSummary, ValidationSummary

_QUEUE_LIMIT = 1000


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
    def __init__(self, hub: EventHub, job_id: str):
        self.hub, self.job_id = hub, job_id
        self.events: queue.Queue[JobEvent | None] = queue.Queue()

    def get(self, timeout: float) -> JobEvent | None:
        """The next event, or None after `timeout` seconds or when the hub closes."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def put(self, event: JobEvent | None) -> None:
        if event is not None and event.kind == "progress" and self.events.qsize() > _QUEUE_LIMIT:
            return  # a stalled watcher: drop progress, which the next one supersedes
        self.events.put(event)

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

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(self, job_id)
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
