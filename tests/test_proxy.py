"""The exporter behind a real forward proxy (Debian's tinyproxy), towards the simulator
over TLS, as a team whose pods reach Zilliz Cloud through an egress proxy runs it."""

from __future__ import annotations

import ssl
from typing import Iterator
from urllib.parse import urlsplit

import pytest

from exporter.simulator import Simulator

from conftest import fast_defaults, free_port, job_counts, run_cli, samples, wait_until

PROXY_USER = "ops"
PROXY_PASSWORD = "tiny-pr0xy-pw-5150"


@pytest.fixture
def tls_simulator(pki: dict[str, str]) -> Iterator[Simulator]:
    """The simulator behind a private CA, one v2 cluster ``a`` with jobs in every state."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki["server_cert"], pki["server_key"])
    with Simulator(tls=tls) as sim:
        cluster = sim.add_cluster("a", "v2")
        for state, n in (("pending", 2), ("importing", 3), ("completed", 5), ("failed", 1)):
            cluster.add_jobs(n, "docs", state)
        yield sim


def truth(sim: Simulator) -> dict[tuple[str, str], float]:
    return {k: float(v) for k, v in sim.clusters["a"].truth().items() if v}


def exact(sim: Simulator):
    return lambda metrics: job_counts(metrics, "a") == truth(sim)


def test_with_only_https_proxy_set_counts_are_exact_through_the_proxy(
        tls_simulator, tinyproxy, exporter, pki) -> None:
    proxy = tinyproxy()
    proc = exporter({"defaults": fast_defaults(), "clusters": [
        tls_simulator.cluster_config("a", tls_ca_file=pki["ca"])]},
        env={"HTTPS_PROXY": proxy.url})
    proc.wait_for_metrics(exact(tls_simulator))
    target = urlsplit(tls_simulator.base_url).netloc
    assert target in proxy.connects()
    # kept alive through the tunnels: one CONNECT per lane (listings, describes) carries
    # poll after poll
    wait_until(lambda: tls_simulator.clusters["a"].requests >= 4, timeout=20,
               what="several polls")
    assert 1 <= len(proxy.connects()) <= 2


def test_no_proxy_naming_the_host_goes_direct(tls_simulator, tinyproxy, exporter,
                                              pki) -> None:
    proxy = tinyproxy()
    proc = exporter({"defaults": fast_defaults(), "clusters": [
        tls_simulator.cluster_config("a", tls_ca_file=pki["ca"])]},
        env={"https_proxy": proxy.url, "no_proxy": "localhost,127.0.0.1"})
    proc.wait_for_metrics(exact(tls_simulator))
    assert proxy.connects() == []


def test_a_proxy_asking_for_basic_auth_works_with_credentials_in_proxy_url(
        tls_simulator, tinyproxy, exporter, pki, tmp_path) -> None:
    """proxy_url wins over the environment (HTTPS_PROXY names a dead proxy here), and its
    password appears in no log line, metric, page or --check-config line."""
    proxy = tinyproxy(auth=(PROXY_USER, PROXY_PASSWORD))
    host = urlsplit(proxy.url).netloc
    tls_simulator.add_cluster("refused", "v2")
    config = {"defaults": fast_defaults(proxy_url=f"http://{PROXY_USER}:{PROXY_PASSWORD}@{host}"),
              "clusters": [tls_simulator.cluster_config("a", tls_ca_file=pki["ca"]),
                           tls_simulator.cluster_config(
                               "refused", tls_ca_file=pki["ca"],
                               proxy_url=f"http://{PROXY_USER}:wrong-{PROXY_PASSWORD}@{host}")]}
    proc = exporter(config, "--log.level", "debug",
                    env={"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}"})
    metrics = proc.wait_for_metrics(
        lambda m: exact(tls_simulator)(m) and samples(
            m, "zilliz_import_poll_errors_total", cluster_name="refused", reason="connection"))
    assert urlsplit(tls_simulator.base_url).netloc in proxy.connects()
    assert metrics[("zilliz_import_up", (("cluster_name", "refused"),))] == 0
    shown = run_cli("-c", str(proc.config_path), "--check-config")
    assert shown.returncode == 0 and f"{PROXY_USER}:<secret>@{host}" in shown.stdout
    for text in (proc.logs(), proc.get("/metrics")[2].decode(), proc.get("/")[2].decode(),
                 shown.stdout + shown.stderr):
        assert PROXY_PASSWORD not in text


def test_a_dead_proxy_fails_the_poll_with_reason_connection(tls_simulator, exporter,
                                                            pki) -> None:
    dead = f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"
    proc = exporter({"defaults": fast_defaults(), "clusters": [
        tls_simulator.cluster_config("a", tls_ca_file=pki["ca"], proxy_url=dead)]})
    metrics = proc.wait_for_metrics(lambda m: samples(
        m, "zilliz_import_poll_errors_total", cluster_name="a", reason="connection"))
    assert metrics[("zilliz_import_up", (("cluster_name", "a"),))] == 0
    assert tls_simulator.clusters["a"].requests == 0
    assert "through the proxy" in proc.logs() and PROXY_PASSWORD not in proc.logs()
