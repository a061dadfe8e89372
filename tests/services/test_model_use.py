"""Using a trained job's model over real gRPC: Predict, EvaluateJob, Generate, and a job's log
(GetJobLogs, `chainrule logs`). References are computed here by hand with the engine on the
downloaded weights and the manifest's standardisation."""

from __future__ import annotations

import csv
import json

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris

from chainrule.client import state_name
from chainrule.spec_file import job_spec_from_dict
from scheduler.storage import load_weights
from services import cli
from tests.services.helpers import iris_spec, rpc_error, wait_until_done
from worker.backprop.tensor import Tensor, no_grad
from worker.model_builder import build_model
from worker.text_sampling import sample_text

pytestmark = [pytest.mark.distributed]


def _trained(client, spec):
    job = client.submit(spec)
    done = wait_until_done(client, job.id)
    assert state_name(done.state) == "SUCCEEDED", done.error
    return job.id


def _engine_outputs(client, tmp_path, job_id, spec, x_raw):
    """The engine's forward on the downloaded weights, rows standardised as the manifest says
    (float64 arithmetic, then the job's float32)."""
    path = tmp_path / f"{job_id}.safetensors"
    client.download(job_id, path)
    manifest = json.loads((tmp_path / f"{job_id}.safetensors.json").read_text())
    mean, std = np.asarray(manifest["feature_mean"]), np.asarray(manifest["feature_std"])
    model = build_model(spec.model, x_raw.shape[1:], seed=0)
    model.load_state_dict(load_weights(path))
    model.eval()
    with no_grad():
        return model(Tensor(((x_raw - mean) / std).astype(np.float32))).data.astype(np.float64)


@pytest.fixture(scope="module")
def iris_job(server):
    from chainrule.client import Client

    spec = iris_spec(epochs=30)
    with Client(server.address, timeout=30) as client:
        return _trained(client, spec), spec


def test_predict_gives_the_engines_softmax_on_the_downloaded_weights(client, iris_job,
                                                                     tmp_path):
    job_id, spec = iris_job
    x = load_iris().data
    logits = _engine_outputs(client, tmp_path, job_id, spec, x)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)

    predictions = client.predict(job_id, x)

    assert predictions.task == "classification"
    np.testing.assert_allclose(predictions.probabilities, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(predictions.classes, logits.argmax(axis=1))
    assert (predictions.classes == load_iris().target).mean() > 0.9  # raw rows, standardised
    many = np.tile(x, (30, 1))  # 4500 rows: the client sends two requests
    np.testing.assert_array_equal(client.predict(job_id, many).probabilities,
                                  np.tile(predictions.probabilities, (30, 1)))


def test_one_logit_binary_predictions_are_sigmoid_thresholded_at_zero(client, tmp_path):
    spec = job_spec_from_dict({
        "name": "cancer-binary",
        "model": {"layers": [{"linear": {"out_features": 1}}]},
        "loss": "binary_cross_entropy_with_logits",
        "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": "sklearn:breast_cancer", "batch_size": 64, "epochs": 3,
                 "validation_fraction": 0.2},
        "resources": {"workers": 1, "parameter_servers": 1}, "seed": 0})
    job_id = _trained(client, spec)
    x, y = load_breast_cancer(return_X_y=True)
    logit = _engine_outputs(client, tmp_path, job_id, spec, x)[:, 0]

    predictions = client.predict(job_id, x)

    p = 1 / (1 + np.exp(-logit))
    np.testing.assert_allclose(predictions.probabilities, np.stack([1 - p, p], axis=1),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(predictions.classes, (logit > 0).astype(int))
    assert (predictions.classes == y).mean() > 0.9


def test_regression_gives_the_engines_values_and_evaluates_the_mean_squared_error(
        client, tmp_path):
    spec = job_spec_from_dict({
        "name": "diabetes-regression",
        "model": {"layers": [{"linear": {"out_features": 8}}, {"relu": {}},
                             {"linear": {"out_features": 1}}]},
        "loss": "mse",
        "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": "sklearn:diabetes", "batch_size": 64, "epochs": 2,
                 "validation_fraction": 0.2},
        "resources": {"workers": 1, "parameter_servers": 1}, "seed": 0})
    job_id = _trained(client, spec)
    x, y = load_diabetes(return_X_y=True)
    expected = _engine_outputs(client, tmp_path, job_id, spec, x)

    predictions = client.predict(job_id, x)

    assert predictions.task == "regression" and predictions.classes is None
    np.testing.assert_allclose(predictions.values, expected, rtol=1e-12)
    np.savez(tmp_path / "diabetes.npz", x=x[:300], y=y[:300])  # two batches: 256 + 44
    client.upload(tmp_path / "diabetes.npz", "diabetes-test")
    result = client.evaluate(job_id, "diabetes-test")
    assert result.samples == 300
    assert result.loss == pytest.approx(((expected[:300, 0] - y[:300]) ** 2).mean(), rel=1e-5)
    assert not result.HasField("accuracy") and len(result.confusion_matrix) == 0


