"""K-FAC's runtime pieces without Ray: replicas computing blocks with their factor statistics,
parameter-server shards summing them by the fixed tree and stepping (worker/kfac_layout.py,
worker/kfac_shard.py). The transports only move these arrays; tests/scheduler/test_kfac_jobs.py
runs the same on real Ray."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.sampler import EpochSampler
from worker.backprop import Tensor, optim
from worker.backprop.nn import functional as F
from worker.backprop.optim.kfac import KFACLayer, factor_statistics
from worker.flat_parameters import ParameterLayout
from worker.kfac_layout import KFACLayout
from worker.model_builder import build_model
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve
from worker.transport.step import StepWork, apply_coefficients

MLP = """
model: {layers: [{linear: {out_features: 16}}, {tanh: {}}, {layer_norm: {}},
                 {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {kfac: {lr: 0.2, damping: 0.01, factor_decay: 0.9, kl_clip: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 128, epochs: 1, validation_fraction: 0.2,
       micro_batches: 4}
dtype: float64
seed: 3
"""


def digits(spec):
    return split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                 spec.data.validation_fraction, True, spec.seed,
                                 dtype=spec.dtype or "float32")


class InProcessJob:
    """N replicas and K shards of one job, stepped by hand as a transport would."""

    def __init__(self, text: str, workers: int, shards: int):
        spec = load_job_spec(text)
        self.dataset = digits(spec)
        self.job = resolve(spec, self.dataset.shape, workers=workers, parameter_servers=shards)
        setup = ReplicaSetup(self.job, None)
        self.replicas = [ModelReplica(setup, self.dataset.training_rows(), owns_process=False)
                         for _ in range(workers)]
        first = self.replicas[0]
        self.layout, self.kfac = first.layout, first.kfac
        self.bounds = self.layout.shard_bounds(shards, align_to_parameters=True,
                                               keep_together=self.kfac.parameter_ranges)
        self.shards = [ParameterServerShard(ShardSetup(k, bounds, self.layout, None, workers,
                                                       "kfac", self.job.hyperparameters,
                                                       None, self.kfac),
                                            owns_process=False)
                       for k, bounds in enumerate(self.bounds)]
        for shard, (lo, hi) in zip(self.shards, self.bounds):
            shard.load_parameters(first.flat[lo:hi])
        self.sampler = EpochSampler(len(self.dataset.x), self.job.batch_size,
                                    self.job.micro_batches, self.job.seed)
        self.step = 0

    def parameters(self) -> np.ndarray:
        return np.concatenate([shard.parameters for shard in self.shards])

    def run_step(self, micro_batches: list[tuple[int, np.ndarray]]) -> None:
        self.step += 1
        workers = len(self.replicas)
        cuts = [round(len(micro_batches) * w / workers) for w in range(workers + 1)]
        samples = sum(len(indices) for _, indices in micro_batches)
        blocks, statistics = [], []
        for replica, lo, hi in zip(self.replicas, cuts, cuts[1:]):
            replica.flat[:] = self.parameters()  # the all-gather
            block = np.empty_like(replica.flat)
            stats = np.empty(self.kfac.statistics_size)
            replica.compute(replica.layout.views(block), micro_batches[lo:hi], self.step,
                            samples, statistics=stats)
            blocks.append(block)
            statistics.append(stats)
        reduced = []
        for shard, (lo, hi) in zip(self.shards, self.bounds):
            sections = ([shard.kfac.statistics_section(s) for s in statistics]
                        if shard.expects_statistics() else ())
            reduced.append(shard.reduce([block[lo:hi] for block in blocks], sections))
        work = StepWork(self.step, micro_batches, [], [], samples,
                        self.job.schedule.lr_at(self.step - 1), None, None, True,
                        self.job.hyperparameters.kl_clip)
        clip, nu = apply_coefficients(work, sum(r.squared_norm for r in reduced),
                                      [d for r in reduced for d in r.direction_dots.values()])
        self.last_coefficients = (clip, nu)
        for shard in self.shards:
            shard.apply(work.lr, clip, nu)

    def train(self, steps: int) -> np.ndarray:
        """`steps` more steps of the first epoch."""
        for samples in self.sampler.epoch(0)[self.step:self.step + steps]:
            self.run_step(list(enumerate(samples.micro_batches)))
        return self.parameters()

    def checkpoint(self) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
        """What the runner keeps: parameters, optimizer steps, the shards' states merged."""
        states = [shard.state() for shard in self.shards]
        merged = {key: value for _, state in states for key, value in state.items()}
        return self.parameters(), states[0][0], merged

    def restore(self, checkpoint: tuple[np.ndarray, int, dict[str, np.ndarray]]) -> None:
        parameters, steps, state = checkpoint
        for shard, (lo, hi) in zip(self.shards, self.bounds):
            shard.load_parameters(parameters[lo:hi])
            shard.load_state(steps, state)
        self.step = steps


def test_the_layout_cuts_shards_only_between_whole_kfac_layers():
    job = InProcessJob(MLP, 1, 3)
    names = [layer.name for layer in job.kfac.layers]
    assert names == ["0", "3"]  # the layer norm (2) is no K-FAC layer
    assert job.kfac.parameter_ranges == ((0, 64 * 16 + 16), (1072, 1072 + 170))
    for lo, hi in job.bounds:
        job.kfac.owned(lo, hi)  # raises if a shard cuts a layer
    # Only upper triangles travel: 65*66/2 + 16*17/2 + 1 for the first layer.
    assert job.kfac.statistics_ranges[0] == (0, 2145 + 136 + 1)


def test_packed_statistics_unpack_to_the_engines_symmetric_sums():
    rng = np.random.default_rng(0)
    layer = KFACLayer("fc", "linear", (3, 5), True)
    kfac = KFACLayout((layer,), ((0, layer.size),), ((0, 21 + 6 + 1),))  # in_dim 5 + bias
    stats = factor_statistics(layer, [(rng.normal(size=(7, 5)), rng.normal(size=(7, 3)))], 7.0)
    back = kfac.unpack(kfac.pack([stats]), 0, 0)
    assert np.array_equal(back.a_sum, stats.a_sum) and np.array_equal(back.g_sum, stats.g_sum)
    assert back.count == 7.0


@pytest.mark.parametrize("workers, shards", [(2, 1), (4, 2), (1, 3)])
def test_any_power_of_two_worker_count_and_any_shard_count_give_bitwise_the_same_weights(
        workers, shards):
    reference = InProcessJob(MLP, 1, 1).train(4)
    assert np.array_equal(InProcessJob(MLP, workers, shards).train(4), reference)


def test_two_workers_and_two_shards_match_the_engines_kfac_on_whole_batches_to_1e9():
    job = InProcessJob(MLP, 2, 2)
    spec = load_job_spec(MLP)
    model = build_model(spec.model, (64,), np.float64, seed=spec.seed)
    start = ParameterLayout.of(model).flatten(model)
    kfac = optim.KFAC(model, lr=0.2, damping=0.01, factor_decay=0.9, kl_clip=0.01)
    for samples in job.sampler.epoch(0)[:4]:
        job.run_step(list(enumerate(samples.micro_batches)))
        batch = np.concatenate(samples.micro_batches)
        kfac.zero_grad()
        with kfac.capture():
            F.cross_entropy(model(Tensor(job.dataset.x[batch])), job.dataset.y[batch]).backward()
        kfac.step()
    expected = ParameterLayout.of(model).flatten(model)
    np.testing.assert_allclose(job.parameters(), expected, rtol=1e-9, atol=1e-12)
    assert np.abs(expected - start).max() > 0.1  # the steps moved the weights


def test_a_checkpoint_taken_with_two_shards_resumes_with_three_to_the_same_bits():
    # Inverses every 3 steps and factors every 2: the resumed run must use the checkpoint's
    # inverses (computed from older factors), not recompute them.
    text = MLP.replace("kl_clip: 0.01", "factor_update_interval: 2, inverse_update_interval: 3")
    reference = InProcessJob(text, 1, 1).train(7)
    first = InProcessJob(text, 1, 2)
    first.train(4)
    checkpoint = first.checkpoint()
    assert {"0/kfac_factor_a", "0/kfac_factor_g", "0/kfac_inverse_q_a", "3/kfac_inverse_scale",
            "0.weight/momentum_buffer", "2.weight/momentum_buffer"} <= set(checkpoint[2])
    resumed = InProcessJob(text, 2, 3)
    resumed.restore(checkpoint)
    assert np.array_equal(resumed.train(3), reference)


def test_a_frozen_layer_is_no_kfac_layer_and_keeps_its_values():
    text = MLP.replace("{linear: {out_features: 16}}",
                       "{linear: {out_features: 16}, trainable: false}").replace(
        "kl_clip: 0.01", "kl_clip: 0.01, weight_decay: 0.01")  # decay would move any value
    job = InProcessJob(text, 2, 2)
    assert [layer.name for layer in job.kfac.layers] == ["3"]
    start = job.parameters()
    trained = job.train(3)
    frozen = slice(0, 64 * 16 + 16)
    assert np.array_equal(trained[frozen], start[frozen])
    assert np.abs(trained - start).max() > 0.01


def test_the_kl_clip_scales_the_preconditioned_steps_of_this_job():
    job = InProcessJob(MLP, 1, 2)
    coefficients = []
    for samples in job.sampler.epoch(0)[:2]:
        micro_batches = list(enumerate(samples.micro_batches))
        job.run_step(micro_batches)
        coefficients.append(job.last_coefficients)
    assert all(clip == 1.0 and 0 < nu < 0.5 for clip, nu in coefficients), coefficients
