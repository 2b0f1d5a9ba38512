from __future__ import annotations

import logging
import random

import pytest

import exporter.poller
from exporter.errors import AuthFailure, HttpFailure, PaginationFailure
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.board import SnapshotBoard
from exporter.paging import Stopped, backoff_delay, fetch_listing
from exporter.poller import ClusterPoller, ClusterReport, PollerGroup
from exporter.answers import JobDetails
from exporter.details import DetailRules
from exporter.jobs import JobRecord, Listing
from exporter.logs import bind
from exporter.client import make_session
from exporter.jobs import MAX_UNKNOWN_STATES, OTHER_STATE
from exporter.simulator import Simulator

from exporter.ratelimit import RateLimits

from conftest import FakeClock, StubApi, wait_until

LIST = "/v2/vectordb/jobs/import/list"
DESCRIBE = "/v2/vectordb/jobs/import/describe"
V1_LIST = "/v1/vector/collections/import/list"


def v2(stub: StubApi, page_size: int = 2, **settings: object) -> ClusterConfig:
    return ClusterConfig(name="c", url=stub.url, api="v2", cluster_id="x",
                         api_key="k", settings=PollSettings(page_size=page_size,
                                                            **settings))  # type: ignore[arg-type]


def v1(stub: StubApi, page_size: int = 2, **settings: object) -> ClusterConfig:
    return ClusterConfig(name="c", url=stub.url, api="v1",
                         cluster_id="x", api_key="k",
                         settings=PollSettings(page_size=page_size,
                                               **settings))  # type: ignore[arg-type]


def job(job_id: str, state: str = "Importing", collection: str = "c") -> dict:
    return {"collectionName": collection, "jobId": job_id, "state": state, "progress": 0}


def v2_pages(stub: StubApi, *pages: list[dict]) -> None:
    for records in pages:
        stub.add("POST", LIST, json={"code": 0, "data": {"records": records}})


def run(cluster: ClusterConfig):
    delays: list[float] = []
    listing = fetch_listing(make_session(cluster), cluster,
                            wait=lambda s: delays.append(s) or False, rng=random.Random(1))
    return listing, delays


def test_stops_on_short_page(stub: StubApi) -> None:
    v2_pages(stub, [job("a"), job("b")], [job("c")])
    listing, _ = run(v2(stub))
    assert sorted(r.job_id for r in listing) == ["a", "b", "c"] and listing.pages == 2
    assert len(stub.calls) == 2


def test_stops_on_empty_page_when_no_total(stub: StubApi) -> None:
    v2_pages(stub, [job("a"), job("b")], [job("c"), job("d")], [])
    listing, _ = run(v2(stub))
    assert len(listing) == 4 and len(stub.calls) == 3


def test_stops_when_v1_total_is_reached(stub: StubApi) -> None:
    for tasks in ([job("a"), job("b")], [job("c"), job("d")]):
        stub.add("GET", V1_LIST, json={"code": 200, "data": {"tasks": tasks, "count": 4}})
    listing, _ = run(v1(stub))
    assert len(listing) == 4 and len(stub.calls) == 2  # no empty third page


def test_v1_count_as_page_length_is_not_taken_for_a_total(stub: StubApi) -> None:
    for tasks in ([job("a"), job("b")], [job("c"), job("d")], [job("e")]):
        stub.add("GET", V1_LIST, json={"code": 200, "data": {"tasks": tasks,
                                                         "count": len(tasks)}})
    listing, _ = run(v1(stub))
    assert len(listing) == 5 and len(stub.calls) == 3


def test_first_page_larger_than_asked_is_the_whole_listing(stub: StubApi) -> None:
    """Milvus ignores paging: one request per poll, no second page."""
    everything = [job("a"), job("b"), job("c")]
    for _ in range(5):
        stub.add("POST", LIST, json={"code": 0, "data": {"records": everything}})
    listing, _ = run(v2(stub))
    assert len(listing) == 3 and len(stub.calls) == 1


