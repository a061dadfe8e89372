"""Training on real Ray from pretrained weights (`model.init_from`) with a frozen layer
(`trainable: false`): every replica and shard starts from the file's parameters and buffers,
whatever the worker count and transport, and the frozen layer ends bitwise as it started."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner
from scheduler.storage import local_weights_shape, save_weights
from worker.model_builder import build_model
from worker.resolved_job import resolve

pytestmark = [pytest.mark.distributed]

# Batch norm with momentum 0 keeps its running statistics where they start: the file's.
SPEC = """
name: fine-tune
model: {init_from: "file:WEIGHTS", layers: [
  {linear: {out_features: 12}, trainable: false}, {batch_norm: {momentum: 0}}, {relu: {}},
  {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1, momentum: 0.9, weight_decay: 0.1}}
data: {dataset: "sklearn:iris", batch_size: 40, epochs: 3, validation_fraction: 0.2}
seed: 11
"""


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A "pretrained" model of the same layers, from another seed, with BatchNorm statistics
    no seed gives (exact binary fractions, so averaging them over micro-batches is exact)."""
    spec = load_job_spec(SPEC.replace('init_from: "file:WEIGHTS", ', ""))
    model = build_model(spec.model, (4,), np.float32, seed=99)
    state = {key: np.array(value) for key, value in model.state_dict().items()}
    state["1.running_mean"] = np.full(12, 0.5, np.float32)
    state["1.running_var"] = np.full(12, 2.0, np.float32)
    state["1.num_batches_tracked"] = np.array(7, np.int64)
    path = tmp_path_factory.mktemp("weights") / "pretrained.safetensors"
    save_weights(path, state)
    return path, state


def _train(path, workers: int, shards: int, transport: str):
    spec = load_job_spec(SPEC.replace("WEIGHTS", str(path)))
    dataset = split_and_standardize(load_builtin("sklearn:iris", spec.seed), 0.2, True, spec.seed)
    job = resolve(spec, dataset.shape, workers=workers, parameter_servers=shards,
                  weights=local_weights_shape(spec))
    return JobRunner(job, dataset, transport=transport).run()


@pytest.fixture(scope="module")
def runs(local_ray, weights_file):
    path, _ = weights_file
    return {"one worker, shared memory": _train(path, 1, 1, "shared_memory"),
            "two workers, three shards, object store": _train(path, 2, 3, "object_store")}


def test_every_replica_and_shard_starts_from_the_file_so_any_worker_count_gives_the_same_bits(
        runs):
    one, two = runs.values()
    assert one.steps == 9
    for key, value in one.state_dict.items():
        assert np.array_equal(value, two.state_dict[key]), key


def test_the_frozen_layer_and_the_buffers_end_as_the_file_had_them(runs, weights_file):
    _, file = weights_file
    for result in runs.values():
        state = result.state_dict
        for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
            assert np.array_equal(state[key], file[key]), key
        assert int(state["1.num_batches_tracked"]) == 7 + result.steps
        # The trainable layers moved from the file's values (momentum and decay included).
        assert not np.allclose(state["3.weight"], file["3.weight"], atol=1e-3)
        assert not np.allclose(state["1.weight"], file["1.weight"], atol=1e-3)


def test_without_init_from_the_same_spec_starts_from_the_seed(local_ray, weights_file):
    path, file = weights_file
    spec = load_job_spec(SPEC.replace('init_from: "file:WEIGHTS", ', "").replace("epochs: 3",
                                                                                "epochs: 1"))
    dataset = split_and_standardize(load_builtin("sklearn:iris", spec.seed), 0.2, True, spec.seed)
    result = JobRunner(resolve(spec, dataset.shape), dataset).run()
    seeded = build_model(spec.model, (4,), np.float32, seed=spec.seed).state_dict()
    assert np.array_equal(result.state_dict["0.weight"], seeded["0.weight"])
    assert not np.array_equal(result.state_dict["0.weight"], file["0.weight"])


def test_a_saved_weights_file_keeps_a_scalar_buffer_a_scalar(weights_file):
    path, _ = weights_file
    spec = load_job_spec(SPEC.replace("WEIGHTS", str(path)))
    assert dict(local_weights_shape(spec).tensors)["1.num_batches_tracked"] == ()
