"""How long imports take: the duration and wait histograms, each job observed once and
only when its start is known (exporter.durations, contract "Durations")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from conftest import FakeClock, InProcessExporter, samples
from exporter.answers import JobDetails
from exporter.details import DetailRules
from exporter.durations import MAX_COLLECTIONS, OTHER_COLLECTION, DurationBook, TimingRules
from exporter.history import JobHistory
from exporter.jobs import JobRecord, Listing
from exporter.simulator import Simulator
from exporter.store import HistoryStore, Listed


def rec(job_id: str, state: str, collection: str = "c") -> JobRecord:
    return JobRecord(job_id, collection, state, -1)


def apply(h: JobHistory, *records: JobRecord, interval: float = 10, **rules: Any):
    return h.apply(Listing.of(records), stuck_after=1e9, stall_after=0, max_stuck_series=10,
                   rules=DetailRules(**rules), timing=TimingRules(interval=interval,
                                                                  buckets=(20.0, 60.0)))


def observed(histograms: dict) -> dict:
    """{key: (observations per bucket, sum)} of a summary's histograms, empty ones left
    out."""
    return {k: (h.counts, h.total) for k, h in histograms.items() if sum(h.counts)}


# ---- the rule of known starts, on the history alone --------------------------------

def test_only_jobs_seen_appearing_soon_after_a_listing_are_timed() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)

    def listing(*records: JobRecord):       # ends from the listings: no describes
        return apply(h, *records, max_describes=0)
    listing(rec("old", "importing"), rec("old-q", "pending"))     # first listing: unknown
    clock.advance(10)
    listing(rec("old", "importing"), rec("old-q", "pending"), rec("new", "pending"))
    clock.advance(10)
    listing(rec("old", "completed"), rec("old-q", "importing"), rec("new", "importing"))
    clock.advance(30)           # 40 s after "new" appeared
    summary = listing(rec("old", "completed"), rec("old-q", "failed"),
                      rec("new", "completed"))
    assert observed(summary.durations) == {("c", "completed"): ((0, 1, 0), 40.0)}
    assert observed(summary.waits) == {"c": ((1, 0, 0), 10.0)}
    assert [(f.job_id, f.outcome, f.duration) for f in summary.finished] == [
        ("new", "completed", 40.0), ("old-q", "failed", None), ("old", "completed", None)]
    clock.advance(10)
    again = listing(rec("old", "completed"), rec("old-q", "failed"), rec("new", "completed"))
    assert observed(again.durations) == observed(summary.durations)   # once, ever


@pytest.mark.parametrize("gap,poll_seconds,known", [
    (20, 0, True), (21, 0, False),        # at most twice the interval
    (30, 15, True), (31, 15, False),      # or twice the previous poll, if longer
])
def test_the_gap_to_the_previous_listing_decides(gap: float, poll_seconds: float,
                                                 known: bool) -> None:
    """``gap`` from the start of one listing, which took ``poll_seconds``, to the next."""
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    started = clock() - poll_seconds
    h.apply(Listing.of([]), stuck_after=1e9, stall_after=0, max_stuck_series=1,
            timing=TimingRules(interval=10), started=started)
    clock.now = started + gap
    apply(h, rec("j", "pending"))
    clock.advance(10)
    summary = apply(h, rec("j", "importing"))
    assert bool(observed(summary.waits)) == known


def test_a_failed_poll_is_no_listing_and_a_created_time_is_a_start() -> None:
    """The gap counts from the last successful listing; a server's createTime makes a
    start known whatever the gap (newest Milvus)."""
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply(h)
    clock.advance(60)               # polls failed meanwhile: no listing
    apply(h, rec("late", "pending"), rec("told", "pending"))
    h.record_details("told", JobDetails("told", 0, state="pending",
                                        create_time=clock() - 45))
    clock.advance(10)
    apply(h, rec("late", "importing"), rec("told", "importing"))
    clock.advance(10)           # (a collection's first observation shows one listing on)
    summary = apply(h, rec("late", "importing"), rec("told", "importing"))
    assert observed(summary.waits) == {"c": ((0, 1, 0), 55.0)}       # "told" alone


def test_the_describe_brings_the_end_and_a_job_leaving_before_it_is_timed_anyway() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply(h)
    clock.advance(10)
    apply(h, rec("a", "importing"), rec("b", "importing"), rec("gone", "importing"))
    clock.advance(40)
    apply(h, rec("a", "completed"), rec("b", "failed"), rec("gone", "completed"))
    assert sorted(h.describe_plan()) == ["a", "b", "gone"]      # rows, failure texts
    h.record_details("a", JobDetails("a", 100, 5, 5, "completed",
                                     complete_time=clock() - 25))   # done 15 s in
    h.record_details("b", JobDetails("b", reason="bad file",
                                     complete_time=clock() + 3600))   # a clock ahead
    clock.advance(10)
    summary = apply(h, rec("a", "completed"), rec("b", "failed"))   # "gone" left
    assert observed(summary.durations) == {("c", "completed"): ((1, 1, 0), 15.0 + 40.0),
                                           ("c", "failed"): ((0, 1, 0), 40.0)}


def test_describing_off_times_a_waiting_job_without_its_describe() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply(h)
    clock.advance(10)
    apply(h, rec("a", "importing"))
    clock.advance(10)
    apply(h, rec("a", "completed"))
    assert h.describe_plan() == ["a"]
    clock.advance(10)
    summary = apply(h, rec("a", "completed"), max_describes=0)
    assert observed(summary.durations) == {("c", "completed"): ((1, 0, 0), 10.0)}
    clock.advance(10)
    again = apply(h, rec("a", "completed"))             # describing on again
    assert h.describe_plan() == [] and again.durations == summary.durations


def test_a_restart_times_nothing_twice_and_keeps_what_waits(tmp_path: Path) -> None:
    clock = FakeClock()
    store = HistoryStore(str(tmp_path / "state.db"))
    h = JobHistory("x", store, clock)
    apply(h)
    clock.advance(10)
    apply(h, rec("a", "pending"), rec("b", "pending"), rec("c", "pending"))
    clock.advance(10)
    first = apply(h, rec("a", "completed"), rec("b", "completed"), rec("c", "importing"),
                  api="v1")
    assert observed(first.durations) == {("c", "completed"): ((2, 0, 0), 20.0)}
    store.close()
    clock.advance(15)                  # back within twice the interval
    store = HistoryStore(str(tmp_path / "state.db"))
    h = JobHistory("x", store, clock)
    apply(h, rec("a", "completed"), rec("b", "completed"), rec("c", "completed"),
          rec("d", "pending"), api="v1")
    clock.advance(10)
    summary = apply(h, rec("a", "completed"), rec("b", "completed"), rec("c", "completed"),
                    rec("d", "importing"), api="v1")
    # c once (after the restart), d's wait (it appeared while the exporter was down,
    # within twice the interval of the last listing), a and b not again
    assert observed(summary.durations) == {("c", "completed"): ((0, 1, 0), 25.0)}
    assert observed(summary.waits) == {"c": ((1, 0, 0), 10.0)}
    store.close()


def test_the_listing_on_file_is_written_with_changes_or_at_close(tmp_path: Path) -> None:
    clock = FakeClock()
    store = HistoryStore(str(tmp_path / "state.db"))
    h = JobHistory("x", store, clock)
    h.apply(Listing.of([rec("a", "pending")]), stuck_after=1e9, stall_after=0,
            max_stuck_series=1, started=clock() - 2)
    assert store.load("x").listed == Listed(clock() - 2, 2.0)
    changes = store._conn.total_changes
    clock.advance(10)
    apply(h, rec("a", "pending"))                       # nothing changed: nothing written
    assert store._conn.total_changes == changes
    store.close()
    again = HistoryStore(str(tmp_path / "state.db"))
    assert again.load("x").listed == Listed(clock(), 0.0)      # written at close
    again.close()


# ---- labels: bounded, and zero before the first observation -------------------------

def test_collections_past_the_cap_share_other_and_leave_with_their_collection() -> None:
    book = DurationBook(Listed(0.0, 0.0))
    book.begin(1.0)
    names = [f"c{i:03d}" for i in range(MAX_COLLECTIONS + 2)]
    for i, name in enumerate(names):
        book.finish(name, name, "completed", 0.0, 30.0 + i)
    durations, waits, finished = book.summary()
    labels = {label for label, _ in durations}
    assert labels == {*names[:MAX_COLLECTIONS], OTHER_COLLECTION} and set(waits) == labels
    assert all(sum(h.counts) == 0 for h in durations.values())     # new: 0 this listing
    book.begin(2.0)
    durations, _, _ = book.summary()
    assert sum(durations[(OTHER_COLLECTION, "completed")].counts) == 2
    assert durations[("c000", "completed")].counts == (1, *(0,) * 13)   # le="30.0"
    assert len(finished) == 100 and finished[0].job_id == names[-1]    # newest, capped
    book.listed(set(names[1:MAX_COLLECTIONS + 1]))        # c000 and one of _other's go
    durations, _, _ = book.summary()
    assert ("c000", "completed") not in durations
    assert (OTHER_COLLECTION, "completed") in durations    # it still holds one
    book.listed(set(names[1:MAX_COLLECTIONS]))
    durations, _, _ = book.summary()
    assert OTHER_COLLECTION not in {label for label, _ in durations}
    book.finish("n", "newcomer", "failed", 0.0, 1.0)      # a label was freed
    assert ("newcomer", "failed") in book.summary()[0]


def test_new_buckets_start_the_histograms_over() -> None:
    book = DurationBook()
    book.finish("a", "c", "completed", 0.0, 30.0)
    book.configure(TimingRules(buckets=(1.0, 2.0)))
    durations, _, _ = book.summary()
    assert durations == {} and book.summary()[2][0].duration == 30.0


# ---- against the simulator: exact observations ------------------------------------

BUCKETS = ["20s", "1m", "2m", "5m"]
LE = ("20.0", "60.0", "120.0", "300.0", "+Inf")


def histogram(metrics: dict, name: str, **labels: str) -> tuple[tuple[float, ...], float,
                                                                 float]:
    """(cumulative buckets in LE order, count, sum) of one series, summed over matches."""
    buckets = tuple(sum(samples(metrics, f"{name}_bucket", le=le, **labels).values())
                    for le in LE)
    return (buckets, sum(samples(metrics, f"{name}_count", **labels).values()),
            sum(samples(metrics, f"{name}_sum", **labels).values()))


def config(sim: Simulator, tmp_path: Path, *names: str) -> dict:
    return {"state_file": str(tmp_path / "state.db"),
            "defaults": {"interval": "10s", "retries": 0, "duration_buckets": BUCKETS},
            "clusters": [sim.cluster_config(name) for name in names]}


def poll_every(exporter: InProcessExporter, clock: FakeClock, polls: int,
               seconds: float = 10) -> dict:
    """Poll ``polls`` times, ``seconds`` apart (the clock moves after each); the last
    metrics."""
    for _ in range(polls):
        metrics = exporter.poll()
        clock.advance(seconds)
    return metrics


def test_jobs_of_known_durations_land_in_their_buckets(tmp_path: Path) -> None:
    """Zilliz Cloud v2 (starts seen, ends from completeTime or the listing) and the newest
    Milvus (createTime): every job created while the exporter runs lands in its bucket,
    and _count is the number of jobs that finished."""
    clock = FakeClock(1_700_000_000.0)
    with Simulator(clock=clock) as sim:
        zilliz = sim.add_cluster("zilliz", "v2")
        milvus = sim.add_cluster("milvus", "milvus", report_create_time=True)
        clock.advance(-100)
        zilliz.add_timed_jobs(1, "docs", 50, 200, prefix="old")      # running at the start
        milvus.add_timed_jobs(1, "docs", 50, 200, prefix="old")
        clock.advance(100)
        exporter = InProcessExporter(config(sim, tmp_path, "zilliz", "milvus"), clock)
        try:
            exporter.poll()
            clock.advance(10)
            # created just before a listing: that listing's time is their start
            zilliz.add_timed_jobs(3, "docs", 10, 20)                 # waits 10, takes 30
            zilliz.add_timed_jobs(2, "docs", 50, 200)                # waits 50, takes 250
            zilliz.add_timed_jobs(1, "docs", 10, 80, "failed")       # waits 10, takes 90
            exporter.poll()
            clock.advance(3)
            # created between listings: only createTime knows their start
            milvus.add_timed_jobs(2, "docs", 10, 20)                 # waits 10, takes 30
            milvus.add_timed_jobs(1, "docs", 40, 150)                # waits 40, takes 190
            clock.advance(7)
            metrics = poll_every(exporter, clock, 30)                # every 10 s, 300 s
        finally:
            exporter.close()
        finished = {name: sum(n for (_, state), n in sim.clusters[name].truth().items()
                              if state in ("completed", "failed"))
                    for name in ("zilliz", "milvus")}
    assert finished == {"zilliz": 7, "milvus": 4}
    duration = "zilliz_import_job_duration_seconds"
    wait = "zilliz_import_job_wait_seconds"
    z = {"cluster_name": "zilliz", "collection": "docs"}
    # the old job finished too, but its start is unknown: 6 observed of 7 finished
    assert histogram(metrics, duration, outcome="completed", **z) == \
        ((0, 3, 3, 5, 5), 5, 3 * 30 + 2 * 250)
    assert histogram(metrics, duration, outcome="failed", **z) == ((0, 0, 1, 1, 1), 1, 90)
    assert histogram(metrics, wait, **z) == ((4, 6, 6, 6, 6), 6, 4 * 10 + 2 * 50)
    m = {"cluster_name": "milvus", "collection": "docs"}
    # createTime: the old job counts (its start is told), in its 250 s; waits end with the
    # listing that first shows a job importing (7 s after its end here)
    assert histogram(metrics, duration, outcome="completed", **m) == \
        ((0, 2, 2, 4, 4), 4, 2 * 30 + 190 + 250)
    assert histogram(metrics, wait, **m) == ((2, 3, 3, 3, 3), 3, 2 * 17 + 47)


def test_unknown_starts_stay_out_and_a_short_restart_misses_nothing(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    with Simulator(clock=clock) as sim:
        cluster = sim.add_cluster("z", "v2")
        cluster.add_timed_jobs(2, "docs", 0, 15, prefix="running")   # at the first listing
        settings = config(sim, tmp_path, "z")

        def run(polls: int) -> dict:
            exporter = InProcessExporter(settings, clock)
            try:
                return poll_every(exporter, clock, polls)
            finally:
                exporter.close()
        first = run(3)
        # stopped for 25 s, more than twice the interval: a job created meanwhile
        cluster.add_timed_jobs(1, "docs", 30, 10, prefix="unseen")
        clock.advance(25)
        second = run(6)
        # stopped for 5 s: a job created meanwhile is timed from the first listing after
        cluster.add_timed_jobs(1, "docs", 0, 20, prefix="seen")
        clock.advance(5)
        third = run(4)
    count = "zilliz_import_job_duration_seconds_count"
    for metrics in (first, second):
        assert sum(samples(metrics, count).values()) == 0
        assert sum(samples(metrics, "zilliz_import_job_wait_seconds_count").values()) == 0
    assert samples(third, count, collection="docs", outcome="completed") == {
        (count, (("cluster_name", "z"), ("collection", "docs"), ("outcome", "completed"))): 1}
    assert sum(samples(third, "zilliz_import_job_duration_seconds_sum").values()) == 15


# ---- a restart in the middle of a burst of completions -----------------------------

def finished_jobs(exporter: InProcessExporter, name: str) -> dict[str, float | None]:
    """Job id -> duration of the jobs the cluster's last snapshot lists as finished."""
    snapshot = exporter.board.get(name)
    assert snapshot is not None and snapshot.jobs is not None
    return {job.job_id: job.duration for job in snapshot.jobs.finished}


