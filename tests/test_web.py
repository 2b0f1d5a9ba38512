"""HTTP layer: routes, auth, negotiation and the status page through respond() in process;
TLS, HEAD and keep-alive over a real socket; the status page in a real browser."""

from __future__ import annotations

import base64
import gzip
import socket
import html
import os
import re
import ssl
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml
from prometheus_client import CollectorRegistry

from conftest import (
    GOLDEN_NOW, ROOT, fast_defaults, golden_board, golden_discovery, job_counts, require_tool,
    run_cli, wait_until,
)
from exporter.collector import ImportCollector
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.board import ClusterSnapshot, SnapshotBoard
from exporter.paging import Stopped
from exporter.poller import ClusterPoller
from exporter.web import WebApp, create_server, respond
from exporter.webconfig import WebConfig

ARTIFACTS = Path(os.environ.get("ZIE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# ---- routes, auth and negotiation through respond(), no socket -------------------------

def app_with(**fields: object) -> WebApp:
    registry = CollectorRegistry()
    registry.register(ImportCollector(golden_board(), clock=lambda: GOLDEN_NOW))
    return WebApp(registry=registry, board=golden_board(), clock=lambda: GOLDEN_NOW,
                  **fields)  # type: ignore[arg-type]


def test_basic_auth_protects_every_endpoint() -> None:
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt(rounds=4)).decode()
    app = app_with(web_config=WebConfig(basic_auth_users={"alice": hashed},
                                        headers={"X-Content-Type-Options": "nosniff"}),
                   lifecycle=True)
    for method, path in (("GET", "/metrics"), ("GET", "/"), ("GET", "/-/healthy"),
                         ("HEAD", "/-/ready"), ("POST", "/-/reload"), ("GET", "/nope")):
        status, headers, _ = respond(app, method, path, {})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert respond(app, method, path, basic("alice", "wrong"))[0] == 401
        assert respond(app, method, path, basic("bob", "s3cret-pass"))[0] == 401
    status, headers, _ = respond(app, "GET", "/-/healthy", basic("alice", "s3cret-pass"))
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    lower = {"authorization": basic("alice", "s3cret-pass")["Authorization"]}
    status, _, body = respond(app, "GET", "/metrics", lower)      # any case of header name
    assert status == 200 and b"zilliz_import_up" in body
    assert respond(app, "POST", "/-/reload", basic("alice", "s3cret-pass"))[0] == 200


def test_routes_and_lifecycle() -> None:
    ready = [False]
    reloads: list[str] = []

    def reload() -> str | None:
        reloads.append("reload")
        return None if len(reloads) == 1 else "c.yml: key 'x': refused"
    app = app_with(is_ready=lambda: ready[0], reload=reload)
    assert respond(app, "GET", "/-/healthy", {}) == \
        (200, {"Content-Type": "text/plain; charset=utf-8"}, b"Healthy\n")
    assert respond(app, "GET", "/-/ready", {})[0] == 503
    ready[0] = True
    assert respond(app, "GET", "/-/ready?x=1", {})[:3:2] == (200, b"Ready\n")
    assert respond(app, "GET", "/nope", {})[0] == 404
    assert respond(app, "GET", "/-/reload", {})[:2] == (405, {
        "Content-Type": "text/plain; charset=utf-8", "Allow": "POST"})
    assert respond(app, "POST", "/metrics", {})[0] == 405
    assert respond(app, "PUT", "/metrics", {})[0] == 405
    assert respond(app, "POST", "/-/reload", {})[0] == 403 and not reloads   # lifecycle off
    app = app_with(lifecycle=True, reload=reload)
    assert respond(app, "POST", "/-/reload", {}, b"{}")[::2] == (200, b"Reloaded\n")
    assert respond(app, "POST", "/-/reload", {})[::2] == (400, b"c.yml: key 'x': refused\n")
    status, headers, page = respond(app, "GET", "/", {})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<table id="clusters">' in page and b'href="/metrics"' in page
    custom = app_with(telemetry_path="/custom")
    assert respond(custom, "GET", "/custom", {})[0] == 200
    assert respond(custom, "GET", "/metrics", {})[0] == 404


@pytest.mark.parametrize("accept,encoding,content_type,gzipped", [
    ("", "", "text/plain; version=0.0.4; charset=utf-8", False),
    ("application/openmetrics-text; version=1.0.0", "", "application/openmetrics-text", False),
    ("", "gzip", "text/plain", True),
    ("text/plain", "deflate, GZIP;q=0.5", "text/plain", True),
    ("", "x-gzip-not, br", "text/plain", False),     # a token, not a substring
])
def test_metrics_negotiates_format_and_gzip(accept: str, encoding: str, content_type: str,
                                            gzipped: bool) -> None:
    app = app_with()
    status, headers, body = respond(app, "GET", "/metrics", {
        "Accept": accept, "Accept-Encoding": encoding})
    assert status == 200 and headers["Content-Type"].startswith(content_type)
    assert (headers.get("Content-Encoding") == "gzip") == gzipped
    text = (gzip.decompress(body) if gzipped else body).decode()
    assert "zilliz_import_jobs_stuck" in text
    assert text.endswith("# EOF\n") == content_type.startswith("application/openmetrics")


# ---- TLS against the real process ------------------------------------------------------

def tls_client(pki: dict[str, str], ca: str = "ca", cert: str | None = "client"
               ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki[ca])
    if cert:
        ctx.load_cert_chain(pki[f"{cert}_cert"], pki[f"{cert}_key"])
    return ctx


def test_tls_with_required_client_certificate(simulator, exporter, tmp_path: Path,
                                              pki: dict[str, str]) -> None:
    simulator.add_cluster("c", "v2").add_jobs(2)
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"tls_server_config": {
        "cert_file": pki["server_cert"], "key_file": pki["server_key"],
        "client_ca_file": pki["ca"], "client_auth_type": "RequireAndVerifyClientCert",
        "min_version": "TLS12"}}))
    proc = exporter({"defaults": fast_defaults(), "clusters": [simulator.cluster_config("c")]},
                    "--web.config.file", str(web))
    proc.scheme = "https"
    status, _, body = proc.get("/metrics", context=tls_client(pki))
    assert status == 200 and b"zilliz_import_cluster_info" in body
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        proc.get("/metrics", context=tls_client(pki, cert=None))     # no client cert
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        proc.get("/metrics", context=tls_client(pki, cert="rogue"))  # cert from another CA
    with pytest.raises(urllib.error.URLError) as info:
        proc.get("/metrics", context=tls_client(pki, ca="other_ca"))  # server not trusted
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    proc.scheme = "http"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        proc.get("/metrics")   # plain HTTP is not served
    # the server keeps serving after bad handshakes
    proc.scheme = "https"
    assert proc.get("/-/healthy", context=tls_client(pki))[0] == 200


