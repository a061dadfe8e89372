"""Images and text through the service (a real server over gRPC, real embedded Ray): the CNN
and the causal transformer shipped in services/specs/ train to what their comments promise, and
their downloaded weights, rebuilt in the engine from the spec, reproduce the service's figures."""

import json

import numpy as np
import pytest

from chainrule.client import state_name
from chainrule.spec_file import load_job_spec
from scheduler.storage import load_weights
from scheduler.training import prepare_dataset, resolve_builtin_job
from tests.services.helpers import ROOT, wait_until_done
from tests.text_checks import assert_reads_as_english, training_part, unigram_entropy_nats
from worker.backprop import Tensor
from worker.backprop.tensor import no_grad
from worker.model_builder import Loss, build_model
from worker.text_sampling import sample_text

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

DIGITS_CNN = ROOT / "services" / "specs" / "digits-cnn.yaml"
PYTHON_HELP_TRANSFORMER = ROOT / "services" / "specs" / "python-help-transformer.yaml"
# About 20 s (CNN) and 70 s (transformer) on a quiet 2-core machine; a loaded machine
# stretches that many times over.
TRAIN_TIMEOUT_SECONDS = 1500


def train_over_grpc(client, spec_path, weights):
    job = wait_until_done(client, client.submit(spec_path).id, timeout=TRAIN_TIMEOUT_SECONDS)
    assert state_name(job.state) == "SUCCEEDED", job.error
    header = client.download(job.id, weights)
    assert json.loads(header.manifest_json)["steps"] > 0
    return job


@pytest.mark.timeout(TRAIN_TIMEOUT_SECONDS + 60)
def test_the_digits_cnn_reaches_98_percent_validation_accuracy(client, tmp_path):
    weights = tmp_path / "digits-cnn.safetensors"
    job = train_over_grpc(client, DIGITS_CNN, weights)
    accuracy = job.final_validation.accuracy
    # Measured: 0.9889 (355 of the 359 validation images), as through chainrule train.
    assert accuracy >= 0.98
    spec = load_job_spec(DIGITS_CNN)
    dataset = prepare_dataset(resolve_builtin_job(spec))
    model = build_model(spec.model, dataset.feature_shape)
    model.load_state_dict(load_weights(weights))
    model.eval()
    with no_grad():
        predictions = model(Tensor(dataset.x_val)).data.argmax(axis=1)
    assert (predictions == dataset.y_val).mean() == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.timeout(TRAIN_TIMEOUT_SECONDS + 60)
def test_the_python_help_transformer_beats_the_unigram_baseline_and_writes_english(
        client, tmp_path):
    spec = load_job_spec(PYTHON_HELP_TRANSFORMER)
    training_text = training_part(spec)
    baseline = unigram_entropy_nats(training_text)  # 3.26 nats per byte
    weights = tmp_path / "python-help.safetensors"
    job = train_over_grpc(client, PYTHON_HELP_TRANSFORMER, weights)
    loss = job.final_validation.loss
    # Measured: 1.4318 nats per byte on the held-out tail, against the baseline's 3.26.
    assert loss < 0.6 * baseline

    dataset = prepare_dataset(resolve_builtin_job(spec))
    model = build_model(spec.model, dataset.feature_shape, input_dtype=np.int64)
    model.load_state_dict(load_weights(weights))
    model.eval()
    with no_grad():
        recomputed = float(Loss("next_token_cross_entropy", "mean")(
            model(Tensor(dataset.x_val)), dataset.y_val).data)
    assert recomputed == pytest.approx(loss, rel=1e-4)
    assert_reads_as_english(sample_text(model, "The ", 300, temperature=0.5, seed=0),
                            training_text)
