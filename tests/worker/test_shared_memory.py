import errno
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tmpfs import mounted_tmpfs
from worker.shared_memory import (
    ROOT_VARIABLE,
    SharedArrayGroup,
    SharedMemoryFull,
    host_identity,
    reserve,
    room,
)


def _write_in_child(spec, value):
    spec.attach()[:] = value


def test_an_array_written_in_another_process_is_seen_without_copying():
    group = SharedArrayGroup("test")
    try:
        spec = group.create("params", (1000,), "float32")
        mine = spec.attach()
        child = multiprocessing.get_context("spawn").Process(target=_write_in_child,
                                                              args=(spec, 3.5))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert np.all(mine == 3.5)
    finally:
        group.remove()
    assert not group.directory.exists()


def test_host_identity_is_stable_within_a_host():
    assert host_identity() == host_identity() and "/" in host_identity()


# --- a full shared-memory folder: every page reserved up front, never SIGBUS -------------------

# Maps a file and writes every byte of it, as a worker writes its gradient block.
WRITE_EVERY_PAGE = """
import mmap, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR)
mapping = mmap.mmap(descriptor, int(sys.argv[2]))
mapping[:] = b"\\x01" * len(mapping)
"""


def write_every_page_in_a_child(path, nbytes: int) -> int:
    return subprocess.run([sys.executable, "-c", WRITE_EVERY_PAGE, str(path), str(nbytes)],
                          capture_output=True, timeout=60).returncode


def fill(folder: Path) -> None:
    """Take every free byte of the folder's filesystem."""
    descriptor = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)


@pytest.fixture
def small_shared_memory(tmp_path, monkeypatch):
    with mounted_tmpfs(tmp_path / "shm", "1m") as folder:
        monkeypatch.setenv(ROOT_VARIABLE, str(folder))
        yield folder


def test_an_array_keeps_its_pages_when_the_folder_fills_up_after_it_was_made(
        small_shared_memory):
    group = SharedArrayGroup("job-1")
    spec = group.create("gradient-block-0", (65536,), "float32")  # 256 KiB
    sparse = small_shared_memory / "sparse"  # what truncate() made before: no pages yet
    with open(sparse, "wb") as handle:
        handle.truncate(spec.nbytes)
    fill(small_shared_memory)
    assert write_every_page_in_a_child(spec.path, spec.nbytes) == 0
    assert write_every_page_in_a_child(sparse, spec.nbytes) == -signal.SIGBUS  # the old way
    group.remove()


def test_arrays_without_room_for_all_of_them_and_the_margin_are_refused_before_any_is_made(
        small_shared_memory):
    group = SharedArrayGroup("job-2")
    free, margin = room(small_shared_memory)
    assert margin == 64 * 1024  # a sixteenth of 1 MiB
    half = (free - margin // 2) // 2 // 8  # together over the margin, each one well under
    with pytest.raises(SharedMemoryFull, match=f"{small_shared_memory} has .* MiB free"):
        group.create_all([("gradient-block-0", (half,), "float64"),
                          ("gradient-block-1", (half,), "float64")])
    assert [path.name for path in group.directory.iterdir()] == [".owner"]
    group.create("gradient-block-0", (half,), "float64")
    group.remove()


def test_a_reservation_the_kernel_refuses_is_shared_memory_full_and_leaves_no_file(
        small_shared_memory):
    group = SharedArrayGroup("job-3")
    fill(small_shared_memory)  # by someone else, after the room was checked
    with pytest.raises(SharedMemoryFull, match="gradient-block-0 found no room"):
        reserve(group.directory / "gradient-block-0", 65536)
    assert not (group.directory / "gradient-block-0").exists()
    group.remove()


def test_a_group_on_a_full_folder_is_shared_memory_full_and_leaves_no_folder(
        small_shared_memory):
    fill(small_shared_memory)
    with pytest.raises(SharedMemoryFull, match="is full"):
        SharedArrayGroup("job-4")
    assert [path.name for path in small_shared_memory.iterdir()] == ["filler"]
