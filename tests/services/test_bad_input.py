"""Bad input gets a clear error, never a crash or a half-written record (BRIEF invariant 4).

Every case goes through a real gRPC channel; each must answer with its status code and name
the field at fault, and the store (every row of every table) and the data directory's files
must be exactly as they were before the request."""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
import zipfile

import grpc
import numpy as np
import pytest

from chainrule.client import Client
from chainrule.v1 import job_pb2
from chainrule.v1 import training_service_pb2 as pb
from services.server import serve
from services.uploads import UploadLimits
from tests.services.helpers import data_files, iris_spec, rpc_error, wait_until_done

pytestmark = [pytest.mark.distributed]

UPLOAD_LIMIT = 256 * 1024
CSV_MAX_ROWS = 1000
CSV_MAX_COLUMNS = 100


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    limits = UploadLimits(max_csv_rows=CSV_MAX_ROWS, max_csv_columns=CSV_MAX_COLUMNS)
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), max_upload_bytes=UPLOAD_LIMIT,
                    upload_limits=limits)
    with Client(running.address) as client:  # for the duplicate-name case
        client.upload_stream(*_npz_upload("taken", x=np.ones((4, 2)), y=np.arange(4)))
    yield running
    running.stop()


# --- specs -------------------------------------------------------------------------------------


def _spec(change) -> job_pb2.JobSpec:
    spec = iris_spec()
    change(spec)
    return spec


def _layers(*layers: dict) -> job_pb2.ModelSpec:
    from chainrule.spec_file import job_spec_from_dict

    return job_spec_from_dict({"model": {"layers": list(layers)}}).model


def _set_model(*layers: dict):
    return lambda spec: spec.model.CopyFrom(_layers(*layers))


def _setattr(path: str, value):
    def change(spec):
        *parents, name = path.split(".")
        message = spec
        for parent in parents:
            message = getattr(message, parent)
        setattr(message, name, value)
    return change


def _clear(path: str):
    def change(spec):
        *parents, name = path.split(".")
        message = spec
        for parent in parents:
            message = getattr(message, parent)
        message.ClearField(name)
    return change


def _adam_betas(spec):
    spec.optimizer.adam.betas.extend([0.9, 0.99, 0.999])


def _sgd_negative_lr(spec):
    spec.optimizer.sgd.lr = -0.1


INVALID_SPECS = [
    ("no layers", _clear("model"), "model.layers"),
    ("empty layer (unknown kind)", lambda s: s.model.layers.add(), "model.layers[3]"),
    ("residual block changes the shape",
     _set_model({"residual": {"layers": [{"linear": {"out_features": 5}}]}},
                {"linear": {"out_features": 3}}), "model.layers[0]"),
    ("output width is not the class count",
     _set_model({"linear": {"out_features": 8}}, {"relu": {}}, {"linear": {"out_features": 5}}),
     "model.layers[2]"),
    ("linear with zero outputs",
     _set_model({"linear": {"out_features": 0}}, {"linear": {"out_features": 3}}),
     "model.layers[0]"),
    ("lr = 0", _setattr("optimizer.adam.lr", 0.0), "optimizer.adam.lr"),
    ("lr < 0", _sgd_negative_lr, "optimizer.sgd.lr"),
    ("three betas", _adam_betas, "optimizer.adam.betas"),
    ("batch larger than the training split", _setattr("data.batch_size", 500), "data.batch_size"),
    ("batch 0", _setattr("data.batch_size", 0), "data.batch_size"),
    ("epochs 0", _setattr("data.epochs", 0), "data.epochs"),
    ("epochs over the limit", _setattr("data.epochs", 100_000), "data.epochs"),
    ("validation_fraction 1", _setattr("data.validation_fraction", 1.0),
     "data.validation_fraction"),
    ("validation_fraction < 0", _setattr("data.validation_fraction", -0.1),
     "data.validation_fraction"),
    ("unknown built-in", _setattr("data.dataset", "sklearn:mnist"), "data.dataset"),
    ("unknown upload", _setattr("data.dataset", "upload:nothing"), "data.dataset"),
    ("no data set", _setattr("data.dataset", ""), "data.dataset"),
    ("more micro-batches than samples per batch", _setattr("data.micro_batches", 64),
     "data.micro_batches"),
    ("workers over the limit", _setattr("resources.workers", 9), "resources.workers"),
    ("parameter servers over the limit", _setattr("resources.parameter_servers", 99),
     "resources.parameter_servers"),
    ("negative cpus per worker", _setattr("resources.cpus_per_worker", -1.0),
     "resources.cpus_per_worker"),
    ("unknown placement strategy", _setattr("resources.placement_strategy", "RANDOM"),
     "resources.placement_strategy"),
    ("too many parameters",
     _set_model({"linear": {"out_features": 8000}}, {"linear": {"out_features": 8000}},
                {"linear": {"out_features": 3}}), "model"),
    ("unknown loss", _setattr("loss", "hinge"), "loss"),
    ("no loss", _setattr("loss", ""), "loss"),
    ("regression loss on class labels", _setattr("loss", "mse"), "loss"),
    ("label smoothing above 1", _setattr("label_smoothing", 2.0), "label_smoothing"),
    ("unknown dtype", _setattr("dtype", "float16"), "dtype"),
    ("dropout p = 1",
     _set_model({"linear": {"out_features": 8}}, {"dropout": {"p": 1.0}},
                {"linear": {"out_features": 3}}), "model.layers[1]"),
    ("lstm on flat features",
     _set_model({"lstm": {"hidden_size": 4}}, {"linear": {"out_features": 3}}), "model.layers[0]"),
    ("embedding on float features",
     _set_model({"embedding": {"num_embeddings": 4, "embedding_dim": 2}}, {"flatten": {}},
                {"linear": {"out_features": 3}}), "model.layers[0]"),
    ("batch norm eps 0",
     _set_model({"batch_norm": {"eps": 0.0}}, {"linear": {"out_features": 3}}),
     "model.layers[0]"),
    ("clipping max_norm 0", _setattr("clipping.max_norm", 0.0), "clipping.max_norm"),
    ("early stopping without a validation split",
     lambda s: (s.early_stopping.SetInParent(), setattr(s.early_stopping, "patience", 2),
                setattr(s.data, "validation_fraction", 0.0)), "early_stopping"),
    ("early stopping with patience 0", lambda s: s.early_stopping.SetInParent(),
     "early_stopping.patience"),
    ("step decay with step_size 0",
     lambda s: s.schedule.step_decay.SetInParent(), "schedule.step_decay.step_size"),
]


