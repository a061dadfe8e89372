"""Ended jobs, on a real server over gRPC: ResumeJob runs a CANCELLED or FAILED job again from
its checkpoint and continues a SUCCEEDED one for more epochs; an ended job's checkpoints go
after the retention; DeleteJob removes a job with its files. (A corrupt checkpoint is set
aside and the one before it used: tests/chaos/test_storage_faults.py.)

Replay is deterministic, so every resumed job must end with bitwise the weights of a run that
was never disturbed."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from chainrule.client import Client, state_name
from scheduler.storage import JobStorage, load_checkpoint
from services import cli
from services.server import serve
from tests.services.helpers import (
    assert_same_weights,
    downloaded,
    events,
    iris_spec,
    long_spec,
    rpc_error,
    stopped_mid_run,
    undisturbed_weights,
    wait_for,
    wait_until_done,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), max_concurrent_jobs=1)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def undisturbed(server, tmp_path_factory):
    """The weights of long_spec() trained from start to end without interruption."""
    with Client(server.address, timeout=30) as client:
        return undisturbed_weights(client, long_spec(), tmp_path_factory.mktemp("undisturbed"))


# --- ResumeJob ---------------------------------------------------------------------------------


def test_a_cancelled_job_resumes_from_its_checkpoint_to_the_undisturbed_weights(
        server, client, undisturbed, tmp_path):
    job_id = stopped_mid_run(client, long_spec())
    stopped_at = client.get(job_id).progress.step
    resumed = client.resume(job_id)
    assert resumed.id == job_id
    assert state_name(resumed.state) in ("QUEUED", "RUNNING")
    done = wait_until_done(client, job_id, timeout=300)
    assert state_name(done.state) == "SUCCEEDED", done.error
    assert done.progress.step == done.progress.total_steps == 240
    assert_same_weights(downloaded(client, job_id, tmp_path), undisturbed)
    states = [payload["state"] for payload in events(server, job_id, "state")]
    assert states == ["QUEUED", "RUNNING", "CANCELLED", "QUEUED", "RUNNING", "SUCCEEDED"]
    assert [payload["step"] for payload in events(server, job_id, "resumed")] == [stopped_at]


def test_a_failed_job_resumes_once_the_cause_is_gone(server, client, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "blobs.npz"
    np.savez(data, x=rng.normal(size=(120, 4)), y=np.arange(120) % 3)
    client.upload(data, "blobs")
    stored = Path(server.service.store.get_dataset("default", "blobs").path)
    moved = tmp_path / "moved-away.npz"
    stored.rename(moved)  # the file goes missing after the upload: the run fails to load it
    spec = iris_spec(data={"dataset": "upload:blobs", "batch_size": 16, "epochs": 2,
                           "validation_fraction": 0.2})
    job = client.submit(spec)
    failed = wait_until_done(client, job.id)
    assert state_name(failed.state) == "FAILED" and failed.error
    moved.rename(stored)
    assert state_name(client.resume(job.id).state) in ("QUEUED", "RUNNING")
    done = wait_until_done(client, job.id)
    assert state_name(done.state) == "SUCCEEDED", done.error
    assert done.error == ""
    assert done.progress.step == done.progress.total_steps


def test_a_succeeded_job_continues_for_more_epochs_like_a_longer_job(server, client, tmp_path):
    # 4 steps an epoch, a checkpoint every 3: the last step of the first 2 epochs (8) is
    # checkpointed only because a job's end always is.
    checkpoint_every_3 = {"checkpoint": {"interval_steps": 3}}
    short = client.submit(iris_spec(epochs=2, **checkpoint_every_3))
    assert state_name(wait_until_done(client, short.id).state) == "SUCCEEDED"
    continued = client.resume(short.id, epochs=1)
    assert continued.spec.data.epochs == 3
    done = wait_until_done(client, short.id)
    assert state_name(done.state) == "SUCCEEDED", done.error
    longer = client.submit(iris_spec(epochs=3, **checkpoint_every_3))
    assert state_name(wait_until_done(client, longer.id).state) == "SUCCEEDED"
    assert done.progress.total_steps == client.get(longer.id).progress.total_steps
    # from the final checkpoint of the first two epochs: the third, and nothing again
    [resumed] = events(server, short.id, "resumed")
    assert resumed["step"] == done.progress.total_steps * 2 // 3
    assert_same_weights(downloaded(client, short.id, tmp_path),
                        downloaded(client, longer.id, tmp_path))


def test_a_succeeded_job_is_continued_only_for_a_given_number_of_epochs(client):
    job = client.submit(iris_spec())
    wait_until_done(client, job.id)
    error = rpc_error(lambda: client.resume(job.id))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("epochs:")
    assert state_name(client.get(job.id).state) == "SUCCEEDED"


def test_a_queued_or_running_job_cannot_be_resumed(client):
    running = client.submit(long_spec())
    queued = client.submit(iris_spec())  # one job at a time: it waits
    try:
        wait_for(lambda: state_name(client.get(running.id).state) == "RUNNING", 60,
                 what="the job to run")
        for job_id, state in ((running.id, "RUNNING"), (queued.id, "QUEUED")):
            error = rpc_error(lambda job_id=job_id: client.resume(job_id))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"job {job_id} is {state}" in error.details()
    finally:
        client.cancel(queued.id)
        client.cancel(running.id)
        wait_until_done(client, running.id)


def test_an_unknown_job_is_not_found(client):
    for call in (lambda: client.resume("job-000000000000", epochs=1),
                 lambda: client.delete("job-000000000000")):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "job-000000000000" in error.details()


# --- retention and DeleteJob -------------------------------------------------------------------


def test_an_ended_jobs_checkpoints_are_deleted_after_the_retention(local_ray, tmp_path):
    running = serve("127.0.0.1:0", tmp_path, keep_checkpoints=3,
                    checkpoint_retention_seconds=5.0)
    storage = JobStorage(tmp_path)
    try:
        with Client(running.address, timeout=30) as client:
            spec = iris_spec(epochs=2)
            spec.checkpoint.interval_steps = 1
            job = client.submit(spec)
            done = wait_until_done(client, job.id)
            assert state_name(done.state) == "SUCCEEDED"
            total = done.progress.total_steps
            assert [load_checkpoint(p).step for p in storage.checkpoints(job.id)] == [
                total, total - 1, total - 2]  # this server keeps three
            wait_for(lambda: not storage.checkpoint_folder(job.id).exists(), 30,
                     what="the retention sweep")
            assert storage.model_path(job.id).exists()  # only checkpoints expire
            error = rpc_error(lambda: client.resume(job.id, epochs=1))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no checkpoint left" in error.details()
    finally:
        running.stop()


def test_deleting_an_ended_job_removes_its_record_checkpoints_and_model(server, client):
    storage = JobStorage(server.data_dir)
    job = client.submit(iris_spec())
    assert state_name(wait_until_done(client, job.id).state) == "SUCCEEDED"
    assert storage.model_path(job.id).exists() and storage.has_checkpoint(job.id)
    client.delete(job.id)
    assert rpc_error(lambda: client.get(job.id)).code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in client.jobs()]
    assert not storage.model_path(job.id).exists()
    assert not storage.checkpoint_folder(job.id).exists()
    assert server.service.store.events(job.id) == []
    assert rpc_error(lambda: client.delete(job.id)).code() == grpc.StatusCode.NOT_FOUND


def test_a_running_job_must_be_cancelled_before_it_is_deleted(client):
    job = client.submit(long_spec())
    try:
        wait_for(lambda: state_name(client.get(job.id).state) == "RUNNING", 60,
                 what="the job to run")
        error = rpc_error(lambda: client.delete(job.id))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancel it first" in error.details()
    finally:
        client.cancel(job.id)
    wait_until_done(client, job.id)
    client.delete(job.id)
    assert rpc_error(lambda: client.get(job.id)).code() == grpc.StatusCode.NOT_FOUND


# --- the command line --------------------------------------------------------------------------


def test_chainrule_resume_and_delete(server, client, capsys):
    job = client.submit(iris_spec())
    wait_until_done(client, job.id)
    where = ("--server", server.address)
    assert cli.main(["resume", job.id, *where]) == 1
    assert f"INVALID_ARGUMENT: epochs: job {job.id} SUCCEEDED" in capsys.readouterr().err
    assert cli.main(["resume", job.id, "--epochs", "2", *where]) == 0
    assert job.id in capsys.readouterr().out
    done = wait_until_done(client, job.id)
    assert state_name(done.state) == "SUCCEEDED" and done.spec.data.epochs == 3
    assert cli.main(["delete", job.id, *where]) == 0
    assert capsys.readouterr().out.strip() == f"deleted {job.id}"
    assert cli.main(["status", job.id, *where]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "--keep-checkpoints", "0"],
                                  ["serve", "--checkpoint-retention-days", "-1"],
                                  ["resume", "job-1", "--epochs", "0"]])
def test_the_command_line_refuses_counts_out_of_range(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err
