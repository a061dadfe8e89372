"""The read-only web UI: one static page (services/web_ui.html) and the JSON it reads.

    GET /                 the page: the jobs list, and a job's page at #/jobs/JOB_ID
    GET /api/jobs         the caller's jobs, newest first (?page_token= for the next page)
    GET /api/jobs/JOB_ID  one job: state, progress, spec, curves, log and recoveries

The JSON comes from the same JobService calls as the gRPC API, under the same bearer tokens
(`Authorization: Bearer TOKEN`; without a token file every caller is the tenant "default"), so
a tenant sees only its own jobs and another tenant's job is 404, as NOT_FOUND is over gRPC.
The page fetches nothing from elsewhere and builds its DOM with textContent only; its Content
Security Policy admits its own inline script and style (by hash) and nothing else, so text a
tenant wrote (a job name, a log line) can never run as script.

Bounded: each curve at most MAX_CURVE_POINTS points, the log (and the recoveries) its last
MAX_LOG_LINES lines of at most MAX_LOG_LINE_CHARS characters, MAX_CONNECTIONS connections at
once (one more is closed at once), each dropped after CONNECTION_TIMEOUT_SECONDS of silence
(HTTP/1.0: one request a connection, so a browser holds none open between polls).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format

from services.auth import Authenticator
from services.errors import NotFound, ServiceError
from services.job_logs import describe, job_events
from services.jobs import JobService
from services.store import JobRecord, ProgressSummary, ValidationSummary
from services.training_curves import TrainingCurves

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MAX_CURVE_POINTS = 512
MAX_LOG_LINES = 500
MAX_LOG_LINE_CHARS = 16384
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT_SECONDS = 10.0
RECOVERY_KINDS = ("recovery", "checkpoint_corrupt")  # the log's events that are recoveries
# The service's errors as HTTP statuses (services/errors.py; the gRPC status names).
_HTTP_STATUS = {"UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED, "NOT_FOUND": HTTPStatus.NOT_FOUND,
                "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
                "RESOURCE_EXHAUSTED": HTTPStatus.SERVICE_UNAVAILABLE}
_JOB_PATH = re.compile(r"/api/jobs/([A-Za-z0-9_-]{1,64})")


# --- the JSON ------------------------------------------------------------------------------


def jobs_page(service: JobService, tenant: str, page_token: str) -> dict[str, Any]:
    jobs, next_token = service.list(tenant, page_size=PAGE_SIZE, page_token=page_token)
    return {"jobs": [_job_summary(job) for job in jobs], "next_page_token": next_token}


def job_page(service: JobService, curves: TrainingCurves, tenant: str,
             job_id: str) -> dict[str, Any]:
    job = service.get(tenant, job_id)  # NOT_FOUND for another tenant's job
    events = job_events(service, tenant, job_id)
    lines = [{"time": event.time, "kind": event.kind,
              "message": describe(event)[:MAX_LOG_LINE_CHARS]} for event in events]
    training = curves.points(job_id)
    return {
        **_job_summary(job),
        # While QUEUED (0 and "" otherwise), as GetJob says: its place among its tenant's
        # queued jobs and why it waits.
        "queue_position": job.queue_position,
        "wait_reason": job.wait_reason,
        "error": job.error,
        "final_validation": _validation(job.final_validation),
        "spec": json_format.MessageToDict(job.spec, preserving_proto_field_name=True),
        "curves": {
            "training_loss": [[point.step, point.loss]
                              for point in downsample(training, MAX_CURVE_POINTS)],
            "validation": downsample(_validation_points(events), MAX_CURVE_POINTS),
        },
        "log": lines[-MAX_LOG_LINES:],
        "log_lines_left_out": max(0, len(lines) - MAX_LOG_LINES),
        "recoveries": [line for line in lines if line["kind"] in RECOVERY_KINDS][-MAX_LOG_LINES:],
    }


def downsample(points: list, limit: int) -> list:
    """At most `limit` of the points, evenly spread, the first and the last always kept."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    return [points[round(i * last / (limit - 1))] for i in range(limit)]


def _validation_points(events: list) -> list[list]:
    """[step, loss, accuracy or None] per evaluation, by step; a step evaluated again (a replay
    after a resume) keeps its latest figures."""
    by_step: dict[int, list] = {}
    for event in events:
        if event.kind == "validation":
            payload = event.payload
            by_step[int(payload.get("step", 0))] = [int(payload.get("step", 0)),
                                                    payload.get("loss"),
                                                    payload.get("accuracy")]
    return [by_step[step] for step in sorted(by_step)]


def _job_summary(job: JobRecord) -> dict[str, Any]:
    return {"id": job.id, "name": job.name, "state": job.state, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at,
            "running_seconds": job.seconds_running(time.time()),
            "progress": _progress(job.progress)}


