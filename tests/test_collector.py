from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from conftest import GOLDEN_NOW, FakeClock, golden_board, golden_discovery
from exporter import __version__
from exporter.jobs import JobRecord
from exporter.collector import FAMILIES, RENDER_ERRORS, ImportCollector
from exporter.exposition import ExpositionCache
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.jobs import Listing
from exporter.board import ClusterSnapshot, SnapshotBoard

CLUSTER = ClusterConfig(name="prod", url="https://api.cloud.zilliz.com", api="v2",
                        cluster_id="in01-a", api_key="k",
                        settings=PollSettings(stale_after=60, stuck_after=100,
                                              stall_after=0, max_stuck_job_series=1))


def published(records: list[JobRecord], clock: FakeClock
              ) -> tuple[CollectorRegistry, SnapshotBoard, JobHistory]:
    """A registry serving one published listing of ``records`` for cluster 'prod'."""
    board = SnapshotBoard()
    history = JobHistory("prod", clock=clock)
    summary = history.apply(Listing.of(records), stuck_after=100, stall_after=0, max_stuck_series=1)
    board.publish(ClusterSnapshot(cluster=CLUSTER, polled=True, up=True,
                                  last_success=clock(), jobs=summary,
                                  api_requests={("list", "200"): 2}))
    registry = CollectorRegistry()
    registry.register(ImportCollector(board, clock=clock))
    return registry, board, history


def rec(job_id: str, collection: str, state: str) -> JobRecord:
    return JobRecord(job_id, collection, state, -1)


def test_all_four_states_present_with_zeros() -> None:
    clock = FakeClock(10_000.0)
    registry, _, _ = published([rec("1", "a", "importing"), rec("2", "a", "importing"),
                            rec("3", "b", "waiting_for_retry")], clock)
    value = registry.get_sample_value
    assert value("zilliz_import_jobs", {"cluster_name": "prod", "collection": "a",
                                        "state": "importing"}) == 2
    for collection in ("a", "b"):
        for state in ("pending", "completed", "failed"):
            assert value("zilliz_import_jobs", {"cluster_name": "prod",
                                                "collection": collection,
                                                "state": state}) == 0
    assert value("zilliz_import_jobs", {"cluster_name": "prod", "collection": "b",
                                        "state": "waiting_for_retry"}) == 1
    assert value("zilliz_import_up", {"cluster_name": "prod"}) == 1
    assert value("zilliz_import_api_requests_total", {"cluster_name": "prod",
                                                      "endpoint": "list", "code": "200"}) == 2
    assert value("zilliz_import_poll_errors_total", {"cluster_name": "prod",
                                                     "reason": "pagination"}) == 0
    assert value("zilliz_import_cluster_info", {"cluster_name": "prod", "cluster_id": "in01-a",
                                                "api": "v2", "host": "api.cloud.zilliz.com",
                                                "shard": "0"}) == 1
    assert value("zilliz_import_config_last_reload_successful") == 1


def test_ages_and_stuck_cap() -> None:
    clock = FakeClock(10_000.0)
    registry, board, history = published([rec("1", "a", "importing")], clock)
    clock.now += 50
    summary = history.apply(Listing.of([rec("1", "a", "importing"), rec("2", "a", "pending")]),
                            stuck_after=100, stall_after=0, max_stuck_series=1)
    clock.now += 70   # job 1 is 120 s old, job 2 is 70 s old
    summary = history.apply(Listing.of([rec("1", "a", "importing"), rec("2", "a", "pending")]),
                            stuck_after=60, stall_after=0, max_stuck_series=1)
    board.publish(replace(board.get("prod"), jobs=summary))  # type: ignore[arg-type]
    clock.now += 5
    value = registry.get_sample_value
    assert value("zilliz_import_oldest_active_job_age_seconds",
                 {"cluster_name": "prod", "collection": "a"}) == 125
    assert value("zilliz_import_jobs_stuck", {"cluster_name": "prod", "collection": "a"}) == 2
    info = [s for m in registry.collect() if m.name == "zilliz_import_stuck_job_info"
            for s in m.samples]
    assert [s.labels["job_id"] for s in info] == ["1"]   # capped, oldest first
    assert info[0].labels["reason"] == "age"


