"""The job queue with a stand-in runner and nodes of given sizes (no Ray): placement by the
CPUs jobs ask for on real node sizes, nodes joining, priorities, FIFO, the concurrency cap,
queue positions and wait reasons, cancellation, failures and shutdown. The real runner is
exercised end to end in test_end_to_end.py."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from scheduler.cluster_view import FixedNodes
from scheduler.datasets import builtin_shape
from scheduler.job_lease import lease_until
from scheduler.job_queue import JobQueue, QueuedJob
from scheduler.placement import NodeGone
from scheduler.records import RunPlacement
from scheduler.scheduling_policy import Node
from tests.services.helpers import iris_spec, wait_for
from worker.resolved_job import resolve


@dataclass
class FakeResult:
    stopped_early: bool
    final_evaluation: None = None


class FakeRunner:
    """Runs `steps` steps of `step_seconds`, polling should_stop like JobRunner."""

    steps, step_seconds = 5, 0.01
    started: list = []

    cpus: dict = {}  # job name -> the cpus_per_worker it was given
    released = threading.Event()  # a job named "holds" runs until it is set
    # The first run of these lasts until it is told to stop, however late that comes: a run
    # of a few steps of 0.05 s could end, at a load of 20, before the test stopped it.
    until_stopped = ("long", "interrupted", "preempted")
    nodes: dict = {}  # job name -> the node of each of its actors it was given

    def __init__(self, spec, dataset, *, should_stop, on_step, on_checkpoint, **options):
        self.spec, self.should_stop, self.on_checkpoint = spec, should_stop, on_checkpoint
        self.options = options

    def run(self):
        FakeRunner.started.append(self.spec.name)
        FakeRunner.cpus[self.spec.name] = self.options["cpus_per_worker"]
        FakeRunner.nodes[self.spec.name] = self.options["nodes"]
        if self.spec.name == "holds":
            FakeRunner.released.wait(60)
        if self.spec.name == "broken":
            raise ValueError("no such thing")
        if self.spec.name == "unplaced" and FakeRunner.started.count("unplaced") == 1:
            raise NodeGone("node(s) gone left before the job's actors were placed there")
        if (self.spec.name in FakeRunner.until_stopped
                and FakeRunner.started.count(self.spec.name) == 1):
            deadline = time.monotonic() + 60
            while not self.should_stop() and time.monotonic() < deadline:
                time.sleep(0.01)
        for _ in range(self.steps):
            if self.should_stop():
                self.on_checkpoint("checkpoint")
                return FakeResult(stopped_early=True)
            time.sleep(self.step_seconds)
        return FakeResult(stopped_early=False)


@dataclass
class FakeHost:
    states: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prepare(self, job):
        return _resolved(job.spec), None  # the fake runner needs no data

    def load_checkpoint(self, job_id):
        return None

    def save_checkpoint(self, job_id, checkpoint):
        self.checkpoints[job_id] = checkpoint

    def job_started(self, job_id, lease):
        self.states[job_id] = "RUNNING"

    def renew_lease(self, job_id, lease):
        return True

    def expired_leases(self):
        return []  # leases are tested on a real store: test_job_leases.py

    def job_requeued(self, job_id):
        self.states[job_id] = "QUEUED"

    def job_finished(self, job_id, outcome):
        self.states[job_id] = outcome.state
        self.errors[job_id] = outcome.error


class Recorder:
    def __init__(self):
        self.calls, self.running, self.most_running = [], set(), 0

    def job_state_changed(self, job_id, state):
        self.calls.append((job_id, state))
        if state == "RUNNING":
            self.running.add(job_id)
        else:
            self.running.discard(job_id)
        self.most_running = max(self.most_running, len(self.running))


def _resolved(spec):
    return resolve(spec, builtin_shape(spec.data.dataset))


def _queue(host, max_concurrent_jobs=1, observers=(), nodes=(("node", 2.0),), **options):
    FakeRunner.started, FakeRunner.cpus, FakeRunner.nodes = [], {}, {}
    FakeRunner.released = threading.Event()
    return JobQueue(host, cluster=FixedNodes([Node(*node) for node in nodes]),
                    max_concurrent_jobs=max_concurrent_jobs, observers=observers,
                    runner_factory=FakeRunner, **options)


def _job(name: str, priority: int = 0, cpus_per_worker: float = 0.0,
         workers: int = 1) -> QueuedJob:
    spec = iris_spec(name=name, priority=priority)
    spec.resources.cpus_per_worker = cpus_per_worker
    spec.resources.workers = workers
    return QueuedJob(name, spec)


def test_the_runner_is_given_the_nodes_the_policy_chose_for_each_actor():
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("small", 1.0), ("big", 4.0)])
    queue.submit(_job("wide", workers=2, cpus_per_worker=1.5))  # only "big" holds a worker
    wait_for(lambda: host.states.get("wide") == "SUCCEEDED", 5, what="the job to run")
    assert FakeRunner.nodes["wide"] == ("big", "big", "big")  # 2 workers, then the shard


def test_a_job_asking_more_memory_than_any_node_has_could_never_fit():
    queue = _queue(FakeHost(), nodes=[("a", 2.0, 2 << 30), ("b", 2.0, 2 << 30)])
    job = _job("hungry")
    job.spec.resources.memory_bytes_per_worker = 3 << 30
    assert queue.never_fits(job) == (
        "1 worker(s) x 0.99 CPUs and 3221225472 bytes of memory and 1 shard(s) x 0.01: an "
        "actor needs 3 GiB of memory; the largest node has 2 GiB")


def test_higher_priority_first_then_first_in_first_out():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("holds"))  # starts at once: the only slot is free
    for name, priority in [("low-a", 0), ("high", 5), ("low-b", 0), ("mid", 1)]:
        queue.submit(_job(name, priority))
    FakeRunner.released.set()  # all four wait for the slot (at load 10 the first job ended
    # before the others were submitted, and low-a took the slot before high was queued)
    wait_for(lambda: len(host.states) == 5 and set(host.states.values()) == {"SUCCEEDED"}, 10)
    assert FakeRunner.started == ["holds", "high", "mid", "low-a", "low-b"]


def test_jobs_start_while_their_actors_fit_on_the_nodes_as_sized():
    """A 4-CPU node and a 1-CPU node are not 5 CPUs: 1.5-CPU workers fit two on the first
    (with their shards' 0.01) and none on the second, so two of four jobs run at once."""
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, max_concurrent_jobs=0, observers=[recorder],
                   nodes=[("big", 4.0), ("small", 1.0)])
    FakeRunner.step_seconds = 0.05
    for i in range(4):
        queue.submit(_job(f"job-{i}", cpus_per_worker=1.5))
    wait_for(lambda: list(host.states.values()).count("SUCCEEDED") == 4, 10)
    assert recorder.most_running == 2
    assert FakeRunner.cpus == {f"job-{i}": 1.5 for i in range(4)}  # as asked, not divided


