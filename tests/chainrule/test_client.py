"""`from chainrule import Client` against a real server on a loopback port (real embedded Ray):
uploads, data sets, jobs on uploaded data, downloads, deadlines; and the CLI commands built on
the client."""

from __future__ import annotations

import json
import socket
import time

import grpc
import numpy as np
import pytest

import chainrule
from chainrule import Client
from chainrule.client import WatchTimeout, state_name
from chainrule.v1 import training_service_pb2 as pb
from services import cli
from tests.services.conftest import server  # noqa: F401  (a module fixture)
from tests.services.helpers import DIGITS_SPEC, iris_spec, rpc_error, wait_for

pytestmark = [pytest.mark.distributed]


def _blobs(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 3)) + 3.0 * y[:, None], y


@pytest.mark.slow
def test_an_uploaded_npz_trains_and_the_model_downloads_as_npz(client, tmp_path):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 200)
    x_val, y_val = _blobs(rng, 50)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y, x_val=x_val, y_val=y_val)
    info = client.upload(path, "blobs")
    assert (info.samples, info.validation_samples, tuple(info.feature_shape)) == (200, 50, (3,))
    assert info.task == "classification" and info.num_classes == 2
    listing = client.datasets()
    assert [d.name for d in listing.datasets] == ["blobs"]
    assert "sklearn:digits" in listing.builtin

    spec = iris_spec(epochs=3, data={"dataset": "blobs", "batch_size": 20, "epochs": 3})
    spec.model.layers[-1].linear.out_features = 2
    job = client.submit(spec, watch=True)
    assert state_name(job.state) == "SUCCEEDED", job.error
    assert job.final_validation.samples == 50 and job.final_validation.accuracy > 0.9

    header = client.download(job.id, tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz", allow_pickle=False) as weights:
        assert sorted(weights.files) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert weights["0.weight"].shape == (8, 3)
    assert header.format == "npz"
    assert json.loads((tmp_path / "model.npz.json").read_text())["job_id"] == job.id

    client.delete_dataset("blobs")
    assert list(client.datasets().datasets) == []
    error = rpc_error(lambda: client.delete_dataset("blobs"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_a_data_set_in_use_by_a_queued_job_cannot_be_deleted(client, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{-i},{i % 2}\n" for i in range(30)))
    client.upload(path, "table", label_column="label")
    spec = load_long_spec("upload:table")
    job = client.submit(spec)
    error = rpc_error(lambda: client.delete_dataset("table"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and job.id in error.details()
    client.cancel(job.id)
    for _ in client.watch(job.id, timeout=60):
        pass
    client.delete_dataset("table")


def load_long_spec(dataset: str):
    spec = iris_spec(data={"dataset": dataset, "batch_size": 4, "epochs": 500})
    spec.model.layers[-1].linear.out_features = 2
    return spec


def test_every_call_has_a_deadline_against_a_silent_server():
    # A socket that accepts connections and never says a word: the worst kind of peer.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with Client(address, timeout=1.0) as client:
            for call in (lambda: client.get("job-1"), lambda: client.list(),
                         lambda: client.submit(iris_spec()), lambda: client.datasets()):
                started = time.monotonic()
                error = rpc_error(call)
                assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.UNAVAILABLE)
                assert time.monotonic() - started < 5
            started = time.monotonic()
            with pytest.raises(grpc.RpcError):
                list(client.watch("job-1", idle_timeout=1.0))
            assert time.monotonic() - started < 5


def test_watch_timeout_is_a_deadline_error():
    assert WatchTimeout("x").code() == grpc.StatusCode.DEADLINE_EXCEEDED


# --- the CLI, through the same client ---------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_cli_submit_watch_status_jobs_download(server, capsys, tmp_path):  # noqa: F811
    spec_path = tmp_path / "iris.yaml"
    spec_path.write_text(DIGITS_SPEC.read_text().replace("sklearn:digits", "sklearn:iris")
                         .replace("out_features: 10}", "out_features: 3}")
                         .replace("epochs: 20", "epochs: 2").replace("batch_size: 128",
                                                                     "batch_size: 32"))
    where = ("--server", server.address)
    code, out = _cli(capsys, "submit", str(spec_path), "--watch", *where)
    assert code == 0 and "submitted job-" in out and "SUCCEEDED" in out
    job_id = out.split("submitted ")[1].split()[0]
    code, out = _cli(capsys, "status", job_id, "--json", *where)
    assert code == 0 and json.loads(out)["state"] == "JOB_STATE_SUCCEEDED"
    code, out = _cli(capsys, "jobs", "--state", "succeeded", *where)
    assert job_id in out
    code, out = _cli(capsys, "watch", job_id, "--json", *where)
    assert json.loads(out.splitlines()[0])["state"]["state"] == "JOB_STATE_SUCCEEDED"
    code, out = _cli(capsys, "download", job_id, "-o", str(tmp_path / "w.safetensors"), *where)
    assert code == 0 and (tmp_path / "w.safetensors").stat().st_size > 0
    code, out = _cli(capsys, "datasets", *where)
    assert "sklearn:iris  (built-in)" in out
    code, out = _cli(capsys, "cancel", job_id, *where)
    assert "SUCCEEDED" in out  # cancelling a finished job changes nothing


@pytest.mark.slow
def test_cli_cancel_shows_a_running_job_ended_not_the_state_it_was_asked_in(
        server, capsys):  # noqa: F811
    with Client(server.address) as client:
        job_id = client.submit(iris_spec(epochs=10_000)).id
        wait_for(lambda: state_name(client.get(job_id).state) == "RUNNING", timeout=60,
                 what=f"{job_id} to run")
    code, out = _cli(capsys, "cancel", job_id, "--server", server.address)
    assert code == 0 and f"{job_id}  CANCELLED" in out


def test_cli_reports_a_bad_spec_with_its_field_and_no_trace(server, capsys, tmp_path):  # noqa: F811
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(DIGITS_SPEC.read_text().replace("lr: 0.001", "lr: -1"))
    code = cli.main(["submit", str(spec_path), "--server", server.address])
    assert code == 1
    assert "INVALID_ARGUMENT: optimizer.adamw.lr: must be > 0" in capsys.readouterr().err


def test_cli_names_the_job_states_when_one_is_misspelt(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["jobs", "--state", "DONE"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'DONE'" in err and "SUCCEEDED" in err and "JOB_STATE_" not in err


def test_client_state_names_come_from_the_schema():
    from chainrule.client import STATE_NAMES, state_value

    assert STATE_NAMES == ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
    assert state_value("running") == pb.JOB_STATE_RUNNING
    with pytest.raises(ValueError, match="'DONE' is not a job state; one of QUEUED"):
        state_value("DONE")


def test_download_refuses_a_missing_folder_before_asking_the_server(capsys, tmp_path):
    output = tmp_path / "missing" / "model.onnx"
    assert cli.main(["download", "job-1", "-o", str(output), "--server", "127.0.0.1:9"]) == 2
    assert "-o/--output: the folder" in capsys.readouterr().err
    assert not output.parent.exists()


def test_download_refuses_a_suffix_it_would_not_write_before_asking_the_server(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["download", "job-1", "-o", "model.pt", "--server", "127.0.0.1:9"])
    assert exit_info.value.code == 2
    assert "model.pt: weights are written as .safetensors, .npz, .onnx" in capsys.readouterr().err
    with Client("127.0.0.1:9", timeout=1.0) as client, pytest.raises(ValueError, match=".pt"):
        client.download("job-1", "model.pt")


# --- where the client connects, and its typed errors ------------------------------------------


def _closed_port_address() -> str:
    """A loopback address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_a_refused_connection_names_the_address_and_how_to_start_or_point_at_a_server():
    address = _closed_port_address()
    with Client(address, timeout=5) as client:
        error = rpc_error(lambda: client.get("job-1"))
    assert isinstance(error, chainrule.Unavailable) and isinstance(error, chainrule.ServiceError)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    message = error.details()
    assert f"no chainrule server answered at {address}" in message
    assert "chainrule serve" in message and "--server" in message
    assert "CHAINRULE_SERVER" in message


def test_the_client_connects_to_CHAINRULE_SERVER_by_default(monkeypatch):
    address = _closed_port_address()
    monkeypatch.setenv("CHAINRULE_SERVER", address)
    with Client(timeout=5) as client:
        assert client.address == address
        assert address in str(rpc_error(lambda: client.list()).details())
    monkeypatch.delenv("CHAINRULE_SERVER")
    with Client() as client:
        assert client.address == "127.0.0.1:50051"


def test_server_errors_are_typed_and_still_grpc_errors_with_their_code(client, tmp_path):
    error = rpc_error(lambda: client.get("job-404"))
    assert isinstance(error, chainrule.NotFound)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "job-404" in error.details()

    with pytest.raises(chainrule.InvalidArgument) as invalid:
        client.submit(iris_spec(optimizer={"adam": {"lr": -1}}))
    assert invalid.value.field == "optimizer.adam.lr"
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    np.savez(tmp_path / "twice.npz", x=np.zeros((20, 2)), y=np.zeros(20))
    client.upload(tmp_path / "twice.npz", "twice")
    with pytest.raises(chainrule.AlreadyExists, match="chainrule datasets delete twice"):
        client.upload(tmp_path / "twice.npz", "twice")
    client.delete_dataset("twice")
    with pytest.raises(chainrule.NotFound):
        client.delete_dataset("twice")


@pytest.mark.parametrize("code, kind", [
    (grpc.StatusCode.FAILED_PRECONDITION, "FailedPrecondition"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "ResourceExhausted"),
    (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied"),
    (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated"),
])
def test_each_status_has_its_error_type(code, kind):
    from chainrule.errors import typed_error

    class Raw(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "why"

    error = typed_error(Raw())
    assert type(error) is getattr(chainrule, kind)
    assert error.code() == code and error.details() == "why"


def test_submit_takes_a_dict_status_is_a_name_and_wait_returns_the_final_job(client):
    from google.protobuf import json_format

    spec = json_format.MessageToDict(iris_spec(epochs=2), preserving_proto_field_name=True)
    job = client.submit(spec)
    with pytest.raises(chainrule.DeadlineExceeded, match=f"{job.id} did not end within"):
        client.wait(job.id, timeout=0.01)
    final = client.wait(job.id, timeout=120)
    assert final.id == job.id and state_name(final.state) == "SUCCEEDED"
    assert client.status(job.id) == "SUCCEEDED"


def test_a_dict_spec_is_checked_as_a_spec_file_is(client):
    from worker.spec_error import SpecError

    with pytest.raises(SpecError, match="data: unknown field 'batch_sise' \\(did you mean "
                                        "'batch_size'"):
        client.submit({"name": "x", "data": {"batch_sise": 3}})


def test_cli_datasets_shows_shape_task_classes_and_size_and_deletes_by_name(
        server, capsys, tmp_path):  # noqa: F811
    where = ("--server", server.address)
    np.savez(tmp_path / "blobs.npz", x=np.zeros((30, 4)), y=np.arange(30) % 3)
    (tmp_path / "story.txt").write_text("once upon a time " * 10)
    assert _cli(capsys, "upload", str(tmp_path / "blobs.npz"), *where)[0] == 0
    assert _cli(capsys, "upload", str(tmp_path / "story.txt"), *where)[0] == 0
    code, out = _cli(capsys, "datasets", *where)
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0
    assert "30 samples  shape (4,)  classification (3 classes)" in lines["blobs"]
    assert lines["blobs"].endswith(("bytes", "KiB"))
    assert lines["story"] == "story  text  170 bytes"
    code, out = _cli(capsys, "datasets", "delete", "blobs", *where)
    assert code == 0 and out.strip() == "deleted data set blobs"
    assert "blobs" not in _cli(capsys, "datasets", *where)[1]
    assert cli.main(["datasets", "delete", "blobs", *where]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli.main(["datasets", "delete", *where]) == 2
    assert "name the upload to delete" in capsys.readouterr().err


def test_a_typed_error_keeps_the_original_calls_trailing_metadata():
    address = _closed_port_address()
    with Client(address, timeout=5) as client:
        error = rpc_error(lambda: client.get("job-1"))
    assert isinstance(error, chainrule.ServiceError)
    assert error.original is not None and error.original.code() == grpc.StatusCode.UNAVAILABLE
    assert error.trailing_metadata() == (error.original.trailing_metadata() or ())
