"""Whether the Ray this process trains on is still there, found in seconds.

Ray 2.60's own reaction is slow and silent: a driver whose raylet is SIGKILLed exits about 13 s
later, one whose GCS server is killed about 62 s later, without a line of its own, and its
calls meanwhile wait (RAY-NOTES.md). A watch here looks every `interval` seconds and reports
the loss once, with what was lost; what to do about it is the caller's (services/ray_recovery.py).

Two ways to look:
  - embedded Ray: the GCS server and the raylet that `ray.init` started are children of this
    process; each look reads their /proc entries (dead, a zombie, or its PID reused is gone);
  - a cluster joined by address: the GCS must answer a call (`ray.nodes()`) within a timeout,
    asked from a helper thread, so a call that hangs is an answer too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from scheduler.process_table import all_processes, read_stat

log = logging.getLogger(__name__)

# The processes of an embedded instance whose loss ends it (the others, log monitor and
# dashboard, are Ray's helpers).
ESSENTIAL_PROCESSES = ("gcs_server", "raylet")
WATCH_INTERVAL_SECONDS = 0.5
CLUSTER_PROBE_TIMEOUT_SECONDS = 4.0

# A check answers None while Ray is there, else what was lost ("raylet (pid 123) exited").
Check = Callable[[], "str | None"]


@dataclass(frozen=True)
class RayProcess:
    name: str
    pid: int
    start_ticks: str  # with the PID, names one process (PIDs are reused)

    def gone(self) -> bool:
        stat = read_stat(self.pid)
        return stat is None or stat.state in ("Z", "X") or stat.start_ticks != self.start_ticks


def embedded_processes(parent: int | None = None) -> list[RayProcess]:
    """The GCS server and raylet that `parent` (default: this process) started, as
    `ray.init(address="local")` does; [] when it started none (Ray joined by address)."""
    return [process for process in child_processes(parent)
            if process.name in ESSENTIAL_PROCESSES]


def child_processes(parent: int | None = None) -> list[RayProcess]:
    """Every live process whose parent is `parent` (default: this process), by name."""
    parent = os.getpid() if parent is None else parent
    found = [RayProcess(stat.name, stat.pid, stat.start_ticks) for stat in all_processes()
             if stat.parent == parent and stat.state not in ("Z", "X")]
    return sorted(found, key=lambda process: process.name)


def processes_exited(processes: list[RayProcess]) -> Check:
    """A check that names every one of `processes` that has exited. Every one: the loss of
    one takes the others down within moments (`ray start --block` ends its session), and the
    one that went first must be among those named, whichever the check finds first."""
    if not processes:
        raise ValueError("no Ray processes to watch: was Ray started by this process?")

    def check() -> str | None:
        gone = [f"{process.name} (pid {process.pid})" for process in processes
                if process.gone()]
        return f"its {', '.join(gone)} exited" if gone else None

    return check


def cluster_unanswered(timeout: float = CLUSTER_PROBE_TIMEOUT_SECONDS,
                       call: Callable[[], object] = ray.nodes) -> Check:
    """A check that names a GCS that failed or did not answer `call` (a GCS call) within
    `timeout`. One call at a time: a call still waiting is not made again, it is waited for."""
    answered = threading.Event()
    probe = _Probe()

    def ask() -> None:
        try:
            call()
        except Exception as error:  # any failure to answer is an answer
            probe.error = f"{type(error).__name__}: {error}"
        answered.set()

    def check() -> str | None:
        if probe.asked_at is None:
            answered.clear()
            probe.asked_at, probe.error = time.monotonic(), None
            threading.Thread(target=ask, name="ray-probe", daemon=True).start()
        if answered.wait(min(timeout, WATCH_INTERVAL_SECONDS)):
            probe.asked_at = None
            return None if probe.error is None else f"its GCS failed a call ({probe.error})"
        waited = time.monotonic() - probe.asked_at
        if waited >= timeout:
            return f"its GCS did not answer for {waited:.1f} s"
        return None

    return check


@dataclass
class _Probe:
    asked_at: float | None = None  # time.monotonic() of the call waited for; None: none
    error: str | None = None


class RayWatch:
    """Runs `check` every `interval` seconds on a daemon thread and calls `on_lost(what)` once,
    from that thread, when it reports a loss; then it stops."""

    def __init__(self, check: Check, on_lost: Callable[[str], None],
                 interval: float = WATCH_INTERVAL_SECONDS):
        self.check, self.on_lost, self.interval = check, on_lost, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ray-watch", daemon=True)

    def start(self) -> RayWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                lost = self.check()
            except Exception:  # a bug in a check must not pass for a loss, nor end the watch
                log.exception("checking Ray failed")
                continue
            if lost is not None and not self._stopped.is_set():
                self.on_lost(lost)
                return
