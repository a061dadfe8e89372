"""Actors of a running job lost to real signals, on real embedded Ray: a worker SIGKILLed (its
micro-batches recomputed by the others in the same step), a worker SIGSTOPped (dropped within
the step's adaptive deadline, scheduler/step_deadline.py, or sooner on the object-store path by
the heartbeats of worker/transport/liveness.py: before, a fixed 120 s let a stopped worker of a
2 ms step go unnoticed), a parameter-server shard SIGKILLed (the job's standby shard takes its
place, the workers and the other shards kept, from the state the shards kept in shared memory
after the last step: worker/shard_state_replica.py).
Each ends with bitwise the weights of the undisturbed run, and reports its recovery time and
the steps trained again. Last, the heartbeats alone: a peer the awaited calls depend on (the
direct transport's shards while the workers compute) is watched too, and a SIGSTOPped one ends
the runner's wait in seconds; and a raylet gone, said by the heartbeat of a worker that outlived
it, or found by a probe of its port when the heartbeat is late (a port still listening leaves
the decision to the heartbeat's timeout: no false loss)."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import types

import numpy as np
import pytest
import ray

from scheduler import worker_group
from scheduler.failure_policy import FailurePolicy
from scheduler.job_runner import JobRunner, TrainingResult
from tests.chaos.recovery_report import report_recovery
from tests.ray_faults import kill_and_wait_until_dead, process_exited, wait_for_replacements
from tests.scheduler.test_job_runner import digits, spec_with, train
from worker.parameter_server import ParameterServerShard
from worker.transport.direct import DirectTransport, ShardNotReached
from worker.transport.liveness import CONCURRENCY_GROUPS, Liveness
from worker.transport.raylet_watch import RayletGone
from worker.transport.step import ActorFailure, ShardLost

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

FAULT_AFTER_STEP = 10  # of 45; the checkpoints are at every epoch's end (15 steps)
CHECKPOINT_STEP = 15


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


@pytest.fixture(scope="module")
def undisturbed(local_ray) -> TrainingResult:
    return train(spec_with(), 1, 1)


def assert_same_weights(result: TrainingResult, undisturbed: TrainingResult) -> None:
    assert result.steps == undisturbed.steps
    for key, value in undisturbed.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


class Fault:
    """Injects a fault after a given step (from the runner's on_step, between steps) and
    times the recovery: from the fault to the end of the next step that completes."""

    def __init__(self, runner: JobRunner, after_step: int, inject):
        self.runner, self.after_step, self.inject = runner, after_step, inject
        self.at: float | None = None
        self.back: float | None = None
        self.pid = 0
        runner.on_step = self.on_step

    def on_step(self, record) -> None:
        if self.at is not None and self.back is None:
            self.back = time.monotonic()
        if record.step == self.after_step and self.at is None:
            self.pid = self.inject(self.runner)
            self.at = time.monotonic()

    @property
    def recovery_seconds(self) -> float:
        assert self.at is not None and self.back is not None
        return self.back - self.at


def _kill(signal_number: int, actors: str, index: int):
    def inject(runner: JobRunner) -> int:
        pid = _pid(getattr(runner.worker_group, actors)[index])
        os.kill(pid, signal_number)
        return pid

    return inject


def test_a_sigkilled_worker_is_recomputed_in_step_with_the_undisturbed_weights(undisturbed):
    # Shared memory (one host); on the object-store path a dead process is found as fast, and
    # a silent one by the heartbeats (the SIGSTOP case below, and tests/scheduler/
    # test_multinode.py for a lost node).
    spec = spec_with()
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                transport="shared_memory")
    fault = Fault(runner, FAULT_AFTER_STEP, _kill(signal.SIGKILL, "replicas", 1))
    result = runner.run()
    lost = result.history.recoveries[0]
    assert lost.kind == "worker_lost" and "(its process died)" in lost.message
    assert result.history.worker_failures == 1
    assert_same_weights(result, undisturbed)
    report_recovery("worker SIGKILL", fault.recovery_seconds, 0, lost.message)


def _die_once_block_delivered(step: int):
    """Run in a worker's process (`__ray_call__`): at `step` it SIGKILLs itself once its
    block's DELIVERED has been acknowledged by every shard's host (worker/transport/direct.py),
    before the runner has its answer."""

    def install(replica) -> None:
        from worker.transport import direct

        compute = direct.compute_direct

        def compute_then_die(replica, micro_batches, global_step, *rest):
            answer = compute(replica, micro_batches, global_step, *rest)
            if global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return answer

        direct.compute_direct = compute_then_die

    return install


def _die_once_chunks_acknowledged(step: int):
    """As above, but when its chunks have all been acknowledged and its DELIVERED is about to
    be sent: the chunks reached the shards, which must not count them."""

    def install(replica) -> None:
        from worker.transport import direct

        send_delivered = direct.WorkerEnd.send_delivered

        def die_instead(links, global_step, *rest):
            if global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            send_delivered(links, global_step, *rest)

        direct.WorkerEnd.send_delivered = die_instead

    return install


def test_workers_sigkilled_after_their_chunks_left_cost_no_step_over_direct_connections(
        undisturbed):
    """Direct connections (across hosts; forced here on one): worker 1 dies once its block is
    delivered, so its figures come from the shards and nothing is recomputed; worker 2 dies
    in the same step once its chunks reached the shards but before it said DELIVERED, so the
    shards do not count them and a survivor recomputes the block. No restart, no step lost."""
    spec = spec_with()
    runner = JobRunner.for_spec(spec, digits(spec), workers=4, parameter_servers=2,
                                transport="direct")
    dying = FAULT_AFTER_STEP + 1

    def arm(runner: JobRunner) -> int:
        replicas = runner.worker_group.replicas
        ray.get([replicas[1].__ray_call__.remote(_die_once_block_delivered(dying)),
                 replicas[2].__ray_call__.remote(_die_once_chunks_acknowledged(dying))],
                timeout=60)
        return 0

    fault = Fault(runner, FAULT_AFTER_STEP, arm)
    result = runner.run()
    lost = {r.message.split(" lost at step ")[0]: r.message
            for r in result.history.recoveries if r.kind == "worker_lost"}
    assert [r.kind for r in result.history.recoveries if r.kind != "worker_replaced"] == [
        "worker_lost", "worker_lost"], result.history.recoveries
    # Both found in the same round of waiting or one after the other, by Ray or a heartbeat.
    assert lost["worker 1"].startswith(f"worker 1 lost at step {dying} (")
    assert "its block(s) [1] had reached the shards" in lost["worker 1"], lost
    assert lost["worker 2"].startswith(f"worker 2 lost at step {dying} (")
    assert lost["worker 2"].endswith("its micro-batches recomputed in-step by worker(s) 0"), lost
    assert result.history.worker_failures == 2
    # Every step once (none trained again), and the lost step's figures are the whole batch's.
    assert [record.step for record in result.history.steps] == list(range(1, 46))
    step = result.history.steps[dying - 1]
    assert step.samples == undisturbed.history.steps[dying - 1].samples
    assert step.train_correct == undisturbed.history.steps[dying - 1].train_correct
    assert step.loss == pytest.approx(undisturbed.history.steps[dying - 1].loss, rel=1e-6)
    assert_same_weights(result, undisturbed)
    report_recovery("worker SIGKILL (direct)", fault.recovery_seconds, 0, lost["worker 1"])


def _die_instead_of_message(step: int, message: int):
    """Run in a worker's process (`__ray_call__`): at `step` it SIGKILLs itself instead of
    sending its `message`-th message of the step over shared memory (worker/transport/
    shared_memory.py: "block written" to shard 0, to shard 1, ..., then its report to the
    runner). Message 2 of a job with two shards: shard 0 was told, shard 1 was not."""

    def install(replica) -> None:
        from worker.transport import named_pipe

        send = named_pipe.Channel.send
        sent: list[object] = []

        def send_or_die(channel, record):
            if getattr(record, "step", None) == step:
                sent.append(record)
                if len(sent) == message:
                    os.kill(os.getpid(), signal.SIGKILL)
            send(channel, record)

        named_pipe.Channel.send = send_or_die  # type: ignore[method-assign]

    return install


def test_workers_sigkilled_between_telling_the_shards_cost_no_step_over_shared_memory(
        undisturbed):
    """Shared memory: worker 1 dies once shard 0 knows its block is written but shard 1 does
    not (shard 0 can apply the step at once), worker 2 once both shards know but the runner
    does not. Both blocks are whole in shared memory with their figures, so every shard counts
    them and nothing is recomputed on parameters a shard may have moved: the step's figures
    and the weights are the undisturbed run's, and no step is lost."""
    spec = spec_with()
    # Four workers: a power of two, so bitwise the one-worker run (invariant 1).
    runner = JobRunner.for_spec(spec, digits(spec), workers=4, parameter_servers=2,
                                transport="shared_memory")
    dying = FAULT_AFTER_STEP + 1

    def arm(runner: JobRunner) -> int:
        replicas = runner.worker_group.replicas
        ray.get([replicas[1].__ray_call__.remote(_die_instead_of_message(dying, 2)),
                 replicas[2].__ray_call__.remote(_die_instead_of_message(dying, 3))],
                timeout=60)
        return 0

    Fault(runner, FAULT_AFTER_STEP, arm)
    result = runner.run()
    lost = {r.message.split(" lost at step ")[0]: r.message
            for r in result.history.recoveries if r.kind == "worker_lost"}
    assert sorted(lost) == ["worker 1", "worker 2"], result.history.recoveries
    for worker in (1, 2):  # found together or one after the other
        assert lost[f"worker {worker}"].startswith(
            f"worker {worker} lost at step {dying} (its process died)"), lost
        assert lost[f"worker {worker}"].endswith(
            f"its block(s) [{worker}] had reached the shards: none recomputed"), lost
    assert [record.step for record in result.history.steps] == list(range(1, 46))
    step = result.history.steps[dying - 1]
    assert step.samples == undisturbed.history.steps[dying - 1].samples
    assert step.train_correct == undisturbed.history.steps[dying - 1].train_correct
    assert step.loss == pytest.approx(undisturbed.history.steps[dying - 1].loss, rel=1e-6)
    assert_same_weights(result, undisturbed)


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_a_stopped_worker_is_dropped_within_the_deadline_with_identical_weights(
        undisturbed, transport):
    # The default deadline is 10 x the median step (ms), at least 3 s: shared memory has no
    # heartbeats and drops the worker at that floor. Over the object store the heartbeats find
    # it at 0.5 s + 2 s; a floor of 6 s leaves them room on a machine twice as slow, so the
    # test asserts that they, not the deadline, found it.
    floor = 3.0 if transport == "shared_memory" else 6.0
    spec = spec_with(**{"resources.step_deadline.floor_seconds": floor})
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                transport=transport)
    deadline: list[float] = []

    def stop_worker_one(runner: JobRunner) -> int:
        deadline.append(runner.deadline.seconds)
        return _kill(signal.SIGSTOP, "replicas", 1)(runner)

    fault = Fault(runner, FAULT_AFTER_STEP, stop_worker_one)
    seen = runner.on_step

    # Whether the stopped process had exited when the first step without it ended: a survivor
    # writes the block it owned, so over shared memory it must be gone before (Ray's kill
    # takes seconds to end a stopped process).
    exited_by_then: list[bool] = []

    def waiting_for_the_replacement(record):
        if record.step == FAULT_AFTER_STEP + 1:
            exited_by_then.append(process_exited(fault.pid))
        seen(record)
        # The replacement joins at the next step boundary, however long it takes to start:
        # Ray takes ~5 s to kill a stopped process (its graceful exit times out first) and
        # only then frees its bundle; a loaded machine takes longer.
        wait_for_replacements(runner.worker_group)

    runner.on_step = waiting_for_the_replacement
    try:
        result = runner.run()
    finally:
        if fault.pid:
            try:
                os.kill(fault.pid, signal.SIGCONT)  # so that Ray can clean it up
            except ProcessLookupError:
                pass  # killed: dropped workers are
    stalled = result.history.steps[FAULT_AFTER_STEP]  # the first step without worker 1
    # What happened, for a failure's message: (step, workers, wall seconds) and recoveries.
    seen_steps = [(r.step, r.workers, round(r.timings.wall, 3)) for r in result.history.steps]
    happened = f"steps {seen_steps}, recoveries {result.history.recoveries}"
    assert deadline == [floor]  # 10 median steps are milliseconds
    if transport == "shared_memory":
        assert 3.0 <= stalled.timings.wall < 3.0 + 1.5, happened
        assert exited_by_then == [True]
        why = "silent past the step's 3 s deadline"
    else:  # the heartbeats (worker/transport/liveness.py) find it first: 0.5 s + 2 s
        assert 2.0 <= stalled.timings.wall < floor, happened
        why = "no answer to its heartbeat: its node or process is gone or stopped"
    assert result.history.worker_failures == 1 and len(result.history.recoveries) == 2, happened
    lost, replaced = result.history.recoveries
    assert lost.message == (f"worker 1 lost at step 11 ({why}): its micro-batches recomputed "
                            f"in-step by worker(s) 0")
    assert replaced.kind == "worker_replaced" and replaced.step > 11
    workers = [record.workers for record in result.history.steps]
    assert workers[:10] == [2] * 10 and workers[10] == 1 and workers[-1] == 2, happened
    assert_same_weights(result, undisturbed)
    report_recovery(f"worker SIGSTOP ({transport})", stalled.timings.wall, 0, lost.message)


