"""How a lost Ray is found: an embedded instance's processes exiting, or a cluster's GCS
failing or not answering in time. Real processes and threads; the cluster's call is a
stand-in (a hung or failing GCS costs a cluster per test)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from scheduler.ray_liveness import (
    RayWatch,
    child_processes,
    cluster_unanswered,
    processes_exited,
)


def test_a_killed_child_process_is_reported_by_name_and_pid_within_the_interval():
    child = subprocess.Popen(["sleep", "30"])
    try:
        watched = [p for p in child_processes() if p.pid == child.pid]
        assert [p.name for p in watched] == ["sleep"]
        check = processes_exited(watched)
        assert check() is None
        lost: list[tuple[float, str]] = []
        watch = RayWatch(check, lambda what: lost.append((time.monotonic(), what)),
                         interval=0.05).start()
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.wait()  # reaped: gone from /proc, as an exited zombie would be reported too
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.01)
        watch.stop()
        assert len(lost) == 1 and lost[0][1] == f"its sleep (pid {child.pid}) exited"
        assert lost[0][0] - killed < 1.0
    finally:
        child.kill()
        child.wait()


def test_a_zombie_counts_as_exited():
    child = subprocess.Popen(["sleep", "30"])
    check = processes_exited([p for p in child_processes() if p.pid == child.pid])
    os.kill(child.pid, signal.SIGKILL)
    # Until it has exited, and left unreaped: a zombie (a sleep of 0.2 s instead could end
    # before a loaded machine had delivered the kill).
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert check() == f"its sleep (pid {child.pid}) exited"
    child.wait()


def test_a_gcs_that_does_not_answer_in_time_is_reported_once_the_timeout_has_passed():
    hung = threading.Event()
    check = cluster_unanswered(timeout=0.3, call=hung.wait)
    started = time.monotonic()
    answers = []
    # Checked as RayWatch does, until it answers: twice, ~0.6 s on a quiet machine (a loaded
    # one can stall this thread for a second: no upper bound but "it answers").
    while time.monotonic() - started < 60:
        answers.append(check())
        if answers[-1] is not None:
            break
    assert answers[-1] is not None and answers[-1].startswith("its GCS did not answer for")
    assert all(answer is None for answer in answers[:-1])
    assert time.monotonic() - started >= 0.3  # not before the timeout
    hung.set()


def test_a_gcs_call_that_fails_is_reported_and_one_that_answers_is_not():
    def refused():
        raise ConnectionError("connection refused")

    assert cluster_unanswered(call=refused)() == \
        "its GCS failed a call (ConnectionError: connection refused)"
    assert cluster_unanswered(call=lambda: [])() is None


def test_every_process_that_exited_is_named_so_the_first_to_go_always_is():
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    pids = {child.pid for child in children}
    check = processes_exited([p for p in child_processes() if p.pid in pids])
    for child in children:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert check() == (f"its sleep (pid {children[0].pid}), sleep (pid {children[1].pid}) "
                       f"exited")
