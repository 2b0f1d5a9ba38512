"""The real exporter process against the simulator, over loopback."""

from __future__ import annotations

import gzip
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import (
    fast_defaults, free_port, job_counts, parse_metrics, run_cli, samples, wait_until,
)
from exporter.simulator import Simulator


def seed(cluster, spread: dict[str, dict]) -> None:
    """Jobs per collection and state; a state may be (canonical, wire name)."""
    for collection, states in spread.items():
        for state, n in states.items():
            state, wire = state if isinstance(state, tuple) else (state, "")
            cluster.add_jobs(n, collection, state, wire=wire)


def truth(cluster) -> dict[tuple[str, str], float]:
    return {k: float(v) for k, v in cluster.truth().items() if v}


def all_match(sim: Simulator, names: list[str]):
    def check(metrics: dict) -> bool:
        return all(job_counts(metrics, n) == truth(sim.clusters[n]) for n in names)
    return check


def test_counts_equal_ground_truth_for_every_paging_behaviour(simulator, exporter) -> None:
    spread = {"alpha": {"pending": 3, "importing": 9, "completed": 11, "failed": 2},
              "beta": {("importing", "ImportRunning"): 4, ("completed", "Completed"): 7,
                       ("waiting_for_retry", "WaitingForRetry"): 1}}
    simulator.add_cluster("v1-total", "v1", count_mode="total")
    simulator.add_cluster("v1-pagecount", "v1", count_mode="page")
    simulator.add_cluster("v2-count", "v2", count_mode="total")
    simulator.add_cluster("v2-ignores-paging", "v2", count_mode="none", ignore_paging=True)
    simulator.add_cluster("milvus", "milvus", api_key="root:Milvus")
    simulator.add_cluster("exact-multiple", "milvus", api_key="u:p")
    for cluster in simulator.clusters.values():
        seed(cluster, spread)
    simulator.clusters["exact-multiple"].add_jobs(14 - 37 % 7)   # a multiple of page size
    names = list(simulator.clusters)
    proc = exporter({"defaults": fast_defaults(page_size=7),
                     "clusters": [simulator.cluster_config(n) for n in names]})
    metrics = proc.wait_for_metrics(all_match(simulator, names), what="counts to match")
    for name in names:
        assert samples(metrics, "zilliz_import_up", cluster_name=name) == \
            {("zilliz_import_up", (("cluster_name", name),)): 1.0}
    # zeros are present for every canonical state of every listed collection
    assert samples(metrics, "zilliz_import_jobs", cluster_name="milvus", collection="beta",
                   state="pending")
    # jobs move; the exporter follows on the next poll
    for cluster in simulator.clusters.values():
        ids = list(cluster.jobs)
        cluster.set_state(ids[0], "completed")
        cluster.set_state(ids[1], "failed")
        cluster.remove_jobs(ids[-3:])
        cluster.add_jobs(5, "gamma", "pending")
    proc.wait_for_metrics(all_match(simulator, names), what="moved counts to match")
    # a server that ignores paging (Milvus: in a new random order every time) answers
    # more than page_size jobs at once: one request per poll, never a second page
    for name in ("v2-ignores-paging", "milvus", "exact-multiple"):
        served = simulator.clusters[name].pages_served
        assert len(served) >= 2 and set(served) == {1}, (name, served)
    assert "waiting_for_retry" in proc.logs()       # unknown state logged once per cluster
    assert proc.logs().count("state=waiting_for_retry") == len(names)


FAULTS = [("auth_body", "auth"), ("auth_http", "auth"), ("429", "http"), ("500", "http"),
          ("malformed", "decode"), ("bad_shape", "decode"), ("api_error", "api"),
          ("hang", "timeout")]


