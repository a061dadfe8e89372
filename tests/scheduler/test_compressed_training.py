"""Jobs with gradient compression (communication.compression) on a real embedded Ray: the same
bits on every rerun with the same worker count, the error feedback carried by checkpoints, and
the bytes the workers send counted from their messages."""

import os
import signal

import numpy as np
import pytest
import ray

from scheduler.job_runner import JobRunner
from scheduler.storage import load_checkpoint, save_checkpoint
from tests.ray_faults import kill_and_wait_until_dead
from tests.scheduler.test_job_runner import digits, spec_with
from worker.compression import PowerSGDPlan, topk_count
from worker.flat_parameters import ParameterLayout
from worker.model_builder import build_planned_model
from worker.resolved_job import resolve
from worker.transport.compressed import CompressedObjectStoreTransport, StepUpdate
from worker.transport.step import ActorFailure, ShardLost

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKERS, SHARDS = 2, 2


def compressed_spec(method: str, epochs: int = 1):
    spec = spec_with(**{"data.epochs": epochs})
    if method == "powersgd":
        spec.communication.compression.powersgd.rank = 2
    else:
        spec.communication.compression.topk.ratio = 0.05
    return spec


def runner(spec, **options) -> JobRunner:
    return JobRunner.for_spec(spec, digits(spec), workers=WORKERS, parameter_servers=SHARDS,
                              **options)


@pytest.fixture(scope="module")
def powersgd_run(local_ray):
    return runner(compressed_spec("powersgd")).run()


def layout_and_bounds(spec):
    job = resolve(spec, digits(spec).shape)
    layout = ParameterLayout.of(build_planned_model(job.model, np.dtype(job.dtype), seed=0))
    return layout, layout.shard_bounds(SHARDS)


def test_a_powersgd_job_resumed_from_its_checkpoint_ends_with_bitwise_the_same_weights(
        powersgd_run, tmp_path):
    spec = compressed_spec("powersgd")
    saved = []
    first = runner(spec, on_checkpoint=lambda c: saved.append(
        save_checkpoint(tmp_path / f"step-{c.step}.npz", c)))
    first.should_stop = lambda: len(first.history.steps) >= 6
    assert first.run().stopped_early
    checkpoint = load_checkpoint(saved[-1])
    # Each block's error feedback and the warm start went to disk with the optimizer state;
    # without them the resumed run would send other messages, and other weights.
    errors = [checkpoint.compression_state[f"error_feedback/{b}"] for b in range(WORKERS)]
    assert all(np.abs(error).max() > 0 for error in errors)
    assert {"powersgd_q/0", "powersgd_q/1"} <= checkpoint.compression_state.keys()
    resumed = runner(spec, resume_from=checkpoint).run()
    assert resumed.steps == powersgd_run.steps
    for key, value in powersgd_run.state_dict.items():
        assert np.array_equal(resumed.state_dict[key], value), key

    # On one worker (one block) the errors owed are not lost: block 0 takes their sum.
    taken = []
    alone = JobRunner.for_spec(spec, digits(spec), workers=1, parameter_servers=SHARDS,
                               resume_from=checkpoint, on_checkpoint=taken.append)
    alone.should_stop = lambda: True
    assert alone.run().stopped_early
    assert taken[-1].step == checkpoint.step
    np.testing.assert_array_equal(taken[-1].compression_state["error_feedback/0"],
                                  errors[0] + errors[1])
    assert "error_feedback/1" not in taken[-1].compression_state


