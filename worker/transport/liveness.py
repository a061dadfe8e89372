"""Whether the actors a runner waits on still live, known in seconds, whatever the step time.

Across hosts (the direct and object-store transports) a lost node shows to the runner only as
calls that never come back: Ray itself declares the node dead after its heartbeat (~15 s), and
the step's own deadline (scheduler/step_deadline.py) grows with the step time, so a job of
minute-long steps would wait minutes. So while the runner waits on actors' calls it asks each
of them, every `interval_seconds`, a heartbeat; one that has not answered within
`timeout_seconds` (its process stopped, its node gone) is reported lost. A fast step never
sends one: pings start only once a wait has lasted `interval_seconds`.

Heartbeats run in their own concurrency group (LIVENESS_GROUP, one thread), so an actor busy
with long blocks, or with two blocks queued on its model's lock, still answers at once.

A host whose raylet dies is a case of its own: Ray's worker processes are its children, and
they outlive it, reparented, answering calls (heartbeats too) until Ray's health check declares
the node dead (measured on Ray 2.60: ~15 s; a call that needs the dead node's object store
hangs meanwhile). So the heartbeat also asks the process table whether the raylet that started
the actor's process is still its parent (raylet_watch.py): a heartbeat that says no is a lost
actor at once, found by this check and named as such. A raylet that died with its workers (as
`ray start --block` ends them) leaves nobody to answer: then a heartbeat late by
PROBE_AFTER_SECONDS has the actor's raylet port probed (Liveness.raylet_of), and a refused
connection (nothing listens there: the host answered) is a lost actor at once too.

Calls made between steps (a checkpoint's optimizer state, the parameters synced before an
evaluation or pushed after a restore) are waited on the same way (Liveness.answers): a shard
stopped or cut off during a checkpoint is found in seconds, not at the calls' deadline.

This is mechanism only: the caller reports the unanswered actors as lost to the failure policy
(scheduler/failure_policy.py), which decides what that costs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from worker.transport.raylet_watch import RayletGone
from worker.transport.step import ActorFailure, ShardLost, StepFailure

LIVENESS_GROUP = "liveness"
# Ray's concurrency groups of an actor class that answers heartbeats (ray.remote's argument).
CONCURRENCY_GROUPS = {LIVENESS_GROUP: 1}
HEARTBEAT_INTERVAL_SECONDS = 0.5  # from an answer (or the wait's start) to the next question
HEARTBEAT_TIMEOUT_SECONDS = 2.0  # unanswered this long: lost. Loss to report: < 3 s.
POLL_SECONDS = 0.1  # how often a wait looks at its pings
PROBE_AFTER_SECONDS = 0.25  # a heartbeat outstanding this long: is its raylet still listening?

Key = TypeVar("Key", bound=Hashable)  # what names an actor: a worker slot, a shard index


def ask_heartbeat(actor) -> ray.ObjectRef:
    """One heartbeat call to `actor` (a replica or shard: both define heartbeat())."""
    return actor.heartbeat.options(concurrency_group=LIVENESS_GROUP).remote()


@dataclass(frozen=True)
class WaitResult:
    ready: list[ray.ObjectRef]  # the awaited refs that are ready (a value or an error)
    # Keys of the actors that missed their heartbeat (or whose heartbeat failed: the actor
    # is gone). Empty with refs not ready: the wait's own deadline ended it.
    unanswered: frozenset
    # Those of `unanswered` whose raylet is gone: their heartbeat said so (raylet_watch.py), or
    # their raylet's port refused a connection.
    raylet_gone: frozenset = frozenset()


@dataclass(frozen=True)
class Settled:
    """Liveness.settle: how each call came out, by its actor's key."""

    ready: dict  # key -> the call's ref, ready (a value or an error)
    unanswered: frozenset  # missed a heartbeat: given up on
    raylet_gone: frozenset  # those of `unanswered` whose raylet is gone
    silent: frozenset  # still out at the deadline


class ActorsLost(Exception):
    """Liveness.answers: actors (by key) whose calls will not answer. `died`: the call says its
    actor is dead (or its returned object is lost); `unanswered`: the actor missed a heartbeat,
    `raylet_gone` those of them whose raylet is gone; `silent`: the call was still running
    when the deadline passed."""

    def __init__(self, died: frozenset, unanswered: frozenset, raylet_gone: frozenset,
                 silent: frozenset):
        self.died, self.unanswered = died, unanswered
        self.raylet_gone, self.silent = raylet_gone, silent
        self.actors = died | unanswered | silent
        super().__init__("; ".join(f"{key!r}: {self.why(key)}" for key in self.actors))

    def why(self, key) -> str:
        """How actor `key` was found lost, for a message."""
        if key in self.raylet_gone:
            return "its raylet is gone, found by its heartbeat"
        if key in self.unanswered:
            return "no answer to its heartbeat: its node or process is gone or stopped"
        if key in self.silent:
            return "silent past the deadline"
        return "its process died"