def test_head_and_keep_alive_over_a_socket() -> None:
    """What only a socket shows: a HEAD answer has the GET's headers and no body, and
    one connection carries several requests."""
    server = create_server(app_with(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=5) as sock:
            stream = sock.makefile("rb")
            for method in ("HEAD", "GET"):
                sock.sendall(f"{method} /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert stream.readline() == b"HTTP/1.1 200 OK\r\n"
                headers = {}
                while (line := stream.readline()) != b"\r\n":
                    name, _, value = line.decode().partition(":")
                    headers[name.lower()] = value.strip()
                assert headers["content-length"] == "8"
            assert stream.read(8) == b"Healthy\n"       # only the GET's body came
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("doc,key", [
    ({"tls_server_config": {"cert_file": "/nope.pem", "key_file": "/nope.pem"}},
     "tls_server_config.cert_file"),
    ({"basic_auth_users": {"alice": "plaintext"}}, "basic_auth_users.alice"),
    ({"tls_server_config": {}, "extra": 1}, "extra"),
])
def test_bad_web_config_is_a_startup_error(tmp_path: Path, doc: dict, key: str) -> None:
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump(doc))
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"clusters": [{"name": "a", "url": "http://x",
                                                    "api": "v2"}]}))
    result = run_cli("-c", str(config), "--web.config.file", str(web), cwd=ROOT)
    assert result.returncode == 2 and f"key '{key}'" in result.stderr


