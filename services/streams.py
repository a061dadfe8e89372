"""How many streaming calls a tenant, and the server, may hold open at once.

gRPC's sync server runs every call on a thread of one pool, and a streaming call holds its
thread for as long as it lasts: a WatchJob for a job's whole run, an upload while its chunks
trickle in, a reflection stream until its client closes it. Unbounded, one tenant's 64 watch
streams took every thread, and other tenants' calls and the health check timed out. So every
streaming call takes a slot first: at most `per_tenant` per tenant and `total` in all, with
`total` below the pool's size, so unary calls (GetJob, ListJobs, SubmitJob, the health check)
always find a thread. A tenant's own quota (`max_streams` in the configuration file) replaces
`per_tenant` for it. A call over a limit gets RESOURCE_EXHAUSTED naming the limit, at once.

The tenant is the one the call's token names; calls without a valid token share one slot
budget (they are refused by the service itself, but reflection asks for no token). The health
service's Watch is not counted: it runs without a thread of its own (non-blocking).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health

from services.auth import Authenticator
from services.errors import ResourceExhausted, Unauthenticated

UNAUTHENTICATED = "(no valid token)"  # the slot budget of callers without a tenant
# Streams that hold no RPC thread: not counted.
UNCOUNTED_METHODS = frozenset({f"/{health.SERVICE_NAME}/Watch"})


@dataclass(frozen=True)
class StreamLimits:
    per_tenant: int = 8
    total: int = 32  # must stay below the server's RPC threads (serve checks)

    def __post_init__(self):
        if not 1 <= self.per_tenant <= self.total:
            raise ValueError(f"stream limits need 1 <= per_tenant <= total, got "
                             f"per_tenant={self.per_tenant}, total={self.total}")


class StreamSlots:
    """The open streams, by tenant: `acquire` a slot before a stream, `release` it after."""

    def __init__(self, limits: StreamLimits, tenant_quotas: Mapping[str, int] | None = None,
                 on_quota_rejection: Callable[[str, str], None] = lambda tenant, quota: None):
        """`tenant_quotas`: the tenants whose streams quota is not `limits.per_tenant`;
        `on_quota_rejection(tenant, "max_streams")` is told of each stream refused for one."""
        self.limits = limits
        self.tenant_quotas = dict(tenant_quotas or {})
        self.on_quota_rejection = on_quota_rejection
        self._lock = threading.Lock()
        self._held: Counter[str] = Counter()
        self._total = 0

    def acquire(self, tenant: str) -> None:
        """Take a slot, or ResourceExhausted naming the limit that is reached."""
        with self._lock:
            if self._total >= self.limits.total:
                raise ResourceExhausted(
                    f"streams: the server has {self._total} streams open, its limit in total "
                    f"(StreamLimits.total); retry later")
            quota = self.tenant_quotas.get(tenant)
            if quota is not None and self._held[tenant] >= quota:
                self.on_quota_rejection(tenant, "max_streams")
                raise ResourceExhausted(
                    f"max_streams: tenant {tenant!r} has {self._held[tenant]} streams open, its "
                    f"quota; close one first (WatchJob, GetJobLogs with follow, uploads and "
                    f"downloads all count)")
            if quota is None and self._held[tenant] >= self.limits.per_tenant:
                raise ResourceExhausted(
                    f"streams: tenant {tenant!r} has {self._held[tenant]} streams open, this "
                    f"server's limit per tenant (StreamLimits.per_tenant); close one first "
                    f"(WatchJob, GetJobLogs with follow, uploads and downloads all count)")
            self._held[tenant] += 1
            self._total += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._held[tenant] -= 1
            if not self._held[tenant]:
                del self._held[tenant]
            self._total -= 1

    def held(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._total if tenant is None else self._held[tenant]


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """Every streaming call of every service holds a slot of `slots` while it runs."""

    def __init__(self, slots: StreamSlots, authenticator: Authenticator):
        self.slots, self.auth = slots, authenticator

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler_call_details.method in UNCOUNTED_METHODS
                or not (handler.request_streaming or handler.response_streaming)):
            return handler
        tenant = self._tenant(handler_call_details.invocation_metadata or ())
        if handler.response_streaming:
            field = "stream_stream" if handler.request_streaming else "unary_stream"
            behavior = getattr(handler, field)

            def stream(request, context):
                self._acquire(tenant, context)
                try:
                    yield from behavior(request, context)
                finally:  # also when the client goes away (the generator is closed)
                    self.slots.release(tenant)
            return handler._replace(**{field: stream})

        behavior = handler.stream_unary

        def stream_unary(requests, context):
            self._acquire(tenant, context)
            try:
                return behavior(requests, context)
            finally:
                self.slots.release(tenant)
        return handler._replace(stream_unary=stream_unary)

    def _tenant(self, metadata: Any) -> str:
        try:
            return self.auth.tenant(metadata)
        except Unauthenticated:
            return UNAUTHENTICATED

    def _acquire(self, tenant: str, context: grpc.ServicerContext) -> None:
        try:
            self.slots.acquire(tenant)
        except ResourceExhausted as error:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message)
