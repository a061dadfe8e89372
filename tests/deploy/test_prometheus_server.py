"""A real Prometheus (Debian's /usr/bin/prometheus, on a free loopback port, storage in a temp
dir) scrapes the live chainrule service (services.server.serve, embedded Ray) while it trains
a real job and answers gRPC calls; then every PromQL expression of every dashboard panel runs
against Prometheus' HTTP API and must parse and return data."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from chainrule.client import Client, state_name
from chainrule.spec_file import job_spec_from_dict
from services.server import serve
from tests.deploy.conftest import DEPLOY, free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes with a 1 s scrape interval
SCRAPES_BEFORE_QUERYING = 8


def long_job(name: str) -> dict:
    """Iris for many epochs: it trains until the test cancels it."""
    return job_spec_from_dict({
        "name": name,
        "model": {"layers": [{"linear": {"out_features": 16}}, {"relu": {}},
                             {"linear": {"out_features": 3}}]},
        "loss": "cross_entropy",
        "optimizer": {"sgd": {"lr": 0.05, "momentum": 0.9}},
        "data": {"dataset": "sklearn:iris", "batch_size": 32, "epochs": 5000,
                 "validation_fraction": 0.2},
        "eval_interval_steps": 10,
        "resources": {"workers": 2, "parameter_servers": 2},
        "seed": 0,
    })


def prometheus_query(base: str, expression: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
    except urllib.error.HTTPError as error:  # 400: the expression does not parse
        raise AssertionError(f"{expression}: {error.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


@pytest.fixture(scope="module")
def live_service(local_ray, tmp_path_factory):
    """The service on loopback with metrics on, training one job with a second one queued."""
    server = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), metrics_port=0,
                   max_concurrent_jobs=1)
    client = Client(server.address, timeout=30)
    stop = threading.Event()
    try:
        running = client.submit(long_job("metrics-live"))
        client.submit(long_job("metrics-queued"))  # waits: max_concurrent_jobs is 1
        threads = [threading.Thread(target=_api_traffic, args=(client, running.id, stop),
                                    daemon=True),
                   threading.Thread(target=_watch, args=(client, running.id, stop),
                                    daemon=True)]
        for thread in threads:
            thread.start()
        yield server, client, running.id
    finally:
        stop.set()
        for job in client.list().jobs:
            if state_name(job.state) in ("QUEUED", "RUNNING"):
                client.cancel(job.id)
        client.close()
        server.stop(grace=1.0, job_timeout=60.0)


def _api_traffic(client: Client, job_id: str, stop: threading.Event) -> None:
    """Unary calls that succeed and calls that fail, as users make them."""
    while not stop.wait(0.25):
        try:
            client.get(job_id)
            client.list()
            client.get("no-such-job")
        except grpc.RpcError:
            pass


def _watch(client: Client, job_id: str, stop: threading.Event) -> None:
    """WatchJob streams, each ended by the client after a few events."""
    while not stop.is_set():
        try:
            for count, _ in enumerate(client.watch(job_id, idle_timeout=30), start=1):
                if count >= 3 or stop.is_set():
                    break
        except grpc.RpcError:
            pass


@pytest.fixture(scope="module")
def prometheus(live_service, prometheus_binary, tmp_path_factory):
    """Prometheus with the repository's config and alert rules, scraping the live service."""
    server, _, _ = live_service
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (chainrule,) = [job for job in config["scrape_configs"] if job["job_name"] == "chainrule"]
    metrics_target = urllib.parse.urlsplit(server.metrics_url).netloc
    chainrule["static_configs"] = [{"targets": [metrics_target]}]
    config["scrape_configs"] = [chainrule]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(directory / "prometheus.log", "w")
    process = subprocess.Popen(
        [prometheus_binary, f"--config.file={directory / 'prometheus.yml'}",
         f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def scraped(prometheus, live_service):
    """Wait until Prometheus holds enough scrapes of the training job."""
    _, _, job_id = live_service
    deadline = time.monotonic() + 90
    query = (f'count_over_time(chainrule_training_steps_total{{job_id="{job_id}"}}[1m]) '
             f'>= {SCRAPES_BEFORE_QUERYING}')
    while not prometheus_query(prometheus, query):
        assert time.monotonic() < deadline, "Prometheus never scraped the training job"
        time.sleep(0.5)
    return prometheus


def dashboard_expressions() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                found.append((path.stem, panel["title"], target["expr"]))
    return found


def test_prometheus_scrapes_the_service_and_loads_the_alert_rules(scraped):
    targets = get_json(f"{scraped}/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    assert targets[0]["labels"]["job"] == "chainrule"
    groups = get_json(f"{scraped}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 8
    for rule in rules:  # evaluated against real series without error
        assert rule["health"] == "ok", rule


def test_the_job_variable_lists_the_running_job(scraped, live_service):
    _, _, job_id = live_service
    dashboard = json.loads((DEPLOY / "grafana/dashboards/training.json").read_text())
    (variable,) = dashboard["templating"]["list"]
    metric, label = variable["query"]["query"].removeprefix("label_values(").rstrip(")").split(
        ", ")
    values = get_json(f"{scraped}/api/v1/label/{label}/values?"
                      + urllib.parse.urlencode({"match[]": metric}))["data"]
    assert job_id in values


def test_every_dashboard_expression_parses_and_returns_data(scraped, live_service):
    _, _, job_id = live_service
    expressions = dashboard_expressions()
    assert len(expressions) >= 30
    empty: dict[str, str] = {}
    deadline = time.monotonic() + 60
    pending = list(expressions)
    while pending:
        still = []
        for dashboard, title, expression in pending:
            query = expression.replace("$job_id", job_id).replace("$__rate_interval",
                                                                  RATE_INTERVAL)
            result = prometheus_query(scraped, query)  # raises if it does not parse
            values = [float(series["value"][1]) for series in result]
            if not any(math.isfinite(v) for v in values):
                still.append((dashboard, title, expression))
                empty[f"{dashboard} / {title}: {query}"] = str(values)
        pending = still
        if pending:
            assert time.monotonic() < deadline, "no data for:\n" + "\n".join(
                f"{k} -> {empty[k]}" for k in empty
                if any(k.startswith(f"{d} / {t}:") for d, t, _ in pending))
            time.sleep(1.0)


def test_the_live_service_endpoint_passes_promtool_check_metrics(live_service, promtool):
    server, _, job_id = live_service
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    assert f'chainrule_training_steps_total{{job_id="{job_id}"}}' in text
    assert "chainrule_grpc_requests_total{" in text
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout and not check.stderr, (
        check.stdout + check.stderr)


def test_the_service_metrics_follow_the_job(scraped, live_service):
    _, client, job_id = live_service
    steps = prometheus_query(scraped, f'chainrule_training_steps_total{{job_id="{job_id}"}}')
    assert float(steps[0]["value"][1]) > 0
    running = prometheus_query(scraped, 'chainrule_jobs{state="RUNNING"}')
    assert float(running[0]["value"][1]) == 1
    depth = prometheus_query(scraped, "chainrule_queue_depth")
    assert float(depth[0]["value"][1]) == 1  # the second job waits for the only slot
    calls = prometheus_query(
        scraped, 'sum by (code) (chainrule_grpc_requests_total{method=~".*/GetJob"})')
    codes = {series["metric"]["code"] for series in calls}
    assert {"OK", "NOT_FOUND"} <= codes
    assert state_name(client.get(job_id).state) == "RUNNING"
