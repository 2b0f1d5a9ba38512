"""Deployment artefacts: promtool on the rules, a real Prometheus on rules and dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import (
    ROOT, fast_defaults, free_port, require_module, require_tool, wait_until,
)

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "zilliz-import-exporter.json"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
CONTRACT_ALERTS = {"ZillizImportJobStuck", "ZillizImportJobFailed", "ZillizImportJobsFailing",
                   "ZillizImportPollFailing", "ZillizImportDataStale",
                   "ZillizImportPendingBacklog", "ZillizImportJobsSlow",
                   "ZillizImportDiscoveryFailing"}
# The slow-import threshold, written once in the rule (STYLE: one place to edit).
SLOW_THRESHOLD = "4 * 3600"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    """The alerting rules."""
    return [r for g in load(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def records() -> dict[str, str]:
    """The recording rules: name -> expression."""
    return {r["record"]: r["expr"] for g in load(ALERTS)["groups"] for r in g["rules"]
            if "record" in r}


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


def squeeze(expr: str) -> str:
    """An expression without whitespace and label matchers, to compare definitions."""
    return re.sub(r"\s+|\{[^}]*\}", "", expr)


def test_slow_imports_read_the_recorded_percentiles_with_one_threshold() -> None:
    """The threshold is one literal in one rule; the alert reads the recorded p95 and
    count; the dashboard's p50 and p95 are the recording rules' own expressions."""
    assert ALERTS.read_text().count(SLOW_THRESHOLD) == 1
    slow = next(r for r in rules() if r["alert"] == "ZillizImportJobsSlow")
    assert slow["for"] == "30m" and f"> {SLOW_THRESHOLD}" in slow["expr"]
    recorded = records()
    level = "cluster_name_collection:zilliz_import_job_duration_seconds"
    p50, p95, count = f"{level}:p50_6h", f"{level}:p95_6h", f"{level}_count:increase6h"
    assert {p50, p95, count} == set(recorded)
    assert re.search(rf"{re.escape(count)}\s*>=\s*5\b", slow["expr"]) and p95 in slow["expr"]
    assert all("[6h]" in expr for expr in recorded.values())
    dash = json.loads(DASHBOARD.read_text())
    (percentiles,) = [p for p in dash["panels"] if p["title"].startswith("Import duration p50")]
    assert [squeeze(t["expr"]) for t in percentiles["targets"]] == \
        [squeeze(recorded[p50]), squeeze(recorded[p95])]


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
    from exporter.demo import DEMO_CLUSTERS, DEMO_DISCOVERY_KEY
    assert {(c.name, c.api_key) for c in config.clusters} == \
        {(name, key) for name, _, key, _ in DEMO_CLUSTERS}
    assert [(s.control_plane.host, s.api_key) for s in config.discovery] == \
        [("simulator:8080", DEMO_DISCOVERY_KEY)]


def test_compose_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool")
    config = DEPLOY / "compose" / "prometheus.yml"
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "rules found" in check.stdout            # it found and checked alerts.yml
    # inside the container the same relative path lands on the mounted alerts.yml
    mounts = dict(reversed(v.split(":")[:2]) for v in
                  load(DEPLOY / "docker-compose.yml")["services"]["prometheus"]["volumes"])
    for rule_file in load(config)["rule_files"]:
        source = mounts[f"/etc/prometheus/{rule_file}"]
        assert (DEPLOY / source).resolve() == (config.parent / rule_file).resolve() == \
            ALERTS.resolve()


def test_readme_states_when_the_compose_stacks_stuck_alert_fires() -> None:
    """stuck_after, then the rule's for, plus one poll, scrape and evaluation."""
    exporter = load(DEPLOY / "compose" / "exporter.yaml")["defaults"]
    prometheus = load(DEPLOY / "compose" / "prometheus.yml")["global"]
    stuck = next(r for r in rules() if r["alert"] == "ZillizImportJobStuck")
    from exporter.kinds import parse_duration
    seconds = sum(parse_duration(v) for v in (
        exporter["stuck_after"], stuck.get("for", 0), exporter["interval"],
        prometheus["scrape_interval"], prometheus["evaluation_interval"]))
    match = re.search(r"stuck job alert fires after about (\d+)(¼|½|¾)? minutes",
                      (ROOT / "README.md").read_text())
    assert match, "the README no longer says when the compose stack's stuck alert fires"
    claimed = int(match.group(1)) + {"¼": .25, "½": .5, "¾": .75}.get(match.group(2) or "", 0)
    assert abs(claimed * 60 - seconds) <= 30, f"README says {claimed} min, files give {seconds} s"


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "zilliz-import-exporter.service").read_text()
    for line in ("DynamicUser=yes", "StateDirectory=zilliz-import-exporter",
                 "ProtectSystem=strict", "EnvironmentFile=", "ExecReload=/bin/kill -HUP $MAINPID",
                 "SystemCallFilter=@system-service", "ProtectClock=yes", "ProtectKernelLogs=yes",
                 "ProtectHostname=yes", "ProtectProc=invisible", "RestrictRealtime=yes",
                 "UMask=0077"):
        assert f"\n{line}" in unit, line
    analyze = require_tool("systemd-analyze", "apt-get install -y systemd")
    # a copy whose ExecStart is this venv's console script, as an install would have it
    installed = Path(sys.executable).parent / "zilliz-import-exporter"
    copy = tmp_path / "zilliz-import-exporter.service"
    copy.write_text(unit.replace("/opt/zilliz-import-exporter/bin/zilliz-import-exporter",
                                 str(installed)))
    verify = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    # verify exits 0 on a misspelt or unparsable setting, but says so on stderr
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # the exposure score stays where the hardening put it (1.5 of 10 when written)
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=20",
                               "--no-pager", str(copy)], capture_output=True, text=True)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


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
                   "zilliz_import_rows_imported_total", "zilliz_import_discovery_up",
                   "zilliz_import_discovered_cluster_info",
                   "zilliz_import_job_duration_seconds_bucket",
                   "zilliz_import_job_wait_seconds_bucket",
                   "zilliz_import_job_duration_seconds_count"):
        assert needle in exprs
    (heatmap,) = [p for p in dash["panels"] if p["type"] == "heatmap"]
    (target,) = heatmap["targets"]
    assert target["format"] == "heatmap" and "sum by (le)" in target["expr"]
    assert heatmap["options"]["calculate"] is False     # Prometheus' buckets, as they are
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


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a README heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_dashboard_keeps_clusters_apart_shows_state_and_links_the_runbooks() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dash["panels"]}
    # same-named collections in two clusters are two rows
    per_collection = panels["Jobs per collection"]
    for target in per_collection["targets"]:
        assert "by (cluster_name, collection)" in target["expr"], target["expr"]
    steps = {t["id"]: t["options"] for t in per_collection["transformations"]}
    assert "groupingToMatrix" not in steps and "merge" in steps
    assert list(steps["organize"]["indexByName"])[:2] == ["cluster_name", "collection"]
    # a reason shows only while it happens
    (errors,) = panels["Poll errors by reason"]["targets"]
    assert re.search(r"\)\s*>\s*0$", errors["expr"]), errors["expr"]
    # up/down, not a 0/1 line
    up = panels["Cluster up"]
    assert up["type"] == "state-timeline"
    (mapping,) = up["fieldConfig"]["defaults"]["mappings"]
    assert {k: v["text"] for k, v in mapping["options"].items()} == {"0": "down", "1": "up"}
    # links to the README's runbooks, each to a heading that exists
    readme = (ROOT / "README.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,3} (.+)$", readme, re.M)}
    runbooks = {r["annotations"]["runbook_url"] for r in rules()}
    links = dash["links"] + [link for p in dash["panels"] for link in p.get("links", [])]
    assert any(link["url"].endswith("#alert-runbooks") for link in dash["links"])
    assert len(links) > len(dash["links"])
    for link in links:
        anchor = link["url"].rsplit("#", 1)[1]
        assert anchor in anchors, link
        assert anchor == "alert-runbooks" or link["url"] in runbooks, link


