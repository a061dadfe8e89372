"""What a starting server removes: what processes that are gone left behind.

A process killed mid-write (SIGKILL, an OOM kill, a power cut) leaves what it would have
cleaned up on the way out:
  - a job's shared-memory folder (/dev/shm/chainrule-*), memory until someone removes it;
    worker/shared_memory.py judges which of those no live process holds;
  - temporary files of the data folder's atomic writes: an upload being received
    (`tmp/.upload-XXXXXXXX`, services/uploads.py) and a checkpoint, model or stored data set
    being written (`.<final name>.XXXXXXXX` beside it, scheduler/storage.py and
    services/uploads.py). Both are named by tempfile.mkstemp: its prefix, then 8 characters.

The server runs this holding its data folder's lock (services/single_instance.py), so no other
server writes there; and it removes only temporary files older than its own start, so nothing
this server has begun writing is touched.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from worker.shared_memory import remove_stale_groups

log = logging.getLogger(__name__)

# tempfile.mkstemp's names: the prefix, then 8 of "abcdefghijklmnopqrstuvwxyz0123456789_".
TEMPORARY_NAME = re.compile(r"\.(upload-|.+\.)[a-z0-9_]{8}")


@dataclass(frozen=True)
class Swept:
    shared_memory_folders: list[Path]
    temporary_files: list[Path]


def sweep_leftovers(data_dir: str | Path, started_at: float) -> Swept:
    """Remove stale shared-memory folders (host-wide) and the data folder's temporary files
    last written before `started_at` (time.time()); log and return what was removed."""
    folders = remove_stale_groups()
    files = remove_temporary_files(Path(data_dir), started_at)
    if folders or files:
        log.info("removed %d stale shared-memory folder(s) and %d temporary file(s) left by "
                 "processes that are gone", len(folders), len(files))
    return Swept(folders, files)


def remove_temporary_files(data_dir: Path, before: float) -> list[Path]:
    """The atomic writes' temporary files under `data_dir` written before `before`."""
    removed = []
    for folder, _, names in os.walk(data_dir):  # does not follow symbolic links
        for name in names:
            if not TEMPORARY_NAME.fullmatch(name):
                continue
            path = Path(folder) / name
            try:
                if path.is_symlink() or path.stat().st_mtime >= before:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
