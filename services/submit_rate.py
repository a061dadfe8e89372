"""How fast a tenant may queue jobs: a token bucket per tenant.

Every SubmitJob and ResumeJob costs the server a spec validation, a database write and a turn
of the scheduler, and a queued job stays in the scheduler's view until it ends. Unbounded, one
tenant submitting spec after spec (3,400 in 30 s in bench/hostile.py) took CPU and the GIL
from every other tenant's calls. So each tenant has a bucket of `burst` submits that refills at
`per_second`: a sweep of a few dozen jobs goes through at once, a loop that submits forever is
held to the rate. A submit over it is refused RESOURCE_EXHAUSTED naming the rate and when to
retry, before the spec is even read, so a refusal costs almost nothing.

The server's default rate (`serve --submit-rate`, `--submit-burst`) applies to every tenant
whose entry in the configuration file (services/server_config.py) gives no `submit_rate` of
its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.auth import TenantSettings
from services.errors import ResourceExhausted

QUOTA = "submit_rate"  # its name in messages and in chainrule_quota_rejections_total


@dataclass(frozen=True)
class SubmitRate:
    per_second: float = 5.0  # submits a second, sustained; math.inf: no limit
    burst: int = 50  # submits at once after a quiet spell (the bucket's size)

    def __post_init__(self) -> None:
        if not self.per_second > 0 or self.burst < 1:
            raise ValueError(f"a submit rate needs per_second > 0 and burst >= 1, got "
                             f"per_second={self.per_second}, burst={self.burst}")

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.per_second)


DEFAULT_SUBMIT_RATE = SubmitRate()
UNLIMITED = SubmitRate(math.inf, 1)


class SubmitRateLimiter:
    """`take(tenant)` before each submit: ResourceExhausted when the tenant's bucket is empty."""

    def __init__(self, default: SubmitRate, tenant_rates: Mapping[str, SubmitRate] | None = None,
                 *, clock: Callable[[], float] = time.monotonic):
        """`tenant_rates`: the tenants whose rate is not `default`."""
        self.default = default
        self.tenant_rates = dict(tenant_rates or {})
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, as of when)

    def rate_of(self, tenant: str) -> SubmitRate:
        return self.tenant_rates.get(tenant, self.default)

    def take(self, tenant: str) -> None:
        rate = self.rate_of(tenant)
        if rate.unlimited:
            return
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(tenant, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - then) * rate.per_second)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return
            self._buckets[tenant] = (tokens, now)
            wait = (1.0 - tokens) / rate.per_second
        raise ResourceExhausted(
            f"{QUOTA}: tenant {tenant!r} may submit {rate.per_second:g} jobs a second (bursts "
            f"of {rate.burst}); retry in {max(round(wait, 2), 0.01):g} s")


def tenant_rates(default: SubmitRate, settings: Mapping[str, TenantSettings]
                 ) -> dict[str, SubmitRate]:
    """The tenants whose configuration gives a rate or a burst of their own, each with its
    rate (what it leaves out: `default`'s)."""
    return {tenant: SubmitRate(own.submit_rate or default.per_second,
                               own.submit_burst or default.burst)
            for tenant, own in settings.items() if own.submit_rate or own.submit_burst}