def test_a_model_predicts_after_its_training_data_set_is_deleted(client, tmp_path):
    iris = load_iris()
    np.savez(tmp_path / "iris.npz", x=iris.data, y=iris.target)
    client.upload(tmp_path / "iris.npz", "iris-upload")
    spec = iris_spec(data={"dataset": "iris-upload", "batch_size": 32, "epochs": 2,
                           "validation_fraction": 0.2})
    job_id = _trained(client, spec)
    client.delete_dataset("iris-upload")  # before the model was ever loaded for Predict

    predictions = client.predict(job_id, iris.data)

    logits = _engine_outputs(client, tmp_path, job_id, spec, iris.data)
    np.testing.assert_array_equal(predictions.classes, logits.argmax(axis=1))
    manifest = json.loads((tmp_path / f"{job_id}.safetensors.json").read_text())
    assert manifest["input_shape"] == [4] and manifest["input_dtype"] == "float32"


def test_a_wrong_feature_width_is_invalid_argument_naming_the_field(client, iris_job):
    job_id, _ = iris_job
    error = rpc_error(lambda: client.predict(job_id, np.ones((3, 5))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("rows.shape: this model takes samples of shape [4]")
    error = rpc_error(lambda: client.predict(job_id, [[1.0, 2.0, float("nan"), 4.0]]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("rows.values")
    assert rpc_error(lambda: client.predict("job-000000000000", [[1, 2, 3, 4]])).code() == (
        grpc.StatusCode.NOT_FOUND)


def test_more_rows_than_one_request_takes_is_rejected_by_the_server(client, iris_job):
    from chainrule.v1 import training_service_pb2 as pb

    job_id, _ = iris_job
    request = pb.PredictRequest(job_id=job_id, rows=pb.Rows(values=[0.0] * 4097 * 4,
                                                            shape=[4097, 4]))
    error = rpc_error(lambda: client.stub.Predict(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("rows.shape: 1 to 4096 rows per request")


def test_predict_takes_a_csv_or_npz_file_in_the_request_as_it_takes_rows(
        client, iris_job, tmp_path):
    job_id, _ = iris_job
    iris = load_iris()
    expected = client.predict(job_id, iris.data)
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "species", "c", "d"])  # the label column is left out
        writer.writerows([*row[:2], label, *row[2:]]
                         for row, label in zip(iris.data.tolist(), iris.target, strict=True))
    from_csv = client.predict_file(job_id, rows, label_column="species")
    np.testing.assert_array_equal(from_csv.probabilities, expected.probabilities)
    np.testing.assert_array_equal(from_csv.classes, expected.classes)
    # More rows than one request takes: the client sends the file in parts.
    many = tmp_path / "many.npz"
    np.savez(many, x=np.tile(iris.data, (30, 1)), y=np.tile(iris.target, 30))
    from_npz = client.predict_file(job_id, many)
    np.testing.assert_array_equal(from_npz.probabilities,
                                  np.tile(expected.probabilities, (30, 1)))


def test_a_csv_row_is_an_image_models_sample_flattened(client, tmp_path):
    spec = job_spec_from_dict({
        "name": "tiny cnn",
        "model": {"layers": [{"conv2d": {"out_channels": 2, "kernel_size": 3}}, {"relu": {}},
                             {"flatten": {}}, {"linear": {"out_features": 10}}]},
        "loss": "cross_entropy", "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": "sklearn:digits_images", "batch_size": 256, "epochs": 1},
        "resources": {"workers": 1, "parameter_servers": 1}, "seed": 0})
    job_id = _trained(client, spec)
    images = load_digits().data[:20]
    expected = client.predict(job_id, images.reshape(20, 1, 8, 8))
    rows = tmp_path / "digits.csv"
    np.savetxt(rows, images, delimiter=",", header=",".join(f"p{i}" for i in range(64)),
               comments="")
    from_csv = client.predict_file(job_id, rows)
    np.testing.assert_array_equal(from_csv.probabilities, expected.probabilities)
    np.savetxt(rows, images[:, :60], delimiter=",", header=",".join(f"p{i}" for i in range(60)),
               comments="")
    error = rpc_error(lambda: client.predict_file(job_id, rows))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("file.shape: this model takes samples of shape [1, 8, 8]")


def _file_request(job_id, data, fmt="csv", label_column=""):
    from chainrule.v1 import training_service_pb2 as pb

    return pb.PredictRequest(job_id=job_id, file=pb.RowsFile(format=fmt, data=data,
                                                             label_column=label_column))


def _npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@pytest.mark.parametrize("request_parts, field, fragment", [
    (("a,b,c,d\n1,2,x,4\n",), "file.data", "CSV line 2, column 'c': not a number"),
    (("a,b,c,d\n1,2,3,4\n", "csv", "label"), "file.label_column", "no column 'label'"),
    (("a,b,c,d\n1,2,3,4\n", "parquet"), "file.format", "must be one of csv, npz"),
    ((b"not a zip", "npz"), "file.data", "not a readable .npz"),
    ((_npz_bytes(y=np.zeros(3)), "npz"), "file.data", "no array 'x'"),
    # 4097 rows: one over Predict's cap; 600,000 values (zeros compress to almost nothing):
    # refused from the declared shape, before any value is read.
    ((_npz_bytes(x=np.random.default_rng(0).random((4097, 4))), "npz"), "file.data",
     "1 to 4096 rows per request"),
    ((_npz_bytes(x=np.zeros((150_000, 4))), "npz"), "file.data", "declares"),
    (("a,b,c\n1,2,3\n",), "file.shape", "this model takes samples of shape [4]"),
])
def test_a_file_in_the_request_is_parsed_with_the_upload_caps_and_errors_name_the_field(
        client, iris_job, request_parts, field, fragment):
    job_id, _ = iris_job
    data, *rest = request_parts
    request = _file_request(job_id, data.encode() if isinstance(data, str) else data, *rest)
    error = rpc_error(lambda: client.stub.Predict(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: "), error.details()
    assert fragment in error.details(), error.details()


def test_a_file_over_the_servers_upload_limit_is_refused(server, client, iris_job,
                                                         monkeypatch):
    job_id, _ = iris_job
    monkeypatch.setattr(server.service, "max_upload_bytes", 16)  # `serve --max-upload-bytes`
    error = rpc_error(lambda: client.stub.Predict(
        _file_request(job_id, b"a,b,c,d\n1,2,3,4\n5,6,7,8\n"), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "file.data: 24 bytes is over this server's upload limit of 16"


def test_chainrule_predict_writes_a_class_column(server, iris_job, tmp_path, capsys):
    job_id, _ = iris_job
    iris = load_iris()
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "c", "d"])
        writer.writerows(iris.data[:10].tolist())
    out = tmp_path / "out.csv"

    assert cli.main(["predict", job_id, str(rows), "-o", str(out),
                     "--server", server.address]) == 0

    table = list(csv.reader(open(out)))
    assert table[0] == ["class", "p0", "p1", "p2"]
    from chainrule.client import Client

    with Client(server.address) as client:
        expected = client.predict(job_id, iris.data[:10])
    assert [int(row[0]) for row in table[1:]] == expected.classes.tolist()
    np.testing.assert_allclose([[float(v) for v in row[1:]] for row in table[1:]],
                               expected.probabilities, rtol=1e-15)


def test_evaluate_gives_the_loss_accuracy_and_confusion_matrix_computed_by_hand(
        client, server, iris_job, tmp_path, capsys):
    job_id, spec = iris_job
    iris = load_iris()
    x, y = iris.data[::2], iris.target[::2]  # 75 samples: one batch of 256 is not all
    np.savez(tmp_path / "test.npz", x=x, y=y)
    client.upload(tmp_path / "test.npz", "iris-test")
    logits = _engine_outputs(client, tmp_path, job_id, spec, x)
    log_softmax = logits - logits.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=int)
    for true, guess in zip(y, predicted, strict=True):
        confusion[true, guess] += 1

    result = client.evaluate(job_id, "iris-test")

    assert result.samples == 75
    assert result.loss == pytest.approx(-log_softmax[np.arange(75), y].mean(), rel=1e-5)
    assert result.accuracy == pytest.approx((predicted == y).mean())
    assert result.num_classes == 3
    np.testing.assert_array_equal(np.asarray(result.confusion_matrix).reshape(3, 3), confusion)
    capsys.readouterr()
    assert cli.main(["evaluate", job_id, "iris-test", "--server", server.address]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"accuracy {(predicted == y).mean():.4f}" in printed
    assert [int(n) for n in printed[-1].split()] == confusion[2].tolist()
    error = rpc_error(lambda: client.evaluate(job_id, "no-such-upload"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("dataset:")


def test_evaluate_reads_the_upload_in_batches_with_the_one_pass_figures(
        client, server, iris_job, tmp_path):
    """EvaluateJob reads the stored upload MAX_BATCH rows at a time (issue 11): the figures of
    forwarding the whole loaded set (training then validation part) to 1e-12, with the
    server's memory bounded by the batch, not the set. Compressed, with a column-major
    validation part (read whole: it has no contiguous rows)."""
    import tracemalloc

    from services.inference import MAX_BATCH, ModelServing, _classes
    from services.uploads import load_arrays
    from worker.model_builder import build_loss

    job_id, spec = iris_job
    iris = load_iris()
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 150, 40_000)
    x = iris.data[rows] + rng.normal(0, 0.05, (40_000, 4))
    np.savez_compressed(tmp_path / "big.npz", x=x, y=iris.target[rows],
                        x_val=np.asfortranarray(iris.data[:30]), y_val=iris.target[:30])
    client.upload(tmp_path / "big.npz", "iris-big")
    serving = ModelServing(server.service)
    # What EvaluateJob computed before: the whole set loaded, forwarded 256 rows at a time.
    arrays = load_arrays(server.service.store.get_dataset("default", "iris-big").path)
    x_all = np.concatenate([arrays["x"], arrays["x_val"]])
    y_all = np.concatenate([arrays["y"], arrays["y_val"]])
    loaded, loss = serving.load("default", job_id), build_loss(spec, "sum")
    total, correct, confusion = 0.0, 0, np.zeros((3, 3), dtype=np.int64)
    for start, out in loaded.forward(x_all):
        target = y_all[start:start + len(out)]
        total += float(loss(Tensor(out), target).data)
        correct += loss.correct(out, target)
        np.add.at(confusion, (target, _classes(loaded, out)), 1)

    tracemalloc.start()  # NumPy reports its arrays' memory to tracemalloc
    try:
        local = serving.evaluate("default", job_id, "iris-big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = client.evaluate(job_id, "iris-big")

    assert result.samples == local.samples == 40_030
    assert result.loss == local.loss == pytest.approx(total / 40_030, rel=1e-12, abs=0)
    assert local.accuracy == correct / 40_030 == pytest.approx(result.accuracy)
    np.testing.assert_array_equal(local.confusion_matrix, confusion)
    # The set's x alone is 1.28 MB; a batch's rows are 8 KiB.
    assert MAX_BATCH * 4 * 8 == 8192 and x.nbytes == 1_280_000
    assert peak < x.nbytes / 4, peak


def test_a_tiny_language_model_generates_the_requested_bytes_deterministically(
        client, server, tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    client.upload(text, "tiny-text", format="text")
    spec = job_spec_from_dict({
        "name": "tiny-lm",
        "model": {"layers": [
            {"embedding": {"num_embeddings": 256, "embedding_dim": 16}},
            {"positional_embedding": {}},
            {"transformer_encoder_layer": {"nhead": 2, "dim_feedforward": 32, "dropout": 0,
                                           "is_causal": True}},
            {"linear": {"out_features": 256}}]},
        "loss": "next_token_cross_entropy",
        "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": "tiny-text", "context_length": 16, "batch_size": 16, "epochs": 1,
                 "validation_fraction": 0.1},
        "resources": {"workers": 1, "parameter_servers": 1}, "seed": 0})
    job_id = _trained(client, spec)

    first = b"".join(client.generate(job_id, "the ", max_tokens=40, seed=3))
    again = b"".join(client.generate(job_id, "the ", max_tokens=40, seed=3))
    other = b"".join(client.generate(job_id, "the ", max_tokens=40, seed=4))

    assert len(first) == 40
    assert first == again
    assert other != first
    # The same draws as worker/text_sampling.py on the downloaded weights.
    path = tmp_path / "lm.safetensors"
    client.download(job_id, path)
    model = build_model(spec.model, (16,), seed=0, input_dtype=np.int64)
    model.load_state_dict(load_weights(path))
    assert first.decode("utf-8", errors="replace") == sample_text(model, "the ", 40, 1.0, 3)
    greedy = b"".join(client.generate(job_id, "the ", max_tokens=20, temperature=0))
    assert greedy.decode("utf-8", errors="replace") == sample_text(model, "the ", 20, 0.0)
    top1 = b"".join(client.generate(job_id, "the ", max_tokens=20, top_k=1, seed=9))
    assert top1 == greedy  # only the likeliest byte can be drawn
    capsys.readouterr()
    assert cli.main(["generate", job_id, "--prompt", "the ", "--max-tokens", "40", "--seed", "3",
                     "--server", server.address]) == 0
    assert capsys.readouterr().out == first.decode("utf-8", errors="replace") + "\n"
    error = rpc_error(lambda: list(client.generate(job_id, "", max_tokens=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("prompt:")


def test_a_failed_jobs_traceback_is_in_chainrule_logs(client, server, monkeypatch, capsys):
    original = server.lifecycle.prepare

    def prepare(job):
        if job.spec.name == "doomed-logs":
            raise RuntimeError("the disk is on fire")
        return original(job)

    monkeypatch.setattr(server.lifecycle, "prepare", prepare)
    job = client.submit(iris_spec(name="doomed-logs"))
    assert state_name(wait_until_done(client, job.id).state) == "FAILED"
    capsys.readouterr()

    assert cli.main(["logs", job.id, "--server", server.address]) == 0

    out = capsys.readouterr().out
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: the disk is on fire" in out
    assert out.rstrip().splitlines()[-1].split(None, 3)[2:] == [
        "state", "FAILED: RuntimeError: the disk is on fire"]


def test_chainrule_logs_follow_prints_until_the_running_job_ends(client, server, capsys):
    job = client.submit(iris_spec(epochs=20, name="followed"))

    assert cli.main(["logs", job.id, "-f", "--server", server.address]) == 0

    assert state_name(client.get(job.id).state) == "SUCCEEDED"
    lines = capsys.readouterr().out.strip().splitlines()
    kinds = [line.split()[2] for line in lines]
    assert lines[-1].endswith("SUCCEEDED")
    assert "validation" in kinds
    assert any(line.endswith("RUNNING") for line in lines)


def test_the_onnx_download_takes_raw_rows_and_gives_predicts_probabilities(
        client, server, iris_job, tmp_path, capsys):
    import onnxruntime

    job_id, _ = iris_job
    x = load_iris().data
    path = tmp_path / "iris.onnx"

    assert cli.main(["download", job_id, "-o", str(path), "--format", "onnx",
                     "--server", server.address]) == 0

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    predictions = client.predict(job_id, x)
    np.testing.assert_allclose(probabilities, predictions.probabilities, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "iris.onnx.json").read_text())["job_id"] == job_id
    capsys.readouterr()
    assert cli.main(["download", job_id, "-o", str(tmp_path / "x.npz"), "--format", "onnx",
                     "--server", server.address]) == 2
    assert "--format onnx does not match -o" in capsys.readouterr().err
    error = rpc_error(lambda: client.download(job_id, tmp_path / "x.onnx", format="tflite"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("format: must be 'safetensors', 'npz' or 'onnx'")