# ---- end to end: a real Prometheus scraping the real exporter ---------------------------

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

    def start(target: str, alertmanager: str = "",
              compress: tuple[tuple[str, str], ...] = ()) -> Prometheus:
        """Prometheus scraping ``target`` with the shipped rules, evaluated every second
        and firing after 2 s; ``compress`` replaces text in every expression (hours of
        windows and thresholds by seconds)."""
        binary = require_tool("prometheus")
        shortened = load(ALERTS)
        for group in shortened["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "2s"
                for old, new in compress:
                    rule["expr"] = rule["expr"].replace(old, new)
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
             f"--storage.tsdb.path={tmp_path / f'tsdb-{port}'}",
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
MATCHING = re.compile(r"^(on|ignoring)\s*\([^)]*\)\s*")     # after a set operator
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s*-?[\d.]+(\s*[-+*/]\s*[\d.]+)*\s*$")


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
    return [COMPARISON.sub("", MATCHING.sub("", p.strip())) for p in parts]


def test_value_parts_split_thresholds() -> None:
    assert value_parts("a > 0\nand\nsum by (x) (b) >= 0") == ["a", "sum by (x) (b)"]
    assert value_parts("max_over_time(up[15m]) == 0") == ["max_over_time(up[15m])"]
    assert value_parts("a:p95 > 4 * 3600\nand on (x)\nb >= 5") == ["a:p95", "b"]


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
    # a discovery source whose key sees a cluster it polls and a stopped one
    simulator.add_cluster("found", "v2", api_key="discovery-key").add_jobs(2, "docs")
    simulator.add_cluster("asleep", "v2", api_key="discovery-key", status="STOPPED")
    clusters = [simulator.cluster_config("main"),
                simulator.cluster_config("second", stuck_after="1h"),
                {**simulator.cluster_config("locked-out"), "api_key": "wrong-key"}]
    proc = exporter({"defaults": fast_defaults(stuck_after="3s", stall_after=0,
                                               duration_buckets=[1, 2, 3, 5, 10]),
                     "discovery": [simulator.discovery_config(
                         "prod", "discovery-key", settings={"stuck_after": "1h"})],
                     "clusters": clusters})
    proc.wait_for_metrics(lambda m: ("zilliz_import_up", (("cluster_name", "second"),)) in m)
    prom = prometheus_for(f"127.0.0.1:{proc.port}")

    def target_up() -> bool:
        targets = prom.api("targets")["activeTargets"]
        return bool(targets) and targets[0]["health"] == "up"
    wait_until(target_up, 30, "the exporter target to be up")
    for seconds in (1, 2, 3):       # created after the first listing and scrape: timed
        v2.add_timed_jobs(1, "images", 1.5, seconds)
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
    for name, expr in records().items():
        assert prom.query(name) and prom.query(expr), f"{name} returned no data"
    wait_until(lambda: prom.query(
        "sum(increase(zilliz_import_job_duration_seconds_count[1m])) >= 3"), 30,
        "the timed jobs to reach Prometheus")
    for where, expr in dashboard_queries():
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr.strip(), re.S)
        if match:
            result = prom.query(instantiate(match.group(1)))
            assert any(match.group(2) in s["metric"] for s in result), where
            continue
        wait_until(lambda e=expr: prom.query(instantiate(e)), 20, f"{where}: {expr}")
    draw_dashboard(prom)


