"""The disk under a running job, on a real server over gRPC with real embedded Ray: a truncated
or bit-flipped checkpoint is set aside (named in the job's events) and the one before it used,
none left means step 0 with a warning, never a FAILED job; a disk that fills mid-job (a real
16 MiB tmpfs) leaves the job RUNNING with its result in memory, its end retried until there is
space, never RUNNING forever with the model lost. Every job ends with bitwise the weights of
the undisturbed run (tests/services/helpers.long_spec, trained once per session)."""

from __future__ import annotations

import errno
import logging
import subprocess
import time

import pytest

from chainrule.client import Client, state_name
from scheduler.storage import JobStorage, load_checkpoint
from services.server import serve
from tests.chaos.recovery_report import report_recovery
from tests.services.helpers import (
    assert_same_weights,
    downloaded,
    events,
    long_spec,
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
    with Client(server.address, timeout=30) as client:
        return undisturbed_weights(client, long_spec(), tmp_path_factory.mktemp("undisturbed"))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the flat parameter vector's raw bytes
    path.write_bytes(bytes(data))


DAMAGE_NAMES = {truncate: "truncated", flip_byte: "bit-flipped"}


def resume_timed(client: Client, job_id: str, past_step: int) -> float:
    """Resume the job; seconds until it trains past `past_step` (the step it had reached)."""
    start = time.monotonic()
    client.resume(job_id)
    wait_for(lambda: client.get(job_id).progress.step > past_step, 120, interval=0.02,
             what=f"a step past {past_step}")
    return time.monotonic() - start


# --- corrupt checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "bit-flipped"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(
        server, client, undisturbed, tmp_path, damage):
    job_id = stopped_mid_run(client, long_spec())
    newest, previous = JobStorage(server.data_dir).checkpoints(job_id)[:2]
    newest_step, previous_step = load_checkpoint(newest).step, load_checkpoint(previous).step
    damage(newest)
    seconds = resume_timed(client, job_id, newest_step)
    done = wait_until_done(client, job_id, timeout=300)
    assert state_name(done.state) == "SUCCEEDED", done.error
    assert_same_weights(downloaded(client, job_id, tmp_path), undisturbed)
    [corrupt] = events(server, job_id, "checkpoint_corrupt")
    assert corrupt["file"] == newest.name
    assert corrupt["set_aside_as"] == f"{newest.name}.corrupt"
    assert (newest.parent / f"{newest.name}.corrupt").exists()
    assert [payload["step"] for payload in events(server, job_id, "resumed")] == [previous_step]
    assert events(server, job_id, "warning") == []
    report_recovery(f"{DAMAGE_NAMES[damage]} checkpoint", seconds, newest_step - previous_step,
                    f"resumed from the previous checkpoint, step {previous_step}")


def test_with_every_checkpoint_corrupt_the_job_restarts_from_step_0_with_a_warning(
        server, client, undisturbed, tmp_path):
    job_id = stopped_mid_run(client, long_spec())
    checkpoints = JobStorage(server.data_dir).checkpoints(job_id)
    assert len(checkpoints) == 2  # the server keeps two
    for path in checkpoints:
        truncate(path)
    client.resume(job_id)
    done = wait_until_done(client, job_id, timeout=300)
    assert state_name(done.state) == "SUCCEEDED", done.error
    assert_same_weights(downloaded(client, job_id, tmp_path), undisturbed)
    assert [e["file"] for e in events(server, job_id, "checkpoint_corrupt")] == [
        path.name for path in checkpoints]
    [warning] = events(server, job_id, "warning")
    assert "step 0" in warning["message"]
    assert events(server, job_id, "resumed") == []


def test_after_a_restart_a_bit_flipped_newest_checkpoint_falls_back_to_the_previous(
        server, undisturbed, tmp_path):
    first = serve("127.0.0.1:0", tmp_path / "data")
    try:
        with Client(first.address, timeout=30) as client:
            job = client.submit(long_spec())
            wait_for(lambda: client.get(job.id).progress.step >= 20, 120, what="20 steps")
    finally:
        first.stop()  # the running job is checkpointed and requeued
    newest, previous = JobStorage(tmp_path / "data").checkpoints(job.id)[:2]
    previous_step = load_checkpoint(previous).step
    flip_byte(newest)
    second = serve("127.0.0.1:0", tmp_path / "data")  # runs the requeued job again
    try:
        with Client(second.address, timeout=30) as client:
            done = wait_until_done(client, job.id, timeout=300)
            assert state_name(done.state) == "SUCCEEDED", done.error
            assert_same_weights(downloaded(client, job.id, tmp_path), undisturbed)
        assert [e["file"] for e in events(second, job.id, "checkpoint_corrupt")] == [newest.name]
        assert events(second, job.id, "resumed")[-1]["step"] == previous_step
    finally:
        second.stop()


# --- a disk that fills mid-job -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    # Lazy: the stopped server's idle RPC threads may still hold their SQLite connections.
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


def _fill(path) -> None:
    """Write until the file system has no byte left."""
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    handle.write(block[:size])
            except OSError as error:
                assert error.errno == errno.ENOSPC, error


def test_a_job_ending_on_a_full_disk_succeeds_with_its_model_once_there_is_space(
        undisturbed, small_disk, tmp_path, caplog):
    # Before: every step trained, recording the end failed once, and the job stayed RUNNING
    # at its last step with no model for good.
    server = serve("127.0.0.1:0", small_disk / "data")
    storage = JobStorage(small_disk / "data")
    try:
        with Client(server.address, timeout=30) as client:
            job = client.submit(long_spec())
            wait_for(lambda: client.get(job.id).progress.step >= 50, 120, interval=0.01,
                     what="50 steps")
            _fill(small_disk / "filler")
            wait_for(lambda: any("recording the end of job" in r.getMessage()
                                 for r in caplog.records), 300, what="the end to fail")
            assert any("was not written" in r.getMessage() for r in caplog.records)  # mid-run
            wait_for(lambda: any("failed again" in r.getMessage() for r in caplog.records), 30,
                     what="a retry")
            assert state_name(client.get(job.id).state) == "RUNNING"
            assert server.queue.running == [job.id]
            assert storage.checkpoints(job.id)  # nothing deleted while the end is unrecorded

            (small_disk / "filler").unlink()
            freed = time.monotonic()
            done = wait_until_done(client, job.id, timeout=60)
            seconds = time.monotonic() - freed
            assert state_name(done.state) == "SUCCEEDED", done.error
            assert done.progress.step == done.progress.total_steps == 240
            assert_same_weights(downloaded(client, job.id, tmp_path), undisturbed)
            # The checkpoint of the last step, refused mid-run, was written with the end.
            assert storage.latest_checkpoint(job.id).checkpoint.step == 240
    finally:
        server.stop()
    print("\n".join(r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and "job-" in r.getMessage())[:2000])
    report_recovery("disk full mid-job", seconds, 0,
                    "every step kept; the end recorded once space was freed")
