"""Deployment artefacts: promtool on the rules, a real Prometheus on rules and dashboard."""

from __future__ import annotations

import json
import shutil
import re
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import ROOT, fast_defaults, require_tool, wait_until

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "zilliz-import-exporter.json"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
CONTRACT_ALERTS = {"ZillizImportJobStuck", "ZillizImportJobFailed", "ZillizImportJobsFailing",
                   "ZillizImportPollFailing", "ZillizImportDataStale",
                   "ZillizImportPendingBacklog"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    return [r for g in load(ALERTS)["groups"] for r in g["rules"]]


# ---- static checks ---------------------------------------------------------------------

def test_promtool_checks_and_tests_the_rules() -> None:
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], capture_output=True,
                          text=True, cwd=ALERTS.parent)
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_alert_is_named_documented_and_tested_both_ways() -> None:
    assert {r["alert"] for r in rules()} == CONTRACT_ALERTS
    readme = (ROOT / "README.md").read_text()
    tests = load(ALERTS.parent / "alerts_test.yml")["tests"]
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        anchor = rule["alert"].lower()
        assert rule["annotations"]["runbook_url"].endswith("#" + anchor)
        assert f"### {rule['alert']}" in readme, f"no runbook for {rule['alert']}"
        cases = [c for t in tests for c in t["alert_rule_test"]
                 if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in cases), f"{rule['alert']} never fires"
        assert any(not c["exp_alerts"] for c in cases), f"{rule['alert']} never quiet"
    stuck = next(r for r in rules() if r["alert"] == "ZillizImportJobStuck")
    assert "$labels.job_id" in stuck["annotations"]["summary"]
    failed = next(r for r in rules() if r["alert"] == "ZillizImportJobFailed")
    assert "$labels.job_id" in failed["annotations"]["summary"]


