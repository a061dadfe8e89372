"""Uploads over a real gRPC channel: what the server keeps, what a stalled client costs, and that
submitting a job on an upload never reads the file in an RPC thread (issue 11). Parquet uploads
(issue 10): `chainrule upload rows.parquet` keeps the file as sent, a job names it
`parquet:upload:NAME` and trains on it exactly as `chainrule train` trains on the same file,
and what the server refuses is refused naming the field."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict
from chainrule.v1 import training_service_pb2 as pb
from scheduler.job_runner import JobRunner
from scheduler.parquet_dataset import load_parquet, parquet_shape
from services import cli, uploads
from services.server import serve
from services.uploads import UploadLimits
from tests.services.helpers import data_files, downloaded, iris_spec, rpc_error, wait_until_done
from worker.resolved_job import resolve

pytestmark = [pytest.mark.distributed]

IDLE_SECONDS = 1.0
# A worker keeps 8 Parquet row groups: 64 KiB each here, so digits' 100-row groups (65 columns,
# 52 KB) pass and a 200-row group does not.
MAX_DATASET_BYTES = 8 * 64 * 1024


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"),
                    upload_limits=UploadLimits(idle_seconds=IDLE_SECONDS,
                                               max_dataset_bytes=MAX_DATASET_BYTES))
    yield running
    running.stop()


def _npz(compressed: bool = False, **arrays) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _header(name: str, data: bytes, format: str = "npz", **fields) -> pb.DatasetHeader:
    return pb.DatasetHeader(name=name, format=format, size_bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), **fields)


def _regression_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((240, 3))
    weights = rng.standard_normal((3, 2))
    x_val = rng.standard_normal((60, 3))
    return {"x": x, "y": x @ weights, "x_val": x_val, "y_val": x_val @ weights}


def _regression_spec(dataset: str, epochs: int = 1):
    return iris_spec(
        epochs=epochs, name="two-targets", loss="mse",
        model={"layers": [{"linear": {"out_features": 16}}, {"relu": {}},
                          {"linear": {"out_features": 2}}]},
        data={"dataset": dataset, "batch_size": 32, "epochs": epochs})


def test_a_compressed_npz_is_kept_exactly_as_it_was_sent(client, server):
    data = _npz(compressed=True, x=np.tile(np.arange(8.0), (500, 1)), y=np.arange(500) % 4)
    info = client.upload_stream(_header("as-sent", data), [data])
    assert (info.samples, tuple(info.feature_shape), info.num_classes) == (500, (8,), 4)
    record = server.service.store.get_dataset("default", "as-sent")
    assert hashlib.sha256(Path(record.path).read_bytes()).hexdigest() == info.sha256
    assert (record.task, record.target_shape) == ("classification", ())


def test_a_regression_upload_keeps_its_target_shape_and_trains_from_its_own_validation_split(
        client, server):
    data = _npz(**_regression_arrays())
    info = client.upload_stream(_header("two-targets", data), [data])
    assert (info.task, info.samples, info.validation_samples) == ("regression", 240, 60)
    assert server.service.store.get_dataset("default", "two-targets").target_shape == (2,)

    job = wait_until_done(client, client.submit(_regression_spec("two-targets", epochs=3)).id)
    assert state_name(job.state) == "SUCCEEDED", job.error
    assert job.final_validation.samples == 60


def test_submitting_on_an_upload_never_reads_its_file_in_an_rpc_thread(
        client, server, monkeypatch):
    data = _npz(**_regression_arrays(seed=1))
    client.upload_stream(_header("not-reloaded", data), [data])
    readers: list[str] = []
    for name in ("load_arrays", "stored_target_shape"):
        original = getattr(uploads, name)

        def spy(*args, _original=original, **kwargs):
            readers.append(threading.current_thread().name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(uploads, name, spy)

    job = client.submit(_regression_spec("upload:not-reloaded"))
    client.cancel(job.id)
    wait_until_done(client, job.id)
    assert not [name for name in readers if name.startswith("rpc")], readers


def test_an_upload_whose_client_goes_quiet_is_abandoned_after_the_idle_limit(server):
    data = _npz(x=np.ones((64, 4)), y=np.arange(64) % 2)
    release = threading.Event()

    def stalled():
        yield pb.UploadDatasetRequest(header=_header("stalled", data))
        yield pb.UploadDatasetRequest(chunk=data[:100])
        release.wait(30)  # the client neither sends nor closes

    store = server.service.store
    before = store.snapshot(), data_files(server.data_dir)
    with Client(server.address) as client:
        start = time.monotonic()
        try:
            error = rpc_error(lambda: client.stub.UploadDataset(stalled(), timeout=30))
        finally:
            release.set()
        waited = time.monotonic() - start
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    assert error.details().startswith("chunk: no message for 1 s"), error.details()
    assert IDLE_SECONDS <= waited < IDLE_SECONDS + 5
    assert (store.snapshot(), data_files(server.data_dir)) == before  # the temporary file too


# --- Parquet (issue 10) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory) -> Path:
    """scikit-learn's digits, 18 row groups of 100 rows, pixels as float64, digits as int64."""
    x, y = load_digits(return_X_y=True)
    path = tmp_path_factory.mktemp("parquet") / "digits.parquet"
    pq.write_table(pa.table({**{f"pixel{i}": x[:, i] for i in range(64)}, "digit": y}), path,
                   row_group_size=100)
    return path


def digits_spec(dataset: str, **data):
    return job_spec_from_dict({
        "model": {"layers": [{"linear": {"out_features": 16}}, {"tanh": {}},
                             {"linear": {"out_features": 10}}]},
        "loss": "cross_entropy",
        "optimizer": {"adam": {"lr": 0.01}},
        "data": {"dataset": dataset, "label_column": "digit", "batch_size": 128, "epochs": 1,
                 "validation_fraction": 0.2, "micro_batches": 2, **data},
        "resources": {"workers": 2, "parameter_servers": 1},
        "seed": 3,
    })


