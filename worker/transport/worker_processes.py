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

When the runner cannot end a process, it says so (CannotFence, naming why) instead of
assuming it gone: pidfds missing (no os.pidfd_open, a kernel before 5.3, a seccomp profile
answering EPERM or ENOSYS), a worker in another PID namespace (its process id means nothing
here: containers sharing the host's hostname and /dev/shm but not its PIDs), or a process
still running after SIGKILL and the timeout (stuck in the kernel). What the job does then is
the failure policy's choice (the runner's), not this module's.
"""

from __future__ import annotations

import os
import select
import signal

import numpy as np

# Columns of the table: process id (0: no process in the slot), start time, PID namespace.
PROCESS_FIELDS = 3


class CannotFence(RuntimeError):
    """The runner cannot make sure a worker's process has ended; the message says why."""


def process_identity(pid: int) -> tuple[int, int, int] | None:
    """(process id, start time, PID namespace) of process `pid` as seen from this process's
    namespace, as a row of the table; None: no process."""
    start = _start_ticks(pid)
    return None if start is None else (pid, start, pid_namespace())


def actor_process_identity(_actor: object) -> tuple[int, int, int]:
    """The row of the actor process this runs in, its id as seen in its own PID namespace;
    the runner calls it through `actor.__ray_call__`, which passes the actor instance first."""
    identity = process_identity(os.getpid())
    assert identity is not None  # this process runs
    return identity


def pid_namespace() -> int:
    """This process's PID namespace (the inode of /proc/self/ns/pid)."""
    return os.stat("/proc/self/ns/pid").st_ino


def why_not_fenceable(row: tuple[int, int, int] | None = None) -> str | None:
    """Why this process could not end a worker process (recorded as `row`), or None when it
    can: pidfds work here (probed on this process itself) and the row is of this process's
    PID namespace."""
    if not hasattr(os, "pidfd_open"):
        return "this Python has no os.pidfd_open (Linux 5.3 and Python 3.9 or later needed)"
    try:
        handle = os.pidfd_open(os.getpid())
        try:
            signal.pidfd_send_signal(handle, 0)  # signal 0: the permission check only
        finally:
            os.close(handle)
    except OSError as error:
        return f"pidfds do not work here ({error.strerror or error})"
    if row is not None and int(row[2]) != pid_namespace():
        return (f"worker process {int(row[0])} is in another PID namespace than the runner "
                f"(pid:[{int(row[2])}], the runner's pid:[{pid_namespace()}])")
    return None


def end_worker_process(table: np.ndarray, worker: int, timeout_seconds: float) -> None:
    """SIGKILL the process that worker slot `worker` recorded and wait until it has exited
    (an unreaped zombie has: it runs no more). Returns once it has, or at once when it was
    gone already (no process recorded, no process at that id, or another process that took
    the id). Raises CannotFence when it cannot tell or do that (pidfds not working, a process
    of another PID namespace) or the process still runs after `timeout_seconds`."""
    pid, start, namespace = (int(value) for value in table[worker])
    if pid <= 0:
        return
    why_not = why_not_fenceable((pid, start, namespace))
    if why_not is not None:
        raise CannotFence(f"cannot end worker {worker}'s process: {why_not}")
    try:
        handle = os.pidfd_open(pid)  # the process itself, whatever happens to its id next
    except ProcessLookupError:
        return
    except OSError as error:
        raise CannotFence(f"cannot end worker {worker}'s process {pid}: "
                          f"pidfd_open: {error.strerror or error}") from error
    try:
        if _start_ticks(pid) != start:  # read after the handle: not ours, so ours is gone
            return
        try:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        except ProcessLookupError:
            return
        except OSError as error:
            raise CannotFence(f"cannot end worker {worker}'s process {pid}: "
                              f"pidfd_send_signal: {error.strerror or error}") from error
        exited = select.poll()
        exited.register(handle, select.POLLIN)  # readable once the process has exited
        if not exited.poll(max(0.0, timeout_seconds) * 1000):
            raise CannotFence(f"worker {worker}'s process {pid} still runs "
                              f"{timeout_seconds} s after SIGKILL")
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