def test_alertmanager_config_routes_every_alert_grouped_by_cluster() -> None:
    amtool = require_tool("amtool")
    check = subprocess.run([amtool, "check-config", str(ALERTMANAGER)], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    for alert in CONTRACT_ALERTS:
        route = subprocess.run([amtool, "config", "routes", "test",
                                f"--config.file={ALERTMANAGER}", "--verify.receivers=zilliz-imports",
                                f"alertname={alert}", "cluster_name=prod"],
                               capture_output=True, text=True)
        assert route.returncode == 0, alert + route.stdout + route.stderr
    assert load(ALERTMANAGER)["route"]["group_by"] == ["cluster_name", "alertname"]


def test_prometheusrule_embeds_the_same_rules() -> None:
    rule = load(DEPLOY / "kubernetes" / "prometheusrule.yaml")
    assert rule["kind"] == "PrometheusRule" and rule["spec"] == load(ALERTS)


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", ["deployment.yaml", "sharded/statefulset.yaml"])
def test_kubernetes_workloads(path: str) -> None:
    doc = load(DEPLOY / "kubernetes" / path)
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = containers(doc)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/zilliz-import-exporter" in mounts
    config = load(DEPLOY / "kubernetes" / "configmap.yaml")["data"]["config.yaml"]
    assert yaml.safe_load(config)["state_file"].startswith("/var/lib/zilliz-import-exporter/")
    if doc["kind"] == "Deployment":
        assert doc["spec"]["replicas"] == 1
        claim = next(v for v in pod["volumes"] if v["name"] == "state")
        assert claim["persistentVolumeClaim"]["claimName"] == \
            load(DEPLOY / "kubernetes" / "pvc.yaml")["metadata"]["name"]
    else:
        env = {e["name"]: e for e in container["env"]}
        assert int(env["ZIE_SHARD_COUNT"]["value"]) == doc["spec"]["replicas"]
        assert env["ZIE_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


@pytest.mark.parametrize("directory", ["kubernetes", "kubernetes/sharded"])
def test_kustomizations_list_existing_files(directory: str) -> None:
    base = DEPLOY / directory
    kustomization = load(base / "kustomization.yaml")
    kinds = set()
    for resource in kustomization["resources"]:
        path = (base / resource).resolve()
        assert path.exists(), resource
        kinds.add(load(path)["kind"])
    assert {"ConfigMap", "Secret", "Service", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert kinds & {"Deployment", "StatefulSet"}
    monitor = load(DEPLOY / "kubernetes" / "servicemonitor.yaml")
    service = load(DEPLOY / "kubernetes" / "service.yaml")
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_compose_stack() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"simulator", "exporter", "prometheus", "grafana"}
    assert "exporter.simulator" in " ".join(services["simulator"]["entrypoint"])
    mounts = " ".join(services["prometheus"]["volumes"])
    assert "alerts.yml" in mounts
    grafana = " ".join(services["grafana"]["volumes"])
    assert "zilliz-import-exporter.json" in grafana and "provisioning" in grafana
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"] + \
            services["exporter"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source
    # the exporter's compose config is valid and points at the simulator service
    from exporter.config import parse_config
    config = parse_config(load(DEPLOY / "compose" / "exporter.yaml"), "exporter.yaml",
                          environ={"MILVUS_DEMO_KEY": "root:Milvus-demo-pass"})
    assert {c.host for c in config.clusters} == {"simulator:8080"}
    from exporter.simulator import DEMO_CLUSTERS
    assert {(c.name, c.api_key) for c in config.clusters} == \
        {(name, key) for name, _, key, _ in DEMO_CLUSTERS}


def test_dockerfile_and_systemd_unit() -> None:
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert dockerfile.count("FROM ") >= 2 and "-slim" in dockerfile
    assert re.search(r"^USER \d+", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/-/healthy" in dockerfile
    assert 'VOLUME ["/var/lib/zilliz-import-exporter"]' in dockerfile
    assert "/etc/zilliz-import-exporter/config.yaml" in dockerfile
    unit = (DEPLOY / "systemd" / "zilliz-import-exporter.service").read_text()
    for line in ("DynamicUser=yes", "StateDirectory=zilliz-import-exporter",
                 "ProtectSystem=strict", "EnvironmentFile=", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in unit


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            out.append((f"variable {variable['name']}", variable["query"]["query"]))
    return out


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(variables) == {"datasource", "cluster_name", "collection"}
    assert variables["datasource"]["type"] == "datasource"
    for name in ("cluster_name", "collection"):
        assert variables[name]["query"]["query"].startswith("label_values(")
    exprs = " ".join(e for _, e in dashboard_queries())
    for needle in ("zilliz_import_stuck_job_info", "zilliz_import_job_transitions_total",
                   "zilliz_import_up", "zilliz_import_poll_duration_seconds",
                   "zilliz_import_poll_errors_total", "zilliz_import_api_requests_total",
                   "zilliz_import_job_progress_ratio", "zilliz_import_job_rows",
                   "zilliz_import_job_eta_seconds", "zilliz_import_failed_job_info",
                   "zilliz_import_rows_imported_total"):
        assert needle in exprs
    running = next(p for p in dash["panels"] if p["title"] == "Running jobs")
    progress = next(o for o in running["fieldConfig"]["overrides"]
                    if o["matcher"]["options"] == "progress")
    assert {"id": "custom.cellOptions", "value": {"type": "gauge", "mode": "basic"}} in \
        progress["properties"]
    types = {p["type"] for p in dash["panels"]}
    assert {"timeseries", "table"} <= types
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


# ---- end to end: a real Prometheus scraping the real exporter ---------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, alertmanager: str = "") -> Prometheus:
        binary = require_tool("prometheus")
        shortened = load(ALERTS)
        for group in shortened["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(shortened))
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "zie", "static_configs": [{"targets": [target]}]}],
        }
        if alertmanager:
            config["alerting"] = {"alertmanagers": [
                {"static_configs": [{"targets": [alertmanager]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tempfile.mkdtemp(prefix='zie-tsdb-')}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        prom = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(lambda: prom.api("status/buildinfo"), 30, "Prometheus to start")
        return prom

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


SET_OPERATOR = re.compile(r"\s(and|or|unless)\s")
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s*-?[\d.]+\s*$")


def value_parts(expr: str) -> list[str]:
    """The operands of an alert expression without their threshold comparisons."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(expr):
        depth += char == "("
        depth -= char == ")"
        match = SET_OPERATOR.match(expr, i) if depth == 0 else None
        if match:
            parts.append(expr[start:i])
            start = match.end()
    parts.append(expr[start:])
    return [COMPARISON.sub("", p.strip()) for p in parts]


def test_value_parts_split_thresholds() -> None:
    assert value_parts("a > 0\nand\nsum by (x) (b) >= 0") == ["a", "sum by (x) (b)"]
    assert value_parts("max_over_time(up[15m]) == 0") == ["max_over_time(up[15m])"]


def instantiate(expr: str) -> str:
    return (expr.replace("$cluster_name", ".*").replace("$collection", ".*")
            .replace("$__rate_interval", "1m"))


@pytest.mark.e2e
def test_real_prometheus_scrapes_alerts_and_serves_every_dashboard_query(
        simulator, exporter, prometheus_for) -> None:
    main = simulator.add_cluster("main", "v1")
    stuck = main.add_jobs(1, "medium_articles", "importing", prefix="stuck")[0]
    v2 = simulator.add_cluster("second", "v2")
    doomed = v2.add_jobs(2, "images", "importing", progress=10)
    mover = v2.add_jobs(1, "images", "importing", progress=10)[0]
    v2.add_jobs(2, "images", "pending")
    simulator.add_cluster("locked-out", "v2", api_key="other").add_jobs(1)
    clusters = [simulator.cluster_config("main"),
                simulator.cluster_config("second", stuck_after="1h"),
                {**simulator.cluster_config("locked-out"), "api_key": "wrong-key"}]
    proc = exporter({"defaults": fast_defaults(stuck_after="3s", stall_after=0),
                     "clusters": clusters})
    proc.wait_for_metrics(lambda m: ("zilliz_import_up", (("cluster_name", "second"),)) in m)
    prom = prometheus_for(f"127.0.0.1:{proc.port}")

    def target_up() -> bool:
        targets = prom.api("targets")["activeTargets"]
        return bool(targets) and targets[0]["health"] == "up"
    wait_until(target_up, 30, "the exporter target to be up")
    # a failure and a completion the exporter sees after its baseline listing
    v2.set_state(doomed[0], "failed")
    v2.set_state(doomed[1], "completed")
    v2.set_progress(mover, 50)                 # moving: an ETA
    v2.set_rows(mover, 2_000, 10_000)
    wait_until(lambda: prom.query('zilliz_import_job_transitions_total{state="failed"} > 0'),
               30, "the failure to reach Prometheus")

    def stuck_firing() -> list[dict]:
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "ZillizImportJobStuck"
                and a["state"] == "firing"]
    firing = wait_until(stuck_firing, 40, "ZillizImportJobStuck to fire")
    assert [a["labels"]["job_id"] for a in firing] == [stuck]   # one alert, the stuck job
    assert stuck in firing[0]["annotations"]["summary"]
    assert firing[0]["labels"]["collection"] == "medium_articles"
    wait_until(lambda: {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]
                        if a["state"] == "firing"} >= {"ZillizImportJobsFailing",
                                                       "ZillizImportPollFailing"},
               30, "failing imports and polls to fire")
    # every expression parses and its value side returns data from this Prometheus
    for rule in rules():
        prom.query(rule["expr"])                       # parses (else status != success)
        for part in value_parts(rule["expr"]):
            assert prom.query(part), f"{rule['alert']}: {part!r} returned no data"
    for where, expr in dashboard_queries():
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr.strip(), re.S)
        if match:
            result = prom.query(instantiate(match.group(1)))
            assert any(match.group(2) in s["metric"] for s in result), where
            continue
        wait_until(lambda e=expr: prom.query(instantiate(e)), 20, f"{where}: {expr}")


# ---- end to end: Prometheus -> a real Alertmanager -> a webhook ------------------------

class WebhookReceiver:
    """Collects the notifications Alertmanager posts, on a loopback port."""

    def __init__(self) -> None:
        import http.server
        import threading
        self.notifications: list[dict] = []
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/zilliz-imports"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    def alerts(self, alertname: str) -> list[dict]:
        return [a for n in list(self.notifications) for a in n["alerts"]
                if a["labels"]["alertname"] == alertname and a["status"] == "firing"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_binary() -> str:
    return shutil.which("alertmanager") or require_tool("prometheus-alertmanager")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, WebhookReceiver]]:
    """A real Alertmanager running the shipped config, its webhook pointed at a
    receiver in this test and its waits shortened (in this copy only)."""
    binary = alertmanager_binary()
    receiver = WebhookReceiver()
    config = load(ALERTMANAGER)
    config["route"].update(group_wait="0s", group_interval="1s")
    for entry in config["receivers"]:
        for hook in entry.get("webhook_configs", []):
            hook["url"] = receiver.url
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'alertmanager.yml'}",
         f"--storage.path={tempfile.mkdtemp(prefix='zie-am-')}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    address = f"127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{address}/-/ready", timeout=5) as r:
            return r.status == 200
    try:
        wait_until(ready, 30, "Alertmanager to start")
        yield address, receiver
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        receiver.stop()


@pytest.mark.e2e
def test_alertmanager_notifies_failed_and_stuck_jobs_with_ids_and_reason(
        simulator, exporter, prometheus_for, alertmanager) -> None:
    address, receiver = alertmanager
    cluster = simulator.add_cluster("am", "v2", reasons_in_list=False)
    stuck = cluster.add_jobs(1, "medium_articles", "pending", prefix="stuck")[0]
    doomed = cluster.add_jobs(1, "images", "importing", progress=30, prefix="doomed")[0]
    proc = exporter({"defaults": fast_defaults(stuck_after="2s", stall_after=0),
                     "clusters": [simulator.cluster_config("am", stuck_after="2s")]})
    proc.wait_for_metrics(lambda m: ("zilliz_import_up", (("cluster_name", "am"),)) in m)
    prometheus_for(f"127.0.0.1:{proc.port}", alertmanager=address)
    text = "failed to parse file s3://vectors/images/part-0007.parquet: schema mismatch " \
           "(field 'embedding' expects dim 768, got 512) <x>"
    cluster.set_state(doomed, "failed")
    cluster.set_reason(doomed, text)
    failed = wait_until(lambda: receiver.alerts("ZillizImportJobFailed"), 60,
                        "the failed-job notification")
    assert [a["labels"]["job_id"] for a in failed] == [doomed]
    assert text in failed[0]["annotations"]["description"]
    assert failed[0]["labels"]["cluster_name"] == "am"
    cluster.set_state(stuck, "importing")          # a stuck job moving on stays one alert
    firing = wait_until(lambda: receiver.alerts("ZillizImportJobStuck"), 60,
                        "the stuck-job notification")
    assert {a["labels"]["job_id"] for a in firing} == {stuck}
    assert stuck in firing[0]["annotations"]["summary"]
    assert "state" not in firing[0]["labels"]