# ---- the HTTP layer alone --------------------------------------------------------------

def test_scrape_does_not_wait_for_anything_but_the_board(simulator) -> None:
    """A poll hangs on its API; /metrics, the page and the probes answer meanwhile."""
    simulator.add_cluster("x", "v2").fail("hang")
    cluster = ClusterConfig(name="x", url=simulator.url_for("x"), api="v2", cluster_id="in01-x",
                            api_key="key-x", settings=PollSettings(timeout=3600, retries=0))
    board = SnapshotBoard()
    poller = ClusterPoller(cluster, board, JobHistory("x"))
    outcome: list[str] = []

    def poll() -> None:
        try:
            poller.poll_once()
        except Stopped:
            outcome.append("stopped")
    polling = threading.Thread(target=poll, daemon=True)
    registry = CollectorRegistry()
    registry.register(ImportCollector(board))
    ready = threading.Event()
    app = WebApp(registry=registry, board=board, is_ready=ready.is_set,
                 web_config=WebConfig(), lifecycle=True, reload=lambda: "bad: key 'x'")
    try:
        polling.start()
        wait_until(lambda: simulator.clusters["x"].requests, what="the poll's request")
        status, _, body = respond(app, "GET", "/metrics", {})
        assert status == 200
        assert 'zilliz_import_cluster_info{api="v2",cluster_id="in01-x"' in body.decode()
        assert b"zilliz_import_up{" not in body and polling.is_alive()   # still polling
        assert respond(app, "GET", "/-/ready", {})[0] == 503
        ready.set()
        assert respond(app, "GET", "/-/ready", {})[0] == 200
        assert respond(app, "POST", "/-/reload", {})[::2] == (400, b"bad: key 'x'\n")
        page = respond(app, "GET", "/", {})[2].decode()
        assert "<td>x</td>" in page and "waiting" in page
    finally:
        poller.stop()
    simulator.stop()                        # the hung request ends; the poll sees the stop
    polling.join(10)
    assert outcome == ["stopped"] and board.get("x") == ClusterSnapshot(cluster=cluster)


# ---- the status page in a real browser -------------------------------------------------

def chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    binary = require_tool("chromium")
    with tempfile.TemporaryDirectory(prefix="zie-chromium-") as profile:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             *args], capture_output=True, text=True, timeout=timeout)


def table_rows(dom: str, table_id: str) -> list[list[str]]:
    """The text of each body row's cells in one table of the page."""
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert table, f"no table {table_id}"
    out = []
    for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells:
            out.append(cells)
    return out


EVIL = "<script>document.title='pwned'</script> schema mismatch: field 'vec' dim 768 != 512"


