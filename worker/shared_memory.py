"""Arrays in shared memory that every process on one host maps without copying.

The step's bytes (parameters, gradient blocks) travel through these instead of the Ray object
store: allocated once per job, reused every step, read and written in place. A file under
/dev/shm is a plain, named, host-wide mapping with none of multiprocessing.SharedMemory's
resource-tracker surprises (attaching processes unlinking segments when they exit).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def shared_root() -> Path:
    """Where shared arrays live: /dev/shm (memory), else the temporary folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def host_identity() -> str:
    """Processes with the same identity can share memory: same kernel boot, same host name."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{os.uname().nodename}/{boot}"


@dataclass(frozen=True)
class SharedArraySpec:
    """Enough to map an array in another process: picklable, a few bytes."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def attach(self) -> np.ndarray:
        """Map the array (read-write, shared: writes are seen by every process)."""
        with open(self.path, "r+b") as handle:
            size = max(self.nbytes, 1)
            mapping = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_WRITE)
        return np.ndarray(self.shape, dtype=self.dtype, buffer=mapping)


# What may name a job's folder: a service job id ("job-" and hex digits) or the like, never a
# path. The spec's name is the tenant's free choice and never names anything on disk.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class SharedArrayGroup:
    """The shared arrays of one job, created together and removed together, in a fresh folder
    `chainrule-<job id>-<random>` (`chainrule-<random>` for a job without an id, as in
    `chainrule train`) that only this user may open."""

    def __init__(self, job_id: str | None = None):
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        prefix = f"chainrule-{job_id}-" if job_id else "chainrule-"
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=shared_root()))

    def create(self, label: str, shape: tuple[int, ...], dtype: str) -> SharedArraySpec:
        spec = SharedArraySpec(str(self.directory / label), tuple(shape), np.dtype(dtype).name)
        with open(spec.path, "wb") as handle:
            handle.truncate(max(spec.nbytes, 1))
        return spec

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
