"""The runtime's invariants, on a real embedded Ray instance (see BRIEF.md, "Invariants")."""

import os
import time

import numpy as np
import pytest
import ray

from chainrule.spec_file import load_job_spec
from scheduler import worker_group
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.failure_policy import FailurePolicy, JobFailed
from scheduler.job_runner import JobRunner
from scheduler.sampler import EpochSampler
from tests.ray_faults import kill_and_wait_until_dead, wait_for_replacements
from tests.tmpfs import mounted_tmpfs
from worker.backprop import Tensor, optim
from worker.backprop.nn import functional as F
from worker.model_builder import build_model
from worker.parameter_server import ParameterServerShard
from worker.replica import ModelReplica
from worker.shared_memory import ROOT_VARIABLE, SharedMemoryFull

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SPEC = """
name: invariants
model: {layers: [{linear: {out_features: 32}}, {tanh: {}}, {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adamw: {lr: 0.003, weight_decay: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 96, epochs: 3, validation_fraction: 0.2,
       micro_batches: 4}
seed: 5
"""


def spec_with(**changes):
    spec = load_job_spec(SPEC)
    for path, value in changes.items():
        target = spec
        *parents, leaf = path.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, leaf, value)
    return spec


def digits(spec):
    return split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                 spec.data.validation_fraction, True, spec.seed)


def train(spec, workers, shards, **options):
    return JobRunner.for_spec(spec, digits(spec), workers=workers, parameter_servers=shards,
                              **options).run()


@pytest.fixture(scope="module")
def one_worker_float32(local_ray):
    return train(spec_with(), 1, 1)


@pytest.mark.parametrize("workers, shards", [(2, 1), (4, 3), (2, 2), (1, 3)])
def test_any_power_of_two_worker_count_and_any_shard_count_give_bitwise_the_same_weights(
        one_worker_float32, workers, shards):
    result = train(spec_with(), workers, shards)
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_three_workers_on_four_micro_batches_agree_to_float32_round_off(one_worker_float32):
    # 4 micro-batches over 3 workers are not aligned subtrees of the reduction tree: the sum's
    # association differs, so only round-off agreement is possible (and expected).
    result = train(spec_with(), 3, 2)
    for key, value in one_worker_float32.state_dict.items():
        np.testing.assert_allclose(result.state_dict[key], value, rtol=1e-6, atol=1e-6)


def single_process_reference(spec, dataset):
    """The same training written directly with the engine: full batches, no Ray."""
    model = build_model(spec.model, dataset.feature_shape, np.float64, seed=spec.seed)
    adamw = optim.AdamW(model.parameters(), lr=spec.optimizer.adamw.lr,
                        weight_decay=spec.optimizer.adamw.weight_decay)
    sampler = EpochSampler(len(dataset.x), spec.data.batch_size, spec.data.micro_batches,
                           spec.seed)
    x = dataset.x.astype(np.float64)
    for epoch in range(spec.data.epochs):
        for step in sampler.epoch(epoch):
            batch = np.concatenate(step.micro_batches)
            adamw.zero_grad()
            F.cross_entropy(model(Tensor(x[batch])), dataset.y[batch]).backward()
            adamw.step()
    return model.state_dict()


def test_float64_distributed_run_equals_a_single_process_engine_run_to_1e12(local_ray):
    spec = spec_with(dtype="float64")
    result = train(spec, 2, 2)
    reference = single_process_reference(spec, digits(spec))
    for key, value in reference.items():
        np.testing.assert_allclose(result.state_dict[key], value, rtol=1e-12, atol=1e-14)


def test_every_training_sample_is_used_exactly_once_per_epoch(local_ray):
    spec = spec_with()
    dataset = digits(spec)
    result = JobRunner.for_spec(spec, dataset, workers=2, parameter_servers=2).run()
    per_epoch = {}
    for record in result.history.steps:
        per_epoch[record.epoch] = per_epoch.get(record.epoch, 0) + record.samples
    assert per_epoch == {epoch: len(dataset.x) for epoch in range(spec.data.epochs)}


def test_each_worker_sends_and_receives_at_most_2_05_times_the_parameter_bytes(local_ray):
    result = train(spec_with(), 2, 3)
    for record in result.history.steps:
        moved = record.bytes_sent_per_worker + record.bytes_received_per_worker
        assert 0 < moved <= 2.05 * record.parameter_bytes