def test_stale_cluster_loses_job_series_but_keeps_health() -> None:
    clock = FakeClock(10_000.0)
    registry, board, _ = published([rec("1", "a", "importing")], clock)
    board.publish(replace(board.get("prod"), up=False,  # type: ignore[arg-type]
                          last_error_reason="timeout", poll_errors={"timeout": 1}))
    clock.now += 59
    labels = {"cluster_name": "prod", "collection": "a", "state": "importing"}
    assert registry.get_sample_value("zilliz_import_jobs", labels) == 1
    clock.now += 2
    assert registry.get_sample_value("zilliz_import_jobs", labels) is None
    assert registry.get_sample_value("zilliz_import_oldest_active_job_age_seconds",
                                     {"cluster_name": "prod", "collection": "a"}) is None
    assert registry.get_sample_value("zilliz_import_up", {"cluster_name": "prod"}) == 0
    assert registry.get_sample_value("zilliz_import_poll_errors_total",
                                     {"cluster_name": "prod", "reason": "timeout"}) == 1


def test_collection_leaving_the_listing_leaves_metrics() -> None:
    clock = FakeClock(10_000.0)
    registry, board, history = published([rec("1", "a", "importing"), rec("2", "b", "failed")],
                                     clock)
    summary = history.apply(Listing.of([rec("1", "a", "completed")]), stuck_after=100, stall_after=0,
                            max_stuck_series=1)
    board.publish(replace(board.get("prod"), jobs=summary))  # type: ignore[arg-type]
    names = {s.labels.get("collection") for m in registry.collect() for s in m.samples
             if m.name == "zilliz_import_jobs"}
    assert names == {"a"}


def test_unpolled_cluster_shows_only_info() -> None:
    board = SnapshotBoard()
    board.publish(ClusterSnapshot(cluster=CLUSTER))
    registry = CollectorRegistry()
    registry.register(ImportCollector(board))
    assert registry.get_sample_value("zilliz_import_up", {"cluster_name": "prod"}) is None
    assert registry.get_sample_value("zilliz_import_exporter_build_info",
                                     {"version": __version__,
                                      "python_version": __import__("platform")
                                      .python_version()}) == 1


def test_job_detail_series() -> None:
    from exporter.summary import FailedJob, RunningJob
    clock = FakeClock(10_000.0)
    registry, board, history = published([rec("1", "a", "importing")], clock)
    summary = replace(board.get("prod").jobs,  # type: ignore[union-attr]
                      running=(RunningJob("a", "1", "importing", 1.0, 0.25, 250, 1000, 90.0),
                               RunningJob("a", "2", "pending", 2.0, None, -1, -1, None)),
                      failed=(FailedJob("a", "9", 'bad "file"\\x', 5.0),),
                      rows_imported={"a": 1000})
    board.publish(replace(board.get("prod"), jobs=summary))  # type: ignore[arg-type]
    value = registry.get_sample_value
    job = {"cluster_name": "prod", "collection": "a", "job_id": "1"}
    assert value("zilliz_import_job_progress_ratio", {**job, "state": "importing"}) == 0.25
    assert value("zilliz_import_job_rows", {**job, "kind": "imported"}) == 250
    assert value("zilliz_import_job_rows", {**job, "kind": "total"}) == 1000
    assert value("zilliz_import_job_eta_seconds", job) == 90
    names = {(m.name, s.labels.get("job_id")) for m in registry.collect() for s in m.samples}
    assert ("zilliz_import_job_progress_ratio", "2") not in names    # unknown: absent
    assert ("zilliz_import_job_rows", "2") not in names
    assert value("zilliz_import_failed_job_info", {"cluster_name": "prod", "collection": "a",
                                                   "job_id": "9",
                                                   "reason": 'bad "file"\\x'}) == 1
    assert value("zilliz_import_rows_imported_total",
                 {"cluster_name": "prod", "collection": "a"}) == 1000


