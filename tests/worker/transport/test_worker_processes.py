"""Ending a lost shared-memory worker's process (worker/transport/worker_processes.py), on real
child processes: killed and waited for, stopped or not; a process that took a recorded id is
never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from worker.transport.worker_processes import (
    PROCESS_FIELDS,
    CannotFence,
    actor_process_identity,
    end_worker_process,
    pid_namespace,
    process_identity,
    why_not_fenceable,
)


@pytest.fixture
def child() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def table_of(*rows: tuple[int, int, int] | None) -> np.ndarray:
    table = np.zeros((len(rows), PROCESS_FIELDS), np.int64)
    for w, row in enumerate(rows):
        table[w] = row or (0, 0, 0)
    return table


def test_a_recorded_process_is_killed_and_has_exited_on_return(child):
    end_worker_process(table_of(process_identity(child.pid)), 0, 60.0)
    assert child.poll() == -signal.SIGKILL  # exited already: a zombie until now


def test_a_stopped_process_is_ended_at_once(child):
    child.send_signal(signal.SIGSTOP)
    end_worker_process(table_of(process_identity(child.pid)), 0, 60.0)
    assert child.poll() == -signal.SIGKILL


def test_a_process_that_took_a_recorded_id_is_left_alone(child):
    identity = process_identity(child.pid)
    assert identity is not None
    pid, start, namespace = identity
    # The recorded worker started at another time: the process now at its id is not it.
    end_worker_process(table_of((pid, start - 1, namespace)), 0, 60.0)
    assert child.poll() is None


def test_a_slot_with_no_process_recorded_or_one_gone_is_ended_already(child):
    child.kill()
    child.wait()
    end_worker_process(table_of(None), 0, 60.0)  # returns: nothing to end
    end_worker_process(table_of((child.pid, 1, pid_namespace())), 0, 60.0)


def test_pidfds_work_here_and_an_actor_records_its_own_process():
    assert why_not_fenceable() is None
    assert actor_process_identity(object()) == process_identity(os.getpid())


def test_a_process_of_another_pid_namespace_cannot_be_fenced_and_is_left_alone(child):
    identity = process_identity(child.pid)
    assert identity is not None
    pid, start, namespace = identity
    foreign = (pid, start, namespace + 1)  # its id means another process here, or none
    assert "another PID namespace" in (why_not_fenceable(foreign) or "")
    with pytest.raises(CannotFence, match="cannot end worker 0's process: worker process "
                                          f"{pid} is in another PID namespace"):
        end_worker_process(table_of(foreign), 0, 60.0)
    assert child.poll() is None
