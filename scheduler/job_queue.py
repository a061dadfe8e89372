"""Which job runs when: a priority queue feeding a fixed number of concurrent job runners.

Policy: higher `priority` first, first-in-first-out within a priority; at most
`max_concurrent_jobs` run at once, each by its own `JobRunner` in its own thread. The cluster's
CPUs are divided evenly between the slots (and within a slot between the job's workers), so
concurrent jobs always fit and never wait on each other's placement groups.

The queue knows nothing about gRPC or SQLite. It reports through two narrow interfaces:
  - a `JobHost` (services/job_lifecycle.py) that resolves a job and loads its data, keeps its
    checkpoints and records the transitions that must be durable (started, finished,
    requeued);
  - observers (metrics, live WatchJob streams) called with every state change, step,
    evaluation and recovery. Observers run in the job's thread between steps, so they must
    be quick; one that raises is logged and ignored, never allowed to fail the job.

Stopping: a runner polls `should_stop` at every step boundary; when it stops early it has
handed a checkpoint to the host. A cancelled job then ends CANCELLED; a job stopped by
`shutdown` goes back to QUEUED (the next server start resumes it from the checkpoint); a run
longer than `max_run_seconds` ends FAILED, saying so (it can be resumed from the checkpoint).
A host that fails to record a run's end (a full disk) is asked again, with backoff, until it
records it: the result waits in memory, and the job is never left RUNNING with it lost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chainrule.v1 import job_pb2
from scheduler.checkpoint import Checkpoint
from scheduler.datasets import Dataset
from scheduler.job_runner import JobRunner, TrainingResult
from scheduler.job_states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from scheduler.placement import PARAMETER_SERVER_CPUS
from scheduler.records import EvaluationRecord, RecoveryRecord, StepRecord
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

    def prepare(self, job: QueuedJob) -> tuple[ResolvedJob, Dataset]:
        """The job resolved against its data set, and the data set split for it."""
        ...

    def load_checkpoint(self, job_id: str) -> Checkpoint | None: ...

    def save_checkpoint(self, job_id: str, checkpoint: Checkpoint) -> None: ...

    def job_started(self, job_id: str) -> None: ...

    def job_requeued(self, job_id: str) -> None: ...

    def job_finished(self, job_id: str, outcome: JobOutcome) -> None: ...


class JobObserver(Protocol):
    """Anything that follows jobs: metrics, live event streams. Every method is optional."""

    def job_state_changed(self, job_id: str, state: str) -> None: ...

    def job_step(self, job_id: str, record: StepRecord) -> None: ...

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None: ...

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None: ...

    def queue_depth(self, depth: int) -> None: ...


RunnerFactory = Callable[..., Any]  # JobRunner's signature; tests pass a fake


class JobQueue:
    def __init__(
        self,
        host: JobHost,
        *,
        max_concurrent_jobs: int = 1,
        cluster_cpus: Callable[[], float] | float = 0.0,
        observers: Sequence[Any] = (),
        runner_factory: RunnerFactory = JobRunner,
        placement_timeout_seconds: float = 120.0,
        max_run_seconds: float = math.inf,
    ):
        """`cluster_cpus` (a number or a function giving it) is what the slots divide; 0 lets
        each runner take its spec's CPUs (tests with a fake runner). `max_run_seconds` bounds
        one run of a job, from its start (or resume) to its end."""
        if max_concurrent_jobs < 1:
            raise ValueError(f"max_concurrent_jobs must be >= 1, got {max_concurrent_jobs}")
        self.host = host
        self.max_concurrent_jobs = max_concurrent_jobs
        self._cluster_cpus = cluster_cpus
        self.observers = list(observers)
        self.runner_factory = runner_factory
        self.placement_timeout_seconds = placement_timeout_seconds
        self.max_run_seconds = max_run_seconds
        self._lock = threading.Lock()
        self._heap: list[tuple[int, int, str]] = []  # (-priority, arrival, job id)
        self._waiting: dict[str, QueuedJob] = {}  # queued job id -> job (heap entries may be stale)
        self._arrival = itertools.count()
        self._running: dict[str, _RunningJob] = {}
        self._draining = False
        self._idle = threading.Condition(self._lock)

    # --- the public operations ---------------------------------------------------------------

    def submit(self, job: QueuedJob) -> None:
        """Queue a job (its record must already say QUEUED); it starts when a slot is free."""
        with self._lock:
            if self._draining:
                return  # stays QUEUED in the store: the next start runs it
            self._waiting[job.job_id] = job
            heapq.heappush(self._heap, (-job.spec.priority, next(self._arrival), job.job_id))
            depth = len(self._waiting)
        self._notify("job_state_changed", job.job_id, QUEUED)  # counted like every transition
        self._notify("queue_depth", depth)
        self._dispatch()

    def submit_all(self, jobs: Iterable[QueuedJob]) -> None:
        for job in jobs:
            self.submit(job)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or ask a running one to stop at its next step boundary.
        False when the queue does not hold the job (already finished, or unknown)."""
        with self._lock:
            job = self._waiting.pop(job_id, None)
            running = self._running.get(job_id)
            if running is not None:
                running.cancelled.set()
            depth = len(self._waiting)
        if job is not None:
            self.host.job_finished(job_id, JobOutcome(CANCELLED))
            self._notify("job_state_changed", job_id, CANCELLED)
            self._notify("queue_depth", depth)
            return True
        return running is not None

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
        with self._lock:
            self._draining = True
            for running in self._running.values():
                running.interrupted.set()
            self._waiting.clear()
            self._heap.clear()
            return self._idle.wait_for(lambda: not self._running, timeout=timeout)

    # --- running jobs --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start waiting jobs while slots are free (called on submit and when a job ends)."""
        while True:
            with self._lock:
                if self._draining or len(self._running) >= self.max_concurrent_jobs:
                    return
                job = None
                while self._heap and job is None:
                    _, _, job_id = heapq.heappop(self._heap)
                    job = self._waiting.pop(job_id, None)  # None: cancelled while waiting
                if job is None:
                    return
                running = _RunningJob(job, time.monotonic() + self.max_run_seconds)
                self._running[job.job_id] = running
                depth = len(self._waiting)
            self._notify("queue_depth", depth)
            running.thread = threading.Thread(target=self._run, args=(running,),
                                              name=f"job-{job.job_id}", daemon=True)
            running.thread.start()

    def _run(self, running: _RunningJob) -> None:
        job = running.job
        job_id = job.job_id
        outcome: JobOutcome | None = None
        try:
            self.host.job_started(job_id)
            self._notify("job_state_changed", job_id, RUNNING)
            resolved, dataset = self.host.prepare(job)
            runner = self.runner_factory(
                resolved, dataset,
                on_step=lambda record: self._notify("job_step", job_id, record),
                on_evaluation=lambda record: self._notify("job_evaluation", job_id, record),
                on_recovery=lambda record: self._notify("job_recovery", job_id, record),
                should_stop=running.should_stop,
                on_checkpoint=lambda checkpoint: self.host.save_checkpoint(job_id, checkpoint),
                resume_from=self.host.load_checkpoint(job_id),
                cpus_per_worker=self._cpus_per_worker(resolved),
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
        except Exception as error:  # a failed job must never take the service down
            log.exception("job %s failed", job_id)
            message = str(error) or type(error).__name__
            outcome = JobOutcome(FAILED, error=f"{type(error).__name__}: {message}",
                                 traceback=traceback.format_exc())
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

    def _cpus_per_worker(self, job: ResolvedJob) -> float | None:
        """The cluster's CPUs / slots / the job's workers, less the shards' token CPUs, so that
        `max_concurrent_jobs` jobs fit side by side."""
        total = self._cluster_cpus() if callable(self._cluster_cpus) else self._cluster_cpus
        if total <= 0:
            return None
        workers, shards = job.workers, job.parameter_servers
        per_slot = total / self.max_concurrent_jobs - shards * PARAMETER_SERVER_CPUS
        cpus = math.floor(per_slot / workers * 1000) / 1000  # Ray's resource precision
        return max(cpus, 0.001)

    def _notify(self, method: str, *args: Any) -> None:
        for observer in self.observers:
            callback = getattr(observer, method, None)
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:  # an observer's bug must not fail a job
                log.exception("observer %r failed in %s", observer, method)


class _RunningJob:
    def __init__(self, job: QueuedJob, deadline: float = math.inf):
        self.job = job
        self.deadline = deadline  # time.monotonic()
        self.cancelled = threading.Event()
        self.interrupted = threading.Event()
        self.timed_out = threading.Event()
        self.thread: threading.Thread | None = None

    def should_stop(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.timed_out.set()
        return (self.cancelled.is_set() or self.interrupted.is_set()
                or self.timed_out.is_set())