def test_histograms_render_cumulative_buckets_count_and_sum() -> None:
    from exporter.summary import Histogram
    clock = FakeClock(10_000.0)
    registry, board, _ = published([rec("1", "a", "importing")], clock)
    bounds = (30.0, 90.0, 1e6)
    summary = replace(board.get("prod").jobs,  # type: ignore[union-attr]
                      durations={("a", "completed"): Histogram(bounds, (2, 0, 1, 4), 9e6),
                                 ("a", "failed"): Histogram(bounds, (0, 0, 0, 0), 0.0)},
                      waits={"a": Histogram(bounds, (1, 1, 0, 0), 100.0)})
    board.publish(replace(board.get("prod"), jobs=summary))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    done = 'cluster_name="prod",collection="a",outcome="completed"'
    for le, n in (("30.0", 2), ("90.0", 2), ("1e+06", 3), ("+Inf", 7)):
        assert ('zilliz_import_job_duration_seconds_bucket{cluster_name="prod",'
                f'collection="a",le="{le}",outcome="completed"}} {n}.0\n') in text
    assert f"zilliz_import_job_duration_seconds_count{{{done}}} 7.0\n" in text
    assert f"zilliz_import_job_duration_seconds_sum{{{done}}} 9e+06\n" in text
    value = registry.get_sample_value
    assert value("zilliz_import_job_duration_seconds_count",
                 {"cluster_name": "prod", "collection": "a", "outcome": "failed"}) == 0
    assert value("zilliz_import_job_wait_seconds_bucket",
                 {"cluster_name": "prod", "collection": "a", "le": "90.0"}) == 2
    assert value("zilliz_import_job_wait_seconds_sum",
                 {"cluster_name": "prod", "collection": "a"}) == 100
    board.publish(replace(board.get("prod"), up=False))  # type: ignore[arg-type]
    clock.now += 61          # stale: withdrawn with the other job series
    assert value("zilliz_import_job_wait_seconds_count",
                 {"cluster_name": "prod", "collection": "a"}) is None


# ---- the golden exposition ---------------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden" / "metrics.txt"
# The build info's values vary by release and by Python: pinned as placeholders.
_BUILD = re.compile(r'(zilliz_import_exporter_build_info)\{python_version="[^"]*",'
                    r'version="[^"]*"\}')


def golden_exposition() -> str:
    """/metrics as the real collector and scrape cache render conftest's golden_board."""
    registry = CollectorRegistry()
    registry.register(ImportCollector(golden_board(), clock=lambda: GOLDEN_NOW,
                                      discovery=golden_discovery()))
    cache = ExpositionCache(registry, SnapshotBoard(), lambda: GOLDEN_NOW)
    body = cache.body(generate_latest, CONTENT_TYPE_LATEST, False).decode()
    return _BUILD.sub(r'\1{python_version="PYTHON",version="VERSION"}', body)


def test_golden_exposition() -> None:
    """HELP text, types, order and series are public: any change fails here. After an
    intended one, regenerate it and review the diff:
        ZIE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_collector.py -k golden
    """
    rendered = golden_exposition()
    if os.environ.get("ZIE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text()


def test_every_family_is_declared_once_and_documented() -> None:
    names = [family.name for family in (*FAMILIES, RENDER_ERRORS)]
    assert len(set(names)) == len(names)
    golden = GOLDEN.read_text()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for family in (*FAMILIES, RENDER_ERRORS):
        assert family.name.startswith("zilliz_import_")
        assert (family.kind == "counter") == family.name.endswith("_total")
        assert f"# HELP {family.name} {family.help}\n# TYPE {family.name} {family.kind}\n" \
            in golden, f"{family.name} is not in the golden exposition"
        assert re.search(rf"^\| `{family.name}` \| {family.kind}\b", readme, re.M), \
            f"{family.name} is not in the README's metrics table"
        assert set(family.labels) <= {"cluster_name", "collection", "state", "job_id",
                                      "reason", "kind", "endpoint", "code", "cluster_id",
                                      "api", "host", "shard", "version", "python_version",
                                      "source", "cluster_display_name", "region_id",
                                      "project_id", "plan", "status", "polled", "outcome"}