@pytest.mark.e2e
def test_real_prometheus_fires_jobs_slow_for_the_slow_collection_only(
        simulator, exporter, prometheus_for) -> None:
    """The shipped rules with hours made seconds: 6 h windows of 1 m, the 4 h threshold
    3 s, for 30 m 2 s. One collection's imports take 4 s, another's a fraction of one,
    a third's are slow but too few; only the first fires."""
    cluster = simulator.add_cluster("slowpoke", "v2")
    proc = exporter({"defaults": {**fast_defaults(),
                                  "duration_buckets": ["1s", "2s", "5s", "10s", "30s"]},
                     "clusters": [simulator.cluster_config("slowpoke")]})
    proc.wait_for_metrics(lambda m: ("zilliz_import_up", (("cluster_name", "slowpoke"),))
                          in m, what="the first listing")
    prom = prometheus_for(f"127.0.0.1:{proc.port}",
                          compress=(("[6h]", "[1m]"), (SLOW_THRESHOLD, "3")))
    wait_until(lambda: prom.query('up{job="zie"} == 1'), 30, "the first scrape")
    cluster.add_timed_jobs(6, "embeddings", 0.5, 4.5)        # 4-5 s as the exporter sees
    cluster.add_timed_jobs(6, "faq", 0.5, 1.5)               # 1-2 s
    cluster.add_timed_jobs(3, "archive", 0.5, 4.5, "failed")

    def slow_firing() -> list[dict]:
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "ZillizImportJobsSlow"
                and a["state"] == "firing"]
    firing = wait_until(slow_firing, 40, "ZillizImportJobsSlow to fire")
    time.sleep(3)                   # long enough for the others to fire, were they to
    firing = slow_firing()
    assert [(a["labels"]["cluster_name"], a["labels"]["collection"]) for a in firing] == \
        [("slowpoke", "embeddings")]
    assert "embeddings on slowpoke" in firing[0]["annotations"]["summary"]
    counted = {r["metric"]["collection"]: float(r["value"][1]) for r in prom.query(
        "cluster_name_collection:zilliz_import_job_duration_seconds_count:increase6h")}
    assert counted["archive"] >= 2.5 and counted["faq"] >= 5     # too few; quick


def draw_dashboard(prom: Prometheus) -> None:
    """The README's picture, from this Prometheus; ZIE_UPDATE_DASHBOARD_PICTURE=1 stores
    it in deploy/grafana/ (see tests/dashboard_picture.py)."""
    require_module("matplotlib")
    from dashboard_picture import render
    end = time.time()

    def matrix(expr: str) -> list[dict]:
        return prom.api("query_range", query=instantiate(expr), start=str(end - 60),
                        end=str(end), step="1")["result"]
    out = ROOT / "test-artifacts" / "dashboard.png"
    out.parent.mkdir(exist_ok=True)
    dash = json.loads(DASHBOARD.read_text())
    drawn = render(dash, lambda e: prom.query(instantiate(e)), matrix, out)
    assert drawn == [p["title"] for p in dash["panels"] if p.get("targets")]
    assert out.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("ZIE_UPDATE_DASHBOARD_PICTURE") == "1":
        shutil.copyfile(out, DASHBOARD.with_name("dashboard.png"))


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
         f"--storage.path={tmp_path / 'alertmanager-data'}",
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