def test_a_powersgd_worker_sends_and_receives_factors_and_vectors_not_parameters(
        powersgd_run):
    spec = compressed_spec("powersgd")
    layout, bounds = layout_and_bounds(spec)
    plan = PowerSGDPlan.of(layout, 2)
    factors = sum((m.rows + m.columns) * 2 for k in range(SHARDS)
                  for m in plan.matrices_within(*bounds[k]))
    dense = sum(hi - lo for k in range(SHARDS) for lo, hi in plan.dense_runs(*bounds[k]))
    # Back: P^ and Q of each matrix once (from the shard answering for it), and the dense
    # runs' sums; no updated parameters.
    replies = sum((m.rows + m.columns) * 2 for m in plan.matrices) + dense
    for record in powersgd_run.history.steps:
        assert record.bytes_sent_per_worker == (factors + dense) * 4
        assert record.bytes_sent_per_worker < record.parameter_bytes / 4
        assert record.bytes_received_per_worker == replies * 4
        assert record.bytes_received_per_worker < record.parameter_bytes / 4
    # The workers step the optimizer, each step's update at the start of the next.
    steps = powersgd_run.history.steps
    assert steps[0].timings.apply == 0 and max(r.timings.apply for r in steps[1:]) > 0
    assert powersgd_run.final_evaluation.accuracy > 0.5


def test_a_powersgd_job_gives_the_same_bits_over_direct_connections_as_through_the_object_store(
        powersgd_run):
    # The module's other runs take the direct connections (the default, on one host too);
    # the object store carries the same messages through the runner's calls.
    spec = compressed_spec("powersgd")
    assert runner(spec).transport_name == "direct"
    through_store = runner(spec, transport="object_store")
    result = through_store.run()
    assert type(through_store.transport) is CompressedObjectStoreTransport
    for key, value in powersgd_run.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key
    for by_store, by_link in zip(result.history.steps, powersgd_run.history.steps, strict=True):
        assert by_store.bytes_sent_per_worker == by_link.bytes_sent_per_worker
        assert by_store.bytes_received_per_worker == by_link.bytes_received_per_worker


def test_a_top_k_job_gives_the_same_bits_on_a_rerun_and_sends_index_value_pairs(local_ray):
    spec = compressed_spec("topk")
    spec.clipping.max_norm = 0.5  # the path where shards wait for the runner's coefficient
    first, second = runner(spec).run(), runner(spec).run()
    for key, value in first.state_dict.items():
        assert np.array_equal(second.state_dict[key], value), key
    assert max(r.gradient_norm for r in first.history.steps) > 0.5  # so clipping did clip
    layout, bounds = layout_and_bounds(spec)
    pairs = sum(topk_count(hi - lo, 0.05) for lo, hi in bounds)
    # A 32-bit index and a float32 value per pair; back, the sum's nonzero pairs: at most
    # every block's.
    assert {r.bytes_sent_per_worker for r in first.history.steps} == {pairs * (4 + 4)}
    assert all(pairs * 8 <= r.bytes_received_per_worker <= WORKERS * pairs * 8
               for r in first.history.steps)


def test_a_compressed_job_losing_a_worker_in_a_step_or_a_checkpoint_restarts_with_the_same_bits(
        powersgd_run):
    # Worker 1 dies between steps 6 and 7 (found by step 7), then worker 0 while the runner
    # takes step 12's checkpoint, after the step's update was applied, as it asks for the
    # optimizer state: each restarts the job from its last checkpoint, none fails it.
    spec = compressed_spec("powersgd")
    spec.checkpoint.interval_steps = 4
    job = runner(spec, step_timeout_seconds=30)

    def kill_in_the_checkpoint(transport, worker: int) -> None:
        fetch = transport.optimizer_state

        def killed_first():
            kill_and_wait_until_dead(job.worker_group.replicas[worker])
            return fetch()

        transport.optimizer_state = killed_first

    def kill_workers(record):
        recoveries = len(job.history.recoveries)
        if record.step == 6 and recoveries == 0:
            kill_and_wait_until_dead(job.worker_group.replicas[1])
        if record.step == 12 and recoveries == 1:
            kill_in_the_checkpoint(job.transport, 0)

    job.on_step = kill_workers
    result = job.run()
    recoveries = result.history.recoveries
    assert [r.kind for r in recoveries] == ["error_feedback_lost"] * 2, recoveries
    assert "error feedback" in recoveries[0].message
    assert "workers [0]" in recoveries[1].message
    assert "from the checkpoint of step 8" in recoveries[1].message
    for key, value in powersgd_run.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_prometheus_shows_a_compressed_step_s_bytes_beside_the_parameter_bytes(powersgd_run):
    from prometheus_client import CollectorRegistry

    from services.metrics import TrainingMetrics

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    for record in powersgd_run.history.steps:
        metrics.job_step("job-1", record)
    last = powersgd_run.history.steps[-1]

    def sample(name, **labels):
        return registry.get_sample_value(name, {"job_id": "job-1", **labels})

    sent = sample("chainrule_training_step_communication_bytes", direction="sent")
    assert sent == last.bytes_sent_per_worker
    assert sample("chainrule_training_step_communication_bytes", direction="received") == \
        last.bytes_received_per_worker
    assert sent < sample("chainrule_model_parameter_bytes") / 4
    assert last.bytes_received_per_worker < sample("chainrule_model_parameter_bytes") / 4


