"""Uploads over a real gRPC channel: what the server keeps, what a stalled client costs, and that
submitting a job on an upload never reads the file in an RPC thread (issue 11)."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from chainrule.client import Client, state_name
from chainrule.v1 import training_service_pb2 as pb
from services import uploads
from services.server import serve
from services.uploads import UploadLimits
from tests.services.helpers import data_files, iris_spec, rpc_error, wait_until_done

pytestmark = [pytest.mark.distributed]

IDLE_SECONDS = 1.0


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"),
                    upload_limits=UploadLimits(idle_seconds=IDLE_SECONDS))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with Client(server.address, timeout=30) as c:
        yield c


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