def _stop_when_the_step_loop_starts(replica) -> None:
    """Run in a worker's process (`__ray_call__`): its shared-memory step loop SIGSTOPs the
    process before doing anything, so the COMPUTE sent to it stays in its inbox."""
    from worker.transport import shared_memory

    serve_worker = shared_memory.serve_worker

    def stop_then_serve(*args) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)
        serve_worker(*args)

    shared_memory.serve_worker = stop_then_serve  # type: ignore[assignment]


def test_a_worker_stopped_before_its_step_loop_starts_is_ended_before_its_block_moves(
        local_ray):
    """Shared memory: worker 1 stops as its step loop starts, with step 1's COMPUTE in its
    inbox. Once the deadline drops it, its block goes to worker 0, so its process must have
    exited by then: continued, it would compute the block into memory worker 0 now owns.
    (Its row in the process table was written by the loop itself, so a loop that had not
    started yet was taken for a process gone, and only Ray's kill, seconds later, ended it.)"""
    spec = spec_with(**{"data.epochs": 1})
    exited_at_step_one: list[bool] = []
    # The first steps' deadline is the step timeout (scheduler/step_deadline.py). The job
    # stops after step 1, the one under test.
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=1,
                                transport="shared_memory", step_timeout_seconds=5.0,
                                should_stop=lambda: bool(exited_at_step_one))
    start_actors = runner._start_actors
    stopped: list[int] = []

    def start_then_arm(*args) -> None:
        start_actors(*args)
        replica = runner.worker_group.replicas[1]
        stopped.append(_pid(replica))
        ray.get(replica.__ray_call__.remote(_stop_when_the_step_loop_starts), timeout=60)

    runner._start_actors = start_then_arm  # type: ignore[method-assign, assignment]
    runner.on_step = lambda record: (exited_at_step_one.append(process_exited(stopped[0]))
                                     if record.step == 1 else None)
    try:
        result = runner.run()
    finally:
        if stopped:
            try:
                os.kill(stopped[0], signal.SIGCONT)  # so that Ray can clean it up
            except ProcessLookupError:
                pass
    lost = result.history.recoveries[0]
    assert lost.message.startswith("worker 1 lost at step 1 (silent past"), lost.message
    assert exited_at_step_one == [True]
    assert [record.step for record in result.history.steps] == [1] and result.stopped_early


