"""How the runner makes sure a lost shared-memory worker can write nothing more.

Over shared memory a lost worker's block goes to a survivor, who writes the same gradient
block, BatchNorm rows and report row (shared_memory.py). The lost process must be gone first:
Ray says an actor is dead before its process has exited (a killed worker was seen to compute
two more 2 ms steps after that), and a worker lost for silence may only be slow. Every actor of
such a job runs on the runner's host, so the runner ends the process itself: SIGKILL (which
also ends a stopped process at once, where Ray's kill waits seconds for a graceful exit) and a
wait until it has exited.

The runner records each worker's process id and start time in a shared table, asking the actor
(actor_process_identity) before it starts the worker's step loop, so the row is there before
the loop can take any command. (A loop that recorded its own row left a window: a worker lost
before its loop had recorded it, at the job's start or after replacing a dead worker, counted
as "gone" while it could still take the COMPUTE left in its inbox and write into a block a
survivor owns.) A slot's row is cleared once its process is ended. The start time tells a
reused process id (this machine's pid_max is 32768) from the worker: a process at that id
that started at another time is not ours, and ours is gone.
"""

from __future__ import annotations

import os
import select
import signal

import numpy as np

# Columns of the table: process id (0: no process in the slot), start time.
PROCESS_FIELDS = 2


def process_identity(pid: int) -> tuple[int, int] | None:
    """(process id, start time) of process `pid`, as a row of the table; None: no process."""
    start = _start_ticks(pid)
    return None if start is None else (pid, start)


def actor_process_identity(_actor: object) -> tuple[int, int]:
    """The row of the actor process this runs in; the runner calls it through
    `actor.__ray_call__`, which passes the actor instance first."""
    identity = process_identity(os.getpid())
    assert identity is not None  # this process runs
    return identity


def end_worker_process(table: np.ndarray, worker: int, timeout_seconds: float) -> bool:
    """SIGKILL the process that worker slot `worker` recorded and wait until it has exited
    (an unreaped zombie has: it runs no more). True once it has, or when it was gone already
    (no process recorded, no process at that id, or another process that took the id); False if
    it is still running after `timeout_seconds`."""
    pid, start = (int(value) for value in table[worker])
    if pid <= 0:
        return True
    try:
        handle = os.pidfd_open(pid)  # the process itself, whatever happens to its id next
    except ProcessLookupError:
        return True
    try:
        if _start_ticks(pid) != start:  # read after the handle: not ours, so ours is gone
            return True
        try:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        except ProcessLookupError:
            return True
        exited = select.poll()
        exited.register(handle, select.POLLIN)  # readable once the process has exited
        return bool(exited.poll(max(0.0, timeout_seconds) * 1000))
    finally:
        os.close(handle)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None
    when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            after_name = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(after_name[19])  # fields 3 onwards follow the name; field 22 is the 20th
