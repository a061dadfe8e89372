"""K-FAC jobs on real Ray: factor statistics reduced by the gradients' fixed tree keep the
same-bits-for-any-worker-count guarantee, on both transports, through failures and resumes;
and through `train_job` K-FAC reaches a target training loss in fewer steps than a tuned Adam."""


import numpy as np
import pytest
import ray

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner
from scheduler.training import train_job
from tests.ray_faults import kill_and_wait_until_dead, wait_for_replacements

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# An MLP with a layer norm (no K-FAC layer: plain SGD on its gradient) and the KL clip on,
# which makes the shards report v.g and wait for the runner's coefficient.
MLP = """
name: kfac-mlp
model: {layers: [{linear: {out_features: 32}}, {tanh: {}}, {layer_norm: {}},
                 {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {kfac: {lr: 0.1, damping: 0.03, factor_update_interval: 2,
                   inverse_update_interval: 3, weight_decay: 0.0001, kl_clip: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 96, epochs: 2, validation_fraction: 0.2,
       micro_batches: 4}
seed: 5
"""

# A CNN on the 1x8x8 digit images: two K-FAC convolutions (one strided), a grouped one and a
# batch norm that step on their plain gradients, and a K-FAC linear head. No KL clip: the
# shards apply as soon as they have reduced.
CNN = """
name: kfac-cnn
model: {layers: [
  {conv2d: {out_channels: 8, kernel_size: 3, padding: 1}}, {batch_norm2d: {}}, {relu: {}},
  {max_pool2d: {kernel_size: 2}},
  {conv2d: {out_channels: 8, kernel_size: 3, padding: 1, groups: 2}}, {relu: {}},
  {conv2d: {out_channels: 16, kernel_size: 3, stride: 2, padding: 1}}, {relu: {}},
  {flatten: {}}, {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {kfac: {lr: 0.05, damping: 0.05}}
data: {dataset: "sklearn:digits_images", batch_size: 96, epochs: 1, validation_fraction: 0.2,
       micro_batches: 4}
seed: 7
"""


def dataset_of(spec):
    return split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                 spec.data.validation_fraction, True, spec.seed)


def runner(text, workers, shards, **options):
    spec = load_job_spec(text)
    return JobRunner.for_spec(spec, dataset_of(spec), workers=workers, parameter_servers=shards,
                              **options)


def train(text, workers, shards, **options):
    return runner(text, workers, shards, **options).run()


def assert_same_bits(result, reference):
    assert result.state_dict.keys() == reference.state_dict.keys()
    for key, value in reference.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


@pytest.fixture(scope="module")
def mlp_reference(local_ray):
    return train(MLP, 1, 1)


@pytest.fixture(scope="module")
def cnn_reference(local_ray):
    return train(CNN, 1, 1)


# --- same bits for any worker and shard count, on both transports -----------------------------


@pytest.mark.parametrize("workers, shards, transport", [
    (2, 1, "shared_memory"), (4, 3, "shared_memory"), (1, 3, "shared_memory"),
    (2, 3, "object_store"), (4, 1, "direct"),
])
def test_a_kfac_mlp_gives_bitwise_the_same_weights_for_any_worker_and_shard_count(
        mlp_reference, workers, shards, transport):
    assert_same_bits(train(MLP, workers, shards, transport=transport), mlp_reference)


@pytest.mark.parametrize("workers, shards, transport", [
    (2, 3, "shared_memory"), (4, 1, "shared_memory"), (2, 3, "object_store"),
])
def test_a_kfac_cnn_gives_bitwise_the_same_weights_for_any_worker_and_shard_count(
        cnn_reference, workers, shards, transport):
    assert_same_bits(train(CNN, workers, shards, transport=transport), cnn_reference)


def test_the_kfac_runs_train(mlp_reference, cnn_reference):
    # What the bitwise comparisons compare: runs that learn, not weights left at their seeds.
    # 30 steps of the MLP, 15 of the CNN (one epoch: 0.8 measured).
    for result, accuracy in ((mlp_reference, 0.85), (cnn_reference, 0.7)):
        assert result.final_evaluation.accuracy > accuracy, result.final_evaluation
        assert result.history.steps[-1].loss < 0.5 * result.history.steps[0].loss


# --- failures and resumes -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_a_worker_killed_mid_kfac_job_is_recomputed_with_identical_weights(
        mlp_reference, transport):
    job = runner(MLP, 2, 2, step_timeout_seconds=30, transport=transport)

    def kill_worker_one(record):
        if record.step == 5:  # on a factor-update step's eve: step 5 carries statistics
            # Dead before step 6, found there: a kill landing mid-step can give other weights
            # (a race of the step protocol, seen with test_job_runner's shared memory).
            kill_and_wait_until_dead(job.worker_group.replicas[1])
        wait_for_replacements(job.worker_group)  # it joins at the next step boundary

    job.on_step = kill_worker_one
    result = job.run()
    assert result.history.worker_failures == 1
    assert min(record.workers for record in result.history.steps) == 1
    assert_same_bits(result, mlp_reference)


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_a_lost_shard_replays_kfac_from_the_checkpoint_to_the_same_weights(
        mlp_reference, transport):
    job = runner(MLP, 2, 2, step_timeout_seconds=30, transport=transport)
    killed = []

    def kill_shard_one(record):
        if record.step == 20 and not killed:  # the checkpoint is at step 15 (an epoch's end)
            killed.append(record.step)
            ray.kill(job.worker_group.shards[1])

    job.on_step = kill_shard_one
    result = job.run()
    assert result.history.shard_failures == 1
    assert_same_bits(result, mlp_reference)


