"""The web UI, against a real server and a real short job: its JSON under the API's tokens and
tenancy, and its page in a real headless browser (Debian's chromium, which `make test`
installs): the elements that must be there, a screenshot that shows them, and text a hostile
tenant wrote shown as text, never run as script."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from chainrule.client import Client
from scheduler.job_states import FAILED, QUEUED
from services.auth import Authenticator
from services.server import serve
from services.store import JobRecord
from services.training_curves import TrainingCurves
from services.web_ui import start_web_ui
from tests.services.certificates import CertificateAuthority
from tests.services.helpers import iris_spec, wait_for

pytestmark = pytest.mark.slow

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
CAROL = "carol-token-0123456789"  # a quota of one running job's CPUs
# What a hostile tenant might write where the page shows text: were it parsed as HTML, the
# image's handler and the script would mark the body.
HOSTILE = ("<img src=x onerror=\"document.body.setAttribute('data-pwned','1')\">"
           "<script>document.body.setAttribute('data-pwned','2')</script>")
CURVE_BLUE = (11, 99, 197)  # the training curve's stroke, #0b63c5 in services/web_ui.html


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB}\ncarol {CAROL} max_running_cpus=0.6\n")
    return path


@pytest.fixture(scope="module")
def server(local_ray, tmp_path_factory, tokens):
    running = serve("127.0.0.1:0", tmp_path_factory.mktemp("data"), tokens_file=tokens,
                    web_address="127.0.0.1:0")
    yield running
    running.stop()


@dataclass
class Jobs:
    trained: str  # alice's real job, with a hostile line in its log
    hostile: str  # alice's, named by a hostile tenant
    bobs: str
    seen_running: list[dict] = field(default_factory=list)  # its JSON read while it ran


@pytest.fixture(scope="module")
def jobs(server) -> Jobs:
    with Client(server.address, token=ALICE, timeout=30) as client:
        # An evaluation every 2 steps: the validation curves have points all along.
        trained = client.submit(iris_spec(epochs=6, name="iris web",
                                          eval_interval_steps=2)).id
        seen: list[dict] = []

        def ended() -> bool:
            page = get_json(server, f"/api/jobs/{trained}", ALICE)
            if page["state"] == "RUNNING":
                seen.append(page)
            return page["state"] not in ("QUEUED", "RUNNING")

        wait_for(ended, timeout=120, interval=0.02, what=f"{trained} to end")
    store = server.service.store
    # Lines as the runner stores them (tests/services/test_recovery_events.py makes real
    # recoveries): one with hostile text, and a recovery.
    store.add_event(trained, "warning", {"message": HOSTILE})
    store.add_event(trained, "recovery", {"step": 3, "kind": "worker_lost",
                                          "message": "worker 1 lost at step 3: recomputed"})
    # Rows as an older server stored them, before names were restricted to plain labels (the
    # API refuses such a name today), and one of another tenant.
    hostile = _stored_job(server, "alice", HOSTILE, error=HOSTILE)
    bobs = _stored_job(server, "bob", "bob's job", error="")
    return Jobs(trained, hostile, bobs, seen)


def _stored_job(server, tenant: str, name: str, error: str) -> str:
    spec = iris_spec()
    spec.name = name
    job_id = f"job-{tenant}{int(time.time() * 1e6) % 10**6:06d}"
    server.service.store.create_job(JobRecord(job_id, tenant, spec, QUEUED, time.time()),
                                    spec_digest=job_id)
    server.service.store.set_state(job_id, FAILED, from_states={QUEUED}, error=error,
                                   finished=True)
    return job_id


# --- HTTP ----------------------------------------------------------------------------------


def request(url: str, token: str | None = None, method: str = "GET",
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method),
                                    timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(server, path: str, token: str | None) -> dict:
    status, _, body = request(server.web_url.rstrip("/") + path, token)
    assert status == 200, body
    return json.loads(body)


def test_the_jobs_list_is_the_tenants_own_with_state_progress_and_creation(server, jobs):
    listed = {job["id"]: job for job in get_json(server, "/api/jobs", ALICE)["jobs"]}
    assert set(listed) == {jobs.trained, jobs.hostile}
    trained = listed[jobs.trained]
    assert trained["state"] == "SUCCEEDED" and trained["created_at"] > 0
    assert trained["progress"]["step"] == trained["progress"]["total_steps"] > 0
    assert [job["id"] for job in get_json(server, "/api/jobs", BOB)["jobs"]] == [jobs.bobs]


def test_a_job_page_has_its_curves_spec_log_and_recoveries(server, jobs):
    page = get_json(server, f"/api/jobs/{jobs.trained}", ALICE)
    steps = page["progress"]["total_steps"]
    assert [point[0] for point in page["curves"]["training_loss"]] == list(range(1, steps + 1))
    validation = page["curves"]["validation"]
    assert len(validation) >= steps // 2  # every 2 steps
    assert all(0 <= accuracy <= 1 for _, _, accuracy in validation)
    assert page["spec"]["name"] == "iris web" and page["spec"]["data"]["epochs"] == 6
    assert [line["message"] for line in page["recoveries"]] == [
        "worker 1 lost at step 3: recomputed"]
    messages = [line["message"] for line in page["log"]]
    assert "SUCCEEDED" in messages and HOSTILE in messages


def test_the_curves_grow_while_the_job_runs(server, jobs):
    final = get_json(server, f"/api/jobs/{jobs.trained}", ALICE)["curves"]
    training = [len(page["curves"]["training_loss"]) for page in jobs.seen_running]
    assert training == sorted(training)
    assert any(0 < length < len(final["training_loss"]) for length in training), training
    validation = [len(page["curves"]["validation"]) for page in jobs.seen_running]
    assert validation == sorted(validation) and validation[0] < len(final["validation"])


def test_a_job_page_says_how_long_it_ran_and_where_a_queued_job_waits(server, jobs):
    trained = get_json(server, f"/api/jobs/{jobs.trained}", ALICE)
    assert 0 < trained["running_seconds"] <= trained["finished_at"] - trained["started_at"]
    # Carol's quota holds one of these jobs at a time: the second waits, and its page says so.
    spec = iris_spec(epochs=10_000, resources={"workers": 1, "parameter_servers": 1,
                                                 "cpus_per_worker": 0.5})
    with Client(server.address, token=CAROL, timeout=30) as client:
        first = client.submit(spec).id
        second = client.submit(spec).id
        try:
            wait_for(lambda: get_json(server, f"/api/jobs/{first}", CAROL)["state"] == "RUNNING",
                     timeout=60, what=f"{first} to run")
            waiting = wait_for(lambda: (lambda page: page if page["wait_reason"] else None)(
                get_json(server, f"/api/jobs/{second}", CAROL)), timeout=30,
                what=f"{second}'s wait reason")
            assert waiting["state"] == "QUEUED" and waiting["queue_position"] == 1
            assert "quota" in waiting["wait_reason"]
            assert get_json(server, f"/api/jobs/{first}", CAROL)["queue_position"] == 0
        finally:
            client.cancel(second)
            client.cancel(first)


def test_a_wrong_or_missing_token_is_401_and_another_tenants_job_404(server, jobs):
    for token in (None, "not-a-token-at-all-0000"):
        for path in ("/api/jobs", f"/api/jobs/{jobs.trained}"):
            status, headers, body = request(server.web_url + path.lstrip("/"), token)
            assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            assert json.loads(body)["error"].startswith("authorization:")
    status, _, body = request(f"{server.web_url}api/jobs/{jobs.trained}", BOB)
    assert status == 404 and json.loads(body) == {"error": f"job_id: no job {jobs.trained!r}"}


def test_the_page_runs_its_own_script_only_and_nothing_can_be_written(server):
    status, headers, body = request(server.web_url)
    assert status == 200
    # Nothing fetched from elsewhere: the one URL in it is SVG's namespace name.
    assert re.findall(rb"[a-z]+://[^\"'` ]*", body) == [b"http://www.w3.org/2000/svg"]
    policy = headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in policy and "unsafe" not in policy
    assert "default-src 'none'" in policy
    for method in ("POST", "PUT", "DELETE"):
        assert request(f"{server.web_url}api/jobs", ALICE, method=method)[0] == 405


def test_connections_beyond_the_cap_are_closed_at_once_and_a_silent_one_dropped(server):
    ui = start_web_ui("127.0.0.1:0", server.service, Authenticator({}), TrainingCurves(),
                      max_connections=1, connection_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", ui.port), timeout=5) as silent:
            connected = time.monotonic()
            time.sleep(0.2)  # accepted: it holds the one slot
            with socket.create_connection(("127.0.0.1", ui.port), timeout=5) as extra:
                extra.sendall(b"GET /api/jobs HTTP/1.0\r\n\r\n")
                assert _answer(extra) == b""  # closed, never answered
            assert _answer(silent) == b""  # dropped once silent for the timeout
            assert 0.9 < time.monotonic() - connected < 4
        # Its slot is free again.
        wait_for(lambda: request(ui.url + "api/jobs")[0] == 200, timeout=5, what="a slot")
    finally:
        ui.stop()


def _answer(connection: socket.socket) -> bytes:
    try:
        return connection.recv(100)
    except ConnectionResetError:
        return b""


def test_the_web_ui_serves_other_hosts_only_with_tokens_and_tls(tmp_path):
    with pytest.raises(ValueError, match="--web-address '0.0.0.0:0' is not loopback"):
        serve("127.0.0.1:0", tmp_path / "data", web_address="0.0.0.0:0")
    with pytest.raises(ValueError, match="--web-address: expected HOST:PORT"):
        serve("127.0.0.1:0", tmp_path / "data", web_address="8080")


def test_with_tls_the_web_ui_is_https_with_the_servers_certificate_and_client_ca(
        server, tokens, tmp_path):
    server_ca, client_ca = (CertificateAuthority(tmp_path, name) for name in ("server", "client"))
    certificate, client = (server_ca.issue("chainrule-server", server=True),
                           client_ca.issue("alice", server=False))
    running = serve("127.0.0.1:0", tmp_path / "data", tokens_file=tokens,
                    tls_cert=certificate.certificate, tls_key=certificate.key,
                    tls_client_ca=client_ca.path, web_address="127.0.0.1:0")
    try:
        assert running.web_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(server_ca.path))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
            request(running.web_url + "api/jobs", ALICE, context=context)  # no client cert
        context.load_cert_chain(client.certificate, client.key)
        status, _, body = request(running.web_url + "api/jobs", ALICE, context=context)
        assert status == 200 and json.loads(body)["jobs"] == []
    finally:
        running.stop()


# --- the browser ---------------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list[Element] = field(default_factory=list)
    text: str = ""

    def all_text(self) -> str:
        return self.text + "".join(child.all_text() for child in self.children)

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        found = [self] if self.tag == tag and all(
            self.attrs.get(name.replace("_", "-")) == value for name, value in attrs.items()
        ) else []
        return found + [match for child in self.children for match in
                        child.find_all(tag, **attrs)]

    def find(self, tag: str, **attrs: str) -> Element:
        (match,) = self.find_all(tag, **attrs)
        return match


class DomParser(HTMLParser):
    VOID = {"meta", "input", "br", "img", "link", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(Element("#text", {}, text=data))


def browse(url: str, folder: Path) -> tuple[str, Element, Path]:
    """The page's DOM once its fetches are answered, and a screenshot of it."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make test installs it: apt-get install chromium)"
    shot = folder / "page.png"
    command = [chromium, "--headless", "--disable-gpu", f"--user-data-dir={folder / 'profile'}",
               "--no-first-run", "--disable-extensions", "--disable-component-update",
               "--disable-background-networking", "--disable-sync", "--window-size=1000,1200",
               "--virtual-time-budget=5000", f"--screenshot={shot}", "--dump-dom", url]
    if os.geteuid() == 0:
        command.insert(2, "--no-sandbox")  # chromium's sandbox refuses root
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    parser = DomParser()
    parser.feed(done.stdout)
    return done.stdout, parser.root, shot


