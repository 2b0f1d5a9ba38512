from __future__ import annotations

import random

import pytest
import responses

from exporter.client import AuthFailure, HttpFailure, PaginationFailure
from exporter.config import ClusterConfig, Config, PollSettings
from exporter.history import JobHistory
from exporter.poller import (
    ClusterPoller, PollerGroup, SnapshotBoard, backoff_delay, fetch_listing, select_shard,
)
from exporter.client import make_session
from exporter.simulator import Simulator

URL = "https://api.example.com/v2/vectordb/jobs/import/list"
V1URL = "https://controller.api.example.com/v1/vector/collections/import/list"


def v2(page_size: int = 2, **settings: object) -> ClusterConfig:
    return ClusterConfig(name="c", url="https://api.example.com", api="v2", cluster_id="x",
                         api_key="k", settings=PollSettings(page_size=page_size,
                                                            **settings))  # type: ignore[arg-type]


def v1(page_size: int = 2, **settings: object) -> ClusterConfig:
    return ClusterConfig(name="c", url="https://controller.api.example.com", api="v1",
                         cluster_id="x", api_key="k",
                         settings=PollSettings(page_size=page_size,
                                               **settings))  # type: ignore[arg-type]


def job(job_id: str, state: str = "Importing", collection: str = "c") -> dict:
    return {"collectionName": collection, "jobId": job_id, "state": state, "progress": 0}


def v2_pages(*pages: list[dict]) -> None:
    for records in pages:
        responses.post(URL, json={"code": 0, "data": {"records": records}})


def run(cluster: ClusterConfig):
    delays: list[float] = []
    listing = fetch_listing(make_session(cluster), cluster,
                            wait=lambda s: delays.append(s) or False, rng=random.Random(1))
    return listing, delays


@responses.activate
def test_stops_on_short_page() -> None:
    v2_pages([job("a"), job("b")], [job("c")])
    listing, _ = run(v2())
    assert sorted(r.job_id for r in listing) == ["a", "b", "c"] and listing.pages == 2
    assert len(responses.calls) == 2


@responses.activate
def test_stops_on_empty_page_when_no_total() -> None:
    v2_pages([job("a"), job("b")], [job("c"), job("d")], [])
    listing, _ = run(v2())
    assert len(listing) == 4 and len(responses.calls) == 3


@responses.activate
def test_stops_when_v1_total_is_reached() -> None:
    for tasks in ([job("a"), job("b")], [job("c"), job("d")]):
        responses.get(V1URL, json={"code": 200, "data": {"tasks": tasks, "count": 4}})
    listing, _ = run(v1())
    assert len(listing) == 4 and len(responses.calls) == 2  # no empty third page


@responses.activate
def test_v1_count_as_page_length_is_not_taken_for_a_total() -> None:
    for tasks in ([job("a"), job("b")], [job("c"), job("d")], [job("e")]):
        responses.get(V1URL, json={"code": 200, "data": {"tasks": tasks,
                                                         "count": len(tasks)}})
    listing, _ = run(v1())
    assert len(listing) == 5 and len(responses.calls) == 3


@responses.activate
def test_first_page_larger_than_asked_is_the_whole_listing() -> None:
    """Milvus ignores paging: one request per poll, no second page."""
    everything = [job("a"), job("b"), job("c")]
    for _ in range(5):
        responses.post(URL, json={"code": 0, "data": {"records": everything}})
    listing, _ = run(v2())
    assert len(listing) == 3 and len(responses.calls) == 1


@responses.activate
def test_server_repeating_a_full_page_is_listed_once() -> None:
    """Exactly page_size jobs on a server that ignores paging: a page of no new id ends it."""
    everything = [job("a"), job("b")]
    for _ in range(5):
        responses.post(URL, json={"code": 0, "data": {"records": everything}})
    listing, _ = run(v2())
    assert len(listing) == 2 and len(responses.calls) == 2


@responses.activate
def test_later_page_wins_for_a_repeated_id() -> None:
    v2_pages([job("a", "Pending"), job("b")], [job("a", "Completed")])
    listing, _ = run(v2())
    assert {r.job_id: r.state for r in listing}["a"] == "completed" and len(listing) == 2
    assert [r.job_id for r in listing] == ["a", "b"]


@responses.activate
def test_max_pages_is_an_error() -> None:
    v2_pages([job("a"), job("b")], [job("c"), job("d")], [job("e"), job("f")])
    with pytest.raises(PaginationFailure):
        run(v2(max_pages=2))


@responses.activate
def test_retries_with_backoff_then_succeeds() -> None:
    responses.post(URL, status=503)
    responses.post(URL, status=429, headers={"Retry-After": "3"})
    v2_pages([job("a")])
    listing, delays = run(v2(retries=2))
    assert len(listing) == 1 and len(delays) == 2
    assert 0 <= delays[0] <= 0.5 and delays[1] == 3  # Retry-After honoured