def test_status_page_escapes_server_text_and_caps_sections() -> None:
    from exporter.jobs import JobRecord
    from exporter.history import JobHistory
    from exporter.jobs import Listing
    from exporter.summary import FailedJob, FinishedJob
    from exporter.web import render_status_page
    cluster = ClusterConfig(name="c<1>", url="http://127.0.0.1:9", api="v2")
    now = [1000.0]
    history = JobHistory("c<1>", clock=lambda: now[0])
    for now[0] in (1000.0, 1005.0):
        summary = history.apply(Listing.of([JobRecord("<b>id</b>", "<i>col</i>", "importing",
                                                      10)]),
                                stuck_after=1, stall_after=0, max_stuck_series=5)
    failed = tuple(FailedJob("col", f"f{i}", EVIL, 900.0 + i) for i in range(3))
    finished = (FinishedJob("<i>col</i>", "<b>done</b>", "completed", 5400.0, 1000.0),
                FinishedJob("col", "early", "failed", None, 400.0))
    board = SnapshotBoard()
    board.publish(ClusterSnapshot(cluster=cluster, polled=True, up=True, last_success=999.0,
                                  jobs=__import__("dataclasses").replace(
                                      summary, failed=failed, finished=finished)))
    page = render_status_page(WebApp(registry=CollectorRegistry(), board=board,
                                     clock=lambda: 1010.0))
    assert "<script>" not in page and "<b>id</b>" not in page and "c<1>" not in page
    assert [r[2] for r in table_rows(page, "failed")] == ["f2", "f1", "f0"]  # newest first
    assert table_rows(page, "failed")[0][4] == EVIL
    (stuck,) = table_rows(page, "stuck")
    assert stuck == ["c<1>", "<i>col</i>", "<b>id</b>", "importing", "10s", "age"]
    (running,) = table_rows(page, "running")
    assert running[4] == "10%" and running[5:] == ["-", "-"]
    assert table_rows(page, "finished") == [     # newest first; an unknown start says so
        ["c<1>", "<i>col</i>", "<b>done</b>", "completed", "90m", "10s ago"],
        ["c<1>", "col", "early", "failed", "start unknown", "10m ago"]]


def test_cluster_table_has_one_cell_per_declared_column() -> None:
    """The per-cluster table is CLUSTER_COLUMNS: a new column is one declaration."""
    from exporter.web import CLUSTER_COLUMNS, render_status_page
    page = render_status_page(WebApp(registry=CollectorRegistry(), board=golden_board(),
                                     clock=lambda: GOLDEN_NOW))
    head = re.search(r'<table id="clusters"><thead><tr>(.*?)</tr>', page, re.S)
    assert head and re.findall(r"<th>(.*?)</th>", head.group(1)) == \
        [column.heading for column in CLUSTER_COLUMNS]
    rows = {r[0]: r for r in table_rows(page, "clusters")}
    assert list(rows) == ["milvus-a", "new-one", "prod-search"]
    assert rows["prod-search"] == ["prod-search", "v1", "controller.api.gcp.zillizcloud.com",
                                   "up", "20s ago", "", "1", "2", "7", "1", "3", "1", "60s"]
    assert rows["milvus-a"] == ["milvus-a", "v2", "milvus:19530", "down", "60m ago",
                                "auth: HTTP 401 from milvus: credentials refused",
                                "-", "-", "-", "-", "0", "0", "60s"]     # stale: no jobs
    assert rows["new-one"][3:5] == ["waiting", "never"]
    assert '<td class="down">down</td>' in page and '<td class="wait">waiting</td>' in page