def test_a_job_asking_for_no_cpus_takes_one_per_worker_shards_included():
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, max_concurrent_jobs=0, observers=[recorder], nodes=[("node", 2.0)])
    FakeRunner.step_seconds = 0.05
    for i in range(4):
        queue.submit(_job(f"job-{i}"))  # 1 worker, 1 shard: 0.99 + 0.01 CPUs
    wait_for(lambda: list(host.states.values()).count("SUCCEEDED") == 4, 10)
    assert recorder.most_running == 2
    assert set(FakeRunner.cpus.values()) == {0.99}


def test_the_cap_limits_jobs_at_once_whatever_room_is_left():
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, max_concurrent_jobs=2, observers=[recorder], nodes=[("node", 64.0)])
    FakeRunner.step_seconds = 0.02
    for i in range(6):
        queue.submit(_job(f"job-{i}"))
    assert queue.place_of("job-5").reason == ("waiting for a job slot: this server runs at "
                                              "most 2 job(s) at once")
    wait_for(lambda: list(host.states.values()).count("SUCCEEDED") == 6, 10)
    assert recorder.most_running == 2


def test_a_queued_job_says_its_position_and_what_it_waits_for():
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("node", 2.0)])
    FakeRunner.step_seconds = 0.2
    queue.submit(_job("running", cpus_per_worker=1.5))
    queue.submit(_job("next", cpus_per_worker=1.5))
    queue.submit(_job("after", cpus_per_worker=1.5))
    queue.submit(_job("urgent", priority=3, cpus_per_worker=1.5))
    assert queue.place_of("running") is None  # not queued
    urgent, following, last = (queue.place_of(j) for j in ("urgent", "next", "after"))
    assert urgent.position == 1 and urgent.reason == ("waiting for 1.51 CPUs in 2 actors; "
                                                      "0.49 free")
    assert (following.position, last.position) == (2, 3)
    assert last.reason == "2 job(s) of tenant default go first (higher priority or queued " \
                          "earlier)"
    queue.shutdown(timeout=5)