def test_a_worker_killed_mid_run_is_replaced_by_recomputation_with_identical_weights(
        one_worker_float32):
    # Direct connections: tests/chaos/test_actor_faults.py kills workers at the two moments
    # that matter there (its block delivered, or its chunks in and not yet said DELIVERED).
    spec = spec_with()
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                step_timeout_seconds=30, transport="shared_memory")

    killed = []

    def kill_worker_one(record):
        if record.step == 5 and not killed:  # once: a restart replays step 5
            # Dead before step 6 (found there, recomputed in-step): a ray.kill landing mid-step
            # gave other weights about 1 run in 5 at a load of 10-17 (reported as a race of
            # the shared-memory step, not tested here).
            kill_and_wait_until_dead(runner.worker_group.replicas[1])
            killed.append(record.step)
        # The replacement (~1 s to start, many more on a loaded machine) joins at the next
        # step boundary, however long it takes: the job waits for it here.
        wait_for_replacements(runner.worker_group)

    runner.on_step = kill_worker_one
    result = runner.run()
    assert result.history.worker_failures == 1
    workers = [record.workers for record in result.history.steps]
    assert workers[:5] == [2] * 5
    kinds = [recovery.kind for recovery in result.history.recoveries]
    # The loss shows at one of the next steps, which then run on the survivor until a
    # replacement replica joins (elasticity).
    assert kinds[0] == "worker_lost" and min(workers) == 1 and workers[-1] == 2
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch_in_float64(local_ray):
    full = train(spec_with(dtype="float64"), 2, 1)
    halves = train(spec_with(dtype="float64", gradient_accumulation_steps=2,
                             **{"data.batch_size": 48, "data.micro_batches": 2}), 2, 1)
    # The same samples in the same steps: batch 96 = two consecutive batches of 48 of the
    # same permutation, cut into the same four micro-batches.
    for key, value in full.state_dict.items():
        np.testing.assert_allclose(halves.state_dict[key], value, rtol=1e-12, atol=1e-14)


def test_global_norm_clipping_matches_the_engine_clip_grad_norm(local_ray):
    spec = spec_with(dtype="float64")
    spec.clipping.max_norm = 0.05
    result = train(spec, 2, 3)
    dataset = digits(spec)
    model = build_model(spec.model, dataset.feature_shape, np.float64, seed=spec.seed)
    adamw = optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.01)
    sampler = EpochSampler(len(dataset.x), 96, 4, spec.seed)
    for epoch in range(3):
        for step in sampler.epoch(epoch):
            batch = np.concatenate(step.micro_batches)
            adamw.zero_grad()
            F.cross_entropy(model(Tensor(dataset.x[batch].astype(np.float64))),
                            dataset.y[batch]).backward()
            optim.clip_grad_norm_(model.parameters(), 0.05)
            adamw.step()
    assert all(record.gradient_norm > 0.05 for record in result.history.steps[:3])
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(result.state_dict[key], value, rtol=1e-10, atol=1e-13)


def test_the_trained_model_is_evaluated_on_the_validation_split(local_ray):
    spec = spec_with(**{"data.epochs": 5})
    result = train(spec, 2, 2)
    assert result.final_evaluation.samples == len(digits(spec).x_val) == 359
    assert result.final_evaluation.accuracy > 0.9
    assert result.history.steps[-1].loss < result.history.steps[0].loss


def test_a_stopped_job_resumed_from_its_checkpoint_ends_with_bitwise_the_same_weights(
        one_worker_float32, tmp_path):
    from scheduler.storage import load_checkpoint, save_checkpoint

    spec = spec_with()
    saved = []
    stop_after = 7
    first = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                               on_checkpoint=lambda c: saved.append(save_checkpoint(
                                   tmp_path / f"step-{c.step}.npz", c)))
    first.should_stop = lambda: len(first.history.steps) >= stop_after
    stopped = first.run()
    assert stopped.stopped_early and stopped.steps == stop_after
    checkpoint = load_checkpoint(saved[-1])
    assert checkpoint.step == stop_after
    # Resumed with another worker and shard count: the state does not depend on them.
    resumed = JobRunner.for_spec(spec, digits(spec), workers=1, parameter_servers=3,
                                 resume_from=checkpoint).run()
    assert resumed.steps == stopped.steps + len(resumed.history.steps)
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(resumed.state_dict[key], value), key


@pytest.mark.parametrize("workers, shards, transport", [(2, 2, "object_store"),
                                                       (4, 3, "direct")])