def test_server_repeating_a_full_page_is_listed_once(stub: StubApi) -> None:
    """Exactly page_size jobs on a server that ignores paging: a page of no new id ends it."""
    everything = [job("a"), job("b")]
    for _ in range(5):
        stub.add("POST", LIST, json={"code": 0, "data": {"records": everything}})
    listing, _ = run(v2(stub))
    assert len(listing) == 2 and len(stub.calls) == 2


def test_later_page_wins_for_a_repeated_id(stub: StubApi) -> None:
    v2_pages(stub, [job("a", "Pending"), job("b")], [job("a", "Completed")])
    listing, _ = run(v2(stub))
    assert {r.job_id: r.state for r in listing}["a"] == "completed" and len(listing) == 2
    assert [r.job_id for r in listing] == ["a", "b"]


def test_max_pages_is_an_error(stub: StubApi) -> None:
    v2_pages(stub, [job("a"), job("b")], [job("c"), job("d")], [job("e"), job("f")])
    with pytest.raises(PaginationFailure):
        run(v2(stub, max_pages=2))


def test_retries_with_backoff_then_succeeds(stub: StubApi) -> None:
    stub.add("POST", LIST, status=503)
    stub.add("POST", LIST, status=429, headers={"Retry-After": "3"})
    v2_pages(stub, [job("a")])
    listing, delays = run(v2(stub, retries=2))
    assert len(listing) == 1 and len(delays) == 2
    assert 0 <= delays[0] <= 0.5 and delays[1] == 3  # Retry-After honoured


def test_gives_up_after_retries_and_never_retries_auth(stub: StubApi) -> None:
    for _ in range(3):
        stub.add("POST", LIST, status=500)
    with pytest.raises(HttpFailure):
        run(v2(stub, retries=2))
    assert len(stub.calls) == 3
    stub.reset()
    stub.add("POST", LIST, status=401)
    with pytest.raises(AuthFailure):
        run(v2(stub, retries=2))
    assert len(stub.calls) == 1


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(3)
    delays = [backoff_delay(n, None, 10, rng) for n in range(10)]
    assert all(0 <= d <= 10 for d in delays) and len(set(delays)) == 10
    assert backoff_delay(0, 3600, 60, rng) == 60


def test_failed_page_publishes_nothing_new(stub: StubApi) -> None:
    board = SnapshotBoard()
    cluster = v2(stub, retries=0, max_describes_per_poll=0)
    poller = ClusterPoller(cluster, board, JobHistory("c"))
    v2_pages(stub, [job("a"), job("b")], [job("c")])
    first = poller.poll_once()
    assert first.up and first.jobs is not None and first.jobs.total == 3
    v2_pages(stub, [job("a"), job("b")])
    stub.add("POST", LIST, status=500)
    second = poller.poll_once()
    assert not second.up and second.last_error_reason == "http"
    assert second.jobs is first.jobs  # the last complete listing, not page 1 of the new one
    assert board.get("c") is second and second.poll_errors == {"http": 1}
    assert second.api_requests == {("list", "200"): 3, ("list", "500"): 1}


def test_poller_backs_off_through_its_wait_seam(stub: StubApi) -> None:
    """Retries of a poll and of its describes wait through the injected ``wait``."""
    delays: list[float] = []
    poller = ClusterPoller(v2(stub, retries=2, max_describes_per_poll=1), SnapshotBoard(),
                           JobHistory("c"), rng=random.Random(1),
                           wait=lambda s: delays.append(s) or False)
    stub.add("POST", LIST, status=503)
    stub.add("POST", LIST, status=429, headers={"Retry-After": "7"})
    stub.add("POST", LIST, json={"code": 0, "data": {"records": [job("a")]}})
    stub.add("POST", DESCRIBE, status=503)
    stub.add("POST", DESCRIBE, json={"code": 0, "data": {"jobId": "a", "state": "Importing",
                                                         "progress": 5}})
    snap = poller.poll_once()
    assert [c.path for c in stub.calls] == [LIST] * 3 + [DESCRIBE] * 2
    assert snap.up and len(delays) == 3 and delays[1] == 7
    assert snap.api_requests == {("list", "503"): 1, ("list", "429"): 1, ("list", "200"): 1,
                                 ("describe", "503"): 1, ("describe", "200"): 1}


