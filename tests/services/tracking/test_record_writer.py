"""The trackers' shared writer thread: records in order, a failing one passed on, never a wait."""

from __future__ import annotations

import threading

from services.tracking.record_writer import RecordWriter


def test_records_are_handled_in_order_and_a_failing_one_does_not_stop_the_rest():
    handled: list[str] = []
    failures: list[tuple] = []

    def handle(kind: str, job_id: str, payload: int) -> None:
        if payload == 2:
            raise OSError("disk full")
        handled.append(f"{kind}:{job_id}:{payload}")

    writer = RecordWriter("test", handle, limit=10,
                          on_error=lambda record, error: failures.append((record, str(error))))
    for number in range(4):
        writer.put("step", "job-1", number)
    assert writer.flush()
    assert handled == ["step:job-1:0", "step:job-1:1", "step:job-1:3"]
    assert failures == [(("step", "job-1", 2), "disk full")]
    assert writer.close()


def test_a_stuck_handler_makes_new_records_dropped_and_close_give_up():
    started, release, stopped = threading.Event(), threading.Event(), threading.Event()

    def handle(kind: str, job_id: str, payload: int) -> None:
        started.set()
        release.wait()

    writer = RecordWriter("test", handle, limit=3, on_error=lambda record, error: None,
                          on_stop=stopped.set)
    writer.put("step", "job-1", 0)
    assert started.wait(5)  # record 0 is being handled: the queue is empty again
    for number in range(1, 10):  # three queued, the rest dropped, and no wait
        writer.put("step", "job-1", number)
    assert writer.dropped == 6
    assert writer.close(timeout=0.2) is False  # gives up rather than hold a server's stop
    release.set()
    assert writer.close(timeout=5) and stopped.is_set()
