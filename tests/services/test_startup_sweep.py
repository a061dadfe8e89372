"""A starting server removes what killed processes left behind (issue 12): shared-memory folders
of runs that are gone and the data folder's temporary files; what a live process holds stays.

Before: a SIGKILLed `chainrule serve` leaked its job's /dev/shm folder (memory) for good, and
an interrupted upload or checkpoint write left its temporary file in the data folder."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
import time

import pytest

from services.server import serve
from tests.services.helpers import ROOT
from worker.shared_memory import OWNER_FILE, SharedArrayGroup, shared_root

pytestmark = [pytest.mark.distributed]

AN_HOUR_AGO = time.time() - 3600


def _group_of_a_killed_process() -> str:
    """A group whose creator died without removing it, as a SIGKILLed runner does."""
    code = ("import os, signal\n"
            "from worker.shared_memory import SharedArrayGroup\n"
            "group = SharedArrayGroup('job-sweep0killed')\n"
            "group.create('parameters', (1024,), 'float32')\n"
            "print(group.directory, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    return child.stdout.strip()


def _unowned_group(name: str) -> str:
    """A group as an older version made it (no owner record), last changed an hour ago."""
    folder = tempfile.mkdtemp(prefix=f"chainrule-{name}-", dir=shared_root())
    with open(os.path.join(folder, "parameters"), "wb") as handle:
        handle.truncate(4096)
    os.utime(folder, (AN_HOUR_AGO, AN_HOUR_AGO))
    return folder


def _temporary(path, old: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a file")
    if old:
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return path


def test_a_starting_server_removes_leftovers_of_dead_processes_and_keeps_live_ones(
        local_ray, tmp_path):
    killed = _group_of_a_killed_process()
    assert os.path.isdir(killed) and os.path.exists(os.path.join(killed, OWNER_FILE))
    live = SharedArrayGroup("job-sweep0live")  # this process is alive
    unowned_unused = _unowned_group("job-sweep0unused")
    unowned_mapped = _unowned_group("job-sweep0mapped")
    handle = open(os.path.join(unowned_mapped, "parameters"), "r+b")
    mapping = mmap.mmap(handle.fileno(), 4096)  # a live process still uses it
    handle.close()

    data = tmp_path / "data"
    stale = [
        _temporary(data / "tmp" / ".upload-k2j4h6g8"),  # an upload being received
        _temporary(data / "checkpoints" / "job-0123456789ab" / ".step-0000000010.npz.a1b2c3d4"),
        _temporary(data / "checkpoints" / "job-0123456789ab"
                   / ".step-0000000010.npz.json.zz_9yy8x"),
        _temporary(data / "models" / ".job-0123456789ab.safetensors.q1w2e3r4"),
        _temporary(data / "datasets" / "0f1e2d3c4b5a6978" / ".iris-5f6e7d8c.npz.m0n9b8v7"),
    ]
    kept = [
        _temporary(data / "models" / "job-0123456789ab.safetensors"),
        _temporary(data / "datasets" / "0f1e2d3c4b5a6978" / "iris-5f6e7d8c.npz"),
        _temporary(data / "models" / ".gitignore"),  # a dot file, but no temporary name
        _temporary(data / "tmp" / ".upload-a1b2c3d4", old=False),  # written after the start
    ]
    os.utime(kept[-1], (time.time() + 3600, time.time() + 3600))
    try:
        server = serve("127.0.0.1:0", data)
        server.stop()
        assert not os.path.exists(killed)
        assert not os.path.exists(unowned_unused)
        assert live.directory.is_dir()
        assert os.path.isdir(unowned_mapped)
        assert [path for path in stale if path.exists()] == []
        assert [path for path in kept if not path.exists()] == []
    finally:
        mapping.close()
        live.remove()
        for folder in (killed, unowned_unused, unowned_mapped):
            subprocess.run(["rm", "-rf", folder], check=True)
