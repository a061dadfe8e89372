"""Arrays in shared memory that every process on one host maps without copying.

The step's bytes (parameters, gradient blocks) travel through these instead of the Ray object
store: allocated once per job, reused every step, read and written in place. A file under
/dev/shm is a plain, named, host-wide mapping with none of multiprocessing.SharedMemory's
resource-tracker surprises (attaching processes unlinking segments when they exit).

Every page of an array is reserved when it is created (posix_fallocate), after checking that
the folder has room for the arrays and a margin: a sparse file would take its pages only when
first written, and a write that finds /dev/shm full kills the writing process with SIGBUS. So
a full /dev/shm is a SharedMemoryFull when a job sets up, never a signal halfway through one.
"""

from __future__ import annotations

import errno
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

# Where shared arrays live when not /dev/shm: an operator's choice (a bigger tmpfs), or a test's
# (a small one). Read by the process that creates a job's arrays; actors get full paths.
ROOT_VARIABLE = "CHAINRULE_SHARED_MEMORY_DIR"

# Room left free on the shared-memory folder besides a job's arrays, for the host's other users
# of it (Ray's object store, other jobs): a sixteenth of its size, at most 256 MiB.
MARGIN_FRACTION = 1 / 16
MAX_MARGIN_BYTES = 256 * 2**20
PAGE_BYTES = mmap.PAGESIZE


class SharedMemoryFull(RuntimeError):
    """The shared-memory folder has no room for a job's arrays: found before reserving them,
    or refused by the kernel while reserving (someone else took the room meanwhile)."""


def shared_root() -> Path:
    """Where shared arrays live: $CHAINRULE_SHARED_MEMORY_DIR when set, else /dev/shm
    (memory), else the temporary folder."""
    configured = os.environ.get(ROOT_VARIABLE)
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def room(root: Path) -> tuple[int, int]:
    """(bytes free to this user, margin to leave free) on the filesystem of `root`."""
    found = os.statvfs(root)
    size = found.f_blocks * found.f_frsize
    return found.f_bavail * found.f_frsize, min(int(size * MARGIN_FRACTION), MAX_MARGIN_BYTES)


def reserved_bytes(nbytes: int) -> int:
    """What an array of `nbytes` takes on a tmpfs: whole pages, at least one."""
    return max(math.ceil(nbytes / PAGE_BYTES), 1) * PAGE_BYTES


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


def reserve(path: Path, nbytes: int) -> None:
    """Create the file `path` (0600) with every page of its `nbytes` allocated; a
    SharedMemoryFull naming the folder, and no file, when the filesystem has no room left."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(descriptor, 0, max(nbytes, 1))
    except OSError as error:
        path.unlink(missing_ok=True)
        if error.errno != errno.ENOSPC:
            raise
        raise SharedMemoryFull(f"{path.parent} filled up while reserving a job's shared "
                               f"arrays: {nbytes / 2**20:.2f} MiB for {path.name} found no room"
                               ) from error
    finally:
        os.close(descriptor)


class SharedArrayGroup:
    """The shared arrays of one job, created together and removed together, in a fresh folder
    `chainrule-<job id>-<random>` (`chainrule-<random>` for a job without an id, as in
    `chainrule train`) that only this user may open."""

    def __init__(self, job_id: str | None = None):
        if job_id is not None and not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        prefix = f"{GROUP_PREFIX}{job_id}-" if job_id else GROUP_PREFIX
        root = shared_root()
        try:
            self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
            try:
                # Who made it, so that a folder left by a killed process can be told from a
                # live one (remove_stale_groups); a dot name never clashes with an array's.
                (self.directory / OWNER_FILE).write_text(_process_identity(os.getpid())
                                                          or str(os.getpid()))
            except OSError:
                self.remove()
                raise
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise SharedMemoryFull(f"{root} is full: no room for a job's shared-memory "
                                   f"folder") from error

    def create(self, label: str, shape: tuple[int, ...], dtype: str) -> SharedArraySpec:
        """One array, its pages reserved: see create_all."""
        return self.create_all([(label, shape, dtype)])[0]

    def check_room(self, arrays: list[tuple[str, tuple[int, ...], str]]) -> None:
        """SharedMemoryFull unless the folder has room for the arrays of (label, shape, dtype)
        and the margin besides."""
        needed = sum(reserved_bytes(math.prod(shape) * np.dtype(dtype).itemsize)
                     for _, shape, dtype in arrays)
        free, margin = room(self.directory)
        if needed + margin > free:
            raise SharedMemoryFull(
                f"{self.directory.parent} has {free / 2**20:.2f} MiB free: the job's shared "
                f"arrays need {needed / 2**20:.2f} MiB and {margin / 2**20:.2f} MiB stay free "
                f"for the host's other users of it")

    def create_all(self, arrays: list[tuple[str, tuple[int, ...], str]]
                   ) -> list[SharedArraySpec]:
        """Arrays of (label, shape, dtype), every page reserved, once the folder is known to
        have room for all of them and the margin; SharedMemoryFull otherwise, with nothing of
        them left behind."""
        specs = [SharedArraySpec(str(self.directory / label), tuple(shape), np.dtype(dtype).name)
                 for label, shape, dtype in arrays]
        self.check_room(arrays)
        created: list[SharedArraySpec] = []
        try:
            for spec in specs:
                reserve(Path(spec.path), spec.nbytes)
                created.append(spec)
        except SharedMemoryFull:
            for spec in created:
                Path(spec.path).unlink(missing_ok=True)
            raise
        return specs

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


def remove_groups_of_this_process(root: Path | None = None) -> list[Path]:
    """Remove the groups this process made, and return them: for a process about to replace
    itself (exec), whose PID and start time live on, so no later sweep would find them stale."""
    root = shared_root() if root is None else root
    me = _process_identity(os.getpid())
    removed = []
    for folder in sorted(root.glob(f"{GROUP_PREFIX}*")):
        try:
            owner = (folder / OWNER_FILE).read_text()
        except OSError:
            continue
        if me is not None and owner.strip() == me:
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
