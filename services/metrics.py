"""What the service exports to Prometheus: training, cluster and API metrics, cheap to collect.

    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)        # the job queue's observer
    server = grpc.server(pool, interceptors=[metrics.grpc_interceptor()])
    start_metrics_server(9464, registry)       # GET /metrics

Every metric is declared once, in `_Families`, on the registry passed in (tests use a private
`CollectorRegistry`, never the global default). Names follow Prometheus conventions:
`chainrule_` prefix, base units (`_seconds`, `_bytes`, `_ratio`), `_total` on counters.

Labels are bounded. `job_id` appears only on per-job series, and those are removed
`job_series_ttl_seconds` after the job reaches a terminal state; `parameter` is a parameter (or
layer) name of the job's model, at most `ParameterSeries.limit` of them per job however large
the model, the rest summed into one `(others)` series; `phase`, `state`, `direction`, a
recovery's `kind` and gRPC `code` are fixed sets; `method` is a method of a registered gRPC
service (anything else counts as "unknown"). No step, sample or request ids, ever.

/metrics listens on loopback unless told otherwise: it names every tenant's job ids and losses.

The label is `job_id`, not `job`: Prometheus attaches its own `job` label (the scrape job) to
every series it scrapes, and a clash would rename ours to `exported_job`.

`job_step` runs inside the training loop, so it only touches pre-bound children (no label
lookups): about 14 us per step, under 1% of the demo job's 1.5-2 ms step (bench/metrics.py).
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.job_queue import TenantUsage
from scheduler.job_states import JOB_STATES, TERMINAL_STATES
from scheduler.records import (
    RECOVERY_KIND_DESCRIPTIONS,
    RECOVERY_KINDS,
    EvaluationRecord,
    RecoveryRecord,
    StepRecord,
)

# StepTimings field -> the phase label a reader expects (the optimizer step is `apply` in code).
STEP_PHASES = (("compute", "compute"), ("reduce", "reduce"), ("apply", "optimizer"),
               ("gather", "gather"), ("wait", "wait"))
# From a tiny model's sub-millisecond shard step to a large model's multi-second compute.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
# Unary calls take milliseconds; WatchJob streams last as long as a job.
GRPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 300.0, 1800.0)
OBJECT_STORE_REFRESH_SECONDS = 10.0
UNKNOWN_METHOD = "unknown"
METRICS_ADDRESS_VARIABLE = "CHAINRULE_METRICS_ADDRESS"
OTHER_PARAMETERS = "(others)"  # the `parameter` label of the norms past the limit, together


@dataclass(frozen=True)
class ParameterSeries:
    """Which gradient norms get a series of their own. One series per parameter tensor would
    let one job of 50,000 tensors add 50,000 series (a 4.7 MiB scrape); here a job exports at
    most `limit` + 1: the `limit` largest norms of each step (by parameter, or by layer: the
    norm of all of a layer's parameters), and the norm of all the others as `(others)`. A
    name that leaves the largest is removed, so the live series stay within the bound."""

    by: str = "parameter"  # or "layer": "3.weight" and "3.bias" count as layer "3"
    limit: int = 32

    def __post_init__(self):
        if self.by not in ("parameter", "layer"):
            raise ValueError(f"parameter series by 'parameter' or 'layer', got {self.by!r}")
        if self.limit < 1:
            raise ValueError(f"parameter series limit must be at least 1, got {self.limit}")

    def select(self, norms: Mapping[str, float]) -> Mapping[str, float]:
        """The norms to export, by label; `norms` itself when it is within the limit."""
        if self.by == "layer":
            squares: dict[str, float] = {}
            for name, norm in norms.items():
                layer = name.rpartition(".")[0] or name
                squares[layer] = squares.get(layer, 0.0) + norm * norm
            norms = {layer: math.sqrt(total) for layer, total in squares.items()}
        if len(norms) <= self.limit:
            return norms
        kept = dict(heapq.nlargest(self.limit, norms.items(), key=lambda item: item[1]))
        rest = sum(norm * norm for name, norm in norms.items() if name not in kept)
        kept[OTHER_PARAMETERS] = math.sqrt(rest)
        return kept


class _Families:
    """Every metric family the service exports, declared once on one registry."""

    def __init__(self, registry: CollectorRegistry):
        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=registry)

        def counter(name, doc, labels=()):
            # prometheus_client appends `_total` to counter samples; the family name has none.
            return Counter(name.removesuffix("_total"), doc, labels, registry=registry)

        job = ("job_id",)
        # --- training ---------------------------------------------------------------------
        self.loss = gauge("chainrule_training_loss", "Mean training loss of the last step.", job)
        self.validation_loss = gauge("chainrule_validation_loss",
                                     "Loss on the validation split at the last evaluation.", job)
        self.validation_accuracy = gauge(
            "chainrule_validation_accuracy_ratio",
            "Accuracy (0-1) on the validation split at the last evaluation; classification.", job)
        self.samples = counter("chainrule_training_samples_total",
                               "Training samples processed.", job)
        self.steps = counter("chainrule_training_steps_total", "Optimizer steps completed.", job)
        self.step = gauge("chainrule_training_step",
                          "Number of the last optimizer step (1-based; goes back when a job "
                          "replays from a checkpoint).", job)
        self.planned_steps = gauge("chainrule_training_planned_steps",
                                   "Optimizer steps the job will take in all.", job)
        self.epoch = gauge("chainrule_training_epoch", "Epoch of the last step (0-based).", job)
        self.step_duration = Histogram(
            "chainrule_training_step_duration_seconds",
            "Time per optimizer step by phase: compute (forward+backward, slowest worker), "
            "reduce (gradient sum, slowest shard), optimizer (slowest shard), gather (updated "
            "parameters back to workers), wait (call latency and synchronisation).",
            job + ("phase",), buckets=STEP_BUCKETS, registry=registry)
        self.samples_per_second = gauge("chainrule_training_samples_per_second",
                                        "Training throughput of the last step.", job)
        self.learning_rate = gauge("chainrule_training_learning_rate",
                                   "Learning rate used by the last step.", job)
        self.gradient_norm = gauge("chainrule_training_gradient_norm",
                                   "Global L2 norm of the reduced gradient, before clipping.",
                                   job)
        self.parameter_gradient_norm = gauge(
            "chainrule_training_parameter_gradient_norm",
            "L2 norm of the reduced gradient of one named parameter, before clipping.",
            job + ("parameter",))
        self.communication = counter(
            "chainrule_training_communication_bytes_total",
            "Bytes moved between workers and parameter-server shards, summed over workers.",
            job + ("direction",))
        self.step_communication = gauge(
            "chainrule_training_step_communication_bytes",
            "Bytes one worker sent to the parameter-server shards (its gradient messages, "
            "compressed or whole) and received from them (updated parameters, and PowerSGD's "
            "factors) in the last step, counted where sent; compare "
            "chainrule_model_parameter_bytes.", job + ("direction",))
        self.parameter_bytes = gauge("chainrule_model_parameter_bytes",
                                     "Size of the model's flat parameter vector.", job)
        # --- cluster ----------------------------------------------------------------------
        self.workers_up = gauge("chainrule_workers_up", "Workers alive in the job.", job)
        self.worker_failures = counter("chainrule_worker_failures_total",
                                       "Workers of the job lost (died or missed a deadline).",
                                       job)
        self.worker_recoveries = counter(
            "chainrule_worker_recoveries_total",
            "Lost workers whose micro-batches were recomputed by survivors in the same step.",
            job)
        self.ps_failures = counter("chainrule_parameter_server_failures_total",
                                   "Parameter-server shards of the job lost.", job)
        self.ps_recoveries = counter(
            "chainrule_parameter_server_recoveries_total",
            "Parameter-server shards restored from a checkpoint and deterministic replay.", job)
        self.straggler_spread = gauge(
            "chainrule_straggler_spread_seconds",
            "Slowest minus median worker compute time in the last step.", job)
        self.recoveries = counter(
            "chainrule_recoveries_total",
            "Failures jobs recovered from, by kind: " + "; ".join(
                f"{kind} ({meaning})" for kind, meaning in RECOVERY_KIND_DESCRIPTIONS.items())
            + ".",
            ("kind",))
        # --- service ----------------------------------------------------------------------
        self.jobs = gauge("chainrule_jobs", "Jobs known to this process, by state.", ("state",))
        self.job_state = gauge("chainrule_job_state",
                               "1 for the job's current state, 0 for the others.",
                               job + ("state",))
        self.job_transitions = counter("chainrule_job_transitions_total",
                                       "Jobs entering each state.", ("state",))
        self.queue_depth = gauge("chainrule_queue_depth", "Jobs waiting in the queue.")
        # --- scheduling (labels: the tenants of the configuration, a bounded set; a job's
        # priority as one of PRIORITY_CLASSES, since priorities themselves are any int32) -------
        tenant = ("tenant",)
        self.tenant_queued_jobs = gauge("chainrule_tenant_queued_jobs",
                                        "Jobs of the tenant waiting in the queue, by priority "
                                        "class (high: priority > 0, normal: 0, low: < 0).",
                                        ("tenant", "priority_class"))
        self.tenant_running_cpus = gauge("chainrule_tenant_running_cpus",
                                         "CPUs reserved by the tenant's running jobs.", tenant)
        self.tenant_oldest_queued = gauge(
            "chainrule_tenant_oldest_queued_job_timestamp_seconds",
            "Unix time at which the tenant's longest-waiting queued job was queued; absent "
            "while it has none queued.", tenant)
        self.queue_wait = Histogram(
            "chainrule_queue_wait_seconds",
            "Time from a job's queueing to its start, by tenant and priority class (a "
            "preempted job's second start counts from its first queueing).",
            ("tenant", "priority_class"), registry=registry,
            buckets=(0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0,
                     24 * 3600.0))
        self.preemptions = counter("chainrule_preemptions_total",
                                   "Running jobs asked to stop and queue again to make room "
                                   "for a job of higher priority, by the victim's tenant.",
                                   tenant)
        self.quota_rejections = counter("chainrule_quota_rejections_total",
                                        "Submits, uploads and streams refused for a tenant "
                                        "quota, by tenant and quota (max_running_cpus, "
                                        "max_queued_jobs, max_stored_bytes, max_streams, "
                                        "submit_rate).",
                                        ("tenant", "quota"))
        self.grpc_requests = counter("chainrule_grpc_requests_total",
                                     "gRPC requests handled, by method and status code.",
                                     ("method", "code"))
        self.grpc_latency = Histogram(
            "chainrule_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its last response message, by method.",
            ("method",), buckets=GRPC_BUCKETS, registry=registry)
        # Per-job families: counters exist from the job's start (so rates begin at 0); gauges
        # only once they hold a true value (a loss of 0 before the first step would be a lie).
        self.job_counters = (self.samples, self.steps, self.worker_failures,
                             self.worker_recoveries, self.ps_failures, self.ps_recoveries)
        self.step_gauges = (self.loss, self.step, self.planned_steps, self.epoch,
                            self.samples_per_second, self.learning_rate, self.gradient_norm,
                            self.parameter_bytes, self.workers_up, self.straggler_spread)
        self.per_job = (self.job_counters + self.step_gauges
                        + (self.validation_loss, self.validation_accuracy))


@dataclass
class _JobSeries:
    """One job's pre-bound children: the training loop only calls .set/.inc/.observe."""

    job_id: str
    families: _Families
    parameter_series: ParameterSeries = field(default_factory=ParameterSeries)
    state: str | None = None
    expires_at: float | None = None  # monotonic time; set when the job ends
    worker_failures: int = 0  # cumulative counts already exported
    ps_failures: int = 0
    parameters: dict[str, Gauge] = field(default_factory=dict)

    def __post_init__(self):
        f, j = self.families, self.job_id
        (self.samples, self.steps, self.worker_failures_total, self.worker_recoveries_total,
         self.ps_failures_total, self.ps_recoveries_total) = (
            family.labels(j) for family in f.job_counters)
        self.phases = [(attribute, f.step_duration.labels(j, phase))
                       for attribute, phase in STEP_PHASES]
        self.sent = f.communication.labels(j, "sent")
        self.received = f.communication.labels(j, "received")
        self.states = {state: f.job_state.labels(j, state) for state in JOB_STATES}
        self.gauges_bound = False

    def bind_step_gauges(self) -> None:
        (self.loss, self.step, self.planned_steps, self.epoch, self.samples_per_second,
         self.learning_rate, self.gradient_norm, self.parameter_bytes, self.workers_up,
         self.straggler_spread) = (family.labels(self.job_id)
                                   for family in self.families.step_gauges)
        self.step_sent = self.families.step_communication.labels(self.job_id, "sent")
        self.step_received = self.families.step_communication.labels(self.job_id, "received")
        self.gauges_bound = True

    def observe_step(self, record: StepRecord) -> None:
        if not self.gauges_bound:
            self.bind_step_gauges()
        self.loss.set(record.loss)
        self.samples.inc(record.samples)
        self.steps.inc()  # every step done, replays included: the work the cluster did
        self.step.set(record.step)
        self.planned_steps.set(record.total_steps)
        self.epoch.set(record.epoch)
        timings = record.timings
        for attribute, histogram in self.phases:
            histogram.observe(getattr(timings, attribute))
        self.samples_per_second.set(record.samples_per_second)
        self.learning_rate.set(record.learning_rate)
        self.gradient_norm.set(record.gradient_norm)
        norms = self.parameter_series.select(record.parameter_gradient_norms)
        for name, norm in norms.items():
            gauge = self.parameters.get(name)
            if gauge is None:
                gauge = self.parameters[name] = \
                    self.families.parameter_gradient_norm.labels(self.job_id, name)
            gauge.set(norm)
        if len(self.parameters) > len(norms):  # some left the largest: their series go
            for name in [name for name in self.parameters if name not in norms]:
                del self.parameters[name]
                _remove(self.families.parameter_gradient_norm, self.job_id, name)
        self.sent.inc(record.bytes_sent_per_worker * record.workers)
        self.received.inc(record.bytes_received_per_worker * record.workers)
        self.step_sent.set(record.bytes_sent_per_worker)
        self.step_received.set(record.bytes_received_per_worker)
        self.parameter_bytes.set(record.parameter_bytes)
        self.workers_up.set(record.workers)
        self.straggler_spread.set(timings.straggler_spread)
        # The record carries cumulative failures; a record exists only for a completed step,
        # so every failure it reports was also recovered (the lost block was recomputed).
        new = record.worker_failures - self.worker_failures
        if new > 0:
            self.worker_failures = record.worker_failures
            self.worker_failures_total.inc(new)
            self.worker_recoveries_total.inc(new)
        # A lost shard restarts the job from its last checkpoint and replays the steps since;
        # the record carries the cumulative count, and a record means the replay succeeded.
        ps_failures = record.shard_failures
        if ps_failures > self.ps_failures:
            self.ps_failures_total.inc(ps_failures - self.ps_failures)
            self.ps_recoveries_total.inc(ps_failures - self.ps_failures)
            self.ps_failures = ps_failures

    def remove(self) -> None:
        f, j = self.families, self.job_id
        for family in f.per_job:
            _remove(family, j)
        for _, phase in STEP_PHASES:
            _remove(f.step_duration, j, phase)
        for direction in ("sent", "received"):
            _remove(f.communication, j, direction)
            _remove(f.step_communication, j, direction)
        for state in JOB_STATES:
            _remove(f.job_state, j, state)
        for name in self.parameters:
            _remove(f.parameter_gradient_norm, j, name)


PRIORITY_CLASSES = ("high", "normal", "low")


def priority_class(priority: int) -> str:
    """A job's priority as a bounded label: above the server's default of 0 (a priority the
    operator granted), at it, or below it (a tenant's own background work)."""
    return "high" if priority > 0 else "normal" if priority == 0 else "low"


def _remove(family, *labels: str) -> None:
    try:
        family.remove(*labels)
    except KeyError:
        pass


class TrainingMetrics:
    """The job queue's observer: turns job states, step and evaluation records into metrics."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 job_series_ttl_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic,
                 parameter_series: ParameterSeries | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.job_series_ttl_seconds = job_series_ttl_seconds
        self.parameter_series = parameter_series or ParameterSeries()
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobSeries] = {}
        self._state_counts = dict.fromkeys(JOB_STATES, 0)
        self._tenants: dict[str, TenantUsage] = {}  # every tenant reported so far
        # Registered before the families: a scrape expires old jobs first, then collects.
        self.registry.register(_Housekeeping(self))
        self.families = _Families(self.registry)
        for state in JOB_STATES:
            self.families.jobs.labels(state).set(0)
            self.families.job_transitions.labels(state)
        for kind in RECOVERY_KINDS:  # at 0 from the start, so rate() and increase() work
            self.families.recoveries.labels(kind)
        self.families.queue_depth.set(0)

    # --- the observer interface (called by the job queue) ----------------------------------

    def job_state_changed(self, job_id: str, state: str) -> None:
        if state not in JOB_STATES:
            raise ValueError(f"job state {state!r} is not one of {', '.join(JOB_STATES)}")
        self.expire()
        with self._lock:
            series = self._series(job_id)
            previous, series.state = series.state, state
            if previous == state:
                return
            if previous is not None:
                self._state_counts[previous] -= 1
            self._state_counts[state] += 1
            if state in TERMINAL_STATES:
                series.expires_at = self._clock() + self.job_series_ttl_seconds
            else:
                series.expires_at = None
            for name, count in self._state_counts.items():  # under the lock: never stale
                self.families.jobs.labels(name).set(count)
        for name, gauge in series.states.items():
            gauge.set(1 if name == state else 0)
        if state in TERMINAL_STATES and series.gauges_bound:
            series.workers_up.set(0)  # the job's actors are gone
        self.families.job_transitions.labels(state).inc()

    def job_step(self, job_id: str, record: StepRecord) -> None:
        series = self._jobs.get(job_id)  # no lock on the hot path: dict reads are atomic
        if series is None:
            with self._lock:
                series = self._series(job_id)
        series.observe_step(record)

    def job_evaluation(self, job_id: str, record: EvaluationRecord) -> None:
        if job_id not in self._jobs:
            with self._lock:
                self._series(job_id)
        families = self.families  # evaluations are rare: a label lookup is fine here
        families.validation_loss.labels(job_id).set(record.loss)
        if record.accuracy is not None:  # regression jobs have none, and export none
            families.validation_accuracy.labels(job_id).set(record.accuracy)

    def job_recovery(self, job_id: str, record: RecoveryRecord) -> None:
        if record.kind not in RECOVERY_KINDS:  # a label: a bounded set
            raise ValueError(f"recovery kind {record.kind!r} is not one of "
                             f"{', '.join(RECOVERY_KINDS)}")
        self.families.recoveries.labels(record.kind).inc()

    def queue_depth(self, depth: int) -> None:
        self.families.queue_depth.set(depth)

    def tenant_usage(self, usage: Mapping[str, TenantUsage]) -> None:
        """Each tenant's queued jobs, running CPUs and oldest queued job, after every
        scheduling decision; a tenant seen before and absent now has none."""
        families = self.families
        with self._lock:
            self._tenants.update(usage)
            for tenant in self._tenants:
                now = usage.get(tenant, TenantUsage(0, 0.0, None))
                queued = dict.fromkeys(PRIORITY_CLASSES, 0)  # every class: 0 is a value
                for priority, count in now.queued_by_priority.items():
                    queued[priority_class(priority)] += count
                for name, count in queued.items():
                    families.tenant_queued_jobs.labels(tenant, name).set(count)
                families.tenant_running_cpus.labels(tenant).set(now.running_cpus)
                if now.oldest_queued_at is None:  # absent: no queued job to be old
                    _remove(families.tenant_oldest_queued, tenant)
                else:
                    families.tenant_oldest_queued.labels(tenant).set(now.oldest_queued_at)

    def job_waited(self, tenant: str, priority: int, seconds: float) -> None:
        self.families.queue_wait.labels(tenant, priority_class(priority)).observe(seconds)

    def job_preempted(self, tenant: str, victim: str, for_job: str) -> None:
        self.families.preemptions.labels(tenant).inc()

    def quota_rejected(self, tenant: str, quota: str) -> None:
        self.families.quota_rejections.labels(tenant, quota).inc()

    # --- gRPC --------------------------------------------------------------------------

    def grpc_interceptor(self) -> grpc.ServerInterceptor:
        """Counts every call by method and status code and times it, unary or streaming."""
        return _MetricsInterceptor(self.families.grpc_requests, self.families.grpc_latency)

    # --- label hygiene -----------------------------------------------------------------

    def expire(self) -> None:
        """Remove the series of jobs that ended more than `job_series_ttl_seconds` ago."""
        now = self._clock()
        with self._lock:
            expired = [s for s in self._jobs.values()
                       if s.expires_at is not None and s.expires_at <= now]
            for series in expired:
                del self._jobs[series.job_id]
        for series in expired:
            series.remove()

    def _series(self, job_id: str) -> _JobSeries:
        """The job's series, created at 0 so rates and increases start from the first step.
        Caller holds the lock."""
        series = self._jobs.get(job_id)
        if series is None:
            series = self._jobs[job_id] = _JobSeries(job_id, self.families,
                                                     self.parameter_series)
        return series


class _Housekeeping(Collector):
    """Runs at every scrape before the metric families: expires finished jobs' series, and
    reports Ray's object-store usage read in the background (a scrape never waits on Ray)."""

    def __init__(self, metrics: TrainingMetrics):
        self.metrics = metrics
        self.object_store = _ObjectStoreReader()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.metrics.expire()
        reading = self.object_store.reading()
        if reading is not None:
            used, capacity = reading
            yield GaugeMetricFamily("chainrule_object_store_used_bytes",
                                    "Bytes in Ray's object store, summed over nodes.",
                                    value=used)
            yield GaugeMetricFamily("chainrule_object_store_capacity_bytes",
                                    "Capacity of Ray's object store, summed over nodes.",
                                    value=capacity)

    def describe(self):
        return []  # dynamic: present only while Ray is running here


class _ObjectStoreReader:
    """Ray's object-store usage, refreshed by a background thread at most every 10 s.

    Absent (None) when Ray is not installed or not initialised in this process."""

    def __init__(self, refresh_seconds: float = OBJECT_STORE_REFRESH_SECONDS):
        self.refresh_seconds = refresh_seconds
        self._value: tuple[float, float] | None = None
        self._read_at = -math.inf
        self._refreshing = threading.Lock()

    def reading(self) -> tuple[float, float] | None:
        if (time.monotonic() - self._read_at >= self.refresh_seconds
                and self._refreshing.acquire(blocking=False)):
            self._read_at = time.monotonic()
            threading.Thread(target=self._refresh, name="object-store-metrics",
                             daemon=True).start()
        return self._value

    def _refresh(self) -> None:
        try:
            self._value = _read_object_store()
        except Exception:  # Ray shutting down, a node gone: keep the last reading
            pass
        finally:
            self._refreshing.release()


def _read_object_store() -> tuple[float, float] | None:
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    try:  # the raylets' own store statistics: what is really in shared memory
        from ray._private import internal_api
        from ray._private.state import state  # this driver's connection to the GCS

        stats = internal_api.get_memory_info_reply(state, timeout_seconds=5.0).store_stats
        return float(stats.object_store_bytes_used), float(stats.object_store_bytes_avail)
    except Exception:  # private API moved: the scheduler's view of the store resource
        capacity = float(ray.cluster_resources().get("object_store_memory", 0.0))
        available = float(ray.available_resources().get("object_store_memory", 0.0))
        return max(0.0, capacity - available), capacity


# --- gRPC interceptor ------------------------------------------------------------------------


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, requests: Counter, latency: Histogram):
        self.requests, self.latency = requests, latency

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED; a client-made name
            self.requests.labels(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        method = handler_call_details.method
        record = self._recorder(method)
        if handler.response_streaming:
            wrap, behavior = _streaming_response, (handler.stream_stream
                                                   if handler.request_streaming
                                                   else handler.unary_stream)
            factory = (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                       else grpc.unary_stream_rpc_method_handler)
        else:
            wrap, behavior = _unary_response, (handler.stream_unary if handler.request_streaming
                                               else handler.unary_unary)
            factory = (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                       else grpc.unary_unary_rpc_method_handler)
        return factory(wrap(behavior, record),
                       request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _recorder(self, method: str) -> Callable[[str, float], None]:
        latency = self.latency.labels(method)
        requests = self.requests

        def record(code: str, seconds: float) -> None:
            requests.labels(method, code).inc()
            latency.observe(seconds)

        return record


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    # set by set_code() or abort(); None when the handler set nothing. code() is grpc's public
    # ServicerContext API since 1.38, missing from types-grpcio's ServicerContext.
    code = context.code()  # type: ignore[attr-defined]
    if code is None and not context.is_active():
        return grpc.StatusCode.CANCELLED.name  # the client cancelled or its deadline passed
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return default.name


def _unary_response(behavior, record):
    def handle(request, context):
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN.name
        try:
            response = behavior(request, context)
            code = _code_name(context, grpc.StatusCode.OK)
            return response
        except BaseException:
            code = _code_name(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            record(code, time.perf_counter() - start)

    return handle


def _streaming_response(behavior, record):
    def handle(request, context):
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN.name
        try:
            yield from behavior(request, context)
            code = _code_name(context, grpc.StatusCode.OK)
        except GeneratorExit:  # the client went away mid-stream
            code = grpc.StatusCode.CANCELLED.name
            raise
        except BaseException:
            code = _code_name(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            record(code, time.perf_counter() - start)

    return handle


# --- /metrics --------------------------------------------------------------------------------


def start_metrics_server(port: int, registry: CollectorRegistry,
                         address: str | None = None) -> tuple[object, int]:
    """Serve `registry` at http://address:port/metrics in a daemon thread (port 0: any free
    port). Returns the server (`.shutdown()` stops it) and the port it listens on.

    `address` None: $CHAINRULE_METRICS_ADDRESS, else loopback. A container sets the variable
    to 0.0.0.0 so that Prometheus in another container or pod can scrape it; metrics are
    read-only and carry no tenant data beyond opaque job ids."""
    if address is None:
        address = os.environ.get(METRICS_ADDRESS_VARIABLE) or "127.0.0.1"
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server, server.server_port
