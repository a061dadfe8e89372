"""What the service does when the Ray it trains on dies (found by scheduler/ray_liveness.py).

Policy (`decide`):
  - embedded Ray, which this server started: RESTART. Every running job gets a "ray_lost"
    recovery event and goes back to QUEUED with the reason; the `chainrule serve` process
    starts again in place with a new Ray, and runs the jobs again, each from its last
    checkpoint. No person needed. More than MAX_RESTARTS within RESTART_WINDOW_SECONDS is
    EXIT: a Ray that keeps dying (no memory, a broken install) is for a person to look at.
  - a cluster joined by address (`serve --ray-address`): EXIT. This server cannot restart
    it. Its running jobs go back to QUEUED with the reason, one ERROR line says what was
    lost, and the process exits with status RAY_LOST_EXIT_STATUS, so that a supervisor
    (systemd, Kubernetes) restarts it; it resumes the jobs once it can join again.
  - Ray that whoever embedded `serve()` started: not watched; its owner decides.

Why the process starts again rather than calling ray.shutdown() and ray.init() (measured on
Ray 2.60): a job's thread that is inside a Ray call when Ray is shut down (a step waiting on
its workers, as every running job is) touches Ray's core worker when the call returns, and
Ray then ends the whole process ("The core worker has already been shutdown ... The process
will exit"), status 1, without a line of ours. The runners cannot be made to leave their Ray
calls in time: with the raylet gone, Ray ends the process within about 13 s anyway.
`restart_in_place` kills the Ray processes this process started (its children, and every
process of a Ray head it started as a session of its own: scheduler/ray_head.py), removes
the jobs' shared-memory folders, and replaces the process image with the same command line
(exec: same PID, same output; the data-folder lock, the port and the store are let go and taken
again). Startup then finds the jobs QUEUED and runs them on the new Ray.

Mechanism: `RayRecovery` watches and requeues the jobs, then hands the decision to the
process's owner (`on_lost`); `chainrule serve` carries it out (services/cli.py).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from scheduler.job_queue import JobQueue
from scheduler.ray_liveness import (
    RayWatch,
    child_processes,
    cluster_unanswered,
    embedded_processes,
    processes_exited,
)
from worker.shared_memory import remove_groups_of_this_process

log = logging.getLogger(__name__)

RAY_LOST_EXIT_STATUS = 3  # `chainrule serve`'s status when its Ray is lost for good
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 600.0
# The wall-clock times of this server's recent restarts in place, carried across the exec.
RESTARTS_VARIABLE = "CHAINRULE_RAY_RESTARTS"


class Action(enum.Enum):
    RESTART = "restart"
    EXIT = "exit"


def decide(embedded: bool, recent_restarts: int) -> Action:
    """Restart when this server started its Ray and has not had to restart too often lately;
    else exit for a supervisor or a person."""
    if embedded and recent_restarts < MAX_RESTARTS:
        return Action.RESTART
    return Action.EXIT


class RayRecovery:
    """Watches this server's Ray; when it is lost, says so in the log, requeues the running
    jobs with the reason, and calls `on_lost(action, reason)` with the policy's decision."""

    def __init__(self, queue: JobQueue, *, ray_address: str | None,
                 on_lost: Callable[[Action, str], None], ray_parent: int | None = None):
        """`ray_parent`: the process that started the embedded Ray's GCS and raylet (its
        `ray start`, scheduler/ray_head.py; default: this process, as `ray.init()` does)."""
        self.queue = queue
        self.ray_address = ray_address
        self.ray_parent = ray_parent
        self.on_lost = on_lost
        self._watch: RayWatch | None = None
        self._lock = threading.Lock()  # a loss being handled and a stop never interleave
        self._stopped = False

    @property
    def embedded(self) -> bool:
        return not self.ray_address

    def start(self) -> RayRecovery:
        """Watch the Ray this process is connected to now."""
        check = (processes_exited(embedded_processes(self.ray_parent)) if self.embedded
                 else cluster_unanswered())
        self._watch = RayWatch(check, self._lost).start()
        return self

    def stop(self) -> None:
        """Stop watching (the server stops, and shuts its Ray down itself)."""
        with self._lock:
            self._stopped = True
            if self._watch is not None:
                self._watch.stop()

    def _lost(self, what: str) -> None:
        with self._lock:
            if self._stopped:
                return
            action = decide(self.embedded, len(recent_restarts()))
            where = ("the embedded Ray" if self.embedded
                     else f"the Ray cluster at {self.ray_address}")
            reason = f"{where} was lost ({what})"
            if action is Action.RESTART:
                log.error("%s: restarting the server with a new Ray; running jobs go back to "
                          "the queue and resume from their checkpoints", reason)
            else:
                log.error("%s: exiting with status %d so that a supervisor restarts this "
                          "server; running jobs go back to the queue and resume from their "
                          "checkpoints then", reason, RAY_LOST_EXIT_STATUS)
            self.queue.pause()  # nothing starts on the Ray that is gone
            self.queue.take_back_running("ray_lost", reason)
            self.on_lost(action, reason)


def recent_restarts(now: float | None = None) -> list[float]:
    """The times of this server's restarts in place within RESTART_WINDOW_SECONDS."""
    now = time.time() if now is None else now
    recorded = os.environ.get(RESTARTS_VARIABLE, "")
    times = [float(value) for value in recorded.split(",") if value.strip()]
    return [moment for moment in times if now - moment <= RESTART_WINDOW_SECONDS]


def restart_in_place(stop_ray: Callable[[], None] | None = None) -> None:
    """Start this process again with a new Ray (see the module docstring); does not return.
    Only for a process that is a server and nothing else: `chainrule serve`. `stop_ray`
    stops what is left of a Ray this process started in a session of its own."""
    if stop_ray is not None:
        stop_ray()
    for process in child_processes():  # Ray's processes, the only ones a server starts
        try:
            os.kill(process.pid, signal.SIGKILL)
            os.waitpid(process.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    remove_groups_of_this_process()
    os.environ[RESTARTS_VARIABLE] = ",".join(
        str(moment) for moment in [*recent_restarts(), time.time()])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
