"""A job's runner outside the server's process: a detached Ray actor, so training outlives it.

`DetachedJobRunner` has JobRunner's interface (the queue makes one and calls `run()`), but the
JobRunner runs in a detached actor named `runner-<job id>` (RunnerActor) on the server's node,
in the data folder's Ray namespace (`namespace_of`). Detached: the actor, and the workers and
shards it starts, are not the server's, so a killed server leaves them training, on a Ray that
outlives the server too: the embedded one, a process session of its own
(scheduler/ray_head.py), or a cluster joined by address. The actor must be on the server's
node because it writes the store in the data folder; a driver that joins a cluster by address
does so through its own node's raylet, so that node is a node of the cluster.

Runners of every server on one cluster share its named actors: the namespace keeps each data
folder's apart (a job id is unique in its folder only, and a server kills a leftover runner of
the job it starts, which must never be another folder's). It is made from the folder's path and
a random id kept in it, so the next server on the folder finds the runners, and no other server
does, even on a copy of the folder.

The server's side follows the actor, polling it every POLL_SECONDS for what the run reported
(steps, evaluations, recoveries, checkpoints), which it hands to the queue's callbacks as
JobRunner would have called them, and tells it to stop when the queue's `should_stop` says so
(cancel, shutdown, preemption, a run given up).

While no server follows it the actor keeps what a server must see: its newest checkpoint (the
older unsent ones are superseded), every evaluation and recovery, and the newest
STEP_RECORDS_KEPT steps. It writes its lease and progress to the store itself through a
`RunKeeper` (the service's; services/run_keeper.py): at most every KEEP_EVERY_SECONDS from its
step boundaries, and after the run ends until a server takes the result. A restarted server
attaches (`attach`) to every RUNNING job whose actor is there and follows it from then on; the
job's steps never stopped. The actor tells it where the run's actors are reserved
(`placement`: the nodes its placement group is pinned to), so that the new server's queue
counts them where they are.

A runner actor that dies (its process killed) is `RunnerLost`: the queue requeues the job from
its last checkpoint. When the whole Ray went with it the server's Ray watch takes the run back
first (services/ray_recovery.py); the follower waits LOST_GRACE_SECONDS for that.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import pickle
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scheduler.checkpoint import Checkpoint
from scheduler.job_runner import JobRunner, TrainingResult
from scheduler.records import EvaluationRecord, RecoveryRecord, RunPlacement, StepRecord
from worker.shared_memory import remove_stale_groups

log = logging.getLogger(__name__)

NAME_PREFIX = "runner-"
NAMESPACE_PREFIX = "chainrule-"
NAMESPACE_FILE = "runner_namespace"  # in the data folder: the random part of its namespace
POLL_SECONDS = 0.1
STOP_CHECK_SECONDS = 0.01  # how often the follower asks the queue's should_stop between polls
POLL_TIMEOUT_SECONDS = 30.0  # an actor busy this long still answers; a dead one fails at once
KEEP_EVERY_SECONDS = 1.0
STEP_RECORDS_KEPT = 1000
LOST_GRACE_SECONDS = 3.0  # the server's Ray watch looks every 0.5 s
STOP_TIMEOUT_SECONDS = 300.0  # a stop asked for and not done by then: the actor is wedged


class RunKeeper(Protocol):
    """Writes a run's lease and progress to the store from the runner's process (picklable)."""

    def renew(self, record: StepRecord | None) -> bool:
        """Extend the lease (and record `record`'s progress); False once the run lost it."""
        ...


class RunnerLost(RuntimeError):
    """The runner actor died (its process or its node): the job goes back to the queue."""


class RunnerFailed(RuntimeError):
    """The run raised in the actor an exception that does not pickle: its type name, message
    and traceback (others cross as themselves, with `remote_traceback`: _crossing)."""

    def __init__(self, error_type: str, message: str, remote_traceback: str):
        super().__init__(message)
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __reduce__(self):  # it crosses from the actor to the server pickled
        return RunnerFailed, (self.error_type, str(self), self.remote_traceback)


def actor_name(job_id: str) -> str:
    return f"{NAME_PREFIX}{job_id}"


def namespace_of(data_dir: Path) -> str:
    """The Ray namespace of the runners of the server on `data_dir`: "chainrule-" and 16 hex
    digits of a hash of the folder's absolute path and of a random id made on its first use
    and kept in it (0600). The id tells apart folders at one path on different machines; the
    path tells apart a folder from a copy of it (a backup restored beside it, say)."""
    path = Path(data_dir) / NAMESPACE_FILE
    if not path.exists():
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(8))
    identity = f"{path.read_text().strip()}:{Path(data_dir).resolve()}"
    return NAMESPACE_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass
class RunnerReport:
    """What a poll returns: the run's reports since the last one acknowledged, in order."""

    events: list[tuple[int, str, Any]]  # (index, kind, record): kind names the callback
    next_index: int  # acknowledge with it next time
    done: bool = False
    result: TrainingResult | None = None
    error: Exception | None = None  # the run's, as raised in the actor (_crossing)


@dataclass
class _Outbox:
    """The run's reports not yet acknowledged by a server."""

    events: collections.deque = field(default_factory=collections.deque)
    next_index: int = 0
    steps: int = 0  # step events in `events`

    def add(self, kind: str, record: Any) -> None:
        if kind == "checkpoint":  # only the newest matters: it supersedes unsent ones
            self.events = collections.deque(e for e in self.events if e[1] != "checkpoint")
            self.steps = sum(1 for e in self.events if e[1] == "step")
        self.events.append((self.next_index, kind, record))
        self.next_index += 1
        if kind == "step":
            self.steps += 1
            if self.steps > STEP_RECORDS_KEPT:  # no server follows: drop the oldest step
                for position, event in enumerate(self.events):
                    if event[1] == "step":
                        del self.events[position]
                        self.steps -= 1
                        break

    def acknowledge(self, before: int) -> None:
        while self.events and self.events[0][0] < before:
            if self.events.popleft()[1] == "step":
                self.steps -= 1


class RunnerActor:
    """Runs one JobRunner in a thread of its own and keeps its reports for the server."""

    def __init__(self, job, dataset, options: dict, keeper: RunKeeper | None,
                 placement: RunPlacement):
        self._keeper = keeper
        self._placement = placement
        self._lock = threading.Lock()
        self._outbox = _Outbox()
        self._stop = threading.Event()
        self._taken = threading.Event()  # a server took the result
        self._done = False
        self._result: TrainingResult | None = None
        self._error: Exception | None = None
        self._kept_at = 0.0
        self._last_step: StepRecord | None = None
        runner = JobRunner(job, dataset, on_step=self._on_step,
                           on_evaluation=lambda record: self._add("evaluation", record),
                           on_recovery=lambda record: self._add("recovery", record),
                           on_checkpoint=lambda checkpoint: self._add("checkpoint", checkpoint),
                           should_stop=self._stop.is_set, **options)
        threading.Thread(target=self._run, args=(runner,), name="runner", daemon=True).start()

    def poll(self, acknowledged: int) -> RunnerReport:
        with self._lock:
            self._outbox.acknowledge(acknowledged)
            report = RunnerReport(list(self._outbox.events), self._outbox.next_index,
                                  self._done, self._result, self._error)
        if report.done:
            self._taken.set()
        return report

    def stop(self) -> None:
        self._stop.set()

    def placement(self) -> RunPlacement:
        return self._placement

    def _add(self, kind: str, record: Any) -> None:
        with self._lock:
            self._outbox.add(kind, record)

    def _on_step(self, record: StepRecord) -> None:
        self._add("step", record)
        self._last_step = record
        now = time.monotonic()
        if self._keeper is not None and now - self._kept_at >= KEEP_EVERY_SECONDS:
            self._kept_at = now
            self._keep(record)

    def _keep(self, record: StepRecord | None) -> bool:
        """Renew the lease; False once it is lost (the run then stops)."""
        assert self._keeper is not None
        try:
            kept = self._keeper.renew(record)
        except Exception as error:  # a store that refuses now: again next time
            log.warning("renewing the run's lease failed: %s", error)
            return True
        if not kept and not self._stop.is_set():
            log.warning("the run lost its lease (the job was requeued or ended): it stops")
            self._stop.set()
        return kept

    def _run(self, runner: JobRunner) -> None:
        try:
            result, error = runner.run(), None
        except Exception as raised:
            result, error = None, _crossing(raised, traceback.format_exc())
        with self._lock:
            self._done, self._result, self._error = True, result, error
        if self._keeper is not None and self._last_step is not None:
            self._keep(self._last_step)  # the store's progress: where the run ended
        # The job is RUNNING until a server records its end: its lease must not run out
        # (unless it is lost already: the job was requeued, this result is nobody's).
        while self._keeper is not None and not self._taken.wait(KEEP_EVERY_SECONDS * 5):
            if not self._keep(None):
                return