@dataclass(frozen=True)
class Liveness:
    interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS
    timeout_seconds: float = HEARTBEAT_TIMEOUT_SECONDS
    # Where the raylet an actor runs under listens (address, port), when known: a heartbeat
    # outstanding for probe_after_seconds has that port probed once; a refused connection
    # means no raylet listens there any more, and the actor is lost at once (a node whose
    # raylet died with its workers, as `ray start --block` ends them, answers nothing: without
    # the probe it is found at the heartbeat's timeout, or by Ray's report, whichever first).
    raylet_of: Callable[[object], tuple[str, int] | None] | None = None
    probe_after_seconds: float = PROBE_AFTER_SECONDS

    def wait(self, awaited: Mapping[Key, Sequence[ray.ObjectRef]], actors: Mapping[Key, object],
             deadline_seconds: float, watching: Mapping[Any, object] | None = None
             ) -> WaitResult:
        """Wait until every ref of `awaited` (actor key -> the refs its calls return) is ready,
        an actor of `actors` (same keys) misses a heartbeat, or `deadline_seconds` pass.
        Refs of several actors are waited on together; the result says which are ready.
        `watching` (key -> actor; keys apart from awaited's): actors the wait does not wait
        for but sends heartbeats to all along, e.g. peers the awaited calls depend on."""
        watching = watching or {}
        everyone: dict[Any, object] = {**actors, **watching}
        refs = [ref for owned in awaited.values() for ref in owned]
        start = time.monotonic()
        end = start + deadline_seconds
        ready, _ = ray.wait(refs, num_returns=len(refs),
                            timeout=min(self.interval_seconds, deadline_seconds))
        done = set(ready)
        pings: dict[Any, tuple[ray.ObjectRef, float]] = {}  # key -> (ping, sent at)
        next_ping: dict[Any, float] = {}
        probed: set[ray.ObjectRef] = set()  # pings whose actor's raylet port was probed
        while len(done) < len(refs):
            now = time.monotonic()
            if now >= end:
                break
            waiting_on = [key for key, owned in awaited.items()
                          if any(ref not in done for ref in owned)] + list(watching)
            for key in waiting_on:
                if key not in pings and now >= next_ping.get(key, start):
                    pings[key] = (ask_heartbeat(everyone[key]), now)
            unanswered = frozenset(key for key, (_, sent) in pings.items()
                                   if now - sent > self.timeout_seconds)
            if unanswered:
                return WaitResult([ref for ref in refs if ref in done], unanswered)
            refusing = frozenset(self._raylets_refusing(pings, everyone, probed, now))
            if refusing:
                return WaitResult([ref for ref in refs if ref in done], refusing, refusing)
            pending = [ref for ref in refs if ref not in done]
            ping_refs = [ping for ping, _ in pings.values()]
            ready, _ = ray.wait(pending + ping_refs, num_returns=len(pending) + len(ping_refs),
                                timeout=min(POLL_SECONDS, max(0.0, end - now)))
            answered = set(ready)
            done |= answered.intersection(pending)
            failed, raylet_gone = set(), set()
            for key, (ping, _) in list(pings.items()):
                if ping not in answered:
                    continue
                del pings[key]
                try:
                    ray.get(ping)
                except ray.exceptions.RayError as error:  # the actor or its raylet is gone
                    failed.add(key)
                    if isinstance(getattr(error, "cause", None), RayletGone):
                        raylet_gone.add(key)
                next_ping[key] = time.monotonic() + self.interval_seconds
            if failed:
                return WaitResult([ref for ref in refs if ref in done], frozenset(failed),
                                  frozenset(raylet_gone))
        return WaitResult([ref for ref in refs if ref in done], frozenset())

    def settle(self, calls: Mapping[Key, ray.ObjectRef], actors: Mapping[Key, object],
               deadline_seconds: float, watching: Mapping[Any, object] | None = None
               ) -> Settled:
        """Wait until every one of `calls` (actor key -> one call's ref, or an object that call
        returned) is ready, with heartbeats to `actors` (same keys): an actor that misses one
        is given up on while the wait goes on for the others, and the calls still out when
        `deadline_seconds` pass are given up on too. The result says which is which.
        `watching` (as for `wait`): actors the calls depend on; one that misses a heartbeat
        (then in `unanswered`) ends the wait, and the calls still out are in none of the
        result's sets."""
        watching = watching or {}
        pending = dict(calls)
        ready: dict[Any, ray.ObjectRef] = {}
        unanswered: set = set()
        raylet_gone: set = set()
        end = time.monotonic() + deadline_seconds
        while pending:
            waited = self.wait({key: [ref] for key, ref in pending.items()},
                               {key: actors[key] for key in pending},
                               max(0.0, end - time.monotonic()), watching)
            for key, ref in list(pending.items()):
                if ref in waited.ready:
                    ready[key] = pending.pop(key)
            # A heartbeat late after its actor's call answered loses nobody.
            lost = waited.unanswered & (pending.keys() | watching.keys())
            for key in lost & pending.keys():
                del pending[key]
            unanswered |= lost
            raylet_gone |= waited.raylet_gone & lost
            if lost & watching.keys():
                return Settled(ready, frozenset(unanswered), frozenset(raylet_gone),
                               frozenset())
            if pending and not waited.unanswered:  # the deadline passed
                break
        return Settled(ready, frozenset(unanswered), frozenset(raylet_gone),
                       frozenset(pending))

    def answers(self, calls: Mapping[Key, ray.ObjectRef], actors: Mapping[Key, object],
                deadline_seconds: float, watching: Mapping[Any, object] | None = None
                ) -> list:
        """The value of each of `calls` (as for settle), in the mapping's order. ActorsLost
        names the actors whose calls will not answer: dead, missing a heartbeat (found in
        seconds), or silent past `deadline_seconds`. An error the call itself raised
        (RayTaskError: the job's own code) is raised as it is. `watching`: as for `settle` (a
        watched actor lost is in ActorsLost)."""
        settled = self.settle(calls, actors, deadline_seconds, watching)
        values: dict[Any, Any] = {}
        died = set()
        for key, ref in settled.ready.items():
            try:
                values[key] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                died.add(key)
        if died or settled.unanswered or settled.silent:
            raise ActorsLost(frozenset(died), settled.unanswered, settled.raylet_gone,
                             settled.silent)
        return [values[key] for key in calls]

    def answers_or_failure(self, calls: Mapping[Key, ray.ObjectRef], actors: Mapping[Key, object],
                           deadline_seconds: float,
                           failure: Callable[[ActorsLost], StepFailure],
                           watching: Mapping[Any, object] | None = None) -> list:
        """`answers`, for calls made between steps: lost actors are raised as
        ActorFailure(failure(lost)), what the runner hands its failure policy (a raw
        ActorsLost or Ray error would end the job as failed rather than restart it). The
        caller's `failure` says what the loss costs (shard_lost, ErrorFeedbackLost, ...)."""
        try:
            return self.answers(calls, actors, deadline_seconds, watching)
        except ActorsLost as gone:
            raise ActorFailure(failure(gone)) from gone

    def _raylets_refusing(self, pings: Mapping[Any, tuple[ray.ObjectRef, float]],
                          actors: Mapping[Any, object], probed: set[ray.ObjectRef],
                          now: float) -> list:
        """Keys of the actors whose heartbeat has been outstanding probe_after_seconds and
        whose raylet's port refuses a connection (each ping's actor probed once)."""
        if self.raylet_of is None:
            return []
        refusing = []
        for key, (ping, sent) in pings.items():
            if ping in probed or now - sent < self.probe_after_seconds:
                continue
            probed.add(ping)
            endpoint = self.raylet_of(actors[key])
            if endpoint is not None and refuses_connections(*endpoint):
                refusing.append(key)
        return refusing


def shard_lost(when: str) -> Callable[[ActorsLost], ShardLost]:
    """`answers_or_failure`'s `failure` for calls to shards (keyed by index): the lowest lost
    shard, with how it was found, e.g. ShardLost(1, "while loading parameters (its process
    died)")."""
    def lost(gone: ActorsLost) -> ShardLost:
        shard = min(gone.actors)
        return ShardLost(shard, f"{when} ({gone.why(shard)})")
    return lost


def refuses_connections(address: str, port: int, timeout_seconds: float = 0.2) -> bool:
    """Whether a TCP connection to (address, port) is refused: nothing listens there (the
    host answered). A host that does not answer in time, or any other error, is no answer:
    False, for the heartbeat's timeout to decide."""
    try:
        with socket.create_connection((address, port), timeout=timeout_seconds):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