@responses.activate
def test_gives_up_after_retries_and_never_retries_auth() -> None:
    for _ in range(3):
        responses.post(URL, status=500)
    with pytest.raises(HttpFailure):
        run(v2(retries=2))
    assert len(responses.calls) == 3
    responses.reset()
    responses.post(URL, status=401)
    with pytest.raises(AuthFailure):
        run(v2(retries=2))
    assert len(responses.calls) == 1


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(n, None, 10, rng) for n in range(10)]
    assert all(0 <= d <= 10 for d in delays) and len(set(delays)) == 10
    assert backoff_delay(0, 3600, 60, rng) == 60


@responses.activate
def test_failed_page_publishes_nothing_new() -> None:
    board = SnapshotBoard()
    cluster = v2(retries=0)
    poller = ClusterPoller(cluster, board, JobHistory("c"))
    v2_pages([job("a"), job("b")], [job("c")])
    first = poller.poll_once()
    assert first.up and first.jobs is not None and first.jobs.total == 3
    v2_pages([job("a"), job("b")])
    responses.post(URL, status=500)
    second = poller.poll_once()
    assert not second.up and second.last_error_reason == "http"
    assert second.jobs is first.jobs  # the last complete listing, not page 1 of the new one
    assert board.get("c") is second and second.poll_errors == {"http": 1}
    assert second.api_requests == {"200": 3, "500": 1}


def test_stale_series_are_withdrawn_after_stale_after() -> None:
    board = SnapshotBoard()
    cluster = v2(stale_after=60)
    poller = ClusterPoller(cluster, board, JobHistory("c"), clock=lambda: 1000.0)
    with responses.RequestsMock() as mock:
        mock.post(URL, json={"code": 0, "data": {"records": [job("a")]}})
        mock.post(URL, status=500)
        poller.poll_once()
        failed = poller.poll_once()
    assert not failed.is_stale(1059) and failed.is_stale(1061)


def test_retired_poller_never_publishes() -> None:
    board = SnapshotBoard()
    poller = ClusterPoller(v2(), board, JobHistory("c"))
    poller.stop()
    board.remove("c")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.post(URL, json={"code": 0, "data": {"records": [job("a")]}})
        try:
            poller.poll_once()
        except Exception:  # noqa: BLE001 - Stopped is expected; what matters is the board
            pass
    assert board.get("c") is None


def test_pages_from_the_simulator_match_the_floor() -> None:
    """Against a real HTTP server: requests per poll equal ceil(jobs/page_size)."""
    with Simulator() as sim:
        for name, flavour, mode in (("t", "v1", "total"), ("p", "v1", "page"),
                                    ("z", "v2", "total"), ("m", "milvus", "none")):
            cluster = sim.add_cluster(name, flavour, count_mode=mode)
            cluster.add_jobs(250)
            config = ClusterConfig(name=name, url=sim.url_for(name),
                                   api="v1" if flavour == "v1" else "v2",
                                   cluster_id=cluster.cluster_id, api_key=cluster.api_key,
                                   settings=PollSettings(page_size=50))
            listing = fetch_listing(make_session(config), config)
            assert len(listing) == 250
            # 250 is a multiple of 50: without a total, an empty page ends the listing;
            # Milvus ignores paging and answers all 250 at once.
            floor = {"total": 5, "page": 6, "none": 1}[mode]
            assert cluster.requests == floor, (name, cluster.pages_served)


def test_group_applies_changes_and_shards() -> None:
    clusters = tuple(ClusterConfig(name=f"c{i}", url="http://127.0.0.1:9", api="v2")
                     for i in range(12))
    config = Config(path="x", clusters=clusters)
    for count in (1, 2, 3, 5):
        owners = [sorted(c.name for c in select_shard(config, count, i))
                  for i in range(count)]
        flat = [name for names in owners for name in names]
        assert sorted(flat) == sorted(c.name for c in clusters)  # exactly once each
    more = Config(path="x", clusters=clusters + tuple(
        ClusterConfig(name=f"new{i}", url="http://127.0.0.1:9", api="v2") for i in range(9)))
    for i in range(3):
        before = {c.name for c in select_shard(config, 3, i)}
        after = {c.name for c in select_shard(more, 3, i) if not c.name.startswith("new")}
        assert before == after  # adding clusters moves nobody
    board = SnapshotBoard()
    group = PollerGroup(board)
    assert group.apply(clusters[:2], start=False) == {"c0": "added", "c1": "added"}
    changed = ClusterConfig(name="c1", url="http://127.0.0.1:10", api="v2")
    assert group.apply((clusters[0], changed), start=False) == {"c1": "changed"}
    assert group.apply((changed,), start=False) == {"c0": "removed"}
    assert [s.cluster.name for s in board.snapshots()] == ["c1"]