def test_a_stopped_kfac_job_resumed_from_its_checkpoint_file_ends_with_the_same_weights(
        mlp_reference, tmp_path):
    from scheduler.storage import load_checkpoint, save_checkpoint

    saved = []
    first = runner(MLP, 2, 2, on_checkpoint=lambda c: saved.append(
        save_checkpoint(tmp_path / f"step-{c.step}.npz", c)))
    first.should_stop = lambda: len(first.history.steps) >= 7
    stopped = first.run()
    assert stopped.stopped_early and stopped.steps == 7
    checkpoint = load_checkpoint(saved[-1])
    # Step 7's inverses were computed at step 7 (every 3 steps: 1, 4, 7) from the factors of
    # steps 1, 3, 5, 7: the checkpoint must bring both, and the momentum.
    assert {"0/kfac_factor_a", "3/kfac_factor_g", "0/kfac_inverse_q_g", "3/kfac_inverse_scale",
            "0.weight/momentum_buffer", "2.bias/momentum_buffer"} <= set(checkpoint.optimizer_state)
    assert checkpoint.optimizer_steps == 7
    resumed = runner(MLP, 1, 3, resume_from=checkpoint).run()
    assert_same_bits(resumed, mlp_reference)


# --- what K-FAC costs on the wire -----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_kfac_sends_its_statistics_upper_triangles_on_factor_update_steps_only(
        local_ray, transport):
    job = runner(MLP, 2, 2, transport=transport)
    result = job.run()
    gradient_bytes = job.layout.nbytes  # 2474 float32 parameters, the layer norm's 64 included
    # Linear(64, 32): (65*66 + 32*33) / 2 + 1; Linear(32, 10): (33*34 + 10*11) / 2 + 1.
    statistics_bytes = 8 * ((65 * 66 + 32 * 33) // 2 + 1 + (33 * 34 + 10 * 11) // 2 + 1)
    assert (gradient_bytes, statistics_bytes) == (9896, 26328)
    sent = {record.step: record.bytes_sent_per_worker for record in result.history.steps}
    assert sent[1] == sent[3] == gradient_bytes + statistics_bytes  # factor_update_interval 2
    assert sent[2] == sent[4] == gradient_bytes
    assert all(record.bytes_received_per_worker == gradient_bytes
               for record in result.history.steps)


# --- K-FAC against a tuned Adam through train_job -----------------------------------------------


TO_TARGET = """
name: to-target
model: {layers: [{linear: {out_features: 64}}, {tanh: {}}, {linear: {out_features: 10}}]}
loss: cross_entropy
data: {dataset: "sklearn:digits", batch_size: 1438, epochs: 16, validation_fraction: 0.2,
       micro_batches: 4}
eval_interval_steps: 16
seed: 0
"""


def steps_to_reach(optimizer: str, target: float) -> int:
    """Full-batch optimizer steps taken before the training loss first fell below `target`
    (a step's loss is measured before its update); 10**6 if it never did. One worker and one
    shard: the other tests show that the counts give the same weights."""
    losses = []
    train_job(load_job_spec(TO_TARGET + f"optimizer: {optimizer}\n"),
              on_step=lambda record: losses.append(record.loss))
    return next((step for step, loss in enumerate(losses) if loss < target), 10**6)


def test_kfac_reaches_the_target_training_loss_in_fewer_steps_than_a_tuned_adam(local_ray):
    """MLP 64-64-10 (tanh) on the 1438 standardised training digits, full batches of 4
    micro-batches; target training loss 0.02. Measured: Adam takes 10 steps at lr 0.1, its
    best over lr {0.03: 19, 0.05: 13, 0.07: 11, 0.1: 10, 0.15: 11, 0.2: 16, 0.3: 16} (this
    test runs 0.07, 0.1 and 0.15); K-FAC (lr 0.2, damping 0.01, factors and inverses every
    step, momentum 0.9) takes 5 (6 at lr 0.3)."""
    target = 0.02
    adam = {lr: steps_to_reach(f"{{adam: {{lr: {lr}}}}}", target) for lr in (0.07, 0.1, 0.15)}
    kfac = steps_to_reach("{kfac: {lr: 0.2, damping: 0.01}}", target)
    best_adam = min(adam.values())
    assert adam[0.1] == best_adam <= 12, adam  # the tuned rate beats its neighbours (10, 11, 11)
    assert kfac < best_adam, f"K-FAC {kfac} steps, Adam {adam}"
    assert kfac <= 6, kfac  # the measured 5, with a step of room for BLAS round-off
