"""Discovery: what a source lists becomes the clusters to poll (resolve, in process), and
the control plane is paged as listings are (against the simulator)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from conftest import (
    FakeClock, InProcessExporter, fast_defaults, job_counts, parse_metrics, run_cli, samples,
    wait_until,
)
from exporter.answers import CloudCluster
from exporter.client import make_session
from exporter.errors import AuthFailure
from exporter.config import ClusterConfig, Config, DiscoveryConfig, PollSettings
from exporter.discovery import HISTORY_PREFIX, fetch_clusters, resolve, safe_name
from exporter.sharding import shard_of
from exporter.simulator import Simulator

KEY = "zc-discovery-key-5e7d1a"


def src(name: str = "prod", **over: object) -> DiscoveryConfig:
    return DiscoveryConfig(**{"name": name, "api_key": KEY, **over})  # type: ignore[arg-type]


def cloud(cluster_id: str, name: str, status: str = "RUNNING", project: str = "proj-1",
          region: str = "aws-us-west-2") -> CloudCluster:
    return CloudCluster(cluster_id, name, region, project, "Enterprise", status)


def configured(name: str, cluster_id: str) -> ClusterConfig:
    return ClusterConfig(name=name, url="https://api.cloud.zilliz.com", api="v2",
                         cluster_id=cluster_id, api_key="other")


def rows(resolution, source: str = "prod") -> dict[str, tuple[str, bool, str]]:
    """clusterId -> (cluster_name, polled, why not)."""
    return {r.listed.cluster_id: (r.name, r.polled, r.why_not)
            for r in resolution.sources[source]}


def test_a_listed_cluster_becomes_a_v2_cluster_of_its_source() -> None:
    source = src(settings=PollSettings(interval=30))
    config = Config(path="x", clusters=(), discovery=(source,))
    resolution = resolve(config, {"prod": [cloud("in01-a", "search prod/eu #1")]})
    (cluster,) = resolution.clusters
    assert (cluster.name, cluster.url, cluster.api, cluster.cluster_id, cluster.api_key) == \
        ("search-prod-eu--1", "https://api.cloud.zilliz.com", "v2", "in01-a", KEY)
    assert cluster.settings.interval == 30 and (cluster.db_name, cluster.project_id) == ("", "")
    # history follows the clusterId, kept apart from any configured name
    assert cluster.history == HISTORY_PREFIX + "in01-a" and ":" in cluster.history
    assert rows(resolution) == {"in01-a": ("search-prod-eu--1", True, "")}
    assert safe_name("a.b_c-D9 é") == "a.b_c-D9--"


def test_filters_statuses_and_a_configured_cluster_id_decide_what_is_polled() -> None:
    source = src(include="prod-.*", exclude=".*-tmp", projects=("proj-1",),
                 regions=("aws-us-west-2", "gcp-us-west1"), poll_statuses=("RUNNING",))
    config = Config(path="x", clusters=(configured("mine", "in01-c"),), discovery=(source,))
    listing = [cloud("in01-a", "prod-a"), cloud("in01-b", "prod-b", "STOPPED"),
               cloud("in01-c", "prod-c"), cloud("in01-d", "staging-d"),
               cloud("in01-e", "prod-e-tmp"), cloud("in01-f", "prod-f", project="proj-2"),
               cloud("in01-g", "prod-g", region="az-eastus"), cloud("in01-h", "xprod-h"),
               cloud("in01-i", "prod-i", "")]
    resolution = resolve(config, {"prod": listing})
    assert rows(resolution) == {
        "in01-a": ("prod-a", True, ""),
        "in01-b": ("prod-b", False, "status STOPPED not in poll_statuses"),
        "in01-c": ("mine", False, "configured as mine"),       # polled once, as configured
        "in01-d": ("staging-d", False, "not matched by include"),
        "in01-e": ("prod-e-tmp", False, "matched by exclude"),
        "in01-f": ("prod-f", False, "project proj-2 not in projects"),
        "in01-g": ("prod-g", False, "region az-eastus not in regions"),
        "in01-h": ("xprod-h", False, "not matched by include"),   # a full match
        "in01-i": ("prod-i", False, "status (none) not in poll_statuses")}
    assert [c.name for c in resolution.clusters] == ["mine", "prod-a"]


def test_names_that_collide_all_take_their_cluster_id_whatever_the_order() -> None:
    config = Config(path="x", clusters=(configured("search", "in01-z"),),
                    discovery=(src(),))
    listing = [cloud("in01-a", "docs"), cloud("in01-b", "docs"), cloud("in01-c", "search"),
               cloud("in01-d", "unique"), cloud("in01-e", "do cs")]
    expected = {"in01-a": "docs-in01-a", "in01-b": "docs-in01-b",
                "in01-c": "search-in01-c",      # a configured cluster keeps its name
                "in01-d": "unique", "in01-e": "do-cs"}
    for seed in range(5):
        shuffled = random.Random(seed).sample(listing, len(listing))
        resolution = resolve(config, {"prod": shuffled})
        assert {i: name for i, (name, polled, _) in rows(resolution).items()} == expected
        assert sorted(c.name for c in resolution.clusters) == \
            sorted(["search", *expected.values()])


def test_a_suffixed_name_that_still_collides_is_not_polled() -> None:
    config = Config(path="x", clusters=(configured("a-in01-1", "in01-9"),),
                    discovery=(src(),))
    resolution = resolve(config, {"prod": [cloud("in01-1", "a"), cloud("in01-2", "a")]})
    assert rows(resolution) == {"in01-1": ("a-in01-1", False, "name a-in01-1 is taken"),
                                "in01-2": ("a-in01-2", True, "")}


def test_the_first_source_listing_a_cluster_polls_it() -> None:
    config = Config(path="x", clusters=(), discovery=(src("first"), src("second")))
    resolution = resolve(config, {"second": [cloud("in01-a", "a"), cloud("in01-b", "b")],
                                  "first": [cloud("in01-a", "a")]})
    assert rows(resolution, "first") == {"in01-a": ("a", True, "")}
    assert rows(resolution, "second") == {"in01-a": ("a", False, "listed by source first"),
                                          "in01-b": ("b", True, "")}
    assert sorted(c.name for c in resolution.clusters) == ["a", "b"]


def test_sharding_applies_to_discovered_clusters_by_name() -> None:
    config = Config(path="x", clusters=(configured("conf", "in01-z"),), discovery=(src(),))
    listing = [cloud(f"in01-{i}", f"c{i}") for i in range(8)]
    owners: dict[str, list[int]] = {}
    for index in range(3):
        resolution = resolve(config, {"prod": listing}, (3, index))
        for cluster in resolution.clusters:
            owners.setdefault(cluster.name, []).append(index)
            assert shard_of(cluster.name, 3) == index
        for name, polled, why in rows(resolution).values():
            assert polled == (shard_of(name, 3) == index)
            assert polled or why == f"shard {shard_of(name, 3)} of 3"
    assert sorted(owners) == sorted(["conf", *(f"c{i}" for i in range(8))])
    assert all(len(o) == 1 for o in owners.values())


# ---- paging the control plane ----------------------------------------------------------

def test_twelve_clusters_come_in_three_pages(simulator) -> None:
    for i in range(12):
        simulator.add_cluster(f"c{i:02d}", "v2", api_key=KEY)
    simulator.add_cluster("someone-elses", "v2")
    simulator.add_cluster("v1-one", "v1", api_key=KEY)       # the v2 API lists v2 ones
    source = src(url=simulator.base_url, settings=PollSettings(page_size=5))
    found = fetch_clusters(make_session(source.control_plane), source)
    assert sorted(c.cluster_id for c in found) == [f"in01-c{i:02d}" for i in range(12)]
    assert simulator.control_plane(KEY).pages_served == [1, 2, 3]
    # a bare array carries no count: the short page ends it all the same
    simulator.control_plane(KEY).bare_array = True
    assert len(fetch_clusters(make_session(source.control_plane), source)) == 12
    assert simulator.control_plane(KEY).pages_served[3:] == [1, 2, 3]


def test_a_bad_key_is_auth_and_a_later_page_failing_fails_the_refresh(simulator) -> None:
    for i in range(4):
        simulator.add_cluster(f"c{i}", "v2", api_key=KEY)
    wrong = src(url=simulator.base_url, api_key="not-a-key")
    with pytest.raises(AuthFailure, match="HTTP 401"):
        fetch_clusters(make_session(wrong.control_plane), wrong)
    source = src(url=simulator.base_url, settings=PollSettings(page_size=2, retries=0))
    simulator.control_plane(KEY).fail("500", from_page=2)
    with pytest.raises(Exception) as info:
        fetch_clusters(make_session(source.control_plane), source)
    assert getattr(info.value, "reason", "") == "http"          # never half a listing


# ---- the exporter with a discovery source ----------------------------------------------

# sim name, clusterName, status, the cluster_name it is polled under (None: not polled)
FLEET = [
    ("orders", "orders eu", "RUNNING", "orders-eu"),
    ("search-a", "search", "RUNNING", "search-in01-search-a"),     # two share a name
    ("search-b", "search", "RUNNING", "search-in01-search-b"),
    ("billing", "billing", "RUNNING", "billing"),
    ("analytics", "analytics/v2", "RUNNING", "analytics-v2"),
    ("recs", "recs", "RUNNING", "recs"),
    ("logs", "logs", "CREATING", None),
    ("users", "users.prod", "RUNNING", "users.prod"),
    ("archive", "archive", "STOPPED", None),
    ("scratch", "scratch-tmp", "RUNNING", None),                   # excluded by a regex
    ("payments", "payments", "RUNNING", "payments-configured"),     # configured: it wins
    ("search-c", "search-c", "RUNNING", "search-c"),
]


def fleet(sim: Simulator) -> dict[str, str]:
    """Twelve clusters on KEY, each with its own number of jobs; returns their expected
    cluster_name by sim name (only the polled ones)."""
    expected = {}
    for i, (name, display, status, polled_as) in enumerate(FLEET):
        cluster = sim.add_cluster(name, "v2", api_key=KEY, display_name=display,
                                  status=status)
        cluster.add_jobs(i + 1, "docs", "importing")
        cluster.add_jobs(2, "images", "completed")
        if polled_as:
            expected[name] = polled_as
    return expected


def truth(cluster) -> dict[tuple[str, str], float]:
    return {k: float(v) for k, v in cluster.truth().items() if v}


def polled_names(metrics: dict) -> set[str]:
    return {dict(k[1])["cluster_name"] for k in samples(metrics, "zilliz_import_up")}


def test_a_new_user_with_one_key_gets_every_cluster_it_sees(simulator, exporter,
                                                            tmp_path: Path) -> None:
    """12 clusters in 3 pages: two not running, one excluded by a regex, one configured
    by hand: exactly 9 polled, under the expected names, with exact counts, once ready;
    --discover prints the same picture; the key shows nowhere."""
    expected = fleet(simulator)
    simulator.control_plane(KEY).latency = 1.5       # readiness must wait for it
    configured = {**simulator.cluster_config("payments"), "name": "payments-configured"}
    # one key for 9 clusters: its shared rate limit would pace this test
    config = {"defaults": fast_defaults(requests_per_second=1000),
              "discovery": [simulator.discovery_config(
                  "prod", KEY, exclude="scratch-.*", settings={"page_size": 5})],
              "clusters": [configured]}
    proc = exporter(config, "--log.level", "debug")
    assert proc.get("/-/ready")[0] == 503
    simulator.control_plane(KEY).latency = 0
    wait_until(lambda: proc.get("/-/ready")[0] == 200, what="ready")
    metrics = proc.metrics()
    assert polled_names(metrics) == set(expected.values()) and len(expected) == 9
    for name, cluster_name in expected.items():
        assert job_counts(metrics, cluster_name) == truth(simulator.clusters[name]), name
    assert simulator.control_plane(KEY).pages_served == [1, 2, 3]       # one refresh
    info = {dict(k[1])["cluster_id"]: dict(k[1])
            for k in samples(metrics, "zilliz_import_discovered_cluster_info", source="prod")}
    assert len(info) == 12
    assert {i for i, labels in info.items() if labels["polled"] == "true"} == \
        {f"in01-{name}" for name in expected if name != "payments"}
    assert info["in01-payments"]["cluster_name"] == "payments-configured"
    assert (info["in01-archive"]["status"], info["in01-archive"]["cluster_display_name"]) == \
        ("STOPPED", "archive")
    assert metrics[("zilliz_import_discovery_up", (("source", "prod"),))] == 1
    page = proc.get("/")[2].decode()
    assert page.count("<tr><td>prod</td>") == 13          # the source, and its 12 clusters
    # --discover prints the same picture
    listing = run_cli("-c", str(proc.config_path), "--discover")
    assert listing.returncode == 0, listing.stderr
    printed = {}
    for line in listing.stdout.splitlines()[2:]:
        name, rest = line.split(None, 1)
        cluster_id = next(w for w in rest.split() if w.startswith("in01-"))
        printed[cluster_id] = (name, rest.rsplit("  ", 1)[1])
    assert {i: name for i, (name, said) in printed.items() if said == "yes"} == \
        {i: labels["cluster_name"] for i, labels in info.items() if labels["polled"] == "true"}
    assert printed["in01-logs"] == ("logs", "no: status CREATING not in poll_statuses")
    assert printed["in01-scratch"] == ("scratch-tmp", "no: matched by exclude")
    assert printed["in01-payments"] == ("payments-configured",
                                        "no: configured as payments-configured")
    assert "12 clusters listed, 8 polled" in listing.stdout.splitlines()[0]
    # --once waits for discovery too
    once = run_cli("-c", str(proc.config_path), "--once")
    assert once.returncode == 0, once.stderr
    assert polled_names(parse_metrics(once.stdout)) == set(expected.values())
    check = run_cli("-c", str(proc.config_path), "--check-config")
    proc.stop()
    texts = {"metrics": str(metrics), "page": page, "discover": listing.stdout + listing.stderr,
             "once": once.stdout + once.stderr, "check-config": check.stdout + check.stderr,
             "logs": proc.logs()}
    assert "level=debug" in texts["logs"] and "<secret>" in texts["check-config"]
    for where, text in texts.items():
        assert KEY not in text, f"the key leaked into {where}"


def test_discover_exits_2_when_a_source_fails(simulator, tmp_path: Path) -> None:
    simulator.add_cluster("a", "v2", api_key=KEY)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"discovery": [
        simulator.discovery_config("good", KEY),
        simulator.discovery_config("bad", "revoked-key", settings={"retries": 0})]}))
    result = run_cli("-c", str(path), "--discover")
    assert result.returncode == 2
    assert "source good (127.0.0.1:" in result.stdout and "1 clusters listed, 1 polled" in \
        result.stdout
    assert "source bad (127.0.0.1:" in result.stdout and "refresh failed (auth)" in \
        result.stdout
    assert "discovery failed for bad" in result.stderr and "revoked-key" not in \
        result.stdout + result.stderr
    once = run_cli("-c", str(path), "--once")
    assert once.returncode == 1 and "some discovery sources failed" in once.stderr
    path.write_text(yaml.safe_dump({"clusters": [simulator.cluster_config("a")]}))
    assert run_cli("-c", str(path), "--discover").returncode == 2    # nothing to ask


def test_clusters_come_go_and_are_renamed_between_refreshes(simulator, tmp_path: Path,
                                                            caplog) -> None:
    """In process on a fake clock: each change shows after one refresh; the clusters it
    does not touch keep their pollers (no gap), and a renamed one keeps its job ages,
    across a restart too (state file)."""
    for name in ("steady", "leaving", "renamed"):
        simulator.add_cluster(name, "v2", api_key=KEY).add_jobs(2, "docs", "importing")
    config = {"state_file": str(tmp_path / "state.db"),
              "defaults": fast_defaults(stuck_after="1h"),
              "discovery": [simulator.discovery_config("prod", KEY,
                                                       settings={"retries": 0})]}
    clock = FakeClock()
    caplog.set_level("INFO", logger="exporter.discovery")
    exporter = InProcessExporter(config, clock)

    def age(metrics: dict, name: str) -> float:
        return metrics[("zilliz_import_oldest_active_job_age_seconds",
                        (("cluster_name", name), ("collection", "docs")))]
    try:
        exporter.poll()
        clock.advance(100)
        metrics = exporter.poll()
        assert polled_names(metrics) == {"steady", "leaving", "renamed"}
        assert age(metrics, "renamed") == 100
        steady = exporter.group.pollers["steady"]
        # appears: polled from the next refresh on
        simulator.add_cluster("newcomer", "v2", api_key=KEY).add_jobs(3, "docs", "pending")
        metrics = exporter.refresh()
        assert job_counts(metrics, "steady") and "newcomer" in exporter.group.pollers
        metrics = exporter.poll()
        assert job_counts(metrics, "newcomer") == {("docs", "pending"): 3}
        # leaves: its job series go with the next refresh
        simulator.remove_cluster("leaving")
        metrics = exporter.refresh()
        assert not [k for k in metrics if dict(k[1]).get("cluster_name") == "leaving"]
        # renamed in the console: the new name carries on the ages
        simulator.clusters["renamed"].rename("renamed again")
        clock.advance(10)
        exporter.refresh()
        metrics = exporter.poll()
        assert "renamed" not in polled_names(metrics)
        assert age(metrics, "renamed-again") == 110
        # what no refresh touched kept its poller: its series never had a gap
        assert exporter.group.pollers["steady"] is steady
        assert "discovered clusters changed" in caplog.text
    finally:
        exporter.close()
    clock.advance(5)
    restarted = InProcessExporter(config, clock)
    try:
        assert age(restarted.poll(), "renamed-again") == 115
    finally:
        restarted.close()


def test_a_failing_source_keeps_its_clusters_polling(simulator, caplog) -> None:
    """HTTP 500 twice, then a revoked key: the last good set keeps polling, discovery_up
    is 0, each failed refresh is counted by reason and logged in one line."""
    for name in ("a", "b"):
        simulator.add_cluster(name, "v2", api_key=KEY).add_jobs(2, "docs", "importing")
    clock = FakeClock()
    exporter = InProcessExporter({"defaults": fast_defaults(), "discovery": [
        simulator.discovery_config("prod", KEY, settings={"retries": 0})]}, clock)
    plane = simulator.control_plane(KEY)
    up = ("zilliz_import_discovery_up", (("source", "prod"),))

    def errors(metrics: dict) -> dict[str, float]:
        return {dict(k[1])["reason"]: v for k, v in
                samples(metrics, "zilliz_import_discovery_errors_total").items() if v}
    try:
        metrics = exporter.poll()
        assert metrics[up] == 1 and errors(metrics) == {}
        good = metrics[("zilliz_import_discovery_last_success_timestamp_seconds",
                        (("source", "prod"),))]
        plane.fail("500")
        with caplog.at_level("WARNING", logger="exporter.discovery"):
            for failure in ("500", "500", "auth_http"):
                plane.fail(failure)
                clock.advance(60)
                exporter.refresh()
                metrics = exporter.poll()
                assert polled_names(metrics) == {"a", "b"}
                assert all(job_counts(metrics, n) == truth(simulator.clusters[n])
                           for n in ("a", "b"))
                assert metrics[up] == 0
        assert errors(metrics) == {"http": 2, "auth": 1}
        assert metrics[("zilliz_import_discovery_last_success_timestamp_seconds",
                        (("source", "prod"),))] == good
        assert len(samples(metrics, "zilliz_import_discovered_cluster_info")) == 2
        lines = [r for r in caplog.records if r.name == "exporter.discovery"]
        assert [getattr(r, "fields")["reason"] for r in lines] == ["http", "http", "auth"]
        assert all(KEY not in r.getMessage() + str(getattr(r, "fields")) for r in lines)
        plane.heal()
        assert exporter.refresh()[up] == 1
    finally:
        exporter.close()


def test_discovery_is_paced_on_its_own_endpoint_of_the_sources_key(simulator) -> None:
    simulator.add_cluster("a", "v2", api_key=KEY).add_jobs(1)
    exporter = InProcessExporter({"discovery": [simulator.discovery_config("prod", KEY)]},
                                 FakeClock())
    try:
        exporter.poll()
        endpoints = {endpoint for _, _, endpoint in exporter.group.limits.buckets()}
        assert endpoints == {"clusters", "list", "describe"}
        assert len({(host, user) for host, user, _ in exporter.group.limits.buckets()}) == 1
    finally:
        exporter.close()


def test_at_run_time_with_real_threads_and_a_reload(simulator, exporter) -> None:
    """The real exporter refreshing every second: a cluster added is polled, one removed
    leaves /metrics, a failing source keeps the rest polling, a reload re-reads the
    sources; the cluster nothing touched shows in every scrape."""
    for name in ("steady", "leaving"):
        simulator.add_cluster(name, "v2", api_key=KEY).add_jobs(2, "docs", "importing")
    config = {"defaults": fast_defaults(),
              "discovery": [simulator.discovery_config("prod", KEY, refresh_interval="1s",
                                                       settings={"retries": 0})]}
    proc = exporter(config, "--web.enable-lifecycle")
    wait_until(lambda: proc.get("/-/ready")[0] == 200, what="ready")
    gaps = 0

    def watch(check):
        def probe(metrics: dict) -> bool:
            nonlocal gaps
            gaps += not job_counts(metrics, "steady")
            return bool(check(metrics))
        return probe
    proc.wait_for_metrics(watch(lambda m: job_counts(m, "leaving")), what="first refresh")
    simulator.add_cluster("late", "v2", api_key=KEY).add_jobs(1, "docs", "pending")
    simulator.remove_cluster("leaving")
    proc.wait_for_metrics(watch(lambda m: job_counts(m, "late") and not [
        k for k in m if dict(k[1]).get("cluster_name") == "leaving"]),
        what="late polled, leaving gone")
    plane = simulator.control_plane(KEY)
    plane.fail("500")

    def reasons(m: dict) -> dict[str, float]:
        return {dict(k[1])["reason"]: v for k, v in
                samples(m, "zilliz_import_discovery_errors_total").items() if v}
    proc.wait_for_metrics(watch(lambda m: reasons(m).get("http", 0) >= 2), what="two 500s")
    plane.fail("auth_http")
    metrics = proc.wait_for_metrics(watch(lambda m: reasons(m).get("auth")), what="auth")
    assert metrics[("zilliz_import_discovery_up", (("source", "prod"),))] == 0
    assert job_counts(metrics, "late") and job_counts(metrics, "steady")
    plane.heal()
    metrics = proc.wait_for_metrics(watch(lambda m: m[("zilliz_import_discovery_up",
                                                      (("source", "prod"),))] == 1),
                                    what="recovery")
    assert "discovery source recovered" in proc.logs()
    # one line per failed refresh (each logged before its count is published)
    assert proc.logs().count("discovery refresh failed") == sum(reasons(metrics).values())
    # a reload re-reads the sources: an exclude added drops a cluster
    config["discovery"][0]["exclude"] = "late"
    proc.write_config(config)
    assert proc.get("/-/reload", method="POST")[0] == 200
    proc.wait_for_metrics(watch(lambda m: not job_counts(m, "late")), what="late excluded")
    assert "removed=late" in proc.logs()
    assert gaps == 0


def test_a_sources_proxy_serves_its_requests_and_its_clusters() -> None:
    """proxy_url in a source's settings (or defaults) is the control plane's proxy, and
    its clusters inherit it with the rest of its settings."""
    from exporter.client import proxies
    proxy = "http://ops:pw@proxy.corp:3128"
    source = src(settings=PollSettings(proxy_url=proxy))
    config = Config(path="x", clusters=(), discovery=(source,))
    (cluster,) = resolve(config, {"prod": [cloud("in01-a", "a")]}).clusters
    for target in (source.control_plane, cluster):
        assert proxies(target) == {"http": proxy, "https": proxy}