def test_the_cross_host_transports_give_bitwise_the_shared_memory_weights(
        one_worker_float32, workers, shards, transport):
    # The paths for actors on other hosts, forced here on one host: the same sums in the same
    # order, only carried over direct connections or through the object store.
    result = train(spec_with(), workers, shards, transport=transport)
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_the_direct_transport_clips_and_tracks_batch_norm_like_shared_memory(local_ray):
    spec = spec_with(dtype="float64")
    spec.clipping.max_norm = 0.05
    spec.model.layers.insert(1, spec.model.layers[1].__class__(batch_norm={}))
    shared = train(spec, 2, 2, transport="shared_memory")
    store = train(spec, 2, 2, transport="direct")
    assert "1.running_mean" in shared.state_dict
    for key, value in shared.state_dict.items():
        assert np.array_equal(store.state_dict[key], value), key


def test_a_batch_norm_job_whose_last_batch_is_short_trains_on_micro_batches_of_two(local_ray):
    # 1438 training samples in batches of 179 leave a last batch of 6: cut into 4 micro-batches
    # it would hold 1-sample ones, on which batch norm cannot train ("more than 1 value per
    # channel"). It is cut into 3 of 2 instead, the same for any worker count.
    spec = spec_with(**{"data.batch_size": 179, "data.epochs": 1})
    spec.model.layers.insert(1, spec.model.layers[1].__class__(batch_norm={}))
    dataset = digits(spec)
    assert len(dataset.x) % 179 == 6
    assert min(map(len, np.array_split(np.arange(6), 4))) == 1
    one = train(spec, 1, 1)
    two = train(spec, 2, 2)
    assert one.steps == 9 and np.isfinite(one.final_evaluation.loss)
    for key, value in one.state_dict.items():
        assert np.array_equal(two.state_dict[key], value), key


def test_early_stopping_ends_a_job_whose_validation_loss_stalls_and_keeps_the_best_weights(
        local_ray):
    spec = spec_with(**{"data.epochs": 40, "optimizer.adamw.lr": 0.05})
    spec.early_stopping.patience = 2
    spec.early_stopping.restore_best = True
    result = train(spec, 2, 2)
    losses = [e.loss for e in result.history.evaluations[:-1]]
    assert result.early_stopping_triggered and not result.stopped_early
    assert result.steps < result.history.steps[0].total_steps
    best = losses.index(min(losses))
    assert len(losses) == best + 1 + 2  # two evaluations without improvement, then stop
    assert result.final_evaluation.loss == pytest.approx(min(losses), rel=1e-6)


def test_without_an_interval_the_model_is_evaluated_at_every_epoch_end(local_ray):
    result = train(spec_with(), 2, 2)
    per_epoch = result.history.steps[0].total_steps // 3
    assert [e.step for e in result.history.evaluations] == [per_epoch, 2 * per_epoch,
                                                            3 * per_epoch]


@pytest.mark.parametrize("transport", ["shared_memory", "direct"])
def test_a_lost_parameter_server_shard_is_recovered_from_the_checkpoint_with_the_same_weights(
        one_worker_float32, transport):
    spec = spec_with()
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                step_timeout_seconds=30, transport=transport)
    killed = []

    def kill_shard_one(record):
        if record.step == 20 and not killed:  # mid second epoch; the checkpoint is at 15
            killed.append(record.step)
            ray.kill(runner.worker_group.shards[1])

    runner.on_step = kill_shard_one
    result = runner.run()
    assert result.history.shard_failures == 1
    assert [r.step for r in result.history.steps] == list(range(1, result.steps + 1))
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def shard_dying_at_its_first_checkpoint(marker):
    """Shard 1 of the first run dies when the runner asks for its state: before the first
    checkpoint (the one at the job's start) exists."""

    class ShardDyingOnce(ParameterServerShard):
        def state(self):
            if self.setup.index == 1 and not marker.exists():
                marker.touch()
                os._exit(1)
            return super().state()

    return ShardDyingOnce