@pytest.mark.parametrize("change, field", [(c, f) for _, c, f in INVALID_SPECS],
                         ids=[name for name, _, _ in INVALID_SPECS])
def test_an_invalid_spec_is_refused_naming_the_field_and_nothing_is_stored(
        server, change, field):
    _refused(server, lambda client: client.submit(_spec(change)),
             grpc.StatusCode.INVALID_ARGUMENT, field)


@pytest.mark.parametrize("token", [str(2**70), "\u00b2", "-1", " 1", "9" * 400],
                         ids=["2**70", "superscript two", "negative", "space", "400 digits"])
def test_a_page_token_this_server_did_not_issue_is_refused(server, token):
    _refused(server, lambda client: client.list(page_token=token),
             grpc.StatusCode.INVALID_ARGUMENT, "page_token")


@pytest.mark.parametrize("epochs", [2**32 - 1, 10_000])
def test_resuming_for_more_epochs_than_the_server_allows_is_refused_naming_epochs(server, epochs):
    with Client(server.address, timeout=30) as client:
        job = client.submit(iris_spec())
        client.cancel(job.id)
        wait_until_done(client, job.id)
    _refused(server, lambda client: client.stub.ResumeJob(
        pb.ResumeJobRequest(job_id=job.id, epochs=epochs), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "epochs")


def test_an_overlong_request_id_is_refused(server):
    _refused(server, lambda client: client.submit(iris_spec(), request_id="x" * 200),
             grpc.StatusCode.INVALID_ARGUMENT, "request_id")


# --- uploads -----------------------------------------------------------------------------------


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _header(name: str, data: bytes, format: str = "npz", **fields) -> pb.DatasetHeader:
    values = {"name": name, "format": format, "size_bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), **fields}
    return pb.DatasetHeader(**values)


def _npz_upload(name: str, **arrays):
    data = _npz_bytes(**arrays)
    return _header(name, data), [data]


def _csv_upload(name: str, text: str, label_column: str = "label"):
    return _raw_csv_upload(name, text.encode(), label_column)


def _raw_csv_upload(name: str, data: bytes, label_column: str = "label"):
    return _header(name, data, "csv", label_column=label_column), [data]


def _upload_of(name: str, data: bytes):
    return _header(name, data), [data]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_with_shape(array: np.ndarray, shape: tuple[int, ...]) -> bytes:
    """The array's data behind a .npy header that claims another shape."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False,
        "shape": shape})
    return buffer.getvalue() + array.tobytes()


def _zip_upload(name: str, entries: list[tuple[str, bytes]],
                compression: int = zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name; we mean it
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for entry, data in entries:
                archive.writestr(entry, data)
    return _upload_of(name, buffer.getvalue())


def _compressed_npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@functools.cache
def _zip_bomb() -> bytes:
    """94 MiB of uint8 zeros deflated into 95 KiB (once widened to int64 for training, 752
    MiB)."""
    return _compressed_npz(x=np.zeros((94 * 1024, 1024), dtype=np.uint8),
                           y=np.zeros(94 * 1024, dtype=np.int64))


def _flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


GOOD = _npz_bytes(x=np.ones((4, 2)), y=np.arange(4))


def _pickled_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.ones((3, 2)), y=np.array([{"run": "code"}, 1, 2], dtype=object))
    return buffer.getvalue()


def _with(header: pb.DatasetHeader, **fields) -> pb.DatasetHeader:
    changed = pb.DatasetHeader()
    changed.CopyFrom(header)
    for key, value in fields.items():
        setattr(changed, key, value)
    return changed


BAD_UPLOADS = [
    ("wrong sha256", lambda: (_with(_header("a", GOOD), sha256="0" * 64), [GOOD]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.sha256"),
    ("malformed sha256", lambda: (_with(_header("a", GOOD), sha256="xyz"), [GOOD]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.sha256"),
    ("truncated stream", lambda: (_header("a", GOOD), [GOOD[:100]]),
     grpc.StatusCode.INVALID_ARGUMENT, "chunk"),
    ("more bytes than announced", lambda: (_header("a", GOOD), [GOOD, b"extra"]),
     grpc.StatusCode.INVALID_ARGUMENT, "chunk"),
    ("oversize", lambda: (_with(_header("a", GOOD), size_bytes=UPLOAD_LIMIT + 1), [GOOD]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.size_bytes"),
    ("pickle inside an npz", lambda: (_header("a", _pickled_npz()), [_pickled_npz()]),
     grpc.StatusCode.INVALID_ARGUMENT, "y"),
    ("strings inside an npz", lambda: _npz_upload("a", x=np.array([["a"], ["b"]]),
                                                  y=np.arange(2)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("npz without y", lambda: _npz_upload("a", x=np.ones((4, 2))),
     grpc.StatusCode.INVALID_ARGUMENT, "y"),
    ("npz with an unexpected array", lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.arange(4),
                                                         z=np.ones(3)),
     grpc.StatusCode.INVALID_ARGUMENT, "z"),
    ("x and y sample counts differ", lambda: _npz_upload("a", x=np.ones((4, 2)),
                                                         y=np.arange(3)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("NaN features", lambda: _npz_upload("a", x=np.full((4, 2), np.nan), y=np.arange(4)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("not a zip archive", lambda: (_header("a", b"hello, world"), [b"hello, world"]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("unknown format", lambda: (_header("a", GOOD, format="parquet"), [GOOD]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("name with a path in it", lambda: (_header("../evil", GOOD), [GOOD]),
     grpc.StatusCode.INVALID_ARGUMENT, "header.name"),
    ("name taken", lambda: (_header("taken", GOOD), [GOOD]),
     grpc.StatusCode.ALREADY_EXISTS, "header.name"),
    ("CSV label column missing from the file",
     lambda: _csv_upload("a", "f1,f2,target\n1,2,0\n3,4,1\n", label_column="label"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.label_column"),
    ("CSV without a label column", lambda: _csv_upload("a", "f1,label\n1,0\n", label_column=""),
     grpc.StatusCode.INVALID_ARGUMENT, "header.label_column"),
    ("CSV with a word for a number", lambda: _csv_upload("a", "f1,label\n1,0\nseven,1\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV with a short row", lambda: _csv_upload("a", "f1,f2,label\n1,2,0\n3,1\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV field over the csv module's limit",
     lambda: _csv_upload("a", "f1,label\n" + "1" * 200_000 + ",0\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV with a NUL byte", lambda: _csv_upload("a", "f1,label\n1\x00,0\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV that is not UTF-8", lambda: _raw_csv_upload("a", b"f1,label\n\xff\xfe,0\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV with infinity", lambda: _csv_upload("a", "f1,label\ninf,0\n1,1\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV with the label column named twice", lambda: _csv_upload("a", "label,f1,label\n0,1,0\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.label_column"),
    ("CSV with a negative class label", lambda: _csv_upload("a", "f1,label\n1,0\n2,-1\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.label_column"),
    ("CSV with more rows than the server's cap",
     lambda: _csv_upload("a", "f1,label\n" + "1,0\n" * (CSV_MAX_ROWS + 1)),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("CSV with more columns than the server's cap",
     lambda: _csv_upload("a", ",".join(f"f{i}" for i in range(CSV_MAX_COLUMNS)) + ",label\n"
                         + "1," * CSV_MAX_COLUMNS + "0\n"),
     grpc.StatusCode.INVALID_ARGUMENT, "header.format"),
    ("zero-width features", lambda: _npz_upload("a", x=np.ones((4, 0)), y=np.arange(4)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("no samples", lambda: _npz_upload("a", x=np.ones((0, 2)), y=np.arange(0)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("class label >= 2**32 (DatasetInfo.num_classes is a uint32)",
     lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.array([0, 1, 2, 2**32])),
     grpc.StatusCode.INVALID_ARGUMENT, "y"),
    ("negative class label", lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.array([0, -1, 1, 0])),
     grpc.StatusCode.INVALID_ARGUMENT, "y"),
    ("class labels of two dimensions",
     lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.zeros((4, 2), dtype=np.int64)),
     grpc.StatusCode.INVALID_ARGUMENT, "y"),
    ("x_val without y_val",
     lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.arange(4), x_val=np.ones((2, 2))),
     grpc.StatusCode.INVALID_ARGUMENT, "x_val"),
    ("x_val of another feature shape",
     lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.arange(4), x_val=np.ones((2, 3)),
                         y_val=np.arange(2)),
     grpc.StatusCode.INVALID_ARGUMENT, "x_val"),
    ("float y_val for class labels",
     lambda: _npz_upload("a", x=np.ones((4, 2)), y=np.arange(4), x_val=np.ones((2, 2)),
                         y_val=np.ones(2)),
     grpc.StatusCode.INVALID_ARGUMENT, "y_val"),
    ("complex features", lambda: _npz_upload("a", x=np.ones((4, 2), dtype=complex),
                                             y=np.arange(4)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("duplicate zip entries (each would be decompressed)",
     lambda: _zip_upload("a", [("x.npy", _npy(np.ones((4, 2)))), ("y.npy", _npy(np.arange(4))),
                               ("x.npy", _npy(np.zeros((4, 2))))]),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("zip bomb: 95 KiB that declares 94 MiB", lambda: _upload_of("a", _zip_bomb()),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    (".npy header declares more data than its entry holds",
     lambda: _zip_upload("a", [("x.npy", _npy(np.ones((4, 2)))[:-16]),
                               ("y.npy", _npy(np.arange(4)))]),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    (".npy header with a shape of 2**62 samples",
     lambda: _zip_upload("a", [("x.npy", _npy_with_shape(np.ones((4, 2)), (2**62, 2))),
                               ("y.npy", _npy(np.arange(4)))]),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("LZMA-compressed entry (its dictionary could take gigabytes)",
     lambda: _zip_upload("a", [("x.npy", _npy(np.ones((4, 2)))), ("y.npy", _npy(np.arange(4)))],
                         compression=zipfile.ZIP_LZMA),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
    ("corrupted compressed data",
     lambda: _upload_of("a", _flip_byte(_compressed_npz(x=np.ones((64, 8)), y=np.arange(64)),
                                        offset=80)),
     grpc.StatusCode.INVALID_ARGUMENT, "x"),
]


@pytest.mark.parametrize("make, code, field", [(m, c, f) for _, m, c, f in BAD_UPLOADS],
                         ids=[name for name, *_ in BAD_UPLOADS])
def test_a_malformed_upload_is_refused_naming_the_field_and_nothing_is_stored(
        server, make, code, field):
    header, chunks = make()
    _refused(server, lambda client: client.upload_stream(header, chunks), code, field)


def test_an_upload_without_a_header_is_refused(server):
    def call(client):
        requests = iter([pb.UploadDatasetRequest(chunk=GOOD)])
        return client.stub.UploadDataset(requests, timeout=10)
    _refused(server, call, grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_an_upload_with_two_headers_is_refused(server):
    def call(client):
        header = _header("twice", GOOD)
        requests = iter([pb.UploadDatasetRequest(header=header),
                         pb.UploadDatasetRequest(header=header)])
        return client.stub.UploadDataset(requests, timeout=10)
    _refused(server, call, grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_a_valid_csv_upload_is_stored_then_a_job_can_use_it(server):
    text = "f1,f2,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
    with Client(server.address) as client:
        info = client.upload_stream(*_csv_upload("parity-ish", text))
        assert (info.samples, tuple(info.feature_shape), info.num_classes) == (40, (2,), 2)
        job = iris_spec(data={"dataset": "upload:parity-ish", "batch_size": 8, "epochs": 1})
        job.model.layers[-1].linear.out_features = 2
        submitted = client.submit(job)
        assert submitted.spec.data.dataset == "upload:parity-ish"
        client.cancel(submitted.id)


def _refused(server, call, code: grpc.StatusCode, field: str) -> None:
    store = server.service.store
    before = store.snapshot(), data_files(server.data_dir)
    with Client(server.address, timeout=10) as client:
        error = rpc_error(lambda: call(client))
    print(f"{code.name}: {error.details()}")  # shown with -s: the messages users see
    assert error.code() == code, error.details()
    assert error.details().startswith(field), error.details()
    assert (store.snapshot(), data_files(server.data_dir)) == before
