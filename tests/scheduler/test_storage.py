import io
import os

import numpy as np
import pytest
import torch

from worker.backprop import nn
from worker.weights_file import load_weights, manifest_path, save_weights, weights_bytes


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
