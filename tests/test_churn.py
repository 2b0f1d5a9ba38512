"""No stale series under collection churn: hundreds of polls, each bringing a new
collection and dropping an old one, leave series, history and state file flat."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from conftest import FakeClock, parse_metrics
from exporter.collector import ImportCollector
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.board import SnapshotBoard
from exporter.poller import ClusterPoller
from exporter.store import HistoryStore
from exporter.simulator import Simulator

POLLS = 300
KEPT = 3          # collections listed at once


def test_collections_that_leave_take_every_series_with_them(tmp_path: Path) -> None:
    clock, board = FakeClock(), SnapshotBoard()
    store = HistoryStore(str(tmp_path / "state.db"))
    registry = CollectorRegistry()
    registry.register(ImportCollector(board, clock=clock))
    series_at: dict[int, int] = {}
    with Simulator() as sim:
        sim_cluster = sim.add_cluster("churn", "v2")
        config = ClusterConfig(name="churn", url=sim.url_for("churn"), api="v2",
                               cluster_id=sim_cluster.cluster_id, api_key=sim_cluster.api_key,
                               settings=PollSettings(retries=0, max_describes_per_poll=5))
        poller = ClusterPoller(config, board, JobHistory("churn", store, clock), clock=clock)
        rounds: list[list[str]] = []
        for i in range(POLLS):
            if rounds:
                for job_id in rounds[-1]:     # last round's jobs finish: transitions, rows
                    sim_cluster.set_rows(job_id, 10, 10)
                    sim_cluster.set_state(job_id, "completed" if i % 2 else "failed", 100)
            rounds.append(sim_cluster.add_jobs(2, f"coll-{i}", "importing", progress=50))
            if len(rounds) > KEPT:
                sim_cluster.remove_jobs(rounds.pop(0))
            assert poller.poll_once().up
            clock.advance(60)
            if i in (100, POLLS - 1):
                metrics = parse_metrics(generate_latest(registry).decode())
                series_at[i] = len(metrics)
    listed = {f"coll-{i}" for i in range(POLLS - KEPT, POLLS)}
    with_collection = {dict(labels)["collection"] for (_, labels) in metrics
                       if "collection" in dict(labels)}
    assert with_collection == listed
    transitions = {labels: v for (name, labels), v in metrics.items()
                   if name == "zilliz_import_job_transitions_total" and v}
    assert transitions, "the churn must count transitions for the test to mean anything"
    timed = {labels: v for (name, labels), v in metrics.items()
             if name == "zilliz_import_job_duration_seconds_count" and v}
    assert timed, "and time jobs, whose histograms must leave with their collection too"
    assert series_at[100] == series_at[POLLS - 1]
    assert len(poller._history) == 2 * KEPT
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 2 * KEPT
        assert conn.execute("SELECT COUNT(*) FROM details").fetchone()[0] <= 2 * KEPT