def test_a_restart_mid_burst_times_each_job_once_and_misses_none(tmp_path: Path) -> None:
    """Two describes per poll, so finished jobs queue for theirs across the restart;
    two more jobs appear while the exporter is down (5 s, within twice the interval)."""
    clock = FakeClock(1_700_000_000.0)
    with Simulator(clock=clock) as sim:
        cluster = sim.add_cluster("z", "v2", reasons_in_list=False)
        settings = config(sim, tmp_path, "z")
        settings["defaults"]["max_describes_per_poll"] = 2
        first = InProcessExporter(settings, clock)
        try:
            first.poll()
            clock.advance(10)
            burst = [cluster.add_timed_jobs(1, "docs", 5, 15 + 5 * i,
                                            "failed" if i % 4 == 3 else "completed")[0]
                     for i in range(12)]         # they end 30 to 85 s from now
            before = poll_every(first, clock, 5)
            before_finished = finished_jobs(first, "z")
        finally:
            first.close()
        clock.advance(-5)
        late = cluster.add_timed_jobs(2, "docs", 0, 20)
        clock.advance(5)
        second = InProcessExporter(settings, clock)
        try:
            after = poll_every(second, clock, 15)
            after_finished = finished_jobs(second, "z")
        finally:
            second.close()
    timed_before = {j for j, d in before_finished.items() if d is not None}
    timed_after = {j for j, d in after_finished.items() if d is not None}
    assert timed_before and timed_after                 # the restart split the burst
    assert not timed_before & timed_after               # nothing twice
    assert timed_before | timed_after == {*burst, *late}    # nothing missed
    count = "zilliz_import_job_duration_seconds_count"
    assert sum(samples(before, count).values()) + sum(samples(after, count).values()) == 14
    total = "zilliz_import_job_duration_seconds_sum"
    expected = sum(20 + 5 * i for i in range(12)) + 2 * 15   # late: first seen 5 s in
    assert sum(samples(before, total).values()) + sum(samples(after, total).values()) == \
        expected


