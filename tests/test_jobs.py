"""The job model: every state name the servers use, and which states count as active."""

from __future__ import annotations

import pytest

from conftest import FakeClock, InProcessExporter, fast_defaults, samples
from exporter.jobs import is_active, normalise_state


@pytest.mark.parametrize("wire, state", [
    # v1 list, v2 list and progress references, Milvus
    ("ImportPending", "pending"), ("Pending", "pending"), ("ImportRunning", "importing"),
    ("Importing", "importing"), ("Running", "importing"), ("ImportCompleted", "completed"),
    ("Completed", "completed"), ("ImportFailed", "failed"), ("Failed", "failed"),
    # Zilliz's v2 list reference
    ("InProgress", "importing"),
    # Milvus's internal stages and its two-phase import
    ("PreImporting", "importing"), ("Sorting", "importing"), ("IndexBuilding", "importing"),
    ("Committing", "importing"), ("Uncommitted", "pending"),
    # anything else passes through in snake_case
    ("WaitingForRetry", "waiting_for_retry"), ("Verifying", "verifying"),
    ("Cancelled", "cancelled")])
def test_every_state_name_the_servers_use(wire: str, state: str) -> None:
    assert normalise_state(wire) == state


@pytest.mark.parametrize("state, active", [
    ("pending", True), ("importing", True), ("completed", False), ("failed", False),
    # a state nobody foresaw is active, so a job cannot hide from the stuck alert in it...
    ("verifying", True), ("waiting_for_retry", True), ("stats", True), ("other", True),
    # ...unless it looks final
    ("cancelled", False), ("canceled", False), ("aborted", False), ("deleted", False),
    ("expired", False), ("user_cancel", False)])
def test_unknown_states_are_active_unless_they_look_final(state: str, active: bool) -> None:
    assert is_active(state) is active


def test_in_progress_and_an_unknown_state_become_stuck_after_stuck_after(simulator) -> None:
    """Before, ``InProgress`` was a state of its own and never stuck: a job in it, or in a
    state nobody foresaw, hid from ZillizImportJobStuck."""
    cluster = simulator.add_cluster("c", "v2")
    in_progress = cluster.add_jobs(1, "docs", "importing", wire="InProgress")[0]
    verifying = cluster.add_jobs(1, "docs", "verifying", wire="Verifying")[0]
    cluster.add_jobs(1, "docs", "cancelled", wire="Cancelled")     # final: never stuck
    clock = FakeClock()
    exporter = InProcessExporter({"defaults": fast_defaults(stuck_after="60s", stall_after=0),
                                  "clusters": [simulator.cluster_config("c")]}, clock)
    try:
        metrics = exporter.poll()
        jobs = {dict(k[1])["state"]: v for k, v in samples(metrics, "zilliz_import_jobs").items()}
        assert jobs == {"pending": 0, "importing": 1, "completed": 0, "failed": 0,
                        "verifying": 1, "cancelled": 1}
        assert not samples(metrics, "zilliz_import_stuck_job_info")
        assert samples(metrics, "zilliz_import_oldest_active_job_age_seconds") == {
            ("zilliz_import_oldest_active_job_age_seconds",
             (("cluster_name", "c"), ("collection", "docs"))): 0.0}
        clock.advance(61)
        metrics = exporter.poll()
        stuck = {dict(k[1])["job_id"]: dict(k[1])["state"]
                 for k in samples(metrics, "zilliz_import_stuck_job_info")}
        assert stuck == {in_progress: "importing", verifying: "verifying"}
        assert metrics[("zilliz_import_jobs_stuck",
                        (("cluster_name", "c"), ("collection", "docs")))] == 2
        assert metrics[("zilliz_import_oldest_active_job_age_seconds",
                        (("cluster_name", "c"), ("collection", "docs")))] == 61
        # both are running jobs with a progress series; the cancelled one is not
        progress = {dict(k[1])["job_id"] for k in
                    samples(metrics, "zilliz_import_job_progress_ratio")}
        assert progress == {in_progress, verifying}
    finally:
        exporter.close()