def test_a_lost_worker_whose_process_cannot_be_ended_restarts_every_actor(local_ray):
    """Shared memory: worker 1's row in the process table says another PID namespace (as
    from a container sharing the host's /dev/shm, not its PIDs), so when it dies the runner
    cannot make sure of its process. Its block must not go to a survivor: the failure policy
    restarts every actor (here from the state the shards kept after step 2), saying why."""
    spec = spec_with(**{"data.epochs": 1})
    recoveries: list[str] = []
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=1,
                                transport="shared_memory",
                                should_stop=lambda: len(recoveries) > 0)

    def kill_worker_one_of_another_namespace(runner: JobRunner) -> int:
        rows = runner.transport.worker_processes  # type: ignore[attr-defined]
        rows[1, 2] += 1  # the namespace column (worker_processes.py)
        kill_and_wait_until_dead(runner.worker_group.replicas[1])
        return 0

    Fault(runner, 2, kill_worker_one_of_another_namespace)
    runner.on_recovery = lambda record: recoveries.append(f"{record.kind}: {record.message}")
    result = runner.run()
    assert len(recoveries) == 1 and recoveries[0].startswith(
        "worker_not_fenced: workers [1] lost at step 3 could not be stopped from writing into "
        "shared memory (cannot end worker 1's process: worker process "), recoveries
    assert "is in another PID namespace than the runner" in recoveries[0]
    assert recoveries[0].endswith("every actor restarts from step 2, the state its shards kept "
                                  "in shared memory (no step is trained again) (restart 1 of "
                                  "at most 3)"), recoveries
    assert result.history.shard_failures == 1