def test_workers_whose_replicated_parameters_differ_fail_the_job_at_the_next_checkpoint(
        local_ray):
    # Every worker steps its own copy of the parameters with the same update; a copy that
    # drifted (a bug: here worker 1's vector is changed by hand) is found when the runner
    # next takes the parameters, not left to train a different model.
    spec = compressed_spec("powersgd")
    spec.checkpoint.interval_steps = 2
    job = runner(spec)

    def change_worker_one(record):
        if record.step == 1:
            replica = job.worker_group.replicas[1]
            vector = np.array(ray.get(replica.parameter_vector.remote()))
            vector[0] += 1.0
            ray.get(replica.load_parameter_vector.remote(vector))

    job.on_step = change_worker_one
    with pytest.raises(RuntimeError, match="parameters differ after step 2"):
        job.run()


class _Done(Exception):
    """Ends a job from its on_step hook once the test has seen what it looks at."""


def test_a_shard_lost_while_the_workers_wait_for_its_reply_between_steps_is_a_shard_lost(
        local_ray):
    # Between steps (sync_parameters: a checkpoint, an evaluation) every worker applies the
    # last step with the shards' REPLYs. Here step 2's never come, as if the shards' host were
    # cut off once they had answered: a stopped shard is found by its heartbeat, one whose
    # connections closed by the workers, and both go to the failure policy as ShardLost
    # instead of a raw Ray error at the step timeout.
    spec = compressed_spec("powersgd")
    job = JobRunner.for_spec(spec, digits(spec), workers=1, parameter_servers=SHARDS,
                             step_timeout_seconds=60)
    found: list[ShardLost] = []
    never_replied = (StepUpdate(2, 0.01, 1.0), [])

    def lose_shards_between_steps(record):
        transport, shards = job.transport, job.worker_group.shards
        pid = ray.get(shards[1].__ray_call__.remote(lambda _: os.getpid()), timeout=30)
        transport.update = never_replied
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(ActorFailure) as stopped:
                transport.sync_parameters()
        finally:
            os.kill(pid, signal.SIGCONT)
        ray.get(shards[0].__ray_call__.remote(lambda shard: shard.worker_links.close()))
        transport.update = never_replied
        with pytest.raises(ActorFailure) as closed:
            transport.sync_parameters()
        found.extend([stopped.value.failure, closed.value.failure])
        raise _Done

    job.on_step = lose_shards_between_steps
    with pytest.raises(_Done):
        job.run()
    assert found == [
        ShardLost(1, "while the workers applied step 2 (no answer to its heartbeat: its node "
                     "or process is gone or stopped)"),
        ShardLost(0, "while the workers applied step 2: parameter-server shard 0's connection "
                     "closed before it sent its REPLY of step 2")], found
