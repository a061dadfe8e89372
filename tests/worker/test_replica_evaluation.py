"""A replica evaluates the validation split in batches (issue 11): the same figures as one
forward pass over the whole split, with memory bounded by the batch. No Ray: the replica is a
plain object here, as inside its actor."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np

from chainrule.spec_file import load_job_spec
from scheduler.datasets import from_arrays, split_and_standardize
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve

SPEC = """
name: wide
model: {layers: [{linear: {out_features: 256}}, {batch_norm: {}}, {relu: {}},
                 {dropout: {p: 0.5}}, {linear: {out_features: 5}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1}}
data: {dataset: "upload:synthetic", batch_size: 64, epochs: 1, validation_fraction: 0.5}
dtype: float64
seed: 1
"""
SAMPLES = 8_000


def _replica() -> ModelReplica:
    rng = np.random.default_rng(0)
    raw = from_arrays(rng.standard_normal((SAMPLES, 32)), rng.integers(0, 5, SAMPLES))
    dataset = split_and_standardize(raw, 0.5, True, 1, dtype="float64")
    job = resolve(load_job_spec(SPEC), dataset.shape)
    replica = ModelReplica(ReplicaSetup(job, None), dataset.training_rows(), dataset.x_val,
                           dataset.y_val, owns_process=False)
    # Trained-looking state: BatchNorm's running statistics away from their start.
    replica.load_buffers({name: value + 0.3 for name, value in replica.buffer_values().items()
                          if name.endswith(("running_mean", "running_var"))})
    return replica


def _peak_bytes(call) -> tuple[int, object]:
    tracemalloc.start()  # NumPy reports its arrays' memory to tracemalloc
    try:
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_batches_give_the_one_pass_figures_with_memory_bounded_by_the_batch():
    replica = _replica()
    x_val, y_val = replica.x_val, replica.y_val
    assert x_val is not None and y_val is not None and len(y_val) == SAMPLES // 2
    one_pass_peak, (loss, samples, correct) = _peak_bytes(lambda: replica.evaluate(x_val, y_val))
    batch = 16
    batches = [(lo, min(lo + batch, len(y_val))) for lo in range(0, len(y_val), batch)]
    batched_peak, results = _peak_bytes(lambda: replica.evaluate_batches(batches, None, None))
    assert sum(r[1] for r in results) == samples == SAMPLES // 2
    assert math.isclose(sum(r[0] for r in results), loss, rel_tol=1e-12, abs_tol=0)
    assert sum(r[2] for r in results) == correct
    # One pass holds the split's activations (4,000 x 256 doubles per layer, 8 MB each);
    # a batch of 16 holds 16 rows' worth.
    assert one_pass_peak > 8_000_000
    assert batched_peak < one_pass_peak / 20, (batched_peak, one_pass_peak)


def test_the_runners_parameters_and_buffers_are_used_when_given():
    replica, runner = _replica(), _replica()
    rng = np.random.default_rng(2)
    runner.flat[:] = rng.standard_normal(runner.flat.shape) * 0.1
    buffers = runner.flatten_buffers(runner.buffer_values()) * 1.5
    runner.load_buffers(runner.unflatten_buffers(buffers))
    batches = [(0, 1000), (1000, 4000)]
    expected = runner.evaluate_batches(batches, None, None)
    assert replica.evaluate_batches(batches, None, None) != expected
    assert replica.evaluate_batches(batches, np.array(runner.flat), buffers) == expected
