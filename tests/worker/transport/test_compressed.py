"""The workers' side of a compressed step (worker/transport/compressed.py): each worker steps
its own copy of the optimizer with the shards' replies. No Ray: the replica is a plain object
here, as inside its actor."""

from __future__ import annotations

import numpy as np

from chainrule.spec_file import load_job_spec
from scheduler.datasets import from_arrays, split_and_standardize
from worker.compression import topk_reply
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve
from worker.transport.compressed import StepUpdate, compress_block

SPEC = """
name: small
model: {layers: [{linear: {out_features: 8}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.01}}
data: {dataset: "upload:synthetic", batch_size: 16, epochs: 1, validation_fraction: 0.5}
dtype: float64
seed: 1
"""


def _top_k_replica() -> ModelReplica:
    rng = np.random.default_rng(0)
    raw = from_arrays(rng.standard_normal((64, 5)), rng.integers(0, 3, 64))
    dataset = split_and_standardize(raw, 0.5, True, 1, dtype="float64")
    spec = load_job_spec(SPEC)
    spec.communication.compression.topk.ratio = 0.5
    job = resolve(spec, dataset.shape)
    return ModelReplica(ReplicaSetup(job, None), dataset.training_rows(), owns_process=False)


def test_a_worker_computing_two_blocks_applies_the_step_s_update_once():
    # Both blocks' calls carry step 1's update (the runner cannot know that one worker owns
    # both); stepping the optimizer twice would move this replica away from the others.
    once, twice = _top_k_replica(), _top_k_replica()
    size = once.layout.size
    bounds = [(0, size // 2), (size // 2, size)]
    total = np.random.default_rng(1).standard_normal(size)
    replies = [topk_reply(total[lo:hi]) for lo, hi in bounds]
    update = StepUpdate(step=1, lr=0.01, clip_coefficient=1.0)
    micro_batches = [(0, np.arange(8))]
    start = np.array(once.flat)

    compress_block(once, 0, micro_batches, 2, 8, None, bounds, update, *replies)
    for block in (0, 1):
        compress_block(twice, block, micro_batches, 2, 8, None, bounds, update, *replies)

    assert not np.array_equal(once.flat, start)  # the update was applied
    np.testing.assert_array_equal(twice.flat, once.flat)
    assert twice.replicated_optimizer is not None and once.replicated_optimizer is not None
    assert twice.replicated_optimizer.steps_taken == once.replicated_optimizer.steps_taken == 1


def test_a_compressed_job_s_shards_keep_no_optimizer_state():
    # The workers step the optimizer over the whole vector; a shard's Adam moments would be
    # two more copies of its slice, never read.
    replica = _top_k_replica()
    job, layout = replica.job, replica.layout
    bounds = (0, layout.size // 2)

    def shard(compression) -> ParameterServerShard:
        return ParameterServerShard(
            ShardSetup(0, bounds, layout, None, 2, job.optimizer, job.hyperparameters,
                       compression=compression), owns_process=False)

    assert shard(job.compression).state() == (0, {})
    _, state = shard(None).state()
    assert {key: value.size for key, value in state.items()} == {
        "exp_avg": bounds[1], "exp_avg_sq": bounds[1]}