def _report_another_pid_namespace(replica) -> None:
    """Run in a worker's process (`__ray_call__`): the row it gives the runner for the process
    table says another PID namespace than this one."""
    from worker.transport import worker_processes

    identity = worker_processes.actor_process_identity

    def of_another_namespace(actor) -> tuple[int, int, int]:
        pid, start, namespace = identity(actor)
        return pid, start, namespace + 1

    worker_processes.actor_process_identity = of_another_namespace  # type: ignore[assignment]


def test_workers_of_another_pid_namespace_keep_an_auto_job_off_shared_memory(local_ray):
    """Worker 1 says it is in another PID namespace: the runner could not end its process, so
    "auto" goes over direct connections, saying why (the reason is what a job asking for
    "shared_memory" by name fails with at its start: JobRunner.run)."""
    spec = spec_with(**{"data.epochs": 1})
    steps: list[int] = []
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=1,
                                transport="auto", should_stop=lambda: bool(steps))
    runner.on_step = lambda record: steps.append(record.step)
    start_actors = runner._start_actors

    def start_then_arm(*args) -> None:
        start_actors(*args)
        if runner.parameters_shared:
            replica = runner.worker_group.replicas[1]
            ray.get(replica.__ray_call__.remote(_report_another_pid_namespace), timeout=60)

    runner._start_actors = start_then_arm  # type: ignore[method-assign, assignment]
    result = runner.run()
    (fallback,) = result.history.recoveries
    assert fallback.kind == "fence_unavailable", fallback
    assert re.fullmatch(r"cannot end worker 1's process if it is lost: worker process [0-9]+ "
                        r"is in another PID namespace than the runner \(pid:\[[0-9]+\], the "
                        r"runner's pid:\[[0-9]+\]\); the job's steps go over direct "
                        r"connections instead \(same results\)", fallback.message), fallback
    assert isinstance(runner.transport, DirectTransport) and steps == [1]


