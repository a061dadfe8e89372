"""A heartbeat knows when the raylet that started its actor's process has died: Ray's workers
are the raylet's children and outlive it (reparented, answering calls until Ray's health check
declares the node dead), so the heartbeat asks the process table (worker/transport/
raylet_watch.py, asked by the heartbeats of liveness.py).

Here with real processes and no Ray: a parent that names itself "raylet", as Ray's does, and a
child that watches it, killed with a real SIGKILL. And when the raylet's workers died with it,
nobody answers: the runner then probes the raylet's port, which a dead raylet leaves refusing
connections (liveness.refuses_connections), with real sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

# The child answers each line on its stdin with whether its watch says the raylet lives.
CHILD = textwrap.dedent("""
    import sys
    from worker.transport.raylet_watch import RayletGone, RayletWatch
    watch = RayletWatch()
    print("watching" if watch.raylet is not None else "not a raylet's child", flush=True)
    for _ in sys.stdin:
        try:
            watch.check()
            print("alive", flush=True)
        except RayletGone as gone:
            print(f"gone: {gone}", flush=True)
""")

# The parent takes the name `name` (as /proc/PID/comm shows it), starts the child with its
# stdin and stdout, tells its own pid, then sleeps until it is killed.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    with open("/proc/self/comm", "w") as comm:
        comm.write(sys.argv[1])
    subprocess.Popen([sys.executable, "-c", sys.argv[2]])
    time.sleep(600)
""")


@pytest.fixture
def watched():
    """Start a parent with a given name and its watching child; yield (parent, ask)."""
    started: list[subprocess.Popen] = []

    def start(name: str):
        parent = subprocess.Popen([sys.executable, "-c", PARENT, name, CHILD],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
        started.append(parent)
        assert parent.stdin is not None and parent.stdout is not None
        first = parent.stdout.readline().strip()

        def ask() -> str:
            parent.stdin.write("?\n")
            parent.stdin.flush()
            return parent.stdout.readline().strip()

        return parent, first, ask

    yield start
    for parent in started:
        parent.kill()
        parent.wait()
        assert parent.stdin is not None
        parent.stdin.close()  # the child reads its end of file and exits


def test_a_heartbeat_says_its_raylet_died_once_the_raylet_is_sigkilled(watched):
    raylet, first, ask = watched("raylet")
    assert first == "watching"
    assert ask() == "alive"
    os.kill(raylet.pid, signal.SIGKILL)
    raylet.wait()
    # Reparenting is done by the kernel as the parent exits: the next answer already knows.
    assert ask() == f"gone: its raylet (process {raylet.pid} on {os.uname().nodename}) has died"


def test_a_process_not_started_by_a_raylet_is_never_reported(watched):
    other, first, ask = watched("python-parent")
    assert first == "not a raylet's child"
    os.kill(other.pid, signal.SIGKILL)
    other.wait()
    assert ask() == "alive"


# --- a raylet that died with its workers: its port refuses connections ------------------------


def test_a_port_nobody_listens_on_refuses_connections_and_a_listening_one_does_not():
    from worker.transport.liveness import refuses_connections

    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        assert not refuses_connections("127.0.0.1", port)
    # Closed now: the kernel answers with a reset, as for a raylet that has died.
    assert refuses_connections("127.0.0.1", port)

