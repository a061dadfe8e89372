"""`chainrule train` and its Python twin: a spec file in, trained weights out."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.storage import load_weights
from scheduler.training import prepare_dataset, resolve_builtin_job, train_job
from worker.backprop import Tensor
from worker.model_builder import build_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
SPEC = """
name: iris-cli
model: {layers: [{linear: {out_features: 16}}, {tanh: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.05}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 15, validation_fraction: 0.2}
resources: {workers: 2, parameter_servers: 2}
seed: 1
"""


def test_train_command_prints_progress_and_writes_weights_that_reproduce_its_accuracy(
        tmp_path):
    spec_path = tmp_path / "iris.yaml"
    spec_path.write_text(SPEC)
    weights = tmp_path / "iris.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "train", str(spec_path), "-o", str(weights)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "validation accuracy" in done.stdout
    reported = float(done.stdout.split("validation accuracy")[1].split()[0])
    spec = load_job_spec(SPEC)
    dataset = prepare_dataset(resolve_builtin_job(spec))
    model = build_model(spec.model, dataset.feature_shape)
    model.load_state_dict(load_weights(weights))
    model.eval()
    accuracy = (model(Tensor(dataset.x_val)).data.argmax(axis=1) == dataset.y_val).mean()
    assert accuracy == pytest.approx(reported, abs=1e-4)
    assert reported > 0.85


def test_a_bad_spec_exits_2_naming_the_field(tmp_path):
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(SPEC.replace("lr: 0.05", "lr: -1"))
    done = subprocess.run([sys.executable, "-m", "services.cli", "train", str(spec_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "optimizer.adam.lr" in done.stderr


def test_train_job_in_python_returns_weights_and_history(local_ray, tmp_path):
    result = train_job(load_job_spec(SPEC), workers=1, output=tmp_path / "w.npz")
    assert result.steps == 15 * 4
    assert set(load_weights(tmp_path / "w.npz")) == set(result.state_dict)
    assert np.isfinite([r.loss for r in result.history.steps]).all()


def test_binary_classification_with_one_logit_reports_the_accuracy_of_its_sign(local_ray):
    spec = load_job_spec("""
name: cancer
model: {layers: [{linear: {out_features: 16}}, {relu: {}}, {linear: {out_features: 1}}]}
loss: binary_cross_entropy_with_logits
optimizer: {adam: {lr: 0.01}}
data: {dataset: "sklearn:breast_cancer", batch_size: 64, epochs: 4, validation_fraction: 0.25}
resources: {workers: 2, parameter_servers: 1}
""")
    result = train_job(spec)
    dataset = prepare_dataset(resolve_builtin_job(spec))
    model = build_model(spec.model, dataset.feature_shape)
    model.load_state_dict(result.state_dict)
    model.eval()
    logits = model(Tensor(dataset.x_val)).data[:, 0]
    expected = ((logits > 0) == (dataset.y_val == 1)).mean()
    # Before: the arg-max over one column, i.e. the share of class 0 (0.377 on this set).
    assert result.final_evaluation.accuracy == pytest.approx(expected, abs=1e-9)
    assert result.final_evaluation.accuracy > 0.9