def _when_the_standby_shard_is_ready(inject):
    """`inject`, once the job's standby shard has started (waited for without a bound on the
    time it takes: a loaded machine starts processes slowly, which is what a standby hides)."""

    def inject_after_the_standby(runner: JobRunner) -> int:
        while not runner.worker_group.standby_shard_ready():
            time.sleep(0.05)
        return inject(runner)

    return inject_after_the_standby


def test_a_sigkilled_shard_is_replaced_by_the_standby_from_the_kept_state_losing_no_step(
        undisturbed):
    spec = spec_with()  # Adam: its moments and step count are the state a shard keeps
    # A standby from the first step (by default, from 10 s into a job: this one lasts less).
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                transport="shared_memory",
                                failure_policy=FailurePolicy(standby_shard_after_seconds=0))
    killed_after = CHECKPOINT_STEP + 5
    fault = Fault(runner, killed_after,
                  _when_the_standby_shard_is_ready(_kill(signal.SIGKILL, "shards", 1)))
    result = runner.run()
    [lost] = result.history.recoveries
    assert lost.kind == "shard_lost"
    assert (f"the standby shard took over from the state the shards kept after step "
            f"{killed_after}, and step {killed_after + 1} ran again" in lost.message), lost.message
    assert result.history.shard_failures == 1
    # Every step is recorded once: none after step 20 was trained again.
    assert [record.step for record in result.history.steps] == list(range(1, 46))
    assert runner.worker_group.standby is not None  # a new standby after the promotion
    assert_same_weights(result, undisturbed)
    report_recovery("shard SIGKILL", fault.recovery_seconds, 0, lost.message)