def test_a_shard_lost_before_the_first_checkpoint_restarts_the_job_from_its_start(
        one_worker_float32, tmp_path, monkeypatch):
    marker = tmp_path / "shard-died"
    monkeypatch.setattr(worker_group, "RemoteShard",
                        worker_group.actor_class(shard_dying_at_its_first_checkpoint(marker)))
    result = train(spec_with(), 2, 2, step_timeout_seconds=30)
    assert marker.exists()
    assert result.history.shard_failures == 1
    assert [r.step for r in result.history.steps] == list(range(1, result.steps + 1))
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def shard_falling_silent_at_step(step, marker):
    """Shard 1 stops answering (alive, but stuck) in its optimizer step of `step`, once."""

    class ShardFallingSilent(ParameterServerShard):
        def apply(self, lr, *coefficients):
            if self.setup.index == 1 and self.steps_taken + 1 == step and not marker.exists():
                marker.touch()
                time.sleep(600)
            return super().apply(lr, *coefficients)

    return ShardFallingSilent


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_a_shard_silent_past_the_deadline_is_lost_and_recovered_with_the_same_weights(
        one_worker_float32, tmp_path, monkeypatch, transport):
    # No hang: a peer that stops answering is a failed peer, shards included.
    marker = tmp_path / "shard-fell-silent"
    monkeypatch.setattr(worker_group, "RemoteShard",
                        worker_group.actor_class(shard_falling_silent_at_step(20, marker)))
    start = time.monotonic()
    # 30 s for what the step time does not predict (starting the actors: at a load of 17,
    # 10 s was too short); the silent shard is found by the step's deadline, 3 s.
    result = train(spec_with(), 2, 2, step_timeout_seconds=30, transport=transport)
    assert marker.exists() and time.monotonic() - start < 120
    assert result.history.shard_failures == 1
    assert [r.step for r in result.history.steps] == list(range(1, result.steps + 1))
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_the_worker_replacement_cap_holds_across_restarts_from_a_checkpoint(
        one_worker_float32):
    spec = spec_with()
    runner = JobRunner.for_spec(spec, digits(spec), workers=2, parameter_servers=2,
                                step_timeout_seconds=30,
                                failure_policy=FailurePolicy(max_worker_replacements=1))
    injected = []

    def inject(record):
        group = runner.worker_group
        if not injected and record.step == 3:
            injected.append("worker")  # replaced: the one replacement the policy allows
            kill_and_wait_until_dead(group.replicas[1])  # found in step 4, not mid-step
        elif injected == ["worker"] and record.step >= 16 and record.workers == 2:
            injected.append("shard")  # every actor restarts from the checkpoint at step 15
            ray.kill(group.shards[1])
        elif injected == ["worker", "shard"] and record.shard_failures == 1:
            injected.append("worker again")  # no replacement left
            kill_and_wait_until_dead(group.replicas[1])
        wait_for_replacements(group)  # one starting joins at the next step boundary

    runner.on_step = inject
    result = runner.run()
    assert injected == ["worker", "shard", "worker again"]
    assert result.history.worker_failures == 2 and result.history.shard_failures == 1
    assert result.history.steps[-1].workers == 1
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


class ReplicaFailingAtStepThree(ModelReplica):
    def compute(self, destination, micro_batches, global_step, *arguments, **options):
        if global_step == 3:
            raise FloatingPointError("the loss is NaN")
        return super().compute(destination, micro_batches, global_step, *arguments, **options)


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_an_error_in_the_jobs_own_computation_fails_the_job_naming_worker_step_and_error(
        local_ray, monkeypatch, transport):
    monkeypatch.setattr(worker_group, "RemoteReplica",
                        worker_group.actor_class(ReplicaFailingAtStepThree))
    with pytest.raises(JobFailed, match=r"worker \d failed on step 3: FloatingPointError: "
                                        r"the loss is NaN"):
        train(spec_with(), 2, 1, step_timeout_seconds=30, transport=transport)


def shared_memory_of(size, tmp_path, monkeypatch):
    with mounted_tmpfs(tmp_path / "shm", size) as folder:
        monkeypatch.setenv(ROOT_VARIABLE, str(folder))
        yield folder


@pytest.fixture
def small_shared_memory(tmp_path, monkeypatch):
    """32 KiB: room for the parameters (3 pages), not for the step's arrays on 2 workers
    besides them (9 more pages), whose room is checked before the actors start."""
    yield from shared_memory_of("32k", tmp_path, monkeypatch)


@pytest.fixture
def tiny_shared_memory(tmp_path, monkeypatch):
    """8 KiB: not even room for the parameters."""
    yield from shared_memory_of("8k", tmp_path, monkeypatch)


def test_a_job_without_room_in_shared_memory_runs_on_the_object_store_with_the_same_bits(
        one_worker_float32, small_shared_memory):
    recoveries = []
    result = train(spec_with(), 2, 2, on_recovery=recoveries.append)
    for key, value in one_worker_float32.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key
    assert [(r.kind, r.step) for r in recoveries] == [("shared_memory_full", 0)]
    assert str(small_shared_memory) in recoveries[0].message
    assert "Ray object store instead" in recoveries[0].message
    assert list(small_shared_memory.iterdir()) == []


def test_shared_memory_asked_for_by_name_without_room_is_an_error_naming_the_folder(
        local_ray, tiny_shared_memory):
    with pytest.raises(SharedMemoryFull, match=f"{tiny_shared_memory} has .* MiB free"):
        train(spec_with(), 2, 2, transport="shared_memory")
    assert list(tiny_shared_memory.iterdir()) == []