def assert_nothing_injected(html: str) -> None:
    assert 'data-pwned="' not in html  # no hostile handler or script ran
    assert "<img" not in html and "&lt;img src=x onerror" in html  # the text shown as text


def assert_screenshot_shows_the_page(shot: Path, curve: bool) -> None:
    with Image.open(shot) as image:
        image.verify()  # a valid PNG
    with Image.open(shot) as image:
        assert image.size == (1000, 1200)
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20  # not blank: text, table, charts
        if curve:
            blue = sum(count for count, colour in colours
                       if all(abs(a - b) <= 40 for a, b in zip(colour, CURVE_BLUE)))
            assert blue > 100, "the training curve is not drawn"


def test_the_browser_shows_the_tenants_jobs_and_a_hostile_name_as_text(server, jobs, tmp_path):
    html, dom, shot = browse(f"{server.web_url}#/?token={ALICE}", tmp_path)
    rows = {row.attrs["data-job-id"]: row for row in dom.find_all("tr", **{"class": "job"})}
    assert set(rows) == {jobs.trained, jobs.hostile}
    trained = rows[jobs.trained]
    assert trained.find("td", **{"class": "state state-SUCCEEDED"}).all_text() == "SUCCEEDED"
    steps = get_json(server, f"/api/jobs/{jobs.trained}", ALICE)["progress"]["total_steps"]
    progress = trained.find("td", **{"class": "progress"}).all_text()
    assert progress.startswith(f"step {steps}/{steps} (100%), epoch 6/6, loss ")
    assert trained.find("td", **{"class": "created"}).all_text()
    assert rows[jobs.hostile].find("td", **{"class": "name"}).all_text() == HOSTILE
    assert_nothing_injected(html)
    assert_screenshot_shows_the_page(shot, curve=False)