def test_a_crash_while_describing_leaves_the_published_listing_up(
        stub: StubApi, caplog, monkeypatch) -> None:
    """Describes never fail a poll: not even an exception nobody expected."""
    history = JobHistory("c")
    poller = ClusterPoller(v2(stub, max_describes_per_poll=1), SnapshotBoard(), history,
                           wait=lambda s: False)
    stub.add("POST", LIST, json={"code": 0, "data": {"records": [job("a")]}})
    described: list[str] = []

    def buggy_describe(session, cluster, job_id, **kwargs):  # type: ignore[no-untyped-def]
        described.append(job_id)
        raise RuntimeError("a bug in the describe path")
    monkeypatch.setattr(exporter.poller, "describe_import_job", buggy_describe)
    snap = poller.poll_once()
    assert described == ["a"]
    assert snap.up and snap.poll_errors == {} and snap.jobs is not None
    assert snap.jobs.total == 1
    assert "describing jobs crashed" in caplog.text


def test_a_poller_retired_during_its_listing_leaves_the_history_alone(
        stub: StubApi) -> None:
    """A changed cluster's new poller shares the history: the old one must not fold a
    listing it fetched after it was told to stop."""
    history = JobHistory("c")
    poller = ClusterPoller(v2(stub), SnapshotBoard(), history)

    def stop_mid_request(call):  # type: ignore[no-untyped-def]
        poller.stop()
        return 200, {}, '{"code": 0, "data": {"records": [{"jobId": "a", "state": "Pending"}]}}'
    stub.add("POST", LIST, callback=stop_mid_request)
    with pytest.raises(Stopped):
        poller.poll_once()
    assert len(history) == 0 and len(stub.calls) == 1


def test_stale_series_are_withdrawn_after_stale_after(stub: StubApi) -> None:
    board = SnapshotBoard()
    cluster = v2(stub, stale_after=60, max_describes_per_poll=0)
    poller = ClusterPoller(cluster, board, JobHistory("c"), clock=lambda: 1000.0,
                           wait=lambda seconds: False)     # retries go at once
    stub.add("POST", LIST, json={"code": 0, "data": {"records": [job("a")]}})
    stub.add("POST", LIST, status=500)
    poller.poll_once()
    failed = poller.poll_once()
    assert not failed.up
    assert not failed.is_stale(1059) and failed.is_stale(1061)


def test_retired_poller_never_publishes(stub: StubApi) -> None:
    board = SnapshotBoard()
    poller = ClusterPoller(v2(stub), board, JobHistory("c"))
    poller.stop()
    board.remove("c")
    stub.add("POST", LIST, json={"code": 0, "data": {"records": [job("a")]}})
    with pytest.raises(Stopped):
        poller.poll_once()
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


def test_group_applies_changes() -> None:
    clusters = tuple(ClusterConfig(name=f"c{i}", url="http://127.0.0.1:9", api="v2")
                     for i in range(2))
    board = SnapshotBoard()
    group = PollerGroup(board)
    assert group.apply(clusters[:2], start=False) == {"c0": "added", "c1": "added"}
    changed = ClusterConfig(name="c1", url="http://127.0.0.1:10", api="v2")
    kept = group.pollers["c0"]
    kept._describe.get_progress = True      # learnt that c0's server is an old Milvus
    assert group.apply((clusters[0], changed), start=False) == {"c1": "changed"}
    assert group.pollers["c0"] is kept and not kept._describe.get_progress  # a reload forgets
    assert group.apply((changed,), start=False) == {"c0": "removed"}
    assert [s.cluster.name for s in board.snapshots()] == ["c1"]


# ---- job details: describes against the simulator ---------------------------------------