def test_status_page_in_headless_chromium(simulator, exporter) -> None:
    ok = simulator.add_cluster("healthy-one", "v2", reasons_in_list=False)
    for state, n in (("pending", 2), ("completed", 4), ("failed", 1)):
        ok.add_jobs(n, "c", state)
    importing = ok.add_jobs(4, "c", "importing", progress=40)
    for job_id in importing:
        ok.set_rows(job_id, 400_000, 1_000_000)
    simulator.add_cluster("broken-one", "v1").fail("auth_body")
    proc = exporter({"defaults": fast_defaults(stuck_after="1s"),
                     "clusters": [simulator.cluster_config("healthy-one"),
                                  simulator.cluster_config("broken-one")]})
    proc.wait_for_metrics(lambda m: job_counts(m, "healthy-one") and
                          ("zilliz_import_up", (("cluster_name", "broken-one"),)) in m)
    ok.set_state(importing[0], "failed")                 # seen failing: a recent failure
    ok.set_reason(importing[0], EVIL)
    ok.set_progress(importing[1], 60)                    # moving: gets an ETA
    ok.set_rows(importing[1], 600_000, 1_000_000)
    proc.wait_for_metrics(lambda m: m.get(("zilliz_import_jobs_stuck", (
        ("cluster_name", "healthy-one"), ("collection", "c")))) == 5
        and m.get(("zilliz_import_job_eta_seconds", (
            ("cluster_name", "healthy-one"), ("collection", "c"), ("job_id", importing[1]))))
        # the listing (progress, so an ETA) is published before the describes that
        # bring the new rows: wait for those too
        and m.get(("zilliz_import_job_rows", (
            ("cluster_name", "healthy-one"), ("collection", "c"), ("job_id", importing[1]),
            ("kind", "imported")))) == 600_000
        and any(k[0] == "zilliz_import_failed_job_info" for k in m),
        what="5 stuck jobs, an ETA, the new rows and a failure")
    dom = chromium("--dump-dom", proc.url + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<script>" not in dom.stdout                  # the failure text stayed text
    rows = {r[0]: r for r in table_rows(dom.stdout, "clusters")}
    healthy = rows["healthy-one"]
    assert healthy[1:4] == ["v2", simulator.base_url.split("//")[1], "up"]
    assert healthy[6:10] == ["2", "3", "4", "2"]          # pending, importing, completed, failed
    assert int(healthy[11]) == 5                          # all active jobs older than 1s
    assert healthy[12] == "1s"
    broken = rows["broken-one"]
    assert broken[3] == "down" and broken[4] == "never"
    assert broken[5].startswith("auth:") and "80001" in broken[5]
    assert len(table_rows(dom.stdout, "stuck")) == 5
    running = {r[2]: r for r in table_rows(dom.stdout, "running")}
    assert set(running) == set(importing[1:]) | {j for j, job in ok.jobs.items()
                                                 if job.state == "pending"}
    assert running[importing[1]][4] == "60%"
    assert running[importing[1]][5] == "600,000 / 1,000,000"
    assert running[importing[1]][6] != "-"               # an ETA
    (failure,) = table_rows(dom.stdout, "failed")
    assert failure[2] == importing[0] and failure[4] == EVIL
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    if shot.exists():
        shot.unlink()
    result = chromium(f"--screenshot={shot}", "--window-size=1280,1100", proc.url + "/")
    assert result.returncode == 0 and shot.stat().st_size > 5000, result.stderr[-2000:]


def test_status_page_shows_each_source_and_what_became_of_its_clusters() -> None:
    from exporter.web import render_status_page
    app = WebApp(registry=CollectorRegistry(), board=golden_board(), clock=lambda: GOLDEN_NOW,
                 discovery=golden_discovery())
    page = render_status_page(app)
    assert table_rows(page, "sources") == [
        ["prod", "api.cloud.zilliz.com", "up", "40s ago", "", "3", "1", "300s"],
        ["staging", "api.cloud.zilliz.com.cn", "down", "never",
         "auth: HTTP 401 from api.cloud.zilliz.com.cn: credentials refused", "0", "0", "300s"]]
    assert table_rows(page, "discovered") == [
        ["prod", "search-eu", "search eu", "in01-search", "aws-eu-central-1", "proj-1",
         "RUNNING", "yes"],
        ["prod", "old", "old", "in01-old", "aws-eu-central-1", "proj-2", "STOPPED",
         "no: status STOPPED not in poll_statuses"],
        ["prod", "prod-search", "prod search", "in01-0123456789abcdef", "gcp-us-west1",
         "proj-1", "RUNNING", "no: configured as prod-search"]]
    assert "golden-secret" not in page
    # without sources, no section
    assert "Discovery" not in render_status_page(WebApp(
        registry=CollectorRegistry(), board=golden_board(), clock=lambda: GOLDEN_NOW))
