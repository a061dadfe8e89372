"""deploy/ by inspection (no Docker engine here): the compose file, the Kubernetes manifests,
the Dockerfile and the Grafana provisioning parse, and refer only to images built from this
repository's Dockerfile or to well-known public ones, to the service's real ports and flags,
and to files that exist."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml

from services.cli import build_parser
from services.metrics import METRICS_ADDRESS_VARIABLE
from tests.deploy.conftest import DEPLOY, ROOT

GRPC_PORT, METRICS_PORT, RAY_PORT = 50051, 9464, 6379
PUBLIC_IMAGES = ("rayproject/ray:", "prom/prometheus:", "grafana/grafana:")
OUR_IMAGE = "chainrule:"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def kubernetes() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def serve_arguments(command: str | list[str]):
    """The `chainrule serve ...` part of a container command, parsed by the real CLI."""
    text = command if isinstance(command, str) else " ".join(command)
    words = shlex.split(text[text.index("chainrule serve"):].split("&&")[0])
    args = build_parser().parse_args(words[1:])
    assert args.command == "serve"
    return args


def serve_defaults():
    return build_parser().parse_args(["serve"])


# --- the service's own defaults ---------------------------------------------------------------


def test_documented_ports_are_the_service_defaults():
    defaults = serve_defaults()
    assert defaults.address.endswith(f":{GRPC_PORT}")
    assert defaults.metrics_port == METRICS_PORT


# --- docker compose ---------------------------------------------------------------------------


def test_compose_has_a_ray_head_two_workers_the_service_prometheus_and_grafana():
    assert set(compose()["services"]) == {"ray-head", "ray-worker-1", "ray-worker-2",
                                          "chainrule", "prometheus", "grafana"}


def test_compose_images_are_built_here_or_public():
    for name, service in compose()["services"].items():
        image = service["image"]
        if image.startswith(OUR_IMAGE):
            build = service["build"]
            assert (DEPLOY / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).is_file(), name
        else:
            assert image.startswith(PUBLIC_IMAGES), f"{name}: unexpected image {image}"
            assert ":latest" not in image, f"{name}: pin the image version"


def test_compose_mounts_only_files_of_the_repository():
    volumes = compose().get("volumes", {})
    for name, service in compose()["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name}: undeclared volume {source}"


def test_compose_ray_nodes_and_service_use_token_auth_and_share_memory():
    services = compose()["services"]
    head = services["ray-head"]
    assert f"--port={RAY_PORT}" in head["command"] and "--head" in head["command"]
    assert head["ipc"] == "shareable"
    for name in ("ray-head", "ray-worker-1", "ray-worker-2", "chainrule"):
        service = services[name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert "RAY_AUTH_TOKEN" in service["environment"], name
        # The shared-memory transport needs one /dev/shm and one host identity (boot id +
        # host name) for the service and every actor.
        assert service["hostname"] == head["hostname"], name
        if name != "ray-head":
            assert service["ipc"] == "service:ray-head", name
            assert service["depends_on"]["ray-head"]["condition"] == "service_healthy", name
    for name in ("ray-worker-1", "ray-worker-2"):
        assert f"--address=ray-head:{RAY_PORT}" in services[name]["command"]


def test_compose_service_command_is_accepted_by_the_cli():
    service = compose()["services"]["chainrule"]
    args = serve_arguments(service["command"])
    assert args.ray_address == f"ray-head:{RAY_PORT}"
    assert args.address == f"127.0.0.1:{GRPC_PORT}"  # loopback: no TLS or tokens needed
    assert args.metrics_port == METRICS_PORT
    assert service["environment"][METRICS_ADDRESS_VARIABLE] == "0.0.0.0"
    # A driver needs a raylet on its host: the service joins first, without CPUs.
    assert f"ray start --address=ray-head:{RAY_PORT} --num-cpus=0" in " ".join(
        service["command"])


def test_compose_publishes_ports_on_loopback_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} to every interface"


def test_prometheus_scrapes_the_compose_service_on_its_metrics_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = jobs["chainrule"]["static_configs"][0]["targets"]
    assert targets == [f"chainrule:{METRICS_PORT}"]
    for target in jobs["ray"]["static_configs"][0]["targets"]:
        assert target.split(":")[0] in compose()["services"]
        assert f"--metrics-export-port={target.split(':')[1]}" in \
            compose()["services"][target.split(":")[0]]["command"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards():
    grafana = compose()["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/chainrule.yml").read_text())["providers"]
    assert mounts["./grafana/dashboards"] == providers[0]["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
    for path in (DEPLOY / "grafana/dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == source["uid"], (path.name, panel["title"])


def test_dashboards_are_valid_and_distinct():
    uids = set()
    for path in sorted((DEPLOY / "grafana/dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in dashboard["panels"]:
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    assert uids == {"chainrule-training", "chainrule-cluster", "chainrule-service"}


# --- Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_builds_from_python_slim_and_copies_existing_paths():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    assert "FROM python:3.11-slim" in lines
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    args = build_parser().parse_args(json.loads(cmd[4:])[1:])
    assert args.command == "serve"
    assert any("RAY_AUTH_MODE=token" in line for line in lines)


# --- Kubernetes -------------------------------------------------------------------------------


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in kubernetes() if doc["kind"] == kind]


def containers(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        templates = [doc["spec"]["headGroupSpec"]["template"]] + [
            group["template"] for group in doc["spec"]["workerGroupSpecs"]]
    else:
        templates = [doc["spec"]["template"]]
    return [c for template in templates for c in template["spec"]["containers"]]


def test_kubernetes_has_a_raycluster_the_service_and_a_servicemonitor():
    kinds = sorted(doc["kind"] for doc in kubernetes())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "Service",
                     "ServiceMonitor"]
    assert by_kind("RayCluster")[0]["apiVersion"] == "ray.io/v1"
    assert by_kind("ServiceMonitor")[0]["apiVersion"] == "monitoring.coreos.com/v1"


def test_kubernetes_images_are_the_compose_image_or_public():
    ours = compose()["services"]["chainrule"]["image"]
    for doc in kubernetes():
        if doc["kind"] in ("RayCluster", "Deployment"):
            for container in containers(doc):
                image = container["image"]
                assert image == ours or image.startswith(PUBLIC_IMAGES), image


def test_kubernetes_ray_processes_use_token_auth_from_a_secret():
    for doc in by_kind("RayCluster") + by_kind("Deployment"):
        for container in containers(doc):
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
                "ray-auth-token"


def test_kubernetes_service_joins_the_raycluster_head():
    (cluster,) = by_kind("RayCluster")
    (deployment,) = by_kind("Deployment")
    (container,) = containers(deployment)
    command = " ".join(container["command"] + container["args"])
    head = f"{cluster['metadata']['name']}-head-svc:{RAY_PORT}"  # KubeRay's head Service
    args = serve_arguments(command)
    assert args.ray_address == head
    assert f"ray start --address={head}" in command
    head_ports = {p["containerPort"] for p in containers(cluster)[0]["ports"]}
    assert RAY_PORT in head_ports


def test_kubernetes_service_exposes_grpc_and_metrics_with_tls_and_tokens():
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    (container,) = containers(deployment)
    args = serve_arguments(" ".join(container["command"] + container["args"]))
    assert args.address == f"0.0.0.0:{GRPC_PORT}" and args.metrics_port == METRICS_PORT
    assert args.tokens and args.tls_cert and args.tls_key  # the server demands them off loopback
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[METRICS_ADDRESS_VARIABLE] == "0.0.0.0"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for port in service["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    # Every file the command reads is mounted from a volume of the pod.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for path in (args.tokens, args.tls_cert, args.tls_key, args.data_dir):
        mount = next(m for m in mounts if path.startswith(m))
        assert mounts[mount] in volumes
    claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
    assert claim in {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}


def test_servicemonitor_scrapes_the_service_metrics_port():
    (monitor,) = by_kind("ServiceMonitor")
    (service,) = by_kind("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # Prometheus names the scrape job after the Service: the rules select job="chainrule".
    assert service["metadata"]["name"] == "chainrule"
    assert 'up{job="chainrule"}' in (DEPLOY / "prometheus" / "alerts.yml").read_text()


def test_readme_explains_every_secret_the_manifests_need():
    readme = (DEPLOY / "README.md").read_text()
    secrets = set()
    for doc in kubernetes():
        text = yaml.safe_dump(doc)
        secrets |= set(re.findall(r"secretName: (\S+)", text))
        secrets |= set(re.findall(r"secretKeyRef:\n\s+key: \S+\n\s+name: (\S+)", text))
    assert secrets == {"chainrule-tokens", "chainrule-tls", "ray-auth-token"}
    for secret in secrets:
        assert "kubectl create secret" in readme and secret in readme, secret
    for command in ("docker compose", "kubectl apply", "chainrule submit"):
        assert command in readme


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix()
                                        for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    assert list(yaml.safe_load_all((DEPLOY / path).read_text()))
