"""The command line as an operator drives it: demo, reload, signals, secrets."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import yaml

from conftest import (
    ExporterProcess, FakeClock, InProcessExporter, fast_defaults, job_counts, parse_metrics, require_tool,
    run_cli, samples, wait_until,
)
from exporter.cli import build_parser, demo_config, parse_listen_address, resolve_shard
from exporter.demo import DemoDirector
from exporter.simulator import Simulator
from exporter.web import WebApp, render_status_page


def test_demo_shows_jobs_within_10_seconds_and_passes_promtool(tmp_path: Path) -> None:
    proc = ExporterProcess(tmp_path, None, ["--demo"])
    proc.start()
    try:
        started = time.monotonic()
        metrics = proc.wait_for_metrics(
            lambda m: all(job_counts(m, c) for c in ("demo-cloud-v1", "demo-cloud-v2",
                                                     "demo-milvus", "demo-discovered")),
            timeout=10, what="non-zero jobs for the three demo clusters and the one "
                             "discovery finds")
        assert time.monotonic() - started < 10
        assert samples(metrics, "zilliz_import_cluster_info", api="v1")
        # the demo's discovery source finds two clusters; the stopped one is not polled
        found = {dict(k[1])["cluster_name"]: (dict(k[1])["status"], dict(k[1])["polled"])
                 for k in samples(metrics, "zilliz_import_discovered_cluster_info",
                                  source="demo")}
        assert found == {"demo-discovered": ("RUNNING", "true"),
                         "demo-paused": ("STOPPED", "false")}
        assert not samples(metrics, "zilliz_import_up", cluster_name="demo-paused")
        _, _, body = proc.get("/metrics")
        promtool = require_tool("promtool")
        result = subprocess.run([promtool, "check", "metrics"], input=body,
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not result.stdout.strip() and not result.stderr.strip(), result.stdout
    finally:
        proc.stop()


DETAIL_SERIES = ("zilliz_import_job_progress_ratio", "zilliz_import_job_rows",
                 "zilliz_import_job_eta_seconds", "zilliz_import_failed_job_info")


def run_demo(seconds: int, on_poll: Callable[[dict], object] = lambda metrics: None
             ) -> tuple[dict, str, set[str]]:
    """The demo's own simulator, director and config, polled in process for ``seconds``
    of a fake clock (the simulator's too): minutes of the demo cost no minutes of the
    test. Returns the last metrics, the status page then, and the clusters polled."""
    clock = FakeClock(time.time())
    with Simulator(clock=clock) as sim:
        director = DemoDirector(sim)
        config = demo_config(sim)
        demo = InProcessExporter(config, clock)
        try:
            for second in range(seconds + 1):
                if second % director.tick == 0:
                    director.step()
                if second % config.defaults.interval == 0:
                    metrics = demo.poll()
                    on_poll(metrics)
                clock.advance(1)
            page = render_status_page(WebApp(registry=demo.registry, board=demo.board,
                                             clock=clock))
        finally:
            demo.close()
    return metrics, page, {dict(k[1])["cluster_name"] for k in samples(metrics,
                                                                       "zilliz_import_up")}


def section(page: str, table_id: str) -> str:
    return page.split(f'<table id="{table_id}">', 1)[1].split("</table>", 1)[0]


def test_demo_stuck_stalled_and_job_details_within_a_minute() -> None:
    seen: set[tuple[str, str]] = set()
    details: set[tuple[str, str]] = set()
    reasons: set[str] = set()

    def look(m: dict) -> None:
        seen.update((dict(k[1])["reason"], dict(k[1])["job_id"].split("-")[0])
                    for k in samples(m, "zilliz_import_stuck_job_info"))
        for name in DETAIL_SERIES:
            details.update((name, dict(k[1])["cluster_name"]) for k in samples(m, name))
        reasons.update(dict(k[1])["reason"]
                       for k in samples(m, "zilliz_import_failed_job_info"))
    m, page, _ = run_demo(60, look)
    assert ("age", "stuck") in seen and ("stalled", "stalls") in seen, seen
    assert {n for n, _ in details} == set(DETAIL_SERIES), details
    assert ("zilliz_import_job_progress_ratio", "demo-cloud-v1") in details
    assert sum(samples(m, "zilliz_import_rows_imported_total").values()) > 0
    assert any("schema mismatch" in r or "NoSuchKey" in r or "max_length" in r
               or "auto_id" in r for r in reasons), reasons
    for table in ("stuck", "running", "failed"):
        assert 'class="none"' not in section(page, table), f"the {table} section is empty"


def test_demo_times_jobs_and_lists_them_within_two_minutes() -> None:
    """The demo's imports finish often enough that the duration histograms (the
    dashboard's heatmap) and the status page's finished jobs fill within two minutes,
    in more than one bucket."""
    m, page, clusters = run_demo(120)
    assert len(clusters) == 4             # the configured three and one discovered
    counts = samples(m, "zilliz_import_job_duration_seconds_count")
    assert {dict(k[1])["cluster_name"] for k, v in counts.items() if v} == clusters, counts
    assert sum(samples(m, "zilliz_import_job_wait_seconds_count").values()) > 0
    per_bucket: dict[str, float] = {}
    for key, value in samples(m, "zilliz_import_job_duration_seconds_bucket").items():
        le = dict(key[1])["le"]
        per_bucket[le] = per_bucket.get(le, 0) + value
    cumulative = [per_bucket[le] for le in sorted(per_bucket, key=float)]
    assert sum(1 for low, high in zip([0.0, *cumulative], cumulative) if high > low) >= 2
    finished = section(page, "finished")
    assert 'class="none"' not in finished and "ago" in finished
    assert re.search(r"<td>\d+s</td>", finished), "no finished job shows a duration"


def test_help_shows_one_true_default_per_flag() -> None:
    options = build_parser().format_help().split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n  (?=-)", options.strip()):
        words = entry.split()
        flag = next(w.rstrip(",") for w in words if w.startswith("--"))
        entries[flag] = " ".join(words)                                  # unwrapped
    text = " ".join(entries.values())
    assert "(default: None)" not in text and "(default: )" not in text
    assert "(default: False)" not in text
    for flag, described in entries.items():
        if flag not in ("--help", "--version"):
            assert described.count("(default: ") == 1, (flag, described)
    for flag, default in (("--config.file", "config.yaml"), ("--web.listen-address", ":9636"),
                          ("--web.telemetry-path", "/metrics"), ("--log.level", "info"),
                          ("--log.format", "logfmt"), ("--output", "-, stdout"),
                          ("--config.auto-reload-interval", "0, off"),
                          ("--web.enable-lifecycle", "off"), ("--once", "off, serve"),
                          ("--check-config", "off"), ("--demo", "off"),
                          ("--shard.count", "$ZIE_SHARD_COUNT, else 1"),
                          ("--shard.index", "$ZIE_SHARD_INDEX, else 0")):
        assert f"(default: {default}" in entries[flag], (flag, entries[flag])


def test_flags_and_environment() -> None:
    parser = build_parser()
    args = parser.parse_args([])
    assert (args.config_file, args.listen_address, args.telemetry_path) == \
        ("config.yaml", ":9636", "/metrics")
    assert parse_listen_address(":9636") == ("", 9636)
    assert parse_listen_address("[::1]:80") == ("::1", 80)
    env = {"ZIE_SHARD_COUNT": "3", "ZIE_SHARD_INDEX": "zie-2"}
    assert resolve_shard(args, env) == (3, 2)
    assert resolve_shard(parser.parse_args(["--shard.index", "1"]), env) == (3, 1)  # flag wins
    for bad in (["--shard.count", "2", "--shard.index", "2"], ["--shard.count", "0"]):
        try:
            resolve_shard(parser.parse_args(bad), {})
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_reload_adds_removes_changes_and_keeps_the_rest(simulator, exporter) -> None:
    for name in ("keep", "drop", "change"):
        simulator.add_cluster(name, "v2").add_jobs(3, "c", "importing")
    config = {"defaults": fast_defaults(),
              "clusters": [simulator.cluster_config(n) for n in ("keep", "drop", "change")]}
    proc = exporter(config, "--web.enable-lifecycle")
    proc.wait_for_metrics(lambda m: all(job_counts(m, n) for n in ("keep", "drop", "change")))
    # watch the unchanged cluster's series on every scrape through the reload
    simulator.add_cluster("new", "milvus", api_key="u:p").add_jobs(2, "n", "pending")
    config["clusters"] = [simulator.cluster_config("keep"),
                          simulator.cluster_config("change", page_size=2),
                          simulator.cluster_config("new")]
    proc.write_config(config)
    status, _, body = proc.get("/-/reload", method="POST")
    assert status == 200, body
    gaps = 0

    def settled(m: dict) -> bool:
        nonlocal gaps
        gaps += not job_counts(m, "keep")
        return bool(job_counts(m, "new")) and not samples(m, "zilliz_import_up",
                                                          cluster_name="drop") \
            and bool(job_counts(m, "change"))
    proc.wait_for_metrics(settled, what="reload applied")
    assert gaps == 0
    assert "added=new" in proc.logs() and "removed=drop" in proc.logs() \
        and "changed=change" in proc.logs()
    assert "keep" not in [l for l in proc.logs().splitlines() if "reloaded" in l][0]
    # a bad config is refused; the running one stays; the gauge says so
    config["clusters"][0]["interval"] = "often"
    proc.write_config(config)
    status, _, body = proc.get("/-/reload", method="POST")
    assert status == 400 and b"key 'interval'" in body
    metrics = proc.metrics()
    assert metrics[("zilliz_import_config_last_reload_successful", ())] == 0
    assert job_counts(metrics, "keep")
    # SIGHUP reloads too, and a good file sets the gauge back to 1
    config["clusters"][0]["interval"] = "1s"
    proc.write_config(config)
    proc.signal(signal.SIGHUP)
    proc.wait_for_metrics(
        lambda m: m[("zilliz_import_config_last_reload_successful", ())] == 1)


def test_shutdown_writes_history_and_exits_0(simulator, exporter, tmp_path: Path) -> None:
    simulator.add_cluster("c", "v2").add_jobs(5, "c", "importing")
    state = tmp_path / "state.db"
    proc = exporter({"state_file": str(state), "defaults": fast_defaults(),
                     "clusters": [simulator.cluster_config("c")]})
    proc.wait_for_metrics(lambda m: job_counts(m, "c"))
    assert proc.stop() == 0
    import sqlite3
    rows = sqlite3.connect(str(state)).execute("SELECT count(*) FROM jobs").fetchone()
    assert rows == (5,)
    assert not Path(str(state) + "-wal").exists() or Path(str(state) + "-wal").stat().st_size == 0


def test_json_logs_are_one_object_per_line(simulator, exporter) -> None:
    simulator.add_cluster("c", "v2").fail("500")
    proc = exporter({"defaults": fast_defaults(),
                     "clusters": [simulator.cluster_config("c")]},
                    "--log.format", "json", "--log.level", "debug")
    wait_until(lambda: "cluster started failing" in proc.logs())
    events = [json.loads(line) for line in proc.logs().splitlines()]
    failing = [e for e in events if e["msg"] == "cluster started failing"][0]
    assert failing["cluster_name"] == "c" and failing["reason"] == "http"
    assert "duration_seconds" in failing and failing["level"] == "warn"
    requests = [e for e in events if e["msg"] == "api request"]
    assert requests and requests[0]["path"] == "/v2/vectordb/jobs/import/list"
    assert requests[0]["status"] == 500


# ---- secrets: one sweep over every way text leaves the process ------------------------

ZILLIZ_KEY = "zk-sweep-4d1c8e2b9a7f6e5d"
MILVUS_KEY = "sweepuser:Sw33p-Passw0rd-xyz"


def test_secrets_never_leave_the_process(simulator, exporter, tmp_path: Path) -> None:
    good = simulator.add_cluster("good", "v2", api_key=ZILLIZ_KEY, reasons_in_list=False)
    echoing = good.add_jobs(3, "c", "importing")[0]
    simulator.add_cluster("milvus", "milvus", api_key=MILVUS_KEY).add_jobs(1)
    simulator.add_cluster("refused", "v1", api_key="something-else")
    http_port = simulator.base_url.rsplit(":", 1)[1]
    key_file = tmp_path / "key"
    key_file.write_text(MILVUS_KEY + "\n")
    clusters = [
        simulator.cluster_config("good"),
        {**{k: v for k, v in simulator.cluster_config("milvus").items() if k != "api_key"},
         "api_key_file": str(key_file)},
        {**simulator.cluster_config("refused"), "api_key": "${ZKEY}"},
        {"name": "tls-broken", "url": f"https://127.0.0.1:{http_port}/milvus/milvus",
         "api": "v2", "api_key": MILVUS_KEY},
        {"name": "conn-refused", "url": "http://127.0.0.1:9", "api": "v2",
         "api_key": MILVUS_KEY},
    ]
    config = {"defaults": fast_defaults(), "clusters": clusters}
    env = {"ZKEY": ZILLIZ_KEY}
    proc = exporter(config, "--log.level", "debug", "--web.enable-lifecycle", env=env)
    metrics = proc.wait_for_metrics(
        lambda m: all(samples(m, "zilliz_import_up", cluster_name=c["name"])
                      for c in clusters), what="every cluster polled once")
    assert metrics[("zilliz_import_up", (("cluster_name", "good"),))] == 1
    # a server that echoes the key in a failure text (read through describe)
    good.set_state(echoing, "failed")
    good.set_reason(echoing, f"token {ZILLIZ_KEY} has no access to s3://bucket/f.parquet")
    metrics = proc.wait_for_metrics(
        lambda m: samples(m, "zilliz_import_failed_job_info", job_id=echoing))
    (labels,) = [dict(k[1]) for k in samples(metrics, "zilliz_import_failed_job_info")]
    assert labels["reason"] == "token <secret> has no access to s3://bucket/f.parquet"
    assert metrics[("zilliz_import_poll_errors_total",
                    (("cluster_name", "refused"), ("reason", "auth")))] >= 1
    assert metrics[("zilliz_import_poll_errors_total",
                    (("cluster_name", "tls-broken"), ("reason", "connection")))] >= 1
    texts = {"metrics": proc.get("/metrics")[2].decode(), "page": proc.get("/")[2].decode()}
    assert "refused the credentials" in texts["page"]     # the error is shown, the key not
    config["clusters"][0]["retries"] = "many"
    proc.write_config(config)
    texts["reload"] = proc.get("/-/reload", method="POST")[2].decode()
    assert "key 'retries'" in texts["reload"]
    def check_config() -> subprocess.CompletedProcess[str]:
        return run_cli("-c", str(proc.config_path), "--check-config", env=env)
    refused = check_config()
    assert refused.returncode == 2
    config["clusters"][0]["retries"] = 0
    proc.write_config(config)
    check = check_config()
    assert check.returncode == 0
    texts["check-config"] = refused.stderr + check.stdout + check.stderr
    once = run_cli("-c", str(proc.config_path), "--once", "--log.level", "debug", env=env,
                   timeout=60)
    texts["once"] = once.stdout + once.stderr
    proc.stop()
    texts["logs"] = proc.logs()
    assert "level=debug" in texts["logs"] and "tls-broken" in texts["logs"]
    for where, text in texts.items():
        for secret in (ZILLIZ_KEY, MILVUS_KEY, MILVUS_KEY.split(":")[1], "Bearer "):
            assert secret not in text, f"{secret!r} leaked into {where}"
    # the simulator did receive the keys: the sweep looked for strings that were in play
    assert simulator.clusters["good"].requests and simulator.clusters["milvus"].requests
    assert yaml.safe_load(check.stdout)["clusters"][0]["api_key"] == "<secret>"
    assert parse_metrics(once.stdout)


def test_replicas_split_the_clusters_exactly_once(simulator, exporter, tmp_path: Path) -> None:
    names = [f"cluster-{i}" for i in range(9)]
    for name in names:
        simulator.add_cluster(name, "v2").add_jobs(1)
    config = {"defaults": fast_defaults(), "clusters": [simulator.cluster_config(n)
                                                         for n in names]}
    replicas = []
    for index in range(3):
        directory = tmp_path / f"replica-{index}"
        directory.mkdir()
        # replica 2 takes its index from a StatefulSet pod name in the environment
        args = ["--shard.count", "3"] + ([] if index == 2 else ["--shard.index", str(index)])
        replicas.append(exporter(config, *args, tmp=directory,
                                 env={"ZIE_SHARD_INDEX": "zilliz-import-exporter-2"}))
    owners: dict[str, list[int]] = {n: [] for n in names}
    for index, proc in enumerate(replicas):
        wait_until(lambda p=proc: p.get("/-/ready")[0] == 200, what=f"replica {index} ready")
        metrics = proc.metrics()
        for key in samples(metrics, "zilliz_import_up"):
            owners[dict(key[1])["cluster_name"]].append(index)
        for key in samples(metrics, "zilliz_import_cluster_info"):
            assert dict(key[1])["shard"] == str(index)
    assert all(len(o) == 1 for o in owners.values()), owners
    assert len({o[0] for o in owners.values()}) == 3       # every replica has work
    assert all(simulator.clusters[n].requests for n in names)
