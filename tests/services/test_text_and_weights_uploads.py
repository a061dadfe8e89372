"""Text and weights uploads through a real server: a UTF-8 text trains next-token prediction,
a safetensors file is checked by safetensors' own parser and then starts a job's model
(`model.init_from`); bad input is INVALID_ARGUMENT naming the field, and leaves nothing."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save

from chainrule.client import state_name
from chainrule.v1 import training_service_pb2 as pb
from scheduler.datasets import builtin_text
from services import cli, uploads
from services.errors import InvalidArgument
from services.uploads import UploadHeader, UploadLimits
from tests.services.helpers import data_files, iris_spec, rpc_error, wait_until_done
from worker.model_builder import build_model

pytestmark = [pytest.mark.distributed]

IRIS_LAYERS = [{"linear": {"out_features": 8}}, {"relu": {}}, {"linear": {"out_features": 3}}]


def _header(name: str, data: bytes, format: str) -> pb.DatasetHeader:
    return pb.DatasetHeader(name=name, format=format, size_bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest())


def _iris_weights(**changes: np.ndarray) -> bytes:
    """A safetensors file of iris_spec's model (PyTorch key names), from another seed."""
    model = build_model(iris_spec().model, (4,), np.float32, seed=42)
    state = {key: np.array(value) for key, value in model.state_dict().items()}
    state.update(changes)
    return save(state)


def _invalid(call) -> str:
    error = rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    return error.details()


# --- texts ----------------------------------------------------------------------------------------


def test_a_text_upload_is_kept_as_sent_and_trains_next_token_prediction(client, server,
                                                                        tmp_path):
    path = tmp_path / "help.txt"
    path.write_bytes(builtin_text("text:python_help")[:24_000])
    info = client.upload(path, "help")  # the format from the suffix: .txt is text
    assert (info.format, info.size_bytes, info.task, info.num_classes) == (
        "text", 24_000, "next_token", 256)
    record = server.service.store.get_dataset("default", "help")
    assert Path(record.path).read_bytes() == path.read_bytes()
    spec = iris_spec(name="help-lm", loss="next_token_cross_entropy", model={"layers": [
        {"embedding": {"num_embeddings": 256, "embedding_dim": 16}},
        {"linear": {"out_features": 256}}]},
        optimizer={"adam": {"lr": 0.01}},
        data={"dataset": "upload:help", "batch_size": 64, "epochs": 1, "context_length": 16,
              "validation_fraction": 0.1})
    job = wait_until_done(client, client.submit(spec).id)
    assert state_name(job.state) == "SUCCEEDED", job.error
    # 21,600 training bytes in windows of 16; the validation part is the text's last 2,400.
    assert job.progress.total_steps == 22 and job.final_validation.samples == 149
    # 22 steps learn the byte frequencies: clearly below a uniform guess's log(256) = 5.55.
    assert job.final_validation.loss < np.log(256) - 1 and job.final_validation.accuracy > 0


def test_a_text_that_is_not_utf8_names_the_byte_and_leaves_nothing(client, server):
    before = data_files(server.data_dir)
    data = "naïve text, then a stray byte: ".encode() + b"\xff and more"
    message = _invalid(lambda: client.upload_stream(_header("latin", data, "text"), [data]))
    assert message.startswith("header.format: a text must be UTF-8; byte 32:")
    assert server.service.store.get_dataset("default", "latin") is None
    assert data_files(server.data_dir) == before


def test_a_text_too_long_to_train_on_is_refused_by_its_size(tmp_path):
    received = tmp_path / "received"
    received.write_bytes(b"x" * 11)
    header = UploadHeader("long", "text", "", 11, hashlib.sha256(b"x" * 11).hexdigest())
    with pytest.raises(InvalidArgument) as info:
        uploads.store_upload(header, received, tmp_path / "long.txt",
                             UploadLimits(max_dataset_bytes=160))
    assert info.value.field_path == "header.size_bytes"
    assert "at most 10 bytes" in str(info.value)
    assert not (tmp_path / "long.txt").exists()


# --- weights --------------------------------------------------------------------------------------


def test_a_safetensors_upload_keeps_its_tensor_names_and_shapes_for_init_from(client, server):
    data = _iris_weights()
    info = client.upload_stream(_header("iris-weights", data, "safetensors"), [data])
    assert info.format == "safetensors" and info.size_bytes == len(data)
    record = server.service.store.get_dataset("default", "iris-weights")
    assert record.tensors == (("0.bias", (8,)), ("0.weight", (8, 4)), ("2.bias", (3,)),
                              ("2.weight", (3, 8)))
    assert Path(record.path).read_bytes() == data


def _bfloat16_file() -> bytes:
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