def test_every_fault_is_classified_and_isolated(simulator, exporter) -> None:
    healthy = simulator.add_cluster("healthy", "v2")
    seed(healthy, {"c": {"importing": 5, "completed": 3}})
    configs = [simulator.cluster_config("healthy")]
    for fault, _ in FAULTS:
        cluster = simulator.add_cluster(f"f-{fault}", "v1" if fault == "auth_body" else "v2")
        seed(cluster, {"c": {"pending": 2}})
        cluster.fail(fault)
        configs.append(simulator.cluster_config(f"f-{fault}"))
    pages = simulator.add_cluster("f-pagination", "v2", count_mode="none")
    pages.add_jobs(30)     # 6 pages of 5, but max_pages is 2
    configs.append(simulator.cluster_config("f-pagination", max_pages=2, page_size=5))
    configs.append({"name": "f-connection", "url": f"http://127.0.0.1:{free_port()}",
                    "api": "v2"})
    proc = exporter({"defaults": fast_defaults(timeout="1s", retries=1),
                     "clusters": configs})
    expected = FAULTS + [("pagination", "pagination"), ("connection", "connection")]

    def all_classified(metrics: dict) -> bool:
        for fault, reason in expected:
            key = ("zilliz_import_poll_errors_total",
                   (("cluster_name", f"f-{fault}"), ("reason", reason)))
            if not metrics.get(key):
                return False
        return True
    metrics = proc.wait_for_metrics(all_classified, timeout=30, what="every fault reason")
    for fault, reason in expected:
        name = f"f-{fault}"
        assert metrics[("zilliz_import_up", (("cluster_name", name),))] == 0
        assert not job_counts(metrics, name)          # never a partial listing
        others = {dict(k[1])["reason"]: v for k, v in
                  samples(metrics, "zilliz_import_poll_errors_total", cluster_name=name).items()
                  if v}
        assert set(others) == {reason}, (name, others)
    assert job_counts(metrics, "healthy") == truth(healthy)
    assert metrics[("zilliz_import_up", (("cluster_name", "healthy"),))] == 1
    assert metrics[("zilliz_import_api_requests_total",
                    (("cluster_name", "f-connection"), ("code", "error"),
                     ("endpoint", "list")))] >= 1
    assert metrics[("zilliz_import_api_requests_total",
                    (("cluster_name", "f-429"), ("code", "429"), ("endpoint", "list")))] >= 2
    # one log line per failed poll, never one per retry
    lines = [l for l in proc.logs().splitlines() if "cluster_name=f-429" in l
             and "level=warn" in l]
    polls = metrics[("zilliz_import_poll_errors_total",
                     (("cluster_name", "f-429"), ("reason", "http")))]
    assert len(lines) <= polls + 1 and "cluster started failing" in lines[0]


def test_failure_mid_listing_keeps_the_last_complete_listing(simulator, exporter) -> None:
    cluster = simulator.add_cluster("c", "v2", count_mode="none")
    seed(cluster, {"a": {"importing": 12}, "b": {"completed": 3}})
    proc = exporter({"defaults": fast_defaults(page_size=5, stale_after="1h"),
                     "clusters": [simulator.cluster_config("c")]})
    before = truth(cluster)
    proc.wait_for_metrics(lambda m: job_counts(m, "c") == before)
    cluster.fail("500", from_page=2)
    for job_id in list(cluster.jobs)[:5]:          # page 1 changes, page 2 fails
        cluster.set_state(job_id, "failed")
    metrics = proc.wait_for_metrics(
        lambda m: m.get(("zilliz_import_poll_errors_total",
                         (("cluster_name", "c"), ("reason", "http")))), what="a failed poll")
    assert job_counts(metrics, "c") == before      # not page 1 of the new listing
    cluster.heal()
    proc.wait_for_metrics(lambda m: job_counts(m, "c") == truth(cluster))
    assert "cluster recovered" in proc.logs()


