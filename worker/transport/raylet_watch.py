"""Whether the raylet that started this actor's process still lives.

Ray's worker processes are children of their node's raylet. When the raylet dies they are
reparented, and go on running and answering calls (heartbeats too) until Ray's health check
declares the node dead: ~15 s measured on Ray 2.60, while a call that needs the dead node's
object store hangs. So an actor's heartbeat (worker/transport/liveness.py) also asks the process
table whether its parent is still the raylet that started it. No Ray import here: the check is
the kernel's answer, not Ray's.
"""

from __future__ import annotations

import os


class RayletGone(RuntimeError):
    """A heartbeat's answer: the raylet that started this actor's process has died."""


class RayletWatch:
    """Whether the raylet that started this process is still alive: made when the actor starts
    (its parent then is its raylet), asked by every heartbeat. A process whose parent was no
    raylet (an actor started some other way) is never reported."""

    def __init__(self) -> None:
        parent = os.getppid()
        self.raylet = parent if _command_name(parent) == "raylet" else None

    def check(self) -> None:
        """RayletGone once the raylet has died: an orphan is reparented, never given back."""
        if self.raylet is not None and os.getppid() != self.raylet:
            raise RayletGone(f"its raylet (process {self.raylet} on {os.uname().nodename}) "
                             f"has died")


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:  # no /proc (not Linux), or the parent is gone already
        return ""