def sim_poller(sim: Simulator, name: str, clock: FakeClock | None = None,
               **settings: object) -> ClusterPoller:
    c = sim.clusters[name]
    config = ClusterConfig(name=name, url=sim.url_for(name),
                           api="v1" if c.flavour == "v1" else "v2",
                           cluster_id=c.cluster_id, api_key=c.api_key,
                           settings=PollSettings(retries=0, **settings))  # type: ignore[arg-type]
    clock = clock or FakeClock()
    return ClusterPoller(config, SnapshotBoard(), JobHistory(name, clock=clock), clock=clock)


def test_describe_order_budget_and_only_listed_ids() -> None:
    with Simulator() as sim:
        c = sim.add_cluster("z", "v2", reasons_in_list=False)
        pending = c.add_jobs(2, "docs", "pending")
        importing = c.add_jobs(2, "docs", "importing", progress=50)
        finishing = c.add_jobs(2, "docs", "importing", progress=90)
        c.add_jobs(3, "docs", "completed", progress=100)    # baseline: never described
        clock = FakeClock()
        poller = sim_poller(sim, "z", clock, max_describes_per_poll=3)
        first = poller.poll_once()
        # active only, importing before pending, by id when never described
        assert c.described == [*importing, finishing[0]]
        assert first.up and first.api_requests[("describe", "200")] == 3
        c.described.clear()
        clock.now += 10
        c.set_state(finishing[0], "failed")
        c.set_reason(finishing[0], "file s3://b/a.parquet not found")
        c.set_state(finishing[1], "completed")
        c.set_rows(finishing[1], 5000, 5000)
        c.remove_jobs([pending[0]])
        poller.poll_once()
        # newly failed first, then newly completed, then active jobs: the importing
        # ones were described since their progress last moved (v2 rows cannot have
        # moved either), so the never described pending job
        assert c.described == [finishing[0], finishing[1], pending[1]]
        c.described.clear()
        clock.now += 10
        snap = poller.poll_once()
        assert c.described == []                    # nothing moved
        c.described.clear()
        clock.now += 10
        c.set_progress(importing[0], 60)
        poller.poll_once()
        assert c.described == [importing[0]]
        assert c.unknown_describes == 0 and pending[0] not in c.described
        assert snap.jobs is not None
        assert [(f.job_id, f.reason) for f in snap.jobs.failed] == \
            [(finishing[0], "file s3://b/a.parquet not found")]
        assert snap.jobs.rows_imported == {"docs": 5000}


def test_describing_off_sends_no_describe() -> None:
    with Simulator() as sim:
        c = sim.add_cluster("z", "v2")
        c.add_jobs(3, "docs", "importing", progress=10)
        poller = sim_poller(sim, "z", max_describes_per_poll=0)
        snap = poller.poll_once()
        poller.poll_once()
        assert c.described == [] and all(k[0] == "list" for k in snap.api_requests)
        assert snap.jobs is not None and len(snap.jobs.running) == 3   # progress from the list


def test_v1_progress_comes_from_describe_and_stalls() -> None:
    with Simulator() as sim:
        c = sim.add_cluster("one", "v1")
        (job_id,) = c.add_jobs(1, "docs", "importing", progress=40)
        clock = FakeClock()
        poller = sim_poller(sim, "one", clock, stall_after=60.0)
        snap = poller.poll_once()
        assert snap.jobs is not None
        (running,) = snap.jobs.running
        assert running.progress == 0.4 and running.total_rows == -1   # v1: no rows
        clock.now += 30
        c.set_progress(job_id, 60)
        snap = poller.poll_once()
        assert snap.jobs is not None and snap.jobs.running[0].progress == 0.6
        assert snap.jobs.running[0].eta is not None                     # it moved
        for _ in range(4):          # frozen at 60 (seen by the listing one poll later)
            clock.now += 30
            snap = poller.poll_once()
        assert snap.jobs is not None
        assert [(j.job_id, j.reason) for j in snap.jobs.stuck_jobs] == [(job_id, "stalled")]


