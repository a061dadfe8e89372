"""A RUNNING job's lease: who runs it (the runner's owner id) and until when, kept in the store,
so that a job whose runner is gone or wedged does not stay RUNNING for ever.

The runner's side renews it as it makes progress (at step boundaries, at most every
`renew_every` seconds: one store write per several seconds, not per 1 ms step); the queue's
side looks for leases that ran out (`JobQueue`'s lease check) and requeues those jobs from
their checkpoints, with the reason. A lease is long enough to cover the longest wait a runner
bounds itself: the first lease covers its set-up (placement, starting actors), later ones a
step's deadline (120 s for a run's first steps; the adaptive deadline after them).

The owner id names one run of one job in one process ("host:pid:random/run"): a run whose
lease was taken from it cannot renew the next run's.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from dataclasses import dataclass

DEFAULT_LEASE_SECONDS = 150.0  # above a run's 120 s start-up step deadline
RUNNER_STARTUP_SECONDS = 120.0  # JobRunner's default bound on starting its actors


@dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: float  # time.time(): the store is shared with other processes


@dataclass(frozen=True)
class LeaseTerms:
    """How long leases last: `seconds` once a run steps, `startup_seconds` from its start to
    its first step (its set-up has no step boundary to renew at)."""

    seconds: float = DEFAULT_LEASE_SECONDS
    startup_seconds: float = DEFAULT_LEASE_SECONDS + RUNNER_STARTUP_SECONDS

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.startup_seconds <= 0:
            raise ValueError(f"lease seconds must be > 0, got {self.seconds} and "
                             f"{self.startup_seconds}")

    @property
    def renew_every(self) -> float:
        """Renewing at a quarter of the lease leaves three renewals' slack."""
        return self.seconds / 4

    @property
    def check_every(self) -> float:
        """How often the queue looks for expired leases."""
        return min(self.seconds / 4, 5.0)


class LeaseOwners:
    """Owner ids for the runs of one process: "host:pid:random/n"."""

    def __init__(self) -> None:
        self.prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runs = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}/{next(self._runs)}"


def lease_until(seconds: float, owner: str) -> Lease:
    return Lease(owner, time.time() + seconds)
