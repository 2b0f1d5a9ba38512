"""Discovery: what a source lists becomes the clusters to poll (resolve, in process), and
the control plane is paged as listings are (against the simulator)."""

from __future__ import annotations

import random

import pytest

from exporter.client import AuthFailure, CloudCluster, make_session
from exporter.config import ClusterConfig, Config, DiscoveryConfig, PollSettings
from exporter.discovery import HISTORY_PREFIX, fetch_clusters, resolve, safe_name
from exporter.sharding import shard_of

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
