"""The embedded Ray as a process session of its own, so that training outlives the server.

Measured on Ray 2.60: SIGKILL of a driver that started Ray with `ray.init()` brings down its
GCS, raylet and even detached actors within 8 s. So a server that wants its jobs to survive it
starts Ray with `ray start --head --block` in a new session (its own process group, not killed
with the server) and joins it as a driver; the jobs' runners are detached actors on it
(scheduler/detached_runner.py). A restarted server on the same data folder finds the head in
`<data>/ray/head.json` and joins it again instead of starting another.

The head is this machine's alone, as `ray.init()`'s is (scheduler/ray_cluster.py): every
process listens on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes `ray start` take the
loopback address as the node's), token authentication is on, and the token is a 0600 file in
the data folder (0700), which a restarted server reads. Its temporary folder (sessions, logs,
sockets, `ray_current_cluster`) is its own under /tmp, so nothing joins it by `address="auto"`.

Stopping (`stop`): every process of the head's session is killed by PID, the `ray start`
process first (it would otherwise report the others' deaths); never `ray stop`, which would
stop every Ray of the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.process_table import ProcessStat, all_processes, read_stat

FOLDER_NAME = "ray"  # under the data folder
STATE_NAME = "head.json"
TOKEN_NAME = "auth_token"
LOG_NAME = "head.log"
START_TIMEOUT_SECONDS = 180.0  # `ray start` takes ~6 s alone, far longer on a loaded machine
# The processes whose loss ends a head (the others, log monitor and dashboard agent, are
# Ray's helpers).
ESSENTIAL_PROCESSES = ("gcs_server", "raylet")


class RayHeadFailed(RuntimeError):
    """`ray start` exited or did not come up in time: its log's last lines say why."""


@dataclass(frozen=True)
class RayHead:
    address: str  # "127.0.0.1:PORT", its GCS
    pid: int  # the `ray start --block` process: its session's leader
    start_ticks: str  # with the PID, names that process (PIDs are reused)
    temp_dir: str

    def alive(self) -> bool:
        """Its `ray start` process runs and its GCS takes connections."""
        stat = read_stat(self.pid)
        if stat is None or stat.state in ("Z", "X") or stat.start_ticks != self.start_ticks:
            return False
        host, port = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            return False

    def processes(self) -> list[ProcessStat]:
        """Every live process of its session: Ray's, and the actors' workers."""
        return [stat for stat in all_processes()
                if stat.session == self.pid and stat.state not in ("Z", "X")]


def token_path(data_dir: Path) -> Path:
    return Path(data_dir) / FOLDER_NAME / TOKEN_NAME


def find(data_dir: Path) -> RayHead | None:
    """The head a server on this data folder started, if it still runs."""
    try:
        head = RayHead(**json.loads((Path(data_dir) / FOLDER_NAME / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return head if head.alive() else None


def start(data_dir: Path, num_cpus: int | None = None) -> RayHead:
    """Start a head for this data folder (after `stop_leftovers`), and record it."""
    folder = Path(data_dir) / FOLDER_NAME
    folder.mkdir(mode=0o700, exist_ok=True)
    token = _new_token(folder / TOKEN_NAME)
    temp_dir = tempfile.mkdtemp(prefix="chainrule-head-")  # short: Ray's socket paths
    port = _free_loopback_port()
    environment = {**os.environ, **head_environment(token),
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    environment.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus or os.cpu_count()}", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    with open(folder / LOG_NAME, "w") as output:
        process = subprocess.Popen(command, env=environment, stdout=output,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    stat = read_stat(process.pid)
    assert stat is not None  # our own child, not yet waited for
    head = RayHead(f"127.0.0.1:{port}", process.pid, stat.start_ticks, temp_dir)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    # `ray start` writes the cluster's address into its temp folder once the node is up.
    while not (Path(temp_dir) / "ray_current_cluster").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(head, data_dir)
            log_tail = (folder / LOG_NAME).read_text()[-2000:]
            raise RayHeadFailed(f"`ray start` did not start a Ray head for {data_dir} "
                                f"(its output ends: {log_tail})")
        time.sleep(0.2)
    state = folder / STATE_NAME
    descriptor = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(asdict(head), file)
    return head


def head_environment(token: Path) -> dict[str, str]:
    """What every process joining the head needs in its environment: token auth, the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def stop(head: RayHead, data_dir: Path | None = None) -> None:
    """Kill every process of the head's session, remove its temporary folder, and forget it."""
    _kill_session(head)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    if data_dir is not None:
        (Path(data_dir) / FOLDER_NAME / STATE_NAME).unlink(missing_ok=True)


def stop_leftovers(data_dir: Path) -> None:
    """What remains of a head recorded for this folder that no longer answers (its GCS or
    `ray start` killed): its other processes and its temporary folder."""
    try:
        head = RayHead(**json.loads((Path(data_dir) / FOLDER_NAME / STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return
    stat = read_stat(head.pid)
    if stat is not None and stat.start_ticks != head.start_ticks:  # its PID reused since
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        (Path(data_dir) / FOLDER_NAME / STATE_NAME).unlink(missing_ok=True)
        return
    stop(head, data_dir)


def _kill_session(head: RayHead) -> None:
    stat = read_stat(head.pid)
    if stat is not None and stat.start_ticks == head.start_ticks:
        _kill(head.pid)  # first: it would report the others' deaths, or restart nothing
    victims = head.processes() if stat is None or stat.start_ticks == head.start_ticks else []
    for process in victims:
        _kill(process.pid)
    deadline = time.monotonic() + 10
    while head.processes() and time.monotonic() < deadline:
        try:  # our own child: reap it, or it stays a zombie of this process
            os.waitpid(head.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.waitpid(head.pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _new_token(path: Path) -> Path:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    return path


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