def _crossing(raised: Exception, text: str) -> Exception:
    """`raised` as the server will raise it (the queue tells some apart: NodeGone), with the
    traceback of this process; a RunnerFailed naming it when it does not pickle."""
    try:
        raised.remote_traceback = text  # type: ignore[attr-defined]
        pickle.loads(pickle.dumps(raised))
        return raised
    except Exception:
        return RunnerFailed(type(raised).__name__, str(raised) or type(raised).__name__, text)


# Threaded (max_concurrency): polls and stops are answered while the run's thread trains.
_RemoteRunner: Any = ray.remote(  # type: ignore[call-overload]
    num_cpus=0, max_concurrency=4, max_restarts=0)(RunnerActor)


class DetachedJobRunner:
    """JobRunner's interface, with the run in a detached actor (the module docstring)."""

    def __init__(self, job, dataset, *, on_step: Callable[[StepRecord], None],
                 on_evaluation: Callable[[EvaluationRecord], None],
                 on_recovery: Callable[[RecoveryRecord], None],
                 should_stop: Callable[[], bool],
                 on_checkpoint: Callable[[Checkpoint], None], job_id: str,
                 namespace: str, cpus_per_worker: float, nodes: Sequence[str],
                 keeper: RunKeeper | None = None, **options):
        """`cpus_per_worker` and `nodes`, the queue's placement of the run's bundles (JobRunner
        takes them too), are what the actor reports to a server that attaches to it."""
        self.job, self.dataset, self.job_id = job, dataset, job_id
        self.namespace, self.keeper = namespace, keeper
        self.placement = RunPlacement(cpus_per_worker, tuple(nodes))
        self.options = {**options, "cpus_per_worker": cpus_per_worker, "nodes": nodes}
        self.callbacks: dict[str, Callable[[Any], None]] = {
            "step": on_step, "evaluation": on_evaluation, "recovery": on_recovery,
            "checkpoint": on_checkpoint}
        self.should_stop = should_stop
        self._actor: Any = None  # set by attach: follow it rather than start one

    @classmethod
    def attach(cls, job_id: str, namespace: str, **callbacks) -> DetachedJobRunner:
        """Follow the actor already running `job_id` (`run()` raises RunnerLost if none)."""
        # It starts nothing: the placement is the actor's to report, the run's to keep.
        runner = cls(None, None, job_id=job_id, namespace=namespace, cpus_per_worker=0.0,
                     nodes=(), **callbacks)
        runner._actor = find(job_id, namespace)
        if runner._actor is None:
            runner._actor = _Missing()
        return runner

    def run(self) -> TrainingResult:
        if self._actor is None:
            self._actor = self._start()
        if isinstance(self._actor, _Missing):
            raise RunnerLost(f"no runner actor {actor_name(self.job_id)} to attach to")
        return self._follow(self._actor)

    def _start(self):
        stale = find(self.job_id, self.namespace)
        if stale is not None:  # a run given up whose actor still lives: never two at once
            ray.kill(stale)
            _wait_until_gone(self.job_id, self.namespace)
        node = ray.get_runtime_context().get_node_id()  # the data folder is on this node
        return _RemoteRunner.options(
            name=actor_name(self.job_id), namespace=self.namespace, lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(self.job, self.dataset, {**self.options, "job_id": self.job_id}, self.keeper,
                 self.placement)

    def _follow(self, actor) -> TrainingResult:
        acknowledged = 0
        stop_asked_at: float | None = None
        while True:
            if stop_asked_at is None and self.should_stop():
                actor.stop.remote()
                stop_asked_at = time.monotonic()
            try:
                report = ray.get(actor.poll.remote(acknowledged), timeout=POLL_TIMEOUT_SECONDS)
            except GetTimeoutError:
                report = None
            except RayActorError as error:
                self._lost(f"its runner actor {actor_name(self.job_id)} died ({error})")
            if report is not None:
                for _, kind, record in report.events:
                    self.callbacks[kind](record)
                acknowledged = report.next_index
                if report.done:
                    ray.kill(actor)  # its run ended and cleaned up: nothing of it is left
                    if report.error is not None:
                        raise report.error
                    assert report.result is not None
                    return report.result
            if (stop_asked_at is not None
                    and time.monotonic() - stop_asked_at > STOP_TIMEOUT_SECONDS):
                ray.kill(actor)
                raise RunnerLost(f"its runner did not stop within {STOP_TIMEOUT_SECONDS:g} s "
                                 f"of being asked to: killed")
            self._wait_for_next_poll(stop_asked_at is None)

    def _wait_for_next_poll(self, may_stop: bool) -> None:
        """POLL_SECONDS, cut short when the queue says stop: the run stops at the step
        boundary after the actor hears it, so it should hear it at once."""
        deadline = time.monotonic() + POLL_SECONDS
        while time.monotonic() < deadline:
            if may_stop and self.should_stop():
                return
            time.sleep(STOP_CHECK_SECONDS)

    def _lost(self, reason: str) -> NoReturn:
        """Raise RunnerLost, once the run had LOST_GRACE_SECONDS to be stopped anyway (its Ray
        lost, say). The shared memory the dead runner made is removed: no process of it is
        left to."""
        deadline = time.monotonic() + LOST_GRACE_SECONDS
        while time.monotonic() < deadline and not self.should_stop():
            time.sleep(0.1)
        removed = remove_stale_groups()
        if removed:
            log.info("removed the shared memory of a lost runner: %s",
                     ", ".join(str(folder) for folder in removed))
        raise RunnerLost(reason)


class _Missing:
    """attach found no actor: run() says so."""


def find(job_id: str, namespace: str):
    """The live runner actor of `job_id`, or None."""
    try:
        return ray.get_actor(actor_name(job_id), namespace=namespace)
    except ValueError:  # no actor of that name (never started, or dead)
        return None


def placement_of(job_id: str, namespace: str) -> RunPlacement | None:
    """Where the live runner of `job_id` reserved its run's actors; None when it has no live
    runner (none, or one that died as it was asked). A live runner that cannot answer raises
    (one of an older version has no placement(): AttributeError; its placement() failing:
    RayTaskError): it may still train, so it is not taken for gone."""
    actor = find(job_id, namespace)
    if actor is None:
        return None
    try:
        return ray.get(actor.placement.remote(), timeout=POLL_TIMEOUT_SECONDS)
    except (RayActorError, GetTimeoutError):  # dead, or wedged: its job runs again
        return None


def _wait_until_gone(job_id: str, namespace: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while find(job_id, namespace) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