def test_describe_failure_never_fails_the_poll_and_keeps_details() -> None:
    with Simulator() as sim:
        c = sim.add_cluster("z", "milvus")
        jobs = c.add_jobs(3, "docs", "importing", progress=50)
        for job_id in jobs:
            c.set_rows(job_id, 100, 1000)
        clock = FakeClock()
        poller = sim_poller(sim, "z", clock)
        snap = poller.poll_once()
        assert snap.jobs is not None and {j.imported_rows for j in snap.jobs.running} == {100}
        clock.now += 10
        c.describe_fault = "500"
        for job_id in jobs:
            c.set_progress(job_id, 60)
            c.set_rows(job_id, 500, 1000)
        snap = poller.poll_once()
        assert snap.up and snap.last_error == ""
        assert snap.jobs is not None and {j.imported_rows for j in snap.jobs.running} == {100}
        # a broken endpoint costs one request per poll, counted under describe
        assert snap.api_requests[("describe", "500")] == 1
        c.describe_fault = "api_error"           # e.g. a key without the permission
        for job_id in jobs:
            c.set_progress(job_id, 70)
        clock.now += 10
        before = snap.api_requests[("describe", "200")]
        snap = poller.poll_once()
        assert snap.up and snap.api_requests[("describe", "200")] == before + 1   # not 3
        c.describe_fault = ""
        clock.now += 10
        snap = poller.poll_once()
        assert snap.jobs is not None and {j.imported_rows for j in snap.jobs.running} == {500}


def test_old_milvus_falls_back_to_get_progress_until_reload() -> None:
    with Simulator() as sim:
        c = sim.add_cluster("old", "milvus", legacy_describe=True, v2_success_code=200)
        c.add_jobs(2, "docs", "importing", progress=20)
        clock = FakeClock()
        poller = sim_poller(sim, "old", clock)
        snap = poller.poll_once()
        assert snap.api_requests[("describe", "404")] == 1        # once, then remembered
        assert snap.api_requests[("describe", "200")] == 2
        assert snap.jobs is not None and all(j.total_rows == 0 for j in snap.jobs.running)
        snap = poller.poll_once()
        assert snap.api_requests[("describe", "404")] == 1
        poller.reset_fallbacks()                                   # a reload
        c.set_progress(next(iter(c.jobs)), 30)                     # something to describe
        clock.now += 10
        snap = poller.poll_once()
        assert snap.api_requests[("describe", "404")] == 2


def test_unknown_states_are_logged_once_each_and_boundedly(stub: StubApi, caplog) -> None:
    """Each unknown state is logged once; past MAX_UNKNOWN_STATES one line says the
    rest go under OTHER_STATE, and nothing more is remembered or logged."""
    # unknown states are active: describing them is not what this test is about
    cluster = v2(stub, page_size=100, max_describes_per_poll=0)
    states = [f"Weird{i}" for i in range(MAX_UNKNOWN_STATES + 20)]
    for _ in range(2):
        v2_pages(stub, [job(f"j{i}", state) for i, state in enumerate(states)])
    poller = ClusterPoller(cluster, SnapshotBoard(), JobHistory("c", clock=FakeClock()),
                           clock=FakeClock())
    with caplog.at_level("WARNING", logger="exporter.poller"):
        poller.poll_once()
        poller.poll_once()
    unknown = [r for r in caplog.records if r.getMessage().startswith("unknown job state")]
    assert len(unknown) == MAX_UNKNOWN_STATES
    assert len({getattr(r, "fields")["state"] for r in unknown}) == MAX_UNKNOWN_STATES
    assert [r.getMessage() for r in caplog.records].count(
        f"too many distinct job states; new ones are counted under {OTHER_STATE!r} and not "
        "logged") == 1