@pytest.mark.parametrize("data, expected", [
    (b"\x08" + b"\0" * 20, "header.format: not a readable safetensors file"),
    (save({"w": np.zeros(3, np.float32)})[:-2], "header.format: not a readable safetensors file"),
    (save({"w": np.array([1.0, np.nan], np.float32)}), "tensor 'w' contains NaN"),
    (_bfloat16_file(), "tensor 'w' has dtype BF16"),
    (save({}), "holds no tensors"),
])
def test_a_file_that_is_not_usable_weights_is_refused_and_leaves_nothing(client, server, data,
                                                                        expected):
    before = data_files(server.data_dir)
    message = _invalid(lambda: client.upload_stream(_header("bad-weights", data, "safetensors"),
                                                    [data]))
    assert expected in message
    assert data_files(server.data_dir) == before


# --- init_from at submit --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uploaded(server):
    """A weights upload of iris_spec's model, one of another model, and a text."""
    from chainrule.client import Client

    with Client(server.address, timeout=30) as client:
        for name, data in (("iris-init", _iris_weights()),
                           ("wide-init", _iris_weights(**{"0.weight": np.zeros((16, 4),
                                                                               np.float32)}))):
            client.upload_stream(_header(name, data, "safetensors"), [data])
        text = b"a short text for a language model, " * 20
        client.upload_stream(_header("a-text", text, "text"), [text])


@pytest.mark.parametrize("init_from, field, expected", [
    ("upload:nothing-here", "model.init_from", "no uploaded weights 'nothing-here'"),
    ("a-text", "model.init_from", "'a-text' is a text upload, not weights"),
    ("file:/etc/passwd", "model.init_from", "the service reads no local files"),
    ("upload:", "model.init_from", "needs the name of a safetensors upload"),
    ("wide-init", "model.init_from", "mis-shaped keys: 0.weight: file (16, 4), model (8, 4)"),
])
def test_a_bad_init_from_is_invalid_argument_naming_it_and_stores_no_job(
        client, server, uploaded, init_from, field, expected):
    jobs = len(server.service.store.snapshot()["jobs"])
    spec = iris_spec(model={"init_from": init_from, "layers": IRIS_LAYERS})
    message = _invalid(lambda: client.submit(spec))
    assert message.startswith(f"{field}: ") and expected in message
    assert len(server.service.store.snapshot()["jobs"]) == jobs


def test_a_strict_init_from_lists_the_missing_and_unexpected_keys(client, uploaded):
    spec = iris_spec(model={"init_from": "iris-init", "layers": [
        {"linear": {"out_features": 8}}, {"relu": {}}, {"dropout": {"p": 0.1}},
        {"linear": {"out_features": 3}}]})
    message = _invalid(lambda: client.submit(spec))
    assert "missing keys (the model's, not in the file): 3.weight (3, 8), 3.bias (3,)" in message
    assert "unexpected keys (the file's, not in the model): 2.bias (3,), 2.weight (3, 8)" in (
        message)


def test_weights_are_not_a_data_set(client, uploaded):
    spec = iris_spec(data={"dataset": "iris-init", "batch_size": 32, "epochs": 1})
    assert _invalid(lambda: client.submit(spec)).startswith(
        "data.dataset: 'iris-init' is a safetensors upload")


def test_a_job_starts_from_uploaded_weights_which_cannot_be_deleted_while_it_runs(
        client, server, uploaded):
    spec = iris_spec(epochs=2000, model={"init_from": "upload:iris-init", "layers": IRIS_LAYERS})
    job = client.submit(spec)
    try:
        error = rpc_error(lambda: client.delete_dataset("iris-init"))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert job.id in error.details()
    finally:
        client.cancel(job.id)
    assert state_name(wait_until_done(client, job.id).state) == "CANCELLED"
    client.delete_dataset("iris-init")
    assert server.service.store.get_dataset("default", "iris-init") is None


def test_the_upload_command_takes_a_format_and_names_the_upload_after_the_file(
        server, tmp_path, capsys):
    path = tmp_path / "corpus.md"
    path.write_text("# A heading\n\nSome prose for a language model.\n" * 10)
    assert cli.main(["upload", str(path), "--format", "text", "--server", server.address]) == 0
    assert "uploaded corpus: a text of 460 bytes" in capsys.readouterr().out
    assert server.service.store.get_dataset("default", "corpus").format == "text"


@pytest.mark.parametrize("init_from, expected", [
    ("upload:base", "names an upload, which only the service has"),
    ("file:NONE", "no file"),
    ("file:NOT_WEIGHTS", "not a readable safetensors file"),
])
def test_chainrule_train_checks_init_from_before_ray_starts(tmp_path, capsys, init_from,
                                                           expected):
    (tmp_path / "notes.txt").write_text("not weights")
    init_from = init_from.replace("NONE", str(tmp_path / "none.safetensors")).replace(
        "NOT_WEIGHTS", str(tmp_path / "notes.txt"))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"""
name: tiny
model: {{init_from: "{init_from}", layers: [{{linear: {{out_features: 3}}}}]}}
loss: cross_entropy
data: {{dataset: "sklearn:iris", batch_size: 16, epochs: 1}}
""")
    assert cli.main(["train", str(spec)]) == 2
    error = capsys.readouterr().err
    assert "chainrule: model.init_from: " in error and expected in error