def test_the_browser_shows_a_jobs_curves_spec_log_and_recoveries(server, jobs, tmp_path):
    page = get_json(server, f"/api/jobs/{jobs.trained}", ALICE)
    html, dom, shot = browse(f"{server.web_url}#/jobs/{jobs.trained}?token={ALICE}", tmp_path)
    assert dom.find("td", id="job-state").all_text() == "SUCCEEDED"
    assert re.fullmatch(r"\d+s", dom.find("td", id="job-running").all_text())  # iris: seconds
    loss_chart = dom.find("svg", id="loss-chart")
    training = loss_chart.find("polyline", data_series="training").attrs["points"].split()
    assert len(training) == len(page["curves"]["training_loss"]) == page["progress"]["step"]
    validation = loss_chart.find("polyline", data_series="validation").attrs["points"].split()
    assert len(validation) == len(page["curves"]["validation"])
    accuracy = dom.find("svg", id="accuracy-chart").find("polyline",
                                                          data_series="validation-accuracy")
    assert len(accuracy.attrs["points"].split()) == len(page["curves"]["validation"])
    assert json.loads(dom.find("pre", id="spec").all_text()) == page["spec"]
    log_lines = [line.all_text() for line in dom.find("ol", id="log").find_all("li")]
    assert len(log_lines) == len(page["log"])
    assert any(line.endswith("state  SUCCEEDED") for line in log_lines)
    assert any(line.endswith(f"warning  {HOSTILE}") for line in log_lines)
    assert "worker 1 lost at step 3" in dom.find("ul", id="recoveries").all_text()
    assert_nothing_injected(html)
    assert_screenshot_shows_the_page(shot, curve=True)


def test_the_browser_asks_for_a_token_when_it_has_a_wrong_one(server, jobs, tmp_path):
    html, dom, _ = browse(f"{server.web_url}#/?token=wrong-token-000000000", tmp_path)
    assert "hidden" not in dom.find("form", id="token-form").attrs
    assert dom.find("p", id="message").all_text() == "401: authorization: unknown token"
    assert not dom.find_all("tr", **{"class": "job"})


def test_serve_puts_the_web_ui_on_loopback_next_to_metrics_unless_told_otherwise():
    from services.cli import build_parser

    parser = build_parser()
    defaults = parser.parse_args(["serve"])
    assert defaults.web_address == "127.0.0.1:9465" and not defaults.no_web
    assert parser.parse_args(["serve", "--no-web"]).no_web
