from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FakeClock, InProcessExporter, fast_defaults, samples
from exporter.jobs import (
    CANONICAL_STATES, MAX_STATE_NAMES, MAX_UNKNOWN_STATES, OTHER_STATE, JobRecord,
)
from exporter.history import JobHistory
from exporter.jobs import Listing
from exporter.store import SCHEMA_VERSION, HistoryStore, StateFileInUse


def rec(job_id: str, state: str, progress: int = -1, collection: str = "c") -> JobRecord:
    return JobRecord(job_id, collection, state, progress)


def apply(history: JobHistory, *records: JobRecord, stuck_after: float = 3600,
          stall_after: float = 600, cap: int = 100):
    return history.apply(Listing.of(records), stuck_after=stuck_after, stall_after=stall_after,
                         max_stuck_series=cap)


def transitions(summary) -> dict:
    return {k: v for k, v in summary.transitions.items() if v}


def counts(histograms) -> dict:
    """Observations per series of a summary's durations or waits, zeros dropped."""
    return {k: sum(h.counts) for k, h in histograms.items() if sum(h.counts)}


def test_baseline_counts_nothing_then_each_job_counts_once() -> None:
    h = JobHistory("x", clock=FakeClock())
    first = apply(h, rec("done", "completed"), rec("run", "importing"), rec("q", "pending"))
    assert transitions(first) == {}
    second = apply(h, rec("done", "completed"), rec("run", "failed"), rec("q", "completed"),
                   rec("new-done", "completed"))
    assert transitions(second) == {("c", "failed"): 1, ("c", "completed"): 2}
    third = apply(h, rec("done", "completed"), rec("run", "failed"), rec("q", "completed"),
                  rec("new-done", "completed"))
    assert transitions(third) == transitions(second)  # nothing counts twice
    # a terminal job that goes active again and back is still counted once, ever
    apply(h, rec("q", "importing"))
    fourth = apply(h, rec("q", "completed"))
    assert transitions(fourth) == transitions(second)