def write_parquet(path: Path, columns: dict, row_group_size: int = 100) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def uploaded(server, digits_parquet):
    with Client(server.address, timeout=30) as client:
        return client.upload(digits_parquet, "digits")


def test_cli_upload_keeps_the_parquet_file_as_sent_and_says_how_a_spec_names_it(
        client, server, digits_parquet, capsys):
    assert cli.main(["upload", str(digits_parquet), "--name", "digits-cli",
                     "--server", client.address]) == 0
    out = capsys.readouterr().out
    assert "uploaded digits-cli: 1797 rows, 65 numeric columns" in out
    assert '"parquet:upload:digits-cli"' in out
    [info] = [d for d in client.datasets().datasets if d.name == "digits-cli"]
    assert (info.format, info.samples, list(info.feature_shape)) == ("parquet", 1797, [65])
    record = server.service.store.get_dataset("default", "digits-cli")
    assert Path(record.path).suffix == ".parquet"
    assert Path(record.path).read_bytes() == digits_parquet.read_bytes()
    client.delete_dataset("digits-cli")


@pytest.mark.slow
def test_a_job_on_a_parquet_upload_trains_the_bits_chainrule_train_trains_on_the_file(
        uploaded, client, digits_parquet, tmp_path):
    job = client.submit(digits_spec("parquet:upload:digits"))
    finished = wait_until_done(client, job.id)
    assert state_name(finished.state) == "SUCCEEDED", finished.error
    local_spec = digits_spec(f"parquet:{digits_parquet}")
    local = resolve(local_spec, parquet_shape(local_spec.data, local_spec.seed))
    expected = JobRunner(local, load_parquet(local)).run().state_dict
    served = downloaded(client, job.id, tmp_path)
    assert served.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(served[key], expected[key])


@pytest.mark.slow
def test_a_parquet_upload_in_use_cannot_be_deleted_and_is_named_by_its_reader(uploaded, client,
                                                                              server):
    wrong = rpc_error(lambda: client.submit(digits_spec("upload:digits")))
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data.dataset" in wrong.details() and "parquet:upload:digits" in wrong.details()
    missing = rpc_error(lambda: client.submit(digits_spec("parquet:upload:nothing")))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data.dataset" in missing.details()
    no_column = rpc_error(lambda: client.submit(digits_spec("parquet:upload:digits",
                                                            label_column="label")))
    assert no_column.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data.label_column" in no_column.details() and "'label'" in no_column.details()
    assert str(server.data_dir) not in no_column.details()  # the upload's name, not its file
    long_job = client.submit(digits_spec("parquet:upload:digits", epochs=40))
    try:
        in_use = rpc_error(lambda: client.delete_dataset("digits"))
        assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert long_job.id in in_use.details()
    finally:
        client.cancel(long_job.id)
        wait_until_done(client, long_job.id)


@pytest.mark.parametrize("problem, columns, row_group_size, message", [
    ("not Parquet", None, 100, "not a readable Parquet file"),
    ("a NaN", {"a": [1.0, float("nan")], "label": [0, 1]}, 100,
     "column 'a' has NaN or infinite values in row group 0"),
    ("a missing label", {"a": [1.0, 2.0], "label": pa.array([0, None])}, 100,
     "column 'label' has missing values"),
    ("one column", {"label": [0, 1]}, 100, "1 numeric column(s)"),
    ("a row group too large", {"a": np.zeros(200), **{f"b{i}": np.zeros(200) for i in range(64)}},
     200, "row group 0 holds 104,000 bytes"),
    ("a Parquet bomb", {"a": np.zeros(40_000), "label": np.zeros(40_000, dtype=np.int64)},
     4000, "over this server's limit of 100x"),
])
def test_a_bad_parquet_upload_is_refused_naming_the_header_format_and_leaves_nothing(
        client, server, tmp_path, problem, columns, row_group_size, message):
    path = tmp_path / "bad.parquet"
    if columns is None:
        path.write_bytes(b"PAR1 but not really")
    else:
        write_parquet(path, columns, row_group_size)
    before = sorted(p.name for p in (server.data_dir / "datasets").rglob("*"))
    refused = rpc_error(lambda: client.upload(path, "bad"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, problem
    assert refused.details().startswith("header.format") and message in refused.details()
    assert sorted(p.name for p in (server.data_dir / "datasets").rglob("*")) == before
    assert "bad" not in [d.name for d in client.datasets().datasets]


def test_the_client_streams_an_upload_from_the_file_in_chunks(client, tmp_path, monkeypatch):
    """Client.upload hashes and sends the file a chunk at a time (never read whole)."""
    from chainrule import client as client_module

    monkeypatch.setattr(client_module, "CHUNK_BYTES", 4096)
    x = np.random.default_rng(0).standard_normal((3000, 4))
    path = write_parquet(tmp_path / "streamed.parquet",
                         {**{f"f{i}": x[:, i] for i in range(4)}, "label": np.arange(3000) % 3},
                         row_group_size=1000)
    sent: list[int] = []
    original = client.upload_stream

    def counting(header, chunks):
        assert header.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        return original(header, (sent.append(len(chunk)) or chunk for chunk in chunks))

    monkeypatch.setattr(client, "upload_stream", counting)
    info = client.upload(path, "streamed")
    assert (info.format, info.samples) == ("parquet", 3000)
    assert max(sent) == 4096 and sum(sent) == path.stat().st_size
    client.delete_dataset("streamed")
