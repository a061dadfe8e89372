"""The storage module: weights files with their manifest, and job checkpoints with their
checksums, rotation and the setting aside of a corrupt one."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch

from scheduler.checkpoint import Checkpoint, DataCursor
from scheduler.storage import (
    CheckpointCorrupt,
    JobStorage,
    checksum_path,
    load_checkpoint,
    load_weights,
    manifest_path,
    save_checkpoint,
    save_weights,
    weights_bytes,
)
from worker.backprop import nn


def state():
    nn.init.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_weights_round_trip_with_pytorch_key_names_and_a_manifest(tmp_path, suffix):
    path = save_weights(tmp_path / f"model{suffix}", state(), manifest={"steps": 3})
    loaded = load_weights(path)
    assert sorted(loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for key, value in state().items():
        np.testing.assert_array_equal(loaded[key], value)
    assert '"steps": 3' in manifest_path(path).read_text()
    torch_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in loaded.items()})


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    path = save_weights(tmp_path / "model.safetensors", state())
    before = path.read_bytes()
    with pytest.raises(Exception, match="dtype"):  # safetensors refuses an object array
        save_weights(path, {"bad": np.array([object()])})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp left


def test_npz_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_weights(path)


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="safetensors or .npz"):
        save_weights(tmp_path / "model.pt", state())


def test_files_follow_the_umask_not_mkstemp_0600(tmp_path):
    path = save_weights(tmp_path / "model.npz", state())
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_in_memory_bytes_equal_the_file(tmp_path):
    path = save_weights(tmp_path / "model.safetensors", state())
    assert weights_bytes(state(), ".safetensors") == path.read_bytes()
    assert np.load(io.BytesIO(weights_bytes(state(), ".npz")))["0.bias"].shape == (4,)


# --- checkpoints -------------------------------------------------------------------------------


def checkpoint(step: int) -> Checkpoint:
    rng = np.random.default_rng(step)
    return Checkpoint(step, rng.standard_normal(50).astype(np.float32), step * 2,
                      {"exp_avg": rng.standard_normal(50).astype(np.float32)},
                      {"1.running_mean": np.arange(3.0)})


def assert_same(loaded: Checkpoint, expected: Checkpoint) -> None:
    assert (loaded.step, loaded.optimizer_steps) == (expected.step, expected.optimizer_steps)
    np.testing.assert_array_equal(loaded.parameters, expected.parameters)
    assert loaded.parameters.dtype == expected.parameters.dtype
    assert loaded.optimizer_state.keys() == expected.optimizer_state.keys()
    np.testing.assert_array_equal(loaded.optimizer_state["exp_avg"],
                                  expected.optimizer_state["exp_avg"])
    np.testing.assert_array_equal(loaded.buffers["1.running_mean"],
                                  expected.buffers["1.running_mean"])


def truncate(path, keep_bytes: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep_bytes])


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_checkpoint_round_trips_with_its_checksum_beside_it(tmp_path):
    path = save_checkpoint(tmp_path / "step.npz", checkpoint(7))
    assert_same(load_checkpoint(path), checkpoint(7))
    sidecar = json.loads(checksum_path(path).read_text())
    assert sidecar["step"] == 7 and sidecar["size_bytes"] == path.stat().st_size
    assert len(sidecar["sha256"]) == 64


def test_a_checkpoint_keeps_its_data_cursor_and_one_written_without_it_loads_with_none(
        tmp_path):
    cursor = DataCursor(epoch=1, samples_used=384, training_samples=1437, seed=5,
                        order="row_group_lanes(4)")
    with_cursor = dataclasses.replace(checkpoint(7), data_cursor=cursor)
    assert load_checkpoint(save_checkpoint(tmp_path / "new.npz", with_cursor)).data_cursor \
        == cursor
    assert load_checkpoint(save_checkpoint(tmp_path / "old.npz", checkpoint(7))).data_cursor \
        is None


def test_a_checkpoint_with_one_flipped_bit_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step.npz", checkpoint(7))
    # inside the parameters' raw bytes: np.load alone would read a wrong number, silently
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointCorrupt, match="SHA-256 mismatch"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step.npz", checkpoint(7))
    truncate(path)
    with pytest.raises(CheckpointCorrupt, match="truncated"):
        load_checkpoint(path)


def test_a_checkpoint_without_its_checksum_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step.npz", checkpoint(7))
    checksum_path(path).unlink()  # a crash between writing the two files
    with pytest.raises(CheckpointCorrupt, match="no checksum file"):
        load_checkpoint(path)


def test_a_damaged_checksum_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "step.npz", checkpoint(7))
    checksum_path(path).write_text('{"size_bytes": 12')
    with pytest.raises(CheckpointCorrupt, match="unreadable checksum file"):
        load_checkpoint(path)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    storage = JobStorage(tmp_path, keep_checkpoints=2)
    for step in (3, 6, 9, 12):
        storage.save_checkpoint("job-1", checkpoint(step))
    assert [p.name for p in storage.checkpoints("job-1")] == ["step-0000000012.npz",
                                                              "step-0000000009.npz"]
    assert sorted(p.name for p in storage.checkpoint_folder("job-1").iterdir()) == [
        "step-0000000009.npz", "step-0000000009.npz.json",
        "step-0000000012.npz", "step-0000000012.npz.json"]
    assert_same(storage.latest_checkpoint("job-1").checkpoint, checkpoint(12))


def test_how_many_checkpoints_are_kept_is_configurable(tmp_path):
    storage = JobStorage(tmp_path, keep_checkpoints=3)
    for step in range(1, 6):
        storage.save_checkpoint("job-1", checkpoint(step))
    assert [p.name for p in storage.checkpoints("job-1")] == [
        "step-0000000005.npz", "step-0000000004.npz", "step-0000000003.npz"]
    with pytest.raises(ValueError, match="at least 1"):
        JobStorage(tmp_path, keep_checkpoints=0)


def test_steps_order_numerically_not_by_name_length(tmp_path):
    storage = JobStorage(tmp_path, keep_checkpoints=2)
    for step in (9, 10, 100):
        storage.save_checkpoint("job-1", checkpoint(step))
    assert storage.latest_checkpoint("job-1").checkpoint.step == 100


@pytest.mark.parametrize("damage", [truncate, lambda path: flip_byte(path, 200)],
                         ids=["truncated", "bit-flipped"])
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, damage):
    storage = JobStorage(tmp_path)
    storage.save_checkpoint("job-1", checkpoint(4))
    newest = storage.save_checkpoint("job-1", checkpoint(8))
    damage(newest)
    latest = storage.latest_checkpoint("job-1")
    assert_same(latest.checkpoint, checkpoint(4))
    assert latest.path.name == "step-0000000004.npz"
    [set_aside] = latest.set_aside
    assert set_aside.original == newest
    assert set_aside.renamed.name == "step-0000000008.npz.corrupt"
    assert set_aside.renamed.exists() and not newest.exists()
    assert (newest.parent / "step-0000000008.npz.json.corrupt").exists()
    assert "step-0000000008.npz" in set_aside.reason
    # set aside for good: the next load goes straight to the intact one
    again = storage.latest_checkpoint("job-1")
    assert again.checkpoint.step == 4 and again.set_aside == ()


def test_with_every_checkpoint_corrupt_there_is_none_to_resume(tmp_path):
    storage = JobStorage(tmp_path)
    for step in (4, 8):
        truncate(storage.save_checkpoint("job-1", checkpoint(step)))
    latest = storage.latest_checkpoint("job-1")
    assert latest.checkpoint is None and latest.path is None
    assert [s.original.name for s in latest.set_aside] == ["step-0000000008.npz",
                                                           "step-0000000004.npz"]
    assert not storage.has_checkpoint("job-1")


def test_a_job_without_checkpoints_has_none(tmp_path):
    latest = JobStorage(tmp_path).latest_checkpoint("job-never-ran")
    assert latest.checkpoint is None and latest.set_aside == ()


def test_deleting_a_jobs_checkpoints_removes_the_set_aside_ones_too(tmp_path):
    storage = JobStorage(tmp_path)
    storage.save_checkpoint("job-1", checkpoint(4))
    truncate(storage.save_checkpoint("job-1", checkpoint(8)))
    storage.save_checkpoint("job-2", checkpoint(1))
    assert storage.latest_checkpoint("job-1").set_aside  # step 8 is now a .corrupt file
    assert storage.jobs_with_checkpoints() == ["job-1", "job-2"]
    storage.delete_checkpoints("job-1")
    assert not storage.checkpoint_folder("job-1").exists()
    assert storage.jobs_with_checkpoints() == ["job-2"]


def test_a_job_id_never_becomes_a_path_outside_the_data_folder(tmp_path):
    storage = JobStorage(tmp_path / "data")
    for job_id in ("../escape", "a/b", "..", ""):
        with pytest.raises(ValueError, match="not a job id"):
            storage.checkpoint_folder(job_id)
        with pytest.raises(ValueError, match="not a job id"):
            storage.model_path(job_id)


def test_a_models_file_and_manifest_are_deleted_together(tmp_path):
    storage = JobStorage(tmp_path)
    path = save_weights(storage.model_path("job-1"), state(), manifest={"steps": 3})
    assert path == tmp_path / "models" / "job-1.safetensors"
    storage.delete_model("job-1")
    assert not path.exists() and not manifest_path(path).exists()
