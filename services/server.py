"""Start-up and shut-down of the API process: store, queue, gRPC server, health, reflection,
metrics, the web UI.

    server = serve("127.0.0.1:50051", data_dir="data")   # returns once it is serving
    server.wait_for_termination()                          # or server.stop()

Where jobs run: each job's runner is a detached actor (scheduler/detached_runner.py) on this
server's node, in the data folder's namespace, on a Ray that outlives the server: without
`ray_address`, the embedded Ray, which the server starts as a process session of its own
(scheduler/ray_head.py); with it, the cluster at that address, joined through this node's
raylet. A server killed mid-job (SIGKILL, a crash) leaves its jobs training. The next server on
the same data folder joins that Ray, attaches to every RUNNING job whose runner is alive (its
live progress in GetJob and WatchJob as soon as it serves, its actors counted where they are)
and requeues only those whose runner is gone. A Ray Client address (`ray://`) is refused: its
driver is on no node of the cluster, so no runner could be on the server's node to write the
data folder. With Ray started by whoever embeds `serve()` (the tests' fixtures), runners are
threads of this process: that Ray is its owner's, who decides how long it lives.

Stopping (SIGTERM in `chainrule serve`): health turns NOT_SERVING, the queue stops taking jobs,
running jobs stop at their next step boundary with a checkpoint and go back to QUEUED, then
the gRPC server closes and the Ray it started is stopped (every process of it, by PID). The
next start runs every QUEUED job again, each resuming from its checkpoint by deterministic
replay.

Secure by default: without a token file every caller is the tenant "default", so the server
refuses any address but loopback or a unix socket; a non-loopback bind needs tokens and TLS.
The data folder is the server's user's alone (0700; its files 0600), and a unix socket
(`unix:PATH`) is made `socket_mode` (0600: only this user may call) before serving: its file
permissions decide who may call.

A server that started its Ray (embedded, or by joining `ray_address`) watches it: when it dies,
the running jobs go back to the queue, and `failed` is set with what to do (restart with a new
Ray, or exit for a supervisor) and why, for the process's owner to carry out
(services/ray_recovery.py; `chainrule serve` does).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import ray
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chainrule.client import is_local_address
from chainrule.v1 import training_service_pb2 as pb
from chainrule.v1 import training_service_pb2_grpc as pb_grpc
from scheduler import ray_cluster, ray_head
from scheduler.cluster_view import RayNodes
from scheduler.detached_runner import DetachedJobRunner, namespace_of, placement_of
from scheduler.job_queue import JobQueue
from scheduler.records import RunPlacement
from scheduler.scheduling_policy import TenantPolicy
from scheduler.storage import DEFAULT_KEEP_CHECKPOINTS, JobStorage, make_private_folders
from services.auth import Authenticator, Tenancy, load_tokens
from services.events import EventHub
from services.job_lifecycle import JobLifecycle
from services.jobs import DEFAULT_CHECKPOINT_RETENTION_SECONDS, JobService
from services.ray_recovery import Action, RayRecovery
from services.servicer import RequestDecodingInterceptor, TrainingServicer
from services.single_instance import (
    UNIX_PREFIX,
    AlreadyInUse,
    DataFolderLock,
    check_port_free,
    unix_socket_path,
)
from services.startup_sweep import sweep_leftovers
from services.store import Store
from services.streams import StreamLimitInterceptor, StreamLimits, StreamSlots
from services.submit_rate import (
    DEFAULT_SUBMIT_RATE,
    SubmitRate,
    SubmitRateLimiter,
    tenant_rates,
)
from services.tracking.tensorboard import TensorBoardFiles
from services.training_curves import TrainingCurves
from services.upload_limits import DEFAULT_MAX_UPLOAD_BYTES, UploadLimits
from services.validation import Limits
from services.web_ui import RunningWebUI, split_address, start_web_ui, tls_context

if TYPE_CHECKING:  # the exporter is imported when metrics are on (_start_metrics)
    from services.metrics import ParameterSeries

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainingService"].full_name
MESSAGE_BYTES = 8 * 1024 * 1024  # upload/download chunks are 1 MiB; specs are small
SWITCH_INTERVAL_SECONDS = 0.0005
RAY_CLIENT_PREFIX = "ray://"


def configure_process() -> None:
    """The process-wide settings a `chainrule serve` process runs with. The command line calls
    this; `serve()` does not, so an application that embeds the service keeps its own.

    - Job threads share the GIL with the RPC threads. Python hands the GIL over every 5 ms by
      default, so under request load a runner thread waking from a Ray call could wait that
      long each time, several times per step; 0.5 ms keeps steps near their unloaded time.
    - Counters' `_created` samples are turned off: Prometheus would store each as one more
      series, doubling every counter's cost for a timestamp nobody charts.
    """
    from prometheus_client import disable_created_metrics

    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    disable_created_metrics()


@dataclass
class RunningServer:
    address: str  # host:port actually bound (the port resolved when 0 was asked)
    port: int
    data_dir: Path
    metrics_url: str
    service: JobService
    lifecycle: JobLifecycle
    queue: JobQueue
    _grpc: grpc.Server
    _health: health.HealthServicer
    _store: Store
    _owns_ray: bool
    _metrics_server: Any = None
    _lock: DataFolderLock | None = None  # this server's hold on data_dir, until stop()
    _stopped: threading.Event = field(default_factory=threading.Event)
    streams: StreamSlots | None = None  # the streaming calls open now, by tenant
    # Observers that write off the job threads (TensorBoard files, MLflow runs): closed
    # after the queue stops, so each writes what the jobs reported up to their stop.
    trackers: list[Any] = field(default_factory=list)
    web_url: str = ""  # the web UI's address ("" when it is off)
    _web: RunningWebUI | None = None
    _ray_recovery: RayRecovery | None = None  # None: Ray is its starter's to watch
    # Set when the server cannot go on (its Ray lost), with what to do and why: the process
    # should restart or exit, without stop(), whose checkpoints would wait on the Ray that is
    # gone. Its running jobs are back in the queue already.
    failed: threading.Event = field(default_factory=threading.Event)
    failure: str = ""
    failure_action: Action = Action.EXIT
    # The Ray this server started as its own session (None: Ray is another's, or in-process).
    ray_head: ray_head.RayHead | None = None
    attached: int = 0  # jobs whose runners outlived the last server, followed again here

    def stop_ray_head(self) -> None:
        """Kill every process of the Ray head this server started (a restart in place)."""
        if self.ray_head is not None:
            ray_head.stop(self.ray_head, self.data_dir)

    def _ray_lost(self, action: Action, reason: str) -> None:
        self.failure, self.failure_action = reason, action
        self.failed.set()

    def stop(self, grace: float = 5.0, job_timeout: float = 120.0) -> None:
        """Checkpoint and requeue running jobs, then close the server (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._ray_recovery is not None:  # before Ray is shut down below, on purpose
            self._ray_recovery.stop()
        self._health.enter_graceful_shutdown()
        if not self.queue.shutdown(timeout=job_timeout):
            log.warning("jobs still running after %.0f s; they resume from their last "
                        "checkpoint on the next start", job_timeout)
        self.service.events.close()
        for tracker in self.trackers:
            tracker.close()
        if self._web is not None:
            self._web.stop()
        self._grpc.stop(grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._store.close()
        if self._owns_ray:
            ray.shutdown()
        self.stop_ray_head()
        if self._lock is not None:
            self._lock.release()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)


def serve(
    address: str = "127.0.0.1:50051",
    data_dir: str | Path = "data",
    *,
    ray_address: str | None = None,
    ray_cpus: int | None = None,
    metrics_port: int | None = None,
    max_concurrent_jobs: int = 0,
    tokens_file: str | Path | None = None,
    tenancy: Tenancy | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_client_ca: str | Path | None = None,
    limits: Limits | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    upload_limits: UploadLimits | None = None,
    max_rpc_threads: int = 64,
    keep_checkpoints: int = DEFAULT_KEEP_CHECKPOINTS,
    checkpoint_retention_seconds: float = DEFAULT_CHECKPOINT_RETENTION_SECONDS,
    socket_mode: int = 0o600,
    parameter_series: ParameterSeries | None = None,
    stream_limits: StreamLimits | None = None,
    max_concurrent_rpcs: int | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
    web_address: str | None = None,
    submit_rate: SubmitRate = DEFAULT_SUBMIT_RATE,
) -> RunningServer:
    """Start serving and return once the port is bound and queued jobs are resumed.
    `metrics_port` None: no metrics endpoint; 0: any free port. `tls_client_ca` (PEM, with
    `tls_cert` and `tls_key`): mutual TLS, a client must present a certificate it signed.
    `web_address` ("host:port", port 0: any free port; None: no web UI): the read-only web UI
    (services/web_ui.py), under the same tokens, and over HTTPS with the same certificates
    when TLS is on; like the API, only on loopback unless tokens and TLS are configured.
    `tenancy`: the tenants of the configuration file (services/server_config.py);
    `tokens_file`: the older token file's (services/auth.py); at most one of them.
    `submit_rate`: how fast a tenant may submit and resume jobs, unless `tenancy` gives it its
    own (services/submit_rate.py)."""
    if tls_client_ca and not (tls_cert and tls_key):
        raise ValueError("--client-ca needs --tls-cert and --tls-key: mutual TLS is TLS")
    if ray_address and ray_address.startswith(RAY_CLIENT_PREFIX):
        raise ValueError(f"--ray-address {ray_address!r} is a Ray Client address: chainrule "
                         f"serve must run on a node of the cluster (its jobs' runners run on "
                         f"its node and write its data folder); start it on a node joined to "
                         f"the cluster (`ray start --address=...`) and give the cluster's GCS "
                         f"address, host:port")
    # Streams hold an RPC thread each (services/streams.py): capped below the pool, so unary
    # calls and the health check always find one. Calls past `max_concurrent_rpcs` (default
    # 4 per thread) are refused RESOURCE_EXHAUSTED at once rather than queued without bound.
    stream_limits = stream_limits or StreamLimits()
    if stream_limits.total >= max_rpc_threads:
        raise ValueError(f"stream limit {stream_limits.total} must be below the "
                         f"{max_rpc_threads} RPC threads, or streams could take them all")
    max_concurrent_rpcs = max_concurrent_rpcs or 4 * max_rpc_threads
    if tokens_file and tenancy is not None:
        raise ValueError("--tokens and --config both name the tenants: give one (the "
                         "configuration file holds everything the token file does)")
    if tenancy is None:
        tenancy = load_tokens(tokens_file) if tokens_file else Tenancy({})
    tokens = tenancy.tenants
    host = address.rsplit(":", 1)[0]
    if not is_local_address(address) and not (tokens and tls_cert and tls_key):
        raise ValueError(f"--address {address!r} is not loopback: serving other hosts needs "
                         f"--tokens and TLS (--tls-cert, --tls-key)")
    # Checked before anything starts: MLflow missing, or a URI it cannot use, is refused now.
    mlflow = None
    if mlflow_tracking_uri:
        from services.tracking.mlflow_runs import mlflow_client

        mlflow = mlflow_client(mlflow_tracking_uri)
    web_tls = None
    if web_address is not None:
        split_address(web_address)  # ValueError for a malformed one, before anything starts
        if not is_local_address(web_address) and not (tokens and tls_cert and tls_key):
            raise ValueError(f"--web-address {web_address!r} is not loopback: serving the web "
                             f"UI to other hosts needs --tokens and TLS (--tls-cert, --tls-key)")
        if tls_cert and tls_key:
            web_tls = tls_context(str(tls_cert), str(tls_key),
                                  str(tls_client_ca) if tls_client_ca else None)
    started_at = time.time()
    data_dir = Path(data_dir)
    make_private_folders(data_dir)
    _make_private(data_dir)
    # One server per data folder and per port: a second one is refused here, before it opens
    # the store or starts Ray (services/single_instance.py).
    lock = DataFolderLock.acquire(data_dir, address)
    try:
        check_port_free(address)
        if metrics_port:  # before Ray starts, as for the gRPC port (the exporter binds later)
            from services.metrics import METRICS_ADDRESS_VARIABLE

            metrics_host = os.environ.get(METRICS_ADDRESS_VARIABLE) or "127.0.0.1"
            check_port_free(f"{metrics_host}:{metrics_port}", "--metrics-port")
        sweep_leftovers(data_dir, started_at)  # what killed processes left behind
        store = Store(data_dir / "chainrule.db")
    except BaseException:
        lock.release()
        raise
    owns_ray = not ray.is_initialized()
    head, head_started = None, False
    # Runners outlive this server when the Ray they run on does: one it starts or joins.
    namespace = namespace_of(data_dir) if owns_ray else None
    if namespace is not None and not ray_address:
        head, head_started = _start_or_join_ray_head(data_dir, ray_cpus, namespace)
    else:
        ray_cluster.connect(ray_address, num_cpus=ray_cpus, namespace=namespace)

    # The API and the host the queue talks to share one store, one set of job files and one
    # event hub; neither calls the other.
    storage = JobStorage(data_dir, keep_checkpoints)
    events = EventHub()
    lifecycle = JobLifecycle(store, storage, events)
    service = JobService(store, data_dir, storage, events,
                         checkpoint_retention_seconds=checkpoint_retention_seconds,
                         limits=limits, max_upload_bytes=max_upload_bytes,
                         upload_limits=upload_limits,
                         tenant_max_priority=tenancy.max_priority,
                         tenant_min_priority=tenancy.min_priority,
                         tenant_settings=tenancy.settings,
                         submit_rate=SubmitRateLimiter(
                             submit_rate, tenant_rates(submit_rate, tenancy.settings)))
    metrics, metrics_server, metrics_url, interceptors = _start_metrics(metrics_port,
                                                                        parameter_series)
    if metrics is not None:
        service.on_quota_rejection = metrics.quota_rejected
    tensorboard = TensorBoardFiles(storage)
    trackers: list[Any] = [tensorboard]
    if mlflow is not None:
        from services.tracking.mlflow_runs import MlflowRuns

        trackers.append(MlflowRuns(mlflow, store.get_job,
                                   artifact_location=mlflow_artifact_location))
    curves = TrainingCurves() if web_address is not None else None  # the web UI's
    runners: dict[str, Any] = {}
    if namespace is not None:
        runners = _detached_runners(lifecycle, lambda: queue.lease_terms.seconds, namespace)
    queue = JobQueue(lifecycle, cluster=RayNodes(), max_concurrent_jobs=max_concurrent_jobs,
                     **runners,
                     tenants={tenant: TenantPolicy(own.weight, own.max_running_cpus)
                              for tenant, own in tenancy.settings.items()},
                     observers=[lifecycle, *trackers] + ([metrics] if metrics is not None
                                                         else [])
                     + ([curves] if curves is not None else []),
                     max_run_seconds=service.limits.max_wall_seconds)
    service.attach_queue(queue)

    auth = Authenticator(tokens, tenancy.admins)
    streams = StreamSlots(stream_limits,
                          {tenant: own.max_streams for tenant, own in tenancy.settings.items()
                           if own.max_streams},
                          on_quota_rejection=service.on_quota_rejection)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_rpc_threads, thread_name_prefix="rpc"),
        # Metrics outermost, so they count the status the decoding interceptor answers.
        interceptors=[*interceptors, StreamLimitInterceptor(streams, auth),
                      RequestDecodingInterceptor()],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MESSAGE_BYTES),
                 # gRPC's default lets a second server bind the same port and take half
                 # the connections; a busy port must be an error.
                 ("grpc.so_reuseport", 0)])
    pb_grpc.add_TrainingServiceServicer_to_server(
        TrainingServicer(service, auth, tensorboard), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if tls_cert and tls_key:
            client_ca = Path(tls_client_ca).read_bytes() if tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind": taken since check_port_free looked
        port = 0

    def give_up() -> None:
        """What this start opened, closed again; a Ray it started (no run is on it) stopped."""
        for tracker in trackers:
            tracker.close()
        store.close()
        if head is not None and head_started:
            ray.shutdown()
            ray_head.stop(head, data_dir)
        lock.release()

    if port == 0:
        give_up()
        raise AlreadyInUse(f"cannot bind {address!r}: port {address.rsplit(':', 1)[-1]} is "
                           f"in use (another server?); choose another --address")
    web = None
    if web_address is not None:
        assert curves is not None
        try:
            web = start_web_ui(web_address, service, auth, curves, tls=web_tls)
        except OSError as error:  # the port taken, or an address this host does not have
            server.stop(None)
            give_up()
            raise AlreadyInUse(f"cannot bind --web-address {web_address!r} ({error.strerror}); "
                               f"choose another, or turn the web UI off (--no-web)") from None
    bound = address if address.startswith(UNIX_PREFIX) else f"{host}:{port}"
    if address.startswith(UNIX_PREFIX):
        # Before start(), so no call is served before the mode says who may make one.
        # (Connecting needs write permission: the umask's usual 0755 lets none but this user
        # in meanwhile; the socket's folder can close that window for any umask.)
        os.chmod(unix_socket_path(address), socket_mode)
    lock.record(bound)
    # Jobs left QUEUED or RUNNING by the last process go back to the queue before a call is
    # served: a job submitted meanwhile could otherwise be taken for one of them, set back to
    # QUEUED while it runs, and queued twice.
    live_runner = None
    if namespace is not None:
        def live_runner(job_id: str) -> RunPlacement | None:
            return placement_of(job_id, namespace)
    resumed, attached = lifecycle.requeue_unfinished(queue, live_runner)
    if resumed:
        log.info("resumed %d queued job(s)", resumed)
    if attached:
        log.info("attached to %d running job(s) whose runners outlived the last server",
                 attached)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(bound, port, data_dir, metrics_url, service, lifecycle, queue,
                            server, health_servicer, store, owns_ray, metrics_server, lock,
                            streams=streams, trackers=trackers,
                            web_url=web.url if web else "", _web=web, ray_head=head,
                            attached=attached)
    if owns_ray:
        running._ray_recovery = RayRecovery(queue, ray_address=ray_address,
                                            on_lost=running._ray_lost,
                                            ray_parent=head.pid if head else None).start()
    _sweep_checkpoints_periodically(service, running._stopped)
    return running


def _start_or_join_ray_head(data_dir: Path, num_cpus: int | None,
                            namespace: str) -> tuple[ray_head.RayHead, bool]:
    """The Ray head of this data folder: the one the last server started if it still runs
    (its jobs' runners may be training on it), else a new one (True: started now)."""
    head = ray_head.find(data_dir)
    started = head is None
    if head is None:
        ray_head.stop_leftovers(data_dir)
        head = ray_head.start(data_dir, num_cpus)
        log.info("started Ray (pid %d, %s) for %s", head.pid, head.address, data_dir)
    else:
        log.info("joined the running Ray of %s (pid %d, %s)", data_dir, head.pid, head.address)
    ray_cluster.join_head(head, ray_head.token_path(data_dir), namespace)
    return head, started


def _detached_runners(lifecycle: JobLifecycle, lease_seconds: Callable[[], float],
                      namespace: str) -> dict[str, Any]:
    """The queue's runner factory and attacher for runners in detached actors."""

    def start(job, dataset, *, job_id: str, **options) -> DetachedJobRunner:
        return DetachedJobRunner(job, dataset, job_id=job_id, namespace=namespace,
                                 keeper=lifecycle.run_keeper(job_id, lease_seconds()),
                                 **options)

    def attach(job_id: str, **callbacks) -> DetachedJobRunner:
        return DetachedJobRunner.attach(job_id, namespace, **callbacks)

    return {"runner_factory": start, "runner_attacher": attach}


def _make_private(data_dir: Path) -> None:
    """The data folder readable, writable and searchable by this user only: it holds every
    tenant's data sets, specs, checkpoints and models. A wider folder (from an older version,
    or made by hand) is narrowed, and the log says so."""
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if mode != 0o700:
        os.chmod(data_dir, 0o700)
        log.warning("data folder %s was mode %o; made 0700 (it holds every tenant's data)",
                    data_dir, mode)


def _sweep_checkpoints_periodically(service: JobService, stopped: threading.Event) -> None:
    """Delete ended jobs' checkpoints past their retention: at start, then every tenth of
    the retention (at least every second, at most every hour) until the server stops."""
    interval = min(3600.0, max(1.0, service.checkpoint_retention_seconds / 10))

    def sweep() -> None:
        while True:
            try:
                service.delete_expired_checkpoints()
            except Exception:  # a failed sweep is retried next time, never fatal
                log.exception("the checkpoint retention sweep failed")
            if stopped.wait(interval):
                return

    threading.Thread(target=sweep, name="checkpoint-retention", daemon=True).start()


def _start_metrics(port: int | None,
                   parameter_series: ParameterSeries | None) -> tuple[Any, Any, str, list]:
    """The metrics observer, its HTTP server, its URL and gRPC interceptors; nothing when
    metrics are off or the exporter is not installed."""
    if port is None:
        return None, None, "", []
    try:
        from prometheus_client import CollectorRegistry

        from services.metrics import TrainingMetrics, start_metrics_server
    except ImportError:
        return None, None, "", []
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry, parameter_series=parameter_series)
    http_server, bound = start_metrics_server(port, registry)
    return (metrics, http_server, f"http://127.0.0.1:{bound}/metrics",
            [metrics.grpc_interceptor()])

