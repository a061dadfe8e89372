"""Experiment tracking through a real server: a short real job's TensorBoard files, fetched
with `chainrule tensorboard`, hold the losses the job reported, and `chainrule delete` deletes
them; with a tracking URI the job is an MLflow run in a real local store, with its spec, its
losses, its final validation and the model it downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from chainrule.client import Client, state_name
from scheduler.records import EvaluationRecord, StepRecord
from services import cli
from services.server import serve
from tests.services.helpers import iris_spec, rpc_error, wait_for, wait_until_done
from tests.services.tracking.event_files import float32, read_folder

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


class Recorder:
    """One more observer of the server's queue: what the job reported, to compare with."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.evaluations: list[EvaluationRecord] = []

    def job_step(self, job_id: str, record: StepRecord) -> None:
        self.steps.append(record)

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None:
        self.evaluations.append(record)


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory, tracking_uri):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"),
                    mlflow_tracking_uri=tracking_uri,
                    mlflow_artifact_location=str(tmp_path_factory.mktemp("artifacts")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def finished_job(server):
    """A job of 8 steps (iris, 2 epochs of 4 batches), run to its end, and what it reported."""
    recorder = Recorder()
    server.queue.observers.append(recorder)
    with Client(server.address, timeout=30) as client:
        job = client.submit(iris_spec(epochs=2))
        job = wait_until_done(client, job.id)
    assert state_name(job.state) == "SUCCEEDED", job.error
    return job, recorder


def test_downloaded_tensorboard_files_hold_the_losses_the_job_reported(server, finished_job,
                                                                      tmp_path, capsys):
    job, recorder = finished_job
    assert cli.main(["tensorboard", job.id, "-o", str(tmp_path / "runs"),
                     "--server", server.address]) == 0
    assert f"tensorboard --logdir {tmp_path / 'runs'}" in capsys.readouterr().out

    logged = read_folder(tmp_path / "runs" / job.id)
    steps = recorder.steps
    assert [record.step for record in steps] == list(range(1, 9))
    # Scalars are float32 in the file: equal to the reported values rounded so.
    assert logged.scalars["train/loss"] == [(r.step, float32(r.loss)) for r in steps]
    assert logged.scalars["train/gradient_norm"] == [(r.step, float32(r.gradient_norm))
                                                     for r in steps]
    assert [step for step, _ in logged.scalars["train/learning_rate"]] == list(range(1, 9))
    # The server's default: a histogram of the parameters' norms every 10 steps and the last.
    assert [(step, count) for step, count, _ in logged.histograms["gradients/parameter_norms"]
            ] == [(8, len(steps[-1].parameter_gradient_norms))]
    assert logged.scalars["validation/loss"] == [(e.step, float32(e.loss))
                                                 for e in recorder.evaluations]
    assert logged.scalars["validation/accuracy"][-1] == (
        8, float32(job.final_validation.accuracy))


def test_the_job_is_an_mlflow_run_with_its_spec_losses_final_validation_and_model(
        server, finished_job, tracking_uri, tmp_path):
    job, recorder = finished_job
    reader = MlflowClient(tracking_uri)
    experiment = reader.get_experiment_by_name("chainrule/default")
    wait_for(lambda: reader.search_runs(
        [experiment.experiment_id], f"tags.`chainrule.job_id` = '{job.id}' and "
                                    f"attributes.status = 'FINISHED'"), 30, 0.2,
             "the run to be FINISHED")  # sent by the tracker's own thread
    (run,) = reader.search_runs([experiment.experiment_id],
                                f"tags.`chainrule.job_id` = '{job.id}'")
    assert run.data.params["data.dataset"] == "sklearn:iris"
    assert run.data.params["optimizer.adam.lr"] == "0.01"
    reported = {record.step: record.loss for record in recorder.steps}
    losses = reader.get_metric_history(run.info.run_id, "train_loss")
    steps = [metric.step for metric in losses]
    assert steps[0] == 1 and steps[-1] == 8  # the first, the last, at most one a second between
    assert all(metric.value == reported[metric.step] for metric in losses)
    final = reader.get_metric_history(run.info.run_id, "final_validation_accuracy")
    assert [(m.step, m.value) for m in final] == [(8, pytest.approx(
        job.final_validation.accuracy))]
    client_copy = tmp_path / "downloaded.safetensors"
    with Client(server.address, timeout=30) as client:
        client.download(job.id, client_copy)
    logged = reader.download_artifacts(run.info.run_id, "model", str(tmp_path / "mlflow"))
    assert (Path(logged) / f"{job.id}.safetensors").read_bytes() == client_copy.read_bytes()
    assert (Path(logged) / f"{job.id}.safetensors.json").exists()


def test_delete_deletes_the_jobs_tensorboard_files(server, finished_job, tmp_path):
    job, _ = finished_job
    folder = server.service.storage.tensorboard_folder(job.id)
    assert list(folder.iterdir())
    with Client(server.address, timeout=30) as client:
        client.delete(job.id)
        assert not folder.exists()
        error = rpc_error(lambda: client.download_tensorboard(job.id, tmp_path))
    assert error.code().name == "NOT_FOUND"