def test_ages_stuck_and_stalls(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply(h, rec("old", "importing", 10), rec("moving", "importing", 10),
          rec("v1", "importing"))
    clock.now += 700
    summary = apply(h, rec("old", "importing", 10), rec("moving", "importing", 20),
                    rec("v1", "importing"))
    assert [(j.job_id, j.reason) for j in summary.stuck_jobs] == [("old", "stalled")]
    assert summary.oldest_active["c"] == 1_000_000.0
    clock.now += 100
    recovered = apply(h, rec("old", "importing", 11), rec("moving", "importing", 30),
                      rec("v1", "importing"))
    assert recovered.stuck_jobs == ()          # progress moved: no longer stalled
    clock.now += 3000                          # now everything is older than stuck_after
    aged = apply(h, rec("old", "importing", 12), rec("moving", "importing", 40),
                 rec("v1", "importing"), rec("young", "pending"), stall_after=0)
    assert {(j.job_id, j.reason) for j in aged.stuck_jobs} == \
        {("old", "age"), ("moving", "age"), ("v1", "age")}
    assert aged.stuck == {"c": 3}
    capped = apply(h, rec("old", "importing", 12), rec("moving", "importing", 40),
                   rec("v1", "importing"), cap=2)
    assert [j.job_id for j in capped.stuck_jobs] == ["moving", "old"]  # oldest, then id
    assert capped.stuck == {"c": 3}
    apply(h, rec("old", "importing", 12), rec("moving", "importing", 40),
          rec("v1", "importing"), cap=2)
    assert caplog.text.count("more stuck jobs than max_stuck_job_series") == 1  # once


def test_jobs_leaving_the_listing_are_forgotten() -> None:
    h = JobHistory("x", clock=FakeClock())
    apply(h, *[rec(str(i), "importing") for i in range(100)])
    apply(h, rec("1", "importing"))
    assert len(h) == 1 and h.first_seen("2") is None


def test_history_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    clock = FakeClock()
    store = HistoryStore(path)
    h = JobHistory("x", store, clock)
    apply(h, rec("a", "importing", 5), rec("b", "pending"), rec("gone", "completed"))
    store.close()
    clock.now += 500
    store = HistoryStore(path)
    h = JobHistory("x", store, clock)
    assert h.first_seen("a") == 1_000_000.0
    # b finished while the exporter was down; "late" appeared and finished meanwhile
    after = (rec("a", "importing", 5), rec("b", "failed"), rec("gone", "completed"),
             rec("late", "completed"))
    assert transitions(apply(h, *after)) == {}     # a restart's first listing: all at 0
    summary = apply(h, *after)
    assert transitions(summary) == {("c", "failed"): 1, ("c", "completed"): 1}
    assert summary.oldest_active["c"] == 1_000_000.0
    store.close()


def test_only_changes_are_written_and_no_change_writes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = HistoryStore(path)
    h = JobHistory("x", store, FakeClock())
    jobs = [rec(str(i), "importing", 1) for i in range(1000)]
    apply(h, *jobs)
    size = os.path.getsize(path + "-wal")
    before = store._conn.total_changes
    apply(h, *jobs)
    assert store._conn.total_changes == before
    assert os.path.getsize(path + "-wal") == size
    jobs[3] = rec("3", "completed", 1)
    apply(h, *jobs[:-1])                       # one changed, one left, and the listing
    assert store._conn.total_changes == before + 3
    store.close()


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    store = HistoryStore(str(path), clock=lambda: 1234.0)
    assert (tmp_path / "state.db.corrupt-1234").exists()
    apply(JobHistory("x", store, FakeClock()), rec("a", "pending"))
    store.close()
    assert sqlite3.connect(str(path)).execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    assert "moved aside" in caplog.text


def test_second_process_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = HistoryStore(path)
    code = ("from exporter.store import HistoryStore, StateFileInUse\n"
            f"try:\n    HistoryStore({path!r})\nexcept StateFileInUse as e:\n"
            "    print(e)\n    raise SystemExit(3)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 3 and "in use by another exporter" in result.stdout
    store.close()
    with pytest.raises(StateFileInUse):
        HistoryStore(path), HistoryStore(path)


# ---- against the simulator, with the real process and a real state file ------------

def stuck_ids(metrics: dict, reason: str) -> set[str]:
    return {dict(k[1])["job_id"] for k in samples(metrics, "zilliz_import_stuck_job_info",
                                                  reason=reason)}


def transition_counts(metrics: dict, cluster: str, collection: str = "") -> dict[str, float]:
    """Transitions by state, summed over the cluster's collections (or of one)."""
    out: dict[str, float] = {}
    only = {"collection": collection} if collection else {}
    for key, value in samples(metrics, "zilliz_import_job_transitions_total",
                              cluster_name=cluster, **only).items():
        state = dict(key[1])["state"]
        out[state] = out.get(state, 0) + value
    return out


def test_stuck_stalled_transitions_and_restart(simulator, tmp_path: Path) -> None:
    """Against the simulator, polled in process on a fake clock; the restart is a new
    exporter on the same state file."""
    v2 = simulator.add_cluster("v2", "v2")
    v1 = simulator.add_cluster("v1", "v1")
    stuck = v1.add_jobs(1, "medium_articles", "importing")[0]
    freeze = v2.add_jobs(1, "images", "importing", progress=10)[0]
    movers = v2.add_jobs(6, "images", "importing", progress=5)
    v2.add_jobs(3, "images", "completed")            # baseline: never counted
    config = {"state_file": str(tmp_path / "state.db"),
              "defaults": fast_defaults(stuck_after="4s", stall_after="2s"),
              "clusters": [simulator.cluster_config("v1", stall_after=0),
                           simulator.cluster_config("v2", stuck_after="1h")]}
    clock = FakeClock()
    exporter = InProcessExporter(config, clock)
    try:
        metrics = exporter.poll()
        assert metrics[("zilliz_import_up", (("cluster_name", "v2"),))] == 1
        # the frozen v2 job stalls while v2's movers keep moving; v1's job is not yet
        # stuck by age
        for step in range(1, 4):
            clock.advance(1)
            for job_id in movers:
                v2.set_progress(job_id, 5 + step)
            metrics = exporter.poll()
        assert stuck_ids(metrics, "stalled") == {freeze}
        assert stuck_ids(metrics, "age") == set()
        clock.advance(2)
        metrics = exporter.poll()
        assert stuck_ids(metrics, "age") == {stuck}
        info = samples(metrics, "zilliz_import_stuck_job_info", job_id=stuck)
        assert dict(next(iter(info))[1])["collection"] == "medium_articles"
        v2.set_progress(freeze, 50)
        clock.advance(1)
        assert freeze not in stuck_ids(exporter.poll(), "stalled")     # the stall recovers
        # moves the exporter sees
        v2.set_state(movers[0], "completed")
        v2.set_state(movers[1], "failed")
        clock.advance(1)
        metrics = exporter.poll()
        assert transition_counts(metrics, "v2") == {"completed": 1, "failed": 1}
        age_before = metrics[("zilliz_import_oldest_active_job_age_seconds",
                              (("cluster_name", "v1"), ("collection", "medium_articles")))]
    finally:
        exporter.close()
    # moves while it is down: a known job finishes, a new job appears already finished,
    # and a collection nobody saw before gets a job that failed at once
    v2.set_state(movers[2], "completed")
    v2.add_jobs(1, "images", "failed")
    v2.add_jobs(1, "videos", "failed")
    clock.advance(30)
    restarted = InProcessExporter(config, clock)
    try:
        metrics = restarted.poll()
        # A restart's first listing shows every counter at 0: a reset for "images", and
        # for "videos" the start that increase() needs to see its failure at all.
        assert transition_counts(metrics, "v2") == {"completed": 0, "failed": 0}
        assert transition_counts(metrics, "v2", "videos") == {"completed": 0, "failed": 0}
        age_after = metrics[("zilliz_import_oldest_active_job_age_seconds",
                             (("cluster_name", "v1"), ("collection", "medium_articles")))]
        assert age_after == age_before + 30      # ages continue from the first sighting
        assert stuck in stuck_ids(metrics, "age")    # no waiting stuck_after again
        # then what happened while it was down, counted once
        for _ in range(2):
            clock.advance(1)
            metrics = restarted.poll()
            assert transition_counts(metrics, "v2", "images") == {"completed": 1,
                                                                  "failed": 1}
            assert transition_counts(metrics, "v2", "videos") == {"completed": 0,
                                                                  "failed": 1}
    finally:
        restarted.close()


def test_corrupt_state_file_does_not_stop_the_exporter(simulator, exporter,
                                                       tmp_path: Path) -> None:
    simulator.add_cluster("c", "v2").add_jobs(2)
    state = tmp_path / "state.db"
    state.write_bytes(b"\x00garbage" * 512)
    proc = exporter({"state_file": str(state), "defaults": fast_defaults(),
                     "clusters": [simulator.cluster_config("c")]})
    proc.wait_for_metrics(lambda m: m.get(("zilliz_import_up", (("cluster_name", "c"),))))
    assert list(tmp_path.glob("state.db.corrupt-*"))
    assert "moved aside" in proc.logs()
    (tmp_path / "second").mkdir()
    second = exporter({"state_file": str(state), "clusters": [simulator.cluster_config("c")]},
                      wait_listening=False, tmp=tmp_path / "second")
    assert second.proc is not None and second.proc.wait(10) == 1
    assert "in use by another exporter" in second.logs()


# ---- job details -------------------------------------------------------------------------

from exporter.answers import JobDetails  # noqa: E402
from exporter.details import DetailRules  # noqa: E402


def listing(*records: JobRecord, reasons: dict[str, str] | None = None) -> Listing:
    out = Listing()
    out.extend(records, reasons)
    return out


def apply_details(history: JobHistory, records: Listing, **rules: object):
    return history.apply(records, stuck_after=36000, stall_after=0, max_stuck_series=100,
                         rules=DetailRules(**rules))  # type: ignore[arg-type]


def test_failures_keep_their_reason_within_the_window_newest_first_capped() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    jobs = [rec(f"j{i}", "importing", 10) for i in range(4)]
    apply_details(h, listing(rec("old", "failed"), *jobs))     # baseline: never shown
    for i in range(4):
        clock.now += 60
        jobs[i] = rec(f"j{i}", "failed")
        summary = apply_details(h, listing(rec("old", "failed"), *jobs,
                                           reasons={"j0": "listed reason"}),
                                max_failed_series=2, failed_window=600)
    # j1..j3 wait for a describe (their listing carried no reason): not shown yet
    assert [f.job_id for f in summary.failed] == ["j0"]
    assert h.describe_plan() == ["j1", "j2", "j3"]
    h.record_details("j1", JobDetails("j1", reason="schema mismatch: field vec dim 768"))
    h.record_details("j2", None)                    # failed: shown as unknown, retried
    h.record_details("j3", None, final=True)        # job-specific failure: not retried
    summary = h.refresh(summary)
    assert [(f.job_id, f.reason) for f in summary.failed] == \
        [("j3", "unknown"), ("j2", "unknown")]      # newest first, capped at 2
    assert h.describe_plan() == ["j2"]
    clock.now += 60 * 9                             # j0 and j1 fall out of the window
    summary = apply_details(h, listing(rec("old", "failed"), *jobs), failed_window=600)
    assert [f.job_id for f in summary.failed] == ["j3", "j2"]
    summary = apply_details(h, listing(rec("j3", "failed")), failed_window=600)
    assert [f.job_id for f in summary.failed] == ["j3"]    # left the listing: gone


def test_running_jobs_progress_rows_eta_and_cap() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply_details(h, listing(rec("a", "importing", 10), rec("b", "pending", 0)))
    clock.now += 5
    summary = apply_details(h, listing(rec("a", "importing", 10), rec("b", "pending", 0),
                                       rec("c", "importing", 0)), max_job_series=2)
    assert [(j.job_id, j.progress, j.eta) for j in summary.running] == \
        [("a", 0.1, None), ("b", 0.0, None)]        # oldest first, capped; no movement yet
    h.record_details("a", JobDetails("a", progress=10, imported_rows=100, total_rows=1000))
    clock.now += 100
    h.record_details("a", JobDetails("a", progress=20, imported_rows=300, total_rows=1000))
    summary = h.refresh(summary)
    (a, _) = summary.running
    assert (a.imported_rows, a.total_rows) == (300, 1000)
    assert a.eta == pytest.approx(350.0)            # 700 rows to go at 2 rows/s


def test_rows_of_completed_jobs_count_once() -> None:
    clock = FakeClock()
    h = JobHistory("x", clock=clock)
    apply_details(h, listing(rec("a", "importing", 10), rec("done", "completed")))
    summary = apply_details(h, listing(rec("a", "completed"), rec("done", "completed")))
    assert h.describe_plan() == ["a"]
    h.record_details("a", JobDetails("a", 100, 4000, 4000, "completed"))
    assert h.refresh(summary).rows_imported == {"c": 4000}
    summary = apply_details(h, listing(rec("a", "completed"), rec("done", "completed")))
    assert h.describe_plan() == [] and summary.rows_imported == {"c": 4000}
    # v1 has no rows: completed jobs are not described
    v1 = JobHistory("y", clock=clock)
    apply_details(v1, listing(rec("a", "importing")), api="v1")
    apply_details(v1, listing(rec("a", "completed")), api="v1")
    assert v1.describe_plan() == []


def test_details_survive_a_restart_and_nothing_is_described_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    clock = FakeClock()
    store = HistoryStore(path)
    h = JobHistory("x", store, clock)
    apply_details(h, listing(rec("f", "importing"), rec("r", "importing")), api="v1")
    summary = apply_details(h, listing(rec("f", "failed"), rec("r", "importing")), api="v1")
    assert h.describe_plan() == ["f", "r"]
    h.record_details("f", JobDetails("f", reason="bad file"))
    h.record_details("r", JobDetails("r", 40))
    assert h.refresh(summary).running[0].progress == 0.4
    store.close()
    store = HistoryStore(path)
    h = JobHistory("x", store, clock)
    summary = apply_details(h, listing(rec("f", "failed"), rec("r", "importing")), api="v1")
    assert [(f.job_id, f.reason) for f in summary.failed] == [("f", "bad file")]
    assert summary.running[0].progress == 0.4       # v1: the last described progress
    assert h.describe_plan() == ["r"]                # only the active job, as every poll
    store.close()


# The first release's state file, written out here rather than taken from the code: a
# migration must keep reading what old releases wrote, whatever the code says now.
RELEASE_1_SCHEMA = """
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    INSERT INTO schema_version VALUES (1);
    CREATE TABLE clusters (cluster TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE jobs (
        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
        first_seen REAL NOT NULL, progress_since REAL NOT NULL,
        progress INTEGER NOT NULL, state TEXT NOT NULL,
        counted INTEGER NOT NULL,
        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;"""


def test_a_previous_release_state_file_is_migrated_in_place(tmp_path: Path, caplog) -> None:
    path = tmp_path / "state.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(RELEASE_1_SCHEMA + """
        INSERT INTO clusters VALUES ('x');
        INSERT INTO jobs VALUES ('x', 'a', 1000.0, 1000.0, 5, 'importing', 0);
        INSERT INTO jobs VALUES ('x', 'b', 900.0, 900.0, -1, 'failed', 1);""")
    conn.close()
    caplog.set_level("INFO")
    store = HistoryStore(str(path))
    assert not list(tmp_path.glob("state.db.corrupt-*")) and "migrated" in caplog.text
    h = JobHistory("x", store, FakeClock())
    assert h.first_seen("a") == 1000.0
    apply_details(h, listing(rec("a", "failed"), rec("b", "failed")))
    summary = apply_details(h, listing(rec("a", "failed"), rec("b", "failed")))
    assert transitions(summary) == {("c", "failed"): 1}    # b was counted before
    assert h.describe_plan() == ["a"]
    store.close()
    version = sqlite3.connect(str(path)).execute("SELECT version FROM schema_version")
    assert version.fetchone() == (SCHEMA_VERSION,)


def test_the_current_release_state_file_is_migrated_in_place(tmp_path: Path,
                                                              caplog) -> None:
    """A version 2 file (details, no times): details and counts stand; its jobs have no
    known start, so none of them is ever timed, and new jobs are once a listing of
    this release has been seen."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(str(path))
    conn.executescript(RELEASE_1_SCHEMA + """
        UPDATE schema_version SET version = 2;
        CREATE TABLE details (
            cluster TEXT NOT NULL, job_id TEXT NOT NULL,
            imported_rows INTEGER NOT NULL, total_rows INTEGER NOT NULL, reason TEXT NOT NULL,
            failed_at REAL NOT NULL, described_at REAL NOT NULL,
            PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;
        INSERT INTO clusters VALUES ('x');
        INSERT INTO jobs VALUES ('x', 'q', 999000.0, 999000.0, 0, 'pending', 0);
        INSERT INTO jobs VALUES ('x', 'f', 999000.0, 999500.0, 0, 'failed', 3);
        INSERT INTO details VALUES ('x', 'f', -1, -1, 'bad file', 999500.0, 999600.0);""")
    conn.close()
    caplog.set_level("INFO")
    clock = FakeClock()
    store = HistoryStore(str(path))
    assert "migrated" in caplog.text and not list(tmp_path.glob("state.db.corrupt-*"))
    h = JobHistory("x", store, clock)
    summary = apply_details(h, listing(rec("q", "importing"), rec("f", "failed")),
                            failed_window=10_000)
    assert [(f.job_id, f.reason) for f in summary.failed] == [("f", "bad file")]
    assert h.describe_plan()[0] == "f"         # it still waits for its describe
    clock.advance(60)
    summary = apply_details(h, listing(rec("q", "completed"), rec("f", "failed"),
                                       rec("new", "pending")))
    clock.advance(60)
    summary = apply_details(h, listing(rec("q", "completed"), rec("f", "failed"),
                                       rec("new", "completed")))
    h.record_details("new", JobDetails("new", 100, 10, 10, "completed"))  # its rows
    summary = h.refresh(summary)
    assert counts(summary.durations) == {("c", "completed"): 1}     # only the new job
    assert counts(summary.waits) == {"c": 1}
    assert transitions(summary) == {("c", "completed"): 2}
    store.close()
    with sqlite3.connect(str(path)) as done:
        assert done.execute("SELECT version FROM schema_version").fetchone() == \
            (SCHEMA_VERSION,)
        assert done.execute("SELECT reason, created_at FROM details WHERE job_id='f'"
                            ).fetchone() == ("bad file", 0.0)


def test_restart_describes_nothing_twice(simulator, tmp_path: Path) -> None:
    z = simulator.add_cluster("z", "v2", reasons_in_list=False)
    doomed, done = z.add_jobs(2, "images", "importing", progress=40)
    running = z.add_jobs(1, "images", "importing", progress=10)[0]
    config = {"state_file": str(tmp_path / "state.db"), "defaults": fast_defaults(),
              "clusters": [simulator.cluster_config("z")]}
    clock = FakeClock()
    exporter = InProcessExporter(config, clock)
    reason = "schema mismatch: field 'vector' expects dim 768, got 512"

    def failed_reason(m: dict) -> str:
        found = samples(m, "zilliz_import_failed_job_info", job_id=doomed)
        return dict(next(iter(found))[1])["reason"] if found else ""
    rows = ("zilliz_import_rows_imported_total", (("cluster_name", "z"),
                                                  ("collection", "images")))
    try:
        assert exporter.poll()[("zilliz_import_up", (("cluster_name", "z"),))] == 1
        z.set_state(doomed, "failed")
        z.set_reason(doomed, reason)
        z.set_state(done, "completed")
        z.set_rows(done, 12_000, 12_000)
        clock.advance(1)
        metrics = exporter.poll()
        assert failed_reason(metrics) == reason and metrics[rows] == 12_000
    finally:
        exporter.close()
    assert doomed in z.described and done in z.described
    z.described.clear()
    restarted = InProcessExporter(config, clock)
    try:
        for _ in range(3):
            clock.advance(1)
            metrics = restarted.poll()
        assert failed_reason(metrics) == reason
        assert z.described == []            # everything it knew, it still knows
        assert metrics[rows] == 0           # no recount
        z.set_progress(running, 20)
        clock.advance(1)
        restarted.poll()
        assert z.described == [running]     # the moved job is described
    finally:
        restarted.close()


def test_state_names_a_server_invents_are_bounded_per_cluster() -> None:
    """Unknown states keep their own name up to MAX_UNKNOWN_STATES; later new names are
    counted under OTHER_STATE, so a hostile server cannot grow series or memory."""
    h = JobHistory("x", clock=FakeClock())
    invented = [f"weird_{i:03d}" for i in range(3 * MAX_STATE_NAMES)]
    summary = apply(h, *[rec(f"j{i}", state) for i, state in enumerate(invented)])
    counts = {state: n for (_, state), n in summary.counts.items() if n}
    assert [s for s in invented if s in counts] == invented[:MAX_UNKNOWN_STATES]
    assert counts[OTHER_STATE] == len(invented) - MAX_UNKNOWN_STATES
    assert sum(counts.values()) == len(invented)                 # every job still counted
    more = apply(h, *[rec(f"k{i}", f"new_{i}") for i in range(50)])
    states = {state for _, state in more.counts}
    assert len(states) <= MAX_STATE_NAMES and OTHER_STATE in states
    assert states <= {*CANONICAL_STATES, OTHER_STATE, *invented[:MAX_UNKNOWN_STATES]}


def test_with_describing_off_no_finished_job_waits_for_a_describe() -> None:
    """max_describes_per_poll 0: jobs finishing meanwhile are not queued (and kept)
    for a describe that describing-off will never send."""
    h = JobHistory("x", clock=FakeClock())
    apply_details(h, Listing.of([rec("a", "importing", 10), rec("b", "importing", 10)]),
                  max_describes=0, api="v2")
    apply_details(h, Listing.of([rec("a", "failed", 10), rec("b", "completed", 100)]),
                  max_describes=0, api="v2")
    apply_details(h, Listing.of([rec("a", "failed", 10), rec("b", "completed", 100)]),
                  max_describes=5, api="v2")
    assert h.describe_plan() == []


def test_a_failed_state_file_write_is_made_good_by_the_next_one(tmp_path: Path) -> None:
    """Memory moves on even when a write fails (disk full): the next write then writes
    the whole history, so a restart loses nothing the failed write held."""
    import sqlite3 as sql
    clock = FakeClock()
    store = HistoryStore(str(tmp_path / "state.db"))
    history = JobHistory("x", store, clock)
    apply(history, rec("a", "importing", 10))
    clock.advance(60)
    write = store.write

    def full_disk(*args: object, **kwargs: object) -> None:
        raise sql.OperationalError("database or disk is full")
    store.write = full_disk  # type: ignore[method-assign]
    with pytest.raises(sql.OperationalError):
        apply(history, rec("a", "completed", 100), rec("b", "pending"))
    store.write = write  # type: ignore[method-assign]
    apply(history, rec("a", "completed", 100), rec("b", "pending"))   # nothing new to it
    store.close()
    again = HistoryStore(str(tmp_path / "state.db"))
    saved = again.load("x")
    again.close()
    assert saved.baseline and {row[0]: row[4] for row in saved.jobs} == \
        {"a": "completed", "b": "pending"}


def test_a_new_collection_shows_its_counters_at_0_for_one_listing() -> None:
    """increase() takes a series' first sample as its start: a job failing in its
    collection's first listing must show as 0 then 1, not start at 1."""
    h = JobHistory("x", clock=FakeClock())
    apply(h, rec("a", "importing", 10, collection="old"))
    first = apply(h, rec("a", "failed", 10, collection="old"),
                  rec("b", "failed", collection="new"))
    assert first.transitions[("old", "failed")] == 1        # a known collection: at once
    assert first.transitions[("new", "failed")] == 0        # a new one: 0 first...
    second = apply(h, rec("a", "failed", 10, collection="old"),
                   rec("b", "failed", collection="new"))
    assert second.transitions[("new", "failed")] == 1       # ...then its count
    assert second.transitions[("old", "failed")] == 1
