"""The processes of this machine, as /proc lists them: what the embedded Ray's watch
(scheduler/ray_liveness.py) and its head's stop (scheduler/ray_head.py) both read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    name: str
    state: str
    parent: int
    session: int
    start_ticks: str


def read_stat(pid: int) -> ProcessStat | None:
    """/proc/PID/stat's fields that name a process; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split around the last ")".
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return ProcessStat(pid, name, fields[0], int(fields[1]), int(fields[3]), fields[19])


def all_processes() -> list[ProcessStat]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                found.append(stat)
    return found