def _progress(progress: ProgressSummary | None) -> dict[str, Any] | None:
    if progress is None:
        return None
    return {"step": progress.step, "total_steps": progress.total_steps,
            "epoch": progress.epoch, "epochs": progress.epochs, "loss": progress.loss,
            "samples_per_second": progress.samples_per_second,
            "eta_seconds": progress.eta_seconds, "validation": _validation(progress.validation)}


def _validation(summary: ValidationSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {"step": summary.step, "loss": summary.loss, "accuracy": summary.accuracy,
            "samples": summary.samples}


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged loss) as null: JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --- the page ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    html: bytes
    content_security_policy: str


def load_page() -> Page:
    """The page, and a policy that lets its own inline script and style run, by hash, and
    nothing else: no other script, no inline handler, no request to another origin."""
    html = resources.files("services").joinpath("web_ui.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        digests = [base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                   for body in bodies]
        return " ".join(f"'sha256-{digest}'" for digest in digests)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              f"frame-ancestors 'none'")
    return Page(html.encode(), policy)


# --- the HTTP server -----------------------------------------------------------------------


class WebUIServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: one more is closed at once
    rather than queued, so a flood costs threads up to that bound and no more."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Callable[..., Any], *,
                 family: socket.AddressFamily, tls: ssl.SSLContext | None,
                 max_connections: int):
        self.address_family = family
        super().__init__(address, handler)
        if tls is not None:
            # The handshake on the connection's own thread (its first read), under its timeout:
            # a client that never finishes one cannot stall the accepting thread.
            self.socket = tls.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn's own, with the slot given back before the socket closes: a client
        # that reconnects the moment it sees the close must find the slot free.
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._slots.release()
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or failed its TLS handshake is no server error.
        log.debug("web UI connection from %s ended with an error", client_address,
                  exc_info=True)


@dataclass
class RunningWebUI:
    url: str  # http(s)://host:port/, the port resolved when 0 was asked
    port: int
    _server: WebUIServer

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_web_ui(address: str, service: JobService, auth: Authenticator,
                 curves: TrainingCurves, *, tls: ssl.SSLContext | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 connection_timeout: float = CONNECTION_TIMEOUT_SECONDS) -> RunningWebUI:
    """Serve the UI at `address` ("host:port", "[v6]:port"; port 0: any free port) in a daemon
    thread. OSError when the address cannot be bound."""
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    page = load_page()
    handler = _handler_class(page, service, auth, curves, connection_timeout)
    server = WebUIServer((host, port), handler, family=family, tls=tls,
                         max_connections=max_connections)
    bound = server.server_address[1]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                     name="web-ui", daemon=True).start()
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    return RunningWebUI(f"{'https' if tls else 'http'}://{shown}:{bound}/", bound, server)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError naming --web-address."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--web-address: expected HOST:PORT (port 0: any free port), got "
                         f"{address!r}")
    return host, int(port)


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The gRPC server's certificate for HTTPS; with `client_ca`, a browser must present a
    client certificate it signed, as gRPC clients must."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _handler_class(page: Page, service: JobService, auth: Authenticator,
                   curves: TrainingCurves,
                   connection_timeout: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = connection_timeout  # a silent connection gives its slot back
        server_version = "chainrule"
        sys_version = ""

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page.html, "text/html; charset=utf-8",
                           {"Content-Security-Policy": page.content_security_policy})
                return
            try:
                header = self.headers.get("Authorization")
                tenant = auth.tenant([("authorization", header)] if header else [])
                if url.path == "/api/jobs":
                    token = parse_qs(url.query).get("page_token", [""])[0]
                    body = jobs_page(service, tenant, token)
                elif (match := _JOB_PATH.fullmatch(url.path)) is not None:
                    body = job_page(service, curves, tenant, match.group(1))
                else:
                    raise NotFound(f"no page {url.path!r}")
            except ServiceError as error:
                self._send_error(error)
                return
            except Exception:  # a bug: the log has it under an id, the caller gets the id
                error_id = uuid.uuid4().hex[:12]
                log.exception("web UI: internal error %s on %s", error_id, url.path)
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                {"error": f"internal error, see server log {error_id}"})
                return
            self._send_json(HTTPStatus.OK, body)

        def do_HEAD(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain", {"Allow": "GET"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD  # read-only

        def _send_error(self, error: ServiceError) -> None:
            status = _HTTP_STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)
            headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else {}
            self._send_json(status, {"error": error.message}, headers)

        def _send_json(self, status: HTTPStatus, body: dict[str, Any],
                       headers: dict[str, str] | None = None) -> None:
            data = json.dumps(_json_safe(body), allow_nan=False).encode()
            self._send(status, data, "application/json", headers or {})

        def _send(self, status: HTTPStatus, data: bytes, content_type: str,
                  headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("web UI %s: " + format, self.address_string(), *args)

    return Handler