def test_a_cluster_keeps_one_connection_alive_per_lane_across_pages_and_polls(
        simulator) -> None:
    """One for the listings' pages, one for the describes beside them; none more."""
    sim_cluster = simulator.add_cluster("c", "v2")
    sim_cluster.add_jobs(450, "docs", "completed")
    sim_cluster.add_jobs(5, "docs", "importing", progress=40)
    cluster = ClusterConfig(name="c", url=simulator.url_for("c"), api="v2",
                            cluster_id=sim_cluster.cluster_id, api_key=sim_cluster.api_key,
                            settings=PollSettings(page_size=100, max_describes_per_poll=5))
    poller = ClusterPoller(cluster, SnapshotBoard(), JobHistory("c"))
    for _ in range(3):
        snapshot = poller.poll_once()
    assert snapshot.up and snapshot.api_requests[("list", "200")] == 15
    assert snapshot.api_requests[("describe", "200")] >= 5
    assert simulator.connections == 2


def test_describes_run_beside_the_listings_from_the_latest_listings_plan(simulator) -> None:
    """Describes that take 0.5 s each (a plan of 10 takes 5 s, so six polls one after
    the other would take 25 s) hold no listing back; a new listing replaces an
    unfinished plan; once a listing without some jobs is
    published, no describe is sent for them (one already in flight may still land).
    v1: its active jobs are described after every listing (its listing has no progress)."""
    sim_cluster = simulator.add_cluster("c", "v1", describe_latency=0.5)
    leaving = sim_cluster.add_jobs(5, "docs", "importing", progress=40)
    sim_cluster.add_jobs(5, "docs", "importing", progress=40)
    cluster = ClusterConfig(name="c", url=simulator.url_for("c"), api="v1",
                            cluster_id=sim_cluster.cluster_id, api_key=sim_cluster.api_key,
                            settings=PollSettings(interval=0.1, retries=0,
                                                  max_describes_per_poll=10))
    board = SnapshotBoard()
    poller = ClusterPoller(cluster, board, JobHistory("c"), limits=RateLimits())
    poller.start()
    try:
        wait_until(lambda: len(sim_cluster.pages_served) >= 6 and sim_cluster.described,
                   timeout=5, what="six listings while the first describes are slow")
        sim_cluster.remove_jobs(leaving)

        def published_without_them() -> bool:
            snap = board.get("c")
            return bool(snap and snap.jobs and snap.jobs.total == 5)
        wait_until(published_without_them, timeout=3, what="a listing without them")
        seen = len(sim_cluster.described)
        wait_until(lambda: len(sim_cluster.described) >= seen + 3, timeout=10,
                   what="more describes")
        late = [job for job in sim_cluster.described[seen:] if job in leaving]
        assert len(late) <= 1 and sim_cluster.unknown_describes <= 1
    finally:
        poller.stop()
        poller.join(2)


def test_a_listing_published_after_a_describe_keeps_what_the_describe_taught() -> None:
    """The listing lane folds a listing, the describe lane then records a job's rows and
    publishes, and only then does the listing lane publish: its summary is refreshed,
    not taken back (rows_imported would drop, which rate() reads as a counter reset)."""
    clock = FakeClock(1000.0)
    history = JobHistory("c", None, clock)
    rules = {"stuck_after": 3600, "stall_after": 3600, "max_stuck_series": 10,
             "rules": DetailRules(api="v2")}
    board = SnapshotBoard()
    cluster = ClusterConfig(name="c", url="https://x", api="v2", api_key="k")
    report = ClusterReport(cluster, board, 0, clock, lambda: True, lambda: 0.0,
                           bind(logging.getLogger(), cluster_name="c"))
    history.apply(Listing.of([JobRecord("j1", "docs", "importing", 50)]), **rules)
    clock.advance(60)
    report.listing(history.apply(Listing.of([JobRecord("j1", "docs", "completed", 100)]),
                                 **rules), 1.0, {}, history.refresh)
    assert history.describe_plan() == ["j1"]
    folded = history.apply(Listing.of([JobRecord("j1", "docs", "completed", 100)]), **rules)
    history.record_details("j1", JobDetails("j1", progress=100, imported_rows=5000,
                                            total_rows=5000, state="completed"))
    report.details(history.refresh, lambda: False)
    report.listing(folded, 1.0, {}, history.refresh)
    snapshot = board.get("c")
    assert snapshot is not None and snapshot.jobs is not None
    assert dict(snapshot.jobs.rows_imported) == {"docs": 5000}
