"""Same bits for any worker count, for the models of images and text (BRIEF.md, invariant 1):
a CNN with BatchNorm2d on digits images and a causal transformer on a text, on real Ray.

BatchNorm normalises each micro-batch with its own statistics and the running averages move
towards their mean, summed in micro-batch order; dropout masks are seeded by (seed, step,
micro-batch). Both are fixed by the spec, so 1, 2 and 4 workers with 1 or 3 parameter-server
shards must give bitwise the same parameters AND running statistics.
"""

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.job_runner import JobRunner
from scheduler.training import prepare_dataset, resolve_builtin_job

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CNN_WITH_BATCH_NORM = """
name: same-bits-cnn
model: {layers: [
  {conv2d: {out_channels: 6, kernel_size: 3, padding: 1}}, {batch_norm2d: {}}, {relu: {}},
  {max_pool2d: {kernel_size: 2}}, {dropout2d: {p: 0.1}},
  {conv2d: {out_channels: 8, kernel_size: 3}}, {batch_norm2d: {}}, {relu: {}},
  {flatten: {}}, {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.005}}
data: {dataset: "sklearn:digits_images", batch_size: 96, epochs: 1, validation_fraction: 0.2,
       micro_batches: 4}
seed: 3
"""

CAUSAL_TRANSFORMER = """
name: same-bits-transformer
model: {layers: [
  {embedding: {num_embeddings: 256, embedding_dim: 32}}, {positional_embedding: {}},
  {transformer_encoder_layer: {nhead: 4, dim_feedforward: 64, dropout: 0.1, is_causal: true}},
  {transformer_encoder_layer: {nhead: 2, dim_feedforward: 64, dropout: 0.1, is_causal: true,
                               norm_first: true, activation: gelu}},
  {linear: {out_features: 256}}]}
loss: next_token_cross_entropy
optimizer: {adamw: {lr: 0.003, weight_decay: 0.01}}
data: {dataset: "text:python_help", context_length: 32, batch_size: 64, epochs: 1,
       validation_fraction: 0.1, micro_batches: 4}
seed: 4
"""
TRANSFORMER_STEPS = 6  # of the epoch's ~200: enough steps for Adam's state to carry every bit


def train(spec_text: str, workers: int, shards: int, steps: int | None = None):
    job = resolve_builtin_job(load_job_spec(spec_text), workers=workers,
                              parameter_servers=shards)
    runner = JobRunner(job, prepare_dataset(job))
    if steps is not None:
        runner.should_stop = lambda: len(runner.history.steps) >= steps
    return runner.run()


@pytest.fixture(scope="module")
def cnn_on_one_worker(local_ray):
    return train(CNN_WITH_BATCH_NORM, 1, 1)


@pytest.fixture(scope="module")
def transformer_on_one_worker(local_ray):
    return train(CAUSAL_TRANSFORMER, 1, 1, TRANSFORMER_STEPS)


def assert_bitwise_equal(result, reference) -> None:
    assert set(result.state_dict) == set(reference.state_dict)
    for key, value in reference.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


@pytest.mark.parametrize("workers, shards", [(2, 1), (4, 3), (1, 3)])
def test_a_cnn_with_batch_norm2d_gives_bitwise_the_same_weights_and_statistics(
        cnn_on_one_worker, workers, shards):
    result = train(CNN_WITH_BATCH_NORM, workers, shards)
    assert result.steps == cnn_on_one_worker.steps == 15  # 1438 training images, batch 96
    # The running statistics moved (they are part of what must agree).
    assert not np.array_equal(cnn_on_one_worker.state_dict["1.running_var"], np.ones(6))
    assert_bitwise_equal(result, cnn_on_one_worker)


@pytest.mark.parametrize("workers, shards", [(2, 1), (4, 3), (1, 3)])
def test_a_causal_transformer_gives_bitwise_the_same_weights(transformer_on_one_worker,
                                                             workers, shards):
    result = train(CAUSAL_TRANSFORMER, workers, shards, TRANSFORMER_STEPS)
    assert result.steps == transformer_on_one_worker.steps == TRANSFORMER_STEPS
    assert_bitwise_equal(result, transformer_on_one_worker)

