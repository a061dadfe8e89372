"""A job's log for GetJobLogs and `chainrule logs`: its stored events as lines for a person.

The store keeps every event of a job durably (services/store.py: state changes, evaluations,
resumes, corrupt checkpoints, warnings, a failure's traceback), so the log survives a server
restart and is the same for every reader. Following polls the store (each poll one indexed
query), which sees events written by any thread without a second fan-out to keep in step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from scheduler.job_states import TERMINAL_STATES
from services.jobs import JobService
from services.store import EventRecord

FOLLOW_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class LogLine:
    time: float
    kind: str
    message: str


def job_log(service: JobService, tenant: str, job_id: str, follow: bool = False,
            is_active: Callable[[], bool] = lambda: True,
            stopped: threading.Event | None = None) -> Iterator[LogLine]:
    """The job's log lines, oldest first; with `follow`, then new ones until the job ends
    (or the caller goes away: `is_active`)."""
    service.get(tenant, job_id)  # NOT_FOUND for another tenant's job, before any line
    wait = stopped or threading.Event()
    last_seq = 0
    while True:
        job = service.store.get_job(job_id, tenant)
        ended = job is None or job.state in TERMINAL_STATES
        for event in service.store.events(job_id):
            if event.seq > last_seq:
                last_seq = event.seq
                yield LogLine(event.time, event.kind, describe(event))
        if not follow or ended or not is_active():
            return
        if wait.wait(FOLLOW_POLL_SECONDS):
            return


def job_events(service: JobService, tenant: str, job_id: str) -> list[EventRecord]:
    """The job's stored events, oldest first, as they are (the web UI draws its validation
    curves from their figures); NOT_FOUND for another tenant's job."""
    service.get(tenant, job_id)
    return service.store.events(job_id)


def describe(event: EventRecord) -> str:
    payload = event.payload
    if event.kind == "state":
        error = payload.get("error") or ""
        return f"{payload.get('state', '')}" + (f": {error}" if error else "")
    if event.kind == "validation":
        accuracy = payload.get("accuracy")
        return (f"validation at step {payload.get('step')}: loss {payload.get('loss'):.6g}"
                + (f", accuracy {accuracy:.4f}" if accuracy is not None else "")
                + f" ({payload.get('samples')} samples)")
    if event.kind == "resumed":
        return f"resumed from the checkpoint of step {payload.get('step')}"
    if event.kind == "checkpoint_corrupt":
        return (f"corrupt checkpoint {payload.get('file', '')} set aside as "
                f"{payload.get('set_aside_as', '')}: {payload.get('reason', '')}")
    if event.kind == "traceback":
        return payload.get("text", "")
    if "message" in payload:
        return str(payload["message"])
    return ", ".join(f"{key}={value}" for key, value in sorted(payload.items()))