def test_readiness_and_endpoints(simulator, exporter) -> None:
    # slow enough that the first poll cannot end before the first probe (a scrape that
    # waits for nothing but the board: test_web's test_scrape_does_not_wait_...)
    slow = simulator.add_cluster("slow", "v2", latency=1.5)
    seed(slow, {"c": {"pending": 1}})
    proc = exporter({"defaults": fast_defaults(timeout="5s"),
                     "clusters": [simulator.cluster_config("slow")]})
    assert proc.get("/-/ready")[0] == 503
    assert proc.get("/-/healthy")[0] == 200
    assert proc.get("/metrics")[0] == 200
    wait_until(lambda: proc.get("/-/ready")[0] == 200, what="ready")
    status, headers, body = proc.get("/", headers={})
    assert status == 200 and b'href="/metrics"' in body
    status, headers, body = proc.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers.get("Content-Encoding") == "gzip"
    assert b"zilliz_import_jobs{" in gzip.decompress(body)
    status, headers, body = proc.get("/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    assert proc.get("/nope")[0] == 404
    assert proc.get("/-/reload", method="POST")[0] == 403      # lifecycle off


def test_custom_telemetry_path(simulator, exporter) -> None:
    simulator.add_cluster("c", "v2").add_jobs(1)
    proc = exporter({"clusters": [simulator.cluster_config("c")]},
                    "--web.telemetry-path", "/custom")
    assert proc.get("/custom")[0] == 200 and proc.get("/metrics")[0] == 404


def test_sigterm_stops_within_5s_while_a_request_hangs(simulator, exporter) -> None:
    simulator.add_cluster("hangs", "v2").fail("hang")
    proc = exporter({"defaults": fast_defaults(timeout="60s"),
                     "clusters": [simulator.cluster_config("hangs")]})
    wait_until(lambda: simulator.clusters["hangs"].requests > 0, what="a hanging request")
    started = time.monotonic()
    assert proc.stop(timeout=10) == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_sigint_exits_0(simulator, exporter, sig) -> None:
    simulator.add_cluster("c", "v2").add_jobs(1)
    proc = exporter({"clusters": [simulator.cluster_config("c")]})
    proc.signal(sig)
    assert proc.proc is not None and proc.proc.wait(5) == 0


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_once_writes_exposition_atomically(simulator, tmp_path: Path) -> None:
    good = simulator.add_cluster("good", "v2")
    seed(good, {"c": {"importing": 4}})
    bad = simulator.add_cluster("bad", "v2")
    bad.fail("auth_http")
    import yaml
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"defaults": {"retries": 0},
                                      "clusters": [simulator.cluster_config("good")]}))
    out = tmp_path / "zie.prom"
    result = run_cli("-c", str(config), "--once", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert job_counts(parse_metrics(out.read_text()), "good") == truth(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "zie.prom"]  # no temp
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()   # as open() makes it
    config.write_text(yaml.safe_dump({"defaults": {"retries": 0}, "clusters": [
        simulator.cluster_config("good"), simulator.cluster_config("bad")]}))
    result = run_cli("-c", str(config), "--once")
    assert result.returncode == 1
    metrics = parse_metrics(result.stdout)
    assert metrics[("zilliz_import_up", (("cluster_name", "bad"),))] == 0
    assert job_counts(metrics, "good") == truth(good)


def test_api_behind_a_private_ca(exporter, pki, tmp_path: Path) -> None:
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki["server_cert"], pki["server_key"])
    with Simulator(tls=tls) as sim:
        assert sim.base_url.startswith("https://127.0.0.1:")
        for name in ("trusted", "untrusted", "unverified"):
            seed(sim.add_cluster(name, "v2"), {"c": {"importing": 2}})
        proc = exporter({"defaults": fast_defaults(), "clusters": [
            sim.cluster_config("trusted", tls_ca_file=pki["ca"]),
            sim.cluster_config("untrusted"),                       # system CAs only
            sim.cluster_config("unverified", tls_insecure_skip_verify=True)]})
        metrics = proc.wait_for_metrics(
            lambda m: all(("zilliz_import_up", (("cluster_name", n),)) in m
                          for n in ("trusted", "untrusted", "unverified")))
        assert job_counts(metrics, "trusted") == truth(sim.clusters["trusted"])
        assert job_counts(metrics, "unverified") == truth(sim.clusters["unverified"])
        assert metrics[("zilliz_import_up", (("cluster_name", "untrusted"),))] == 0
        assert metrics[("zilliz_import_poll_errors_total",
                        (("cluster_name", "untrusted"), ("reason", "connection")))] >= 1
        assert "certificate verify failed" in proc.logs().lower() or \
            "CERTIFICATE_VERIFY_FAILED" in proc.logs()
        proc.stop()