def shard_stopping_at_the_checkpoint_of(step: int, marker):
    """The shard SIGSTOPs its own process when the runner asks for its state at the checkpoint
    of `step`, once: the fault lands in that wait, whatever the machine's load. The marker
    says the process id and when it stopped."""

    class ShardStoppingAtACheckpoint(ParameterServerShard):
        def state(self):
            if self.steps_taken == step and not marker.exists():
                marker.write_text(f"{os.getpid()} {time.time()}")
                os.kill(os.getpid(), signal.SIGSTOP)
            return super().state()

    return ShardStoppingAtACheckpoint


def test_a_shard_stopped_in_a_checkpoint_is_found_by_its_heartbeat_losing_no_step(
        undisturbed, tmp_path, monkeypatch):
    # Before, the checkpoint's wait had no heartbeats: it lasted the step timeout (60 s here).
    marker = tmp_path / "shard-stopped"
    monkeypatch.setattr(worker_group, "RemoteShard", worker_group.actor_class(
        shard_stopping_at_the_checkpoint_of(CHECKPOINT_STEP, marker)))
    found: list[float] = []  # when the runner reported the loss
    going_on: list[float] = []  # when the step after the checkpoint ended
    spec = spec_with()
    runner = JobRunner.for_spec(
        spec, digits(spec), workers=1, parameter_servers=1, transport="shared_memory",
        step_timeout_seconds=60, on_recovery=lambda record: found.append(time.time()),
        on_step=lambda record: going_on.append(time.time())
        if record.step == CHECKPOINT_STEP + 1 else None)
    try:
        result = runner.run()
    finally:
        if marker.exists():
            try:
                os.kill(int(marker.read_text().split()[0]), signal.SIGCONT)  # for Ray to reap
            except ProcessLookupError:
                pass
    stopped_at = float(marker.read_text().split()[1])
    [lost] = result.history.recoveries
    assert lost.kind == "shard_lost"
    at_the_checkpoint = (
        f"parameter-server shard 0 died at the checkpoint of step {CHECKPOINT_STEP} (no answer "
        f"to its heartbeat: its node or process is gone or stopped): every actor restarts from "
        f"step {CHECKPOINT_STEP}, the state its shards kept in shared memory (no step is "
        f"trained again) (restart 1 of at most 3)")
    # Once in a whole-suite run on a loaded machine (not reproduced alone, nor under two busy
    # loops) the checkpoint's wait ended and the next step's deadline found the stopped shard;
    # the cause is not known. Either way it must be found in seconds (the wait it replaced
    # lasted the 60 s step timeout), cost no step and keep the bits.
    at_the_next_step = re.escape(
        f"parameter-server shard 0 died silent past the deadline of step {CHECKPOINT_STEP + 1}: "
        f"NEW took over from the state the shards kept after step {CHECKPOINT_STEP}, and step "
        f"{CHECKPOINT_STEP + 1} ran again (no step is trained again; restart 1 of at most 3)"
    ).replace("NEW", "(new shards|the standby shard)")  # a standby is ready after 10 s
    assert (lost.message == at_the_checkpoint
            or re.fullmatch(at_the_next_step, lost.message)), lost.message
    assert found[0] - stopped_at < 10.0  # 0.5 s to the first heartbeat, 2 s unanswered
    assert [record.step for record in result.history.steps] == list(range(1, 46))
    assert_same_weights(result, undisturbed)
    report_recovery("shard SIGSTOP at a checkpoint", going_on[0] - stopped_at, 0,
                    f"found in {found[0] - stopped_at:.2f} s. {lost.message}")


