"""The README's "Rebuilding a model in PyTorch", followed to the letter: its code, taken from
the README itself, rebuilds each model from the manifest that `save_trained_weights` writes
(the one `chainrule train -o` and the service's download share), loads the weights with
strict=True, and reproduces the validation split; on the split's raw rows, standardised as the
README says, torch gives the engine's outputs on the job's own validation set.

Weights are the builder's initialisation with batch-norm statistics moved off their defaults
(no training needed: the manifest and the weights file are the real ones). torch is a
reference only, here as in the other tests."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from chainrule.spec_file import load_job_spec
from scheduler.datasets import builtin_text, from_arrays, load_builtin, split_and_standardize
from scheduler.job_runner import TrainingResult
from scheduler.step_history import TrainingHistory
from scheduler.training import prepare_dataset, resolve_builtin_job, save_trained_weights
from worker.backprop import Tensor
from worker.backprop.tensor import no_grad
from worker.model_builder import build_planned_model

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "services" / "specs"

LSTM = """name: sums
model: {layers: [{embedding: {num_embeddings: 10, embedding_dim: 8}},
  {lstm: {hidden_size: 12, num_layers: 2, bidirectional: true}}, {last_step: {}},
  {residual: {layers: [{linear: {out_features: 24}}, {gelu: {}}]}},
  {linear: {out_features: 2}}]}
loss: cross_entropy
data: {dataset: "synthetic:sequence_sum", batch_size: 32, epochs: 1, validation_fraction: 0.25}
seed: 5
"""

CAUSAL_TRANSFORMER = """name: bytes
model: {layers: [{embedding: {num_embeddings: 256, embedding_dim: 16}},
  {positional_embedding: {}},
  {transformer_encoder_layer: {nhead: 4, dim_feedforward: 32, is_causal: true}},
  {transformer_encoder_layer: {nhead: 2, dim_feedforward: 32, activation: gelu,
                               norm_first: true, is_causal: true}},
  {multihead_attention: {num_heads: 2, is_causal: true}}, {layer_norm: {}},
  {linear: {out_features: 256}}]}
loss: next_token_cross_entropy
data: {dataset: "text:python_help", batch_size: 32, epochs: 1, context_length: 16,
       validation_fraction: 0.01}
"""


def readme_code() -> dict:
    """The README section's Python blocks, run in one namespace as a user would paste them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Rebuilding a model in PyTorch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, "the section's rebuilding and split code"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def readme():
    return readme_code()


def _saved_job(spec, folder: Path):
    """The job's real data preparation (split, standardisation) and its manifest and weights
    written by save_trained_weights; returns (weights path, prepared data set, engine model)."""
    job = resolve_builtin_job(spec)
    dataset = prepare_dataset(job)
    model = build_planned_model(job.model, job.dtype, seed=spec.seed)
    rng = np.random.default_rng(1)
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer += rng.normal(0, 0.3, buffer.shape).astype(buffer.dtype)
        if name.endswith("running_var"):
            buffer *= rng.uniform(0.5, 2.0, buffer.shape).astype(buffer.dtype)
    state = {key: value.copy() for key, value in model.state_dict().items()}
    result = TrainingResult(state, TrainingHistory(), None, 0, False, {},
                            feature_mean=dataset.feature_mean, feature_std=dataset.feature_std,
                            input_shape=tuple(job.model.input_shape),
                            input_dtype=job.model.input_dtype,
                            validation_split=dataset.validation_split)
    path = save_trained_weights(folder / "model.safetensors", spec, result)
    model.eval()
    return path, dataset, model


def _engine(model, x: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(Tensor(x)).data


@pytest.mark.parametrize("spec_file", ["digits-mlp.yaml", "digits-cnn.yaml"])
def test_the_readme_rebuilds_the_model_and_its_validation_split_in_pytorch(spec_file, readme,
                                                                           tmp_path):
    spec = load_job_spec(SPECS / spec_file)
    path, dataset, engine_model = _saved_job(spec, tmp_path)

    model, manifest = readme["load_chainrule_model"](str(path))
    training, validation = readme["split_rows"](manifest["validation_split"])
    digits = load_digits()  # the rows in scikit-learn's order, as the README says
    raw = digits.images[:, None] if spec.data.dataset == "sklearn:digits_images" else digits.data
    with torch.no_grad():
        outputs = model(readme["standardize"](raw[validation], manifest)).numpy()

    assert manifest["validation_split"]["rule"] == "seeded_permutation"
    assert len(validation) == len(dataset.x_val) and len(training) == len(dataset.x)
    np.testing.assert_allclose(outputs, _engine(engine_model, dataset.x_val), rtol=0, atol=1e-5)
    images = raw.ndim == 4
    mean = raw[training].astype(np.float64).mean(axis=(0, 2, 3) if images else 0)
    np.testing.assert_allclose(np.asarray(manifest["feature_mean"]).reshape(-1), mean,
                               rtol=1e-12)


def test_the_readme_rebuilds_sequence_models_in_pytorch(readme, tmp_path):
    path, dataset, engine_model = _saved_job(load_job_spec(LSTM), tmp_path)

    model, manifest = readme["load_chainrule_model"](str(path))
    _, validation = readme["split_rows"](manifest["validation_split"])
    tokens = load_builtin("synthetic:sequence_sum", 5).x
    with torch.no_grad():
        outputs = model(torch.from_numpy(tokens[validation])).numpy()

    np.testing.assert_array_equal(tokens[validation], dataset.x_val)
    np.testing.assert_allclose(outputs, _engine(engine_model, dataset.x_val), rtol=0, atol=1e-5)


def test_the_readme_rebuilds_a_causal_transformer_and_its_text_split(readme, tmp_path):
    spec = load_job_spec(CAUSAL_TRANSFORMER)
    path, dataset, engine_model = _saved_job(spec, tmp_path)

    model, manifest = readme["load_chainrule_model"](str(path))
    split = manifest["validation_split"]
    tail = np.frombuffer(builtin_text("text:python_help"), dtype=np.uint8)[split["cut"]:]
    windows = (len(tail) - 1) // 16  # non-overlapping windows, each byte's target after it
    tokens = tail[:windows * 16].astype(np.int64).reshape(windows, 16)
    with torch.no_grad():
        outputs = model(torch.from_numpy(tokens[:8])).numpy()

    assert split["rule"] == "text_tail" and split["validation_samples"] == windows
    np.testing.assert_array_equal(tokens, dataset.x_val)
    np.testing.assert_allclose(outputs, _engine(engine_model, dataset.x_val[:8]), rtol=0,
                               atol=1e-5)


def test_the_split_rule_is_given_for_a_data_sets_own_validation_part_and_none_without():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    own = split_and_standardize(from_arrays(x[:15], y[:15], x[15:], y[15:]), 0.2, True, 0)
    unsplit = split_and_standardize(from_arrays(x, y), 0.0, True, 0)

    assert own.validation_split.to_json()["rule"] == "given"
    assert own.validation_split.validation_samples == 5
    assert unsplit.validation_split.to_json() == {"rule": "none", "validation_samples": 0,
                                                  "how": "no validation split"}
