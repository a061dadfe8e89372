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
import time
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


GROUP_PREFIX = "chainrule-"
OWNER_FILE = ".owner"  # "PID START_TICKS BOOT_ID" of the process that created the group
# A group without an owner record (being created this instant, or by an older version) is left
# alone this long, and then only when no live process has a file of it mapped or open.
UNOWNED_GRACE_SECONDS = 60.0


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
        prefix = f"{GROUP_PREFIX}{job_id}-" if job_id else GROUP_PREFIX
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=shared_root()))
        # Who made it, so that a folder left by a killed process can be told from a live one
        # (remove_stale_groups); a dot name never clashes with an array's label.
        (self.directory / OWNER_FILE).write_text(_process_identity(os.getpid())
                                                  or str(os.getpid()))

    def create(self, label: str, shape: tuple[int, ...], dtype: str) -> SharedArraySpec:
        spec = SharedArraySpec(str(self.directory / label), tuple(shape), np.dtype(dtype).name)
        with open(spec.path, "wb") as handle:
            handle.truncate(max(spec.nbytes, 1))
        return spec

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# --- groups left behind ------------------------------------------------------------------------
#
# A runner removes its group when the job's run ends, however it ends, short of its process
# being killed (SIGKILL of `chainrule serve`, an OOM kill). Those folders stay in /dev/shm,
# which is memory, until a starting server removes them here.


def remove_stale_groups(root: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove the groups under `root` (default: shared_root()) that no live process holds, and
    return them. A group with an owner record is stale once that process is gone (its PID
    dead, or reused by a process started later); one without (an older version's) once it is
    UNOWNED_GRACE_SECONDS old and no live process has any of its files mapped or open."""
    root = shared_root() if root is None else root
    now = time.time() if now is None else now
    in_use: set[str] | None = None  # read from /proc once, and only if needed
    removed = []
    for folder in sorted(root.glob(f"{GROUP_PREFIX}*")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        try:
            owner = (folder / OWNER_FILE).read_text()
        except FileNotFoundError:
            owner = None
        except OSError:
            continue  # not ours to judge (another user's)
        if owner is not None:
            if _is_alive(owner):
                continue
        else:
            try:
                if now - folder.stat().st_mtime < UNOWNED_GRACE_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            if in_use is None:
                in_use = _paths_in_use()
            inside = f"{folder}/"
            if in_use is None or any(path.startswith(inside) for path in in_use):
                continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _process_identity(pid: int) -> str | None:
    """"PID START_TICKS BOOT_ID": a PID names one process only together with its start time
    (PIDs are reused) and the boot (start times restart at 0). None when there is no such
    process, or no /proc to read it from."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 22, starttime; the command name (field 2) may hold spaces and parentheses.
    start_ticks = stat.rsplit(")", 1)[1].split()[19]
    return f"{pid} {start_ticks} {boot}"


def _is_alive(owner: str) -> bool:
    """Whether the process an owner record names still runs. An unreadable record is treated
    as alive: a folder is removed only when its owner is known to be gone."""
    fields = owner.split()
    if not fields or not fields[0].isdigit():
        return True
    pid = int(fields[0])
    if len(fields) < 3:  # recorded where there was no /proc: the PID alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return _process_identity(pid) == owner.strip()


def _paths_in_use() -> set[str] | None:
    """Every file a live process has mapped or open (None without /proc: cannot tell)."""
    proc = Path("/proc")
    if not (proc / "self" / "maps").exists():
        return None
    paths: set[str] = set()
    for process in proc.iterdir():
        if not process.name.isdigit():
            continue
        try:
            for line in (process / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    paths.add(fields[5].removesuffix(" (deleted)"))
            for descriptor in (process / "fd").iterdir():
                try:
                    paths.add(os.readlink(descriptor))
                except OSError:
                    continue
        except OSError:  # it exited meanwhile, or is not ours to read
            continue
    return paths
