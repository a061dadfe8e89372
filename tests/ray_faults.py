"""Faults that land where a test means them to, however slow the machine: `ray.kill` only asks
Ray to kill an actor (it dies some milliseconds later, or a second later on a loaded machine,
by which time a job of 2 ms steps is several steps on, or between steps in an evaluation),
and a replacement replica joins whenever its process has started (seconds, many more on a
loaded machine). A test waits for both instead of guessing how long they take."""

from __future__ import annotations

import os
import time

import ray

from scheduler.worker_group import WorkerGroup


def kill_and_wait_until_dead(actor, timeout: float = 120.0) -> None:
    """`ray.kill(actor)`, returning once its process has exited: whatever it was asked to do
    next finds it gone. (Ray's actor table says DEAD before the process has gone: a worker
    was seen to compute two more 2 ms steps after that.)"""
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=timeout)
    ray.kill(actor)
    deadline = time.monotonic() + timeout
    while not process_exited(pid):
        assert time.monotonic() < deadline, f"actor process {pid} still running {timeout} s on"
        time.sleep(0.01)


def process_exited(pid: int) -> bool:
    """Gone from the process table, or a zombie its parent (the raylet) has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_for_replacements(group: WorkerGroup, timeout: float = 300.0) -> None:
    """Until every replacement replica the group is starting is ready (or has failed to
    start): it then joins at the next step boundary, however long its process took."""
    starting = list(group.starting.values())
    if starting:
        ready, _ = ray.wait(starting, num_returns=len(starting), timeout=timeout)
        assert len(ready) == len(starting), f"replacements not ready {timeout} s on"
