"""What a watcher is sent of a job's events (services/events.py): state changes and recoveries
every one, in order; of progress and validation the newest only, at most one of each per the
watcher's interval by the events' own times, and whatever is held goes out before the state
change it ended on; what is held goes out once the clock has passed its interval, even when no
event follows. Events here are published with made-up times on a clock the test moves (it
stands still unless a test moves it), so nothing waits on the real one but where said.
"""

from __future__ import annotations

import threading
import time

from scheduler.records import RecoveryRecord
from services.events import EventHub, JobEvent
from services.store import ProgressSummary, ValidationSummary
from tests.services.helpers import wait_for

JOB = "job-000000000001"


def progress(step: int, at: float) -> JobEvent:
    return JobEvent(JOB, at, "progress", progress=ProgressSummary(step, 100, 0, 1, 1.0, 1.0, 1.0))


def validation(step: int, at: float) -> JobEvent:
    return JobEvent(JOB, at, "validation", validation=ValidationSummary(step, 0.5, 0.9, 30))


def state(name: str, at: float) -> JobEvent:
    return JobEvent(JOB, at, "state", state=name)


class Clock:
    """The hub's clock, standing before every made-up time until a test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sent(watcher) -> list[tuple[str, float]]:
    """What the watcher has ready now, without waiting: (kind, time) in order."""
    events = []
    while (event := watcher.get(timeout=0)) is not None:
        events.append((event.kind, event.time))
    return events


def test_progress_faster_than_the_interval_is_sent_at_most_once_per_interval_newest_only():
    hub = EventHub(clock=Clock())
    with hub.subscribe(JOB, min_interval=0.25) as watcher:
        hub.publish(progress(1, at=10.0))
        assert sent(watcher) == [("progress", 10.0)]
        hub.publish(progress(2, at=10.1))  # too soon after step 1's: held
        hub.publish(progress(3, at=10.2))  # supersedes step 2, still too soon
        assert sent(watcher) == []
        hub.publish(progress(4, at=10.3))  # 0.3 s after the last one sent
        assert sent(watcher) == [("progress", 10.3)]


def test_validation_is_coalesced_on_its_own_clock_and_recoveries_are_all_sent_in_order():
    hub = EventHub(clock=Clock())
    recovery = RecoveryRecord(step=3, kind="worker_lost", message="worker 0 lost at step 3")
    with hub.subscribe(JOB, min_interval=0.25) as watcher:
        hub.publish(validation(1, at=10.0))
        assert sent(watcher) == [("validation", 10.0)]
        hub.publish(progress(1, at=10.05))  # its own kind: not held back by the validation
        hub.publish(validation(2, at=10.1))  # held: 0.1 s after the last validation sent
        hub.publish(JobEvent(JOB, 10.15, "recovery", recovery=recovery))
        hub.publish(JobEvent(JOB, 10.16, "recovery", recovery=recovery))
        assert sent(watcher) == [("progress", 10.05), ("validation", 10.1),
                                 ("recovery", 10.15), ("recovery", 10.16)]
        hub.publish(validation(3, at=10.3))  # 0.2 s after the one the recovery sent
        assert sent(watcher) == []
        hub.publish(validation(4, at=10.4))
        assert sent(watcher) == [("validation", 10.4)]


def test_a_state_change_comes_after_the_held_progress_and_validation_it_ended_on():
    hub = EventHub(clock=Clock())
    with hub.subscribe(JOB, min_interval=0.25) as watcher:
        hub.publish(progress(1, at=10.0))
        hub.publish(validation(1, at=10.01))
        assert len(sent(watcher)) == 2
        hub.publish(validation(2, at=10.1))
        hub.publish(progress(2, at=10.12))
        hub.publish(state("SUCCEEDED", at=10.13))
        assert sent(watcher) == [("validation", 10.1), ("progress", 10.12),
                                 ("state", 10.13)]


def test_a_waiting_watcher_gets_the_next_event_it_may_send_then_none_when_the_hub_closes():
    hub = EventHub(clock=Clock())
    got: list = []

    def wait_twice() -> None:
        got.append(watcher.get(timeout=60))
        got.append(watcher.get(timeout=60))

    with hub.subscribe(JOB, min_interval=0.25) as watcher:
        hub.publish(progress(1, at=10.0))
        watcher.get(timeout=0)
        waiting = threading.Thread(target=wait_twice)
        waiting.start()
        hub.publish(progress(2, at=10.1))  # held, then superseded
        hub.publish(progress(3, at=10.5))
        wait_for(lambda: got, 60, what="the first event")
        hub.close()
        waiting.join(60)
    assert not waiting.is_alive()
    assert got[0].time == 10.5 and got[1] is None


def test_a_watcher_that_never_reads_holds_one_progress_and_one_validation_whatever_the_job_does():
    hub = EventHub(clock=Clock())
    with hub.subscribe(JOB) as watcher:
        for step in range(1, 10_001):
            hub.publish(progress(step, at=float(step)))
            hub.publish(validation(step, at=step + 0.5))
        assert sent(watcher) == [("progress", 10_000.0), ("validation", 10_000.5)]


def test_a_tenants_watches_share_its_events_a_second_so_more_watches_do_not_mean_more_sends():
    hub = EventHub(tenant_events_per_second=8, clock=Clock())
    crowd = [hub.subscribe(JOB, min_interval=0.25, tenant="a") for _ in range(16)]  # 2 s each
    alone = hub.subscribe(JOB, min_interval=0.25, tenant="b")  # its own 0.25 s
    hub.publish(progress(1, at=10.0))
    assert [sent(watcher) for watcher in crowd + [alone]] == [[("progress", 10.0)]] * 17
    hub.publish(progress(2, at=11.0))
    assert [sent(watcher) for watcher in crowd] == [[]] * 16  # 1 s after the last: too soon
    assert sent(alone) == [("progress", 11.0)]
    hub.publish(progress(3, at=12.0))
    assert [sent(watcher) for watcher in crowd] == [[("progress", 12.0)]] * 16
    for watcher in crowd[8:]:
        watcher.close()
    hub.publish(progress(4, at=13.0))  # 8 watches left: 1 s each
    assert [sent(watcher) for watcher in crowd[:8]] == [[("progress", 13.0)]] * 8


def test_held_progress_goes_out_once_the_clock_passes_its_interval_though_no_event_follows():
    clock = Clock()
    hub = EventHub(clock=clock)
    with hub.subscribe(JOB, min_interval=0.25) as watcher:
        clock.now = 10.0
        hub.publish(progress(1, at=10.0))
        assert sent(watcher) == [("progress", 10.0)]
        hub.publish(progress(2, at=10.1))  # then a long checkpoint: no event for a while
        assert sent(watcher) == []
        clock.now = 10.2
        assert sent(watcher) == []
        clock.now = 10.3  # an interval after the last one sent: still the job's progress now
        assert sent(watcher) == [("progress", 10.3)]
        hub.publish(progress(3, at=10.35))  # counted from when step 2's went out: too soon
        assert sent(watcher) == []


def test_a_waiting_watcher_wakes_when_the_progress_it_holds_falls_due():
    hub = EventHub()  # the real clock: the watcher waits about 0.2 s
    with hub.subscribe(JOB, min_interval=0.2) as watcher:
        now = time.time()
        hub.publish(progress(1, at=now))
        assert watcher.get(timeout=0) is not None
        hub.publish(progress(2, at=now))  # held: due 0.2 s after step 1's went out
        started = time.monotonic()
        event = watcher.get(timeout=60)
    assert event is not None and event.progress is not None and event.progress.step == 2
    assert event.time >= now + 0.2  # an interval after step 1's, as every send is
    assert time.monotonic() - started < 30  # woken when due, not at the timeout