# --- the heartbeats alone ---------------------------------------------------------------------


@ray.remote(concurrency_groups=CONCURRENCY_GROUPS)  # type: ignore[call-overload]
class Peer:
    """A stand-in for a worker or a shard: it answers heartbeats in their own thread."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def heartbeat(self) -> None:
        pass

    def work(self, seconds: float) -> None:
        time.sleep(seconds)

    def work_until_released(self) -> None:
        """A call that lasts until `release` (bounded, in case a failing test never says)."""
        self.released.wait(timeout=600)
        self.released.clear()

    def release(self) -> None:
        self.released.set()


@pytest.fixture(scope="module")
def peers(local_ray):
    # Threads for calls beside a long one that an earlier test left running.
    made = [Peer.options(max_concurrency=4).remote() for _ in range(2)]
    ray.get([peer.heartbeat.remote() for peer in made], timeout=120)
    yield made
    for peer in made:
        ray.kill(peer)


def test_a_watched_peer_that_answers_does_not_end_the_wait(peers):
    worker, shard = peers
    call = worker.work.remote(1.5)  # long enough for heartbeats to go out
    waited = Liveness().wait({0: [call]}, {0: worker}, 60.0, watching={("shard", 0): shard})
    assert waited.ready == [call] and waited.unanswered == frozenset()


def test_a_watched_peer_sigstopped_ends_the_wait_in_seconds(peers):
    worker, shard = peers
    pid = _pid(shard)
    call = worker.work.remote(60)
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        waited = Liveness().wait({0: [call]}, {0: worker}, 120.0,
                                 watching={("shard", 0): shard})
        took = time.monotonic() - began
    finally:
        os.kill(pid, signal.SIGCONT)
    assert waited.unanswered == frozenset({("shard", 0)}) and waited.ready == []
    # 0.5 s to the first heartbeat, 2 s unanswered; far from the call's 60 s either way.
    assert 2.0 <= took < 30.0


def test_settling_gives_up_on_a_stopped_peer_and_waits_on_for_the_others(peers):
    # The waits between steps and the evaluation's: one lost actor does not end them early.
    # The other call lasts until the stopped peer has been given up on, whatever the load.
    worker, stopped = peers
    gave_up = threading.Event()

    class Watched(Liveness):
        def wait(self, *args, **kwargs):
            waited = super().wait(*args, **kwargs)
            if waited.unanswered:
                gave_up.set()
            return waited

    def release_once_given_up() -> None:
        gave_up.wait(timeout=600)
        worker.release.remote()

    pid = _pid(stopped)
    os.kill(pid, signal.SIGSTOP)
    try:
        slow = worker.work_until_released.remote()
        threading.Thread(target=release_once_given_up, daemon=True).start()
        settled = Watched().settle({0: slow, 1: stopped.work.remote(0)},
                                   {0: worker, 1: stopped}, 120.0)
    finally:
        os.kill(pid, signal.SIGCONT)
        gave_up.set()  # a settle that failed early still ends the slow call
    assert settled.ready == {0: slow}
    assert settled.unanswered == frozenset({1}) and settled.silent == frozenset()


# --- a worker that cannot reach a shard: the shard's heartbeat says whose fault it is ---------


@ray.remote(concurrency_groups=CONCURRENCY_GROUPS)  # type: ignore[call-overload]
class WorkerNotReachingShardOne:
    """A worker whose connection to shard 1 fails as a firewall's reject or a broken route
    makes it fail (neither can be made on loopback)."""

    def heartbeat(self) -> None:
        pass

    def connect_to_shards(self, *_) -> None:
        raise ShardNotReached(1, "parameter-server shard 1 at 10.0.0.2:4000 could not be "
                                 "reached: [Errno 113] No route to host")


def _connecting_transport(shards) -> DirectTransport:
    worker = WorkerNotReachingShardOne.remote()
    actors = types.SimpleNamespace(replicas=[worker], shards=shards)
    parameters = np.zeros(4, np.float32)
    return DirectTransport(actors, parameters, [(0, 2), (2, 4)], [],
                           lambda buffers: np.zeros(0), timeout_seconds=60.0)


def test_a_worker_not_reaching_a_live_shard_is_left_unconnected_not_the_shard_lost(peers):
    transport = _connecting_transport(peers)
    transport._connect([0])  # no ActorFailure: its first block is a lost worker


def test_a_worker_not_reaching_a_dead_shard_reports_the_shard_lost(peers):
    dead = Peer.remote()
    ray.get(dead.heartbeat.remote(), timeout=120)
    ray.kill(dead)
    transport = _connecting_transport([peers[0], dead])
    with pytest.raises(ActorFailure) as raised:
        transport._connect([0])
    assert raised.value.failure == ShardLost(
        1, "while a worker connected: parameter-server shard 1 at 10.0.0.2:4000 could not be "
           "reached: [Errno 113] No route to host (its process died)")


# --- a host's raylet gone: said by the heartbeat, or found by a probe of its port ------------


@ray.remote(concurrency_groups=CONCURRENCY_GROUPS)  # type: ignore[call-overload]
class OrphanedPeer:
    """A worker that outlived its raylet: it answers its heartbeat, saying so."""

    def heartbeat(self) -> None:
        raise RayletGone("its raylet (process 4242 on host-b) has died")

    def work(self, seconds: float) -> None:
        time.sleep(seconds)


def test_a_heartbeat_saying_its_raylet_died_ends_the_wait_at_the_first_heartbeat(local_ray):
    peer = OrphanedPeer.remote()
    try:
        # Started first: a heartbeat of a process still starting (seconds on a loaded machine)
        # goes unanswered, which is not what this test is about.
        ray.get(peer.work.remote(0), timeout=120)
        call = peer.work.remote(60)
        began = time.monotonic()
        waited = Liveness().wait({0: [call]}, {0: peer}, 120.0)
        took = time.monotonic() - began
    finally:
        ray.kill(peer)
    assert waited.unanswered == waited.raylet_gone == frozenset({0}) and waited.ready == []
    assert took < 30.0  # the first heartbeat, 0.5 s in; far from the call's 60 s


def test_a_late_heartbeat_whose_raylet_port_refuses_connections_ends_the_wait(peers):
    # The peer is stopped (it cannot answer), and the port given as its raylet's has nothing
    # listening on it: a raylet that died with its workers (`ray start --block`).
    _, worker = peers  # the one the tests above leave idle
    with socket.create_server(("127.0.0.1", 0)) as listening:
        closed_port = listening.getsockname()[1]
    pid = _pid(worker)
    call = worker.work.remote(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        waited = Liveness(raylet_of=lambda actor: ("127.0.0.1", closed_port)).wait(
            {0: [call]}, {0: worker}, 120.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    # raylet_gone: the probe's finding; the heartbeat's timeout alone would leave it empty.
    assert waited.unanswered == waited.raylet_gone == frozenset({0}) and waited.ready == []


def test_a_late_heartbeat_whose_raylet_still_listens_is_left_to_the_timeout(peers):
    _, worker = peers
    pid = _pid(worker)
    with socket.create_server(("127.0.0.1", 0)) as listening:  # a live raylet's port
        call = worker.work.remote(1)
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            # A heartbeat timeout of 1 s, past the probe's 0.25 s: short, for the test's time.
            waited = Liveness(timeout_seconds=1.0,
                              raylet_of=lambda actor: listening.getsockname()).wait(
                {0: [call]}, {0: worker}, 120.0)
            took = time.monotonic() - began
        finally:
            os.kill(pid, signal.SIGCONT)
    assert waited.unanswered == frozenset({0}) and waited.raylet_gone == frozenset()
    assert took >= 1.0  # the heartbeat's timeout decided, not the probe