def test_a_node_that_joins_starts_the_jobs_waiting_for_room_at_once():
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("small", 1.0)], node_poll_seconds=0.05)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("big", cpus_per_worker=3.0))
    assert queue.place_of("big").reason == "waiting for 3.01 CPUs in 2 actors; 1 free"
    queue.cluster.sized.append(Node("joined", 4.0))
    wait_for(lambda: host.states.get("big") == "SUCCEEDED", 5, what="the job on the new node")


def test_a_job_that_could_never_fit_says_so_with_the_numbers():
    queue = _queue(FakeHost(), nodes=[("a", 2.0), ("b", 2.0)])
    assert queue.never_fits(_job("fits", workers=3, cpus_per_worker=1.0)) is None
    assert queue.never_fits(_job("wide", workers=4, cpus_per_worker=1.5)) == (
        "4 worker(s) x 1.5 CPUs and 1 shard(s) x 0.01: needs 6.01 CPUs; the cluster has 4")
    assert queue.never_fits(_job("tall", cpus_per_worker=3.0)) == (
        "1 worker(s) x 3 CPUs and 1 shard(s) x 0.01: an actor needs 3 CPUs; the largest node "
        "has 2")


def test_cancelling_a_waiting_job_ends_it_without_running_it():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.05
    queue.submit(_job("running"))
    queue.submit(_job("waiting"))
    assert queue.cancel("waiting")
    wait_for(lambda: host.states.get("running") == "SUCCEEDED", 10)
    assert host.states["waiting"] == "CANCELLED" and "waiting" not in FakeRunner.started


def test_cancelling_a_running_job_stops_it_at_a_step_boundary_with_a_checkpoint():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.05
    queue.submit(_job("long"))
    wait_for(lambda: host.states.get("long") == "RUNNING", 5)
    assert queue.cancel("long")
    wait_for(lambda: host.states.get("long") == "CANCELLED", 5)
    assert host.checkpoints["long"] == "checkpoint"


def test_a_failing_job_records_why_and_the_next_one_runs():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("broken"))
    queue.submit(_job("fine"))
    wait_for(lambda: host.states.get("fine") == "SUCCEEDED", 5)
    assert host.states["broken"] == "FAILED"
    assert host.errors["broken"] == "ValueError: no such thing"


def test_a_job_whose_node_left_before_it_was_placed_queues_again_and_runs():
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, observers=[recorder])
    recoveries: list = []
    recorder.job_recovery = lambda job_id, record: recoveries.append((job_id, record.kind))
    queue.submit(_job("unplaced"))
    wait_for(lambda: host.states.get("unplaced") == "SUCCEEDED", 5)
    assert FakeRunner.started == ["unplaced", "unplaced"]  # placed again, not FAILED
    assert ("unplaced", "RUNNING") in recorder.calls and ("unplaced", "QUEUED") in recorder.calls
    assert recoveries == [("unplaced", "node_gone")]


def test_shutdown_requeues_running_jobs_after_their_checkpoint():
    host = FakeHost()
    queue = _queue(host)
    FakeRunner.step_seconds = 0.2
    queue.submit(_job("interrupted"))
    queue.submit(_job("never-started"))
    wait_for(lambda: host.states.get("interrupted") == "RUNNING", 5)
    assert queue.shutdown(timeout=5)
    assert host.states == {"interrupted": "QUEUED"}
    assert host.checkpoints == {"interrupted": "checkpoint"}
    queue.submit(_job("after-shutdown"))  # stays queued in the store for the next start
    assert "after-shutdown" not in host.states


def test_an_observer_that_raises_does_not_fail_the_job():
    class Broken:
        def job_state_changed(self, job_id, state):
            raise RuntimeError("observer bug")

    host = FakeHost()
    queue = _queue(host, observers=[Broken()])
    FakeRunner.step_seconds = 0.0
    queue.submit(_job("ok"))
    wait_for(lambda: host.states.get("ok") == "SUCCEEDED", 5)


