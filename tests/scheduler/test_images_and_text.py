"""Images through `chainrule train` (the CLI, in a subprocess, on real Ray): the CNN shipped in
services/specs/ trains to what its comment promises, and its weights file, reloaded in the
engine, reproduces the reported accuracy. The transformer's spec is checked once, through the
service: tests/services/test_images_and_text.py."""

import subprocess
import sys
from pathlib import Path

import pytest

from chainrule.spec_file import load_job_spec
from scheduler.storage import load_weights
from scheduler.training import prepare_dataset, resolve_builtin_job
from worker.backprop import Tensor
from worker.backprop.tensor import no_grad
from worker.model_builder import build_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[2]
DIGITS_CNN = ROOT / "services" / "specs" / "digits-cnn.yaml"
# About 20 s on a quiet 2-core machine; a loaded machine stretches that many times over.
TRAIN_TIMEOUT_SECONDS = 1500


def train_with_cli(spec_path: Path, weights: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "train", str(spec_path), "-o", str(weights)],
        cwd=ROOT, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def reported(stdout: str, figure: str) -> float:
    """A figure of the command's summary line ("... validation loss 0.0553, ...")."""
    return float(stdout.split(figure)[1].split()[0].rstrip(","))


@pytest.mark.timeout(TRAIN_TIMEOUT_SECONDS + 60)
def test_the_digits_cnn_reaches_98_percent_validation_accuracy(tmp_path):
    weights = tmp_path / "digits-cnn.safetensors"
    accuracy = reported(train_with_cli(DIGITS_CNN, weights), "validation accuracy")
    # Measured: 0.9889 (355 of the 359 validation images) in 8 epochs.
    assert accuracy >= 0.98
    spec = load_job_spec(DIGITS_CNN)
    dataset = prepare_dataset(resolve_builtin_job(spec))
    assert dataset.x_val.shape == (359, 1, 8, 8)
    model = build_model(spec.model, dataset.feature_shape)
    model.load_state_dict(load_weights(weights))
    model.eval()
    with no_grad():
        predictions = model(Tensor(dataset.x_val)).data.argmax(axis=1)
    assert (predictions == dataset.y_val).mean() == pytest.approx(accuracy, abs=1e-4)