@pytest.mark.e2e
def test_restarting_the_process_mid_burst_observes_each_job_once(simulator, exporter,
                                                                 tmp_path: Path) -> None:
    """The real process, SIGTERM and all: the API freezes (every request hangs) so the
    first exporter's last scrape is its last word, then a second one takes over."""
    cluster = simulator.add_cluster("burst", "v2")
    settings = {"state_file": str(tmp_path / "state.db"),
                "defaults": {"interval": "1s", "timeout": "1s", "retries": 0,
                             "duration_buckets": ["2s", "5s", "10s", "30s"]},
                "clusters": [simulator.cluster_config("burst")]}
    count = "zilliz_import_job_duration_seconds_count"

    def observed_in(metrics: dict) -> float:
        return sum(samples(metrics, count).values())
    first = exporter(settings)
    first.wait_for_metrics(lambda m: ("zilliz_import_up", (("cluster_name", "burst"),))
                           in m, what="the first listing")
    jobs = [cluster.add_timed_jobs(1, "docs", 0.5, 1 + 0.7 * i)[0] for i in range(10)]
    first.wait_for_metrics(lambda m: observed_in(m) >= 3, what="three jobs timed")
    cluster.fail("hang")
    cluster.describe_fault = "hang"
    time.sleep(2.5)             # a poll in flight ends (its describes time out)
    frozen = observed_in(first.metrics())
    assert first.stop() == 0
    cluster.heal()
    cluster.describe_fault = ""
    assert 3 <= frozen < 10, "the restart must fall in the middle of the burst"
    (tmp_path / "second").mkdir()
    second = exporter(settings, tmp=tmp_path / "second")
    metrics = second.wait_for_metrics(lambda m: observed_in(m) + frozen >= 10,
                                      what="the rest of the burst timed")
    time.sleep(2)               # two more polls: nothing is timed again
    assert observed_in(second.metrics()) + frozen == 10 == len(jobs)
    assert all(state in ("completed", "failed") for _, state in cluster.truth())
    buckets = samples(metrics, "zilliz_import_job_duration_seconds_bucket", le="+Inf")
    assert sum(buckets.values()) == observed_in(metrics)