def test_a_submitted_job_is_reported_as_a_transition_to_queued():
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, observers=[recorder])
    FakeRunner.step_seconds = 0.01
    queue.submit(_job("only"))
    wait_for(lambda: host.states.get("only") == "SUCCEEDED", 10)
    assert [state for _, state in recorder.calls] == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_a_preempted_job_stops_with_a_checkpoint_queues_again_and_ends_after_the_urgent_one():
    host, recorder = FakeHost(), Recorder()
    queue = _queue(host, max_concurrent_jobs=0, observers=[recorder], nodes=[("node", 2.0)])
    FakeRunner.step_seconds = 0.1
    queue.submit(_job("preempted", priority=0, cpus_per_worker=1.5))
    wait_for(lambda: host.states.get("preempted") == "RUNNING", 5)
    queue.submit(_job("urgent", priority=1, cpus_per_worker=1.5))  # fits only without it
    wait_for(lambda: host.states.get("preempted") == "SUCCEEDED", 10, what="its second run")
    assert host.states["urgent"] == "SUCCEEDED"
    assert host.checkpoints["preempted"] == "checkpoint"  # handed over when it stopped
    assert FakeRunner.started == ["preempted", "urgent", "preempted"]
    assert [state for job, state in recorder.calls if job == "preempted"] == [
        "QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]


# --- draining a node ---------------------------------------------------------------------------


def test_a_drained_nodes_jobs_queue_again_elsewhere_and_nothing_new_goes_there(monkeypatch):
    monkeypatch.setattr(FakeRunner, "steps", 20_000)  # 200 s unless stopped
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("a", 2.0), ("b", 2.0)])
    queue.submit(_job("long"))
    wait_for(lambda: "long" in FakeRunner.nodes, 5, what="the job to start")
    node = FakeRunner.nodes["long"][0]
    assert queue.drain([node]) == ["long"] and queue.drained_nodes() == {node}
    # Stopped at a step boundary with its checkpoint, and started again off the node.
    wait_for(lambda: FakeRunner.started == ["long", "long"], 5, what="the job to restart")
    assert host.checkpoints["long"] == "checkpoint"
    assert node not in FakeRunner.nodes["long"]
    queue.submit(_job("later"))
    wait_for(lambda: "later" in FakeRunner.nodes, 5, what="the next job to start")
    assert node not in FakeRunner.nodes["later"]
    queue.undrain([node])
    assert queue.drained_nodes() == set()
    for job in ("long", "later"):
        queue.cancel(job)
    wait_for(lambda: host.states.get("long") == host.states.get("later") == "CANCELLED", 5,
             what="the jobs to stop")


class FollowedRun:
    """An adopted run (started by an earlier server) that goes on until told to stop."""

    def __init__(self, job_id, *, should_stop, on_checkpoint, **callbacks):
        self.should_stop, self.on_checkpoint = should_stop, on_checkpoint

    def run(self):
        while not self.should_stop():
            time.sleep(0.01)
        self.on_checkpoint("checkpoint")
        return FakeResult(stopped_early=True)


def test_an_adopted_run_holds_room_on_the_nodes_its_runner_reports_and_only_their_drain_stops_it(
        monkeypatch):
    monkeypatch.setattr(FakeRunner, "steps", 20_000)  # 200 s unless stopped
    host = FakeHost()
    queue = _queue(host, max_concurrent_jobs=0, nodes=[("a", 2.0), ("b", 2.0)],
                   runner_attacher=FollowedRun)
    # Started by an earlier server, which gave its worker 1.5 CPUs, on node b (a guess from
    # the spec alone would count about 1 CPU, on the first node with room: a).
    queue.adopt(_job("adopted"), lease_until(60.0, "earlier-server"),
                RunPlacement(1.5, ("b", "b")))
    assert queue.actor_nodes("adopted") == {"b"}
    queue.submit(_job("next", cpus_per_worker=1.5))  # room for its worker is left on a only
    wait_for(lambda: "next" in FakeRunner.nodes, 5, what="the next job to start")
    assert FakeRunner.nodes["next"][0] == "a"
    assert queue.drain(["a"]) == ["next"]  # the adopted run is not on a: it goes on
    assert queue.drain(["b"]) == ["adopted"]
    wait_for(lambda: host.states.get("adopted") == "QUEUED", 5, what="the adopted run to stop")
    assert host.checkpoints["adopted"] == "checkpoint"
    for job in ("adopted", "next"):
        queue.cancel(job)
    wait_for(lambda: host.states.get("adopted") == host.states.get("next") == "CANCELLED", 5,
             what="the jobs to end")
