"""Renders the snapshot board as metric families, fresh on every scrape.

Nothing persists between scrapes: a collection that leaves a listing, or a
cluster removed by a reload, is simply not rendered again. Rendering never
calls the API; ages are the only values computed at scrape time.
"""

from __future__ import annotations

import platform
import time
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.poller import SnapshotBoard

POLL_ERROR_REASONS = ("auth", "timeout", "connection", "http", "api", "decode", "pagination")
_FROM_POLL = " Served from the last poll, not fetched at scrape time."


class ImportCollector(Collector):
    def __init__(self, board: SnapshotBoard, *, clock: Callable[[], float] = time.time,
                 reload_ok: Callable[[], bool] = lambda: True) -> None:
        self._board = board
        self._clock = clock
        self._reload_ok = reload_ok

    def describe(self) -> list[Metric]:
        return []  # dynamic: registering must not trigger a collect()

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        jobs = GaugeMetricFamily(
            "zilliz_import_jobs", "Import jobs in the cluster's last listing, by state."
            + _FROM_POLL, labels=["cluster_name", "collection", "state"])
        stuck = GaugeMetricFamily(
            "zilliz_import_jobs_stuck", "Active import jobs older than stuck_after or "
            "without progress for stall_after." + _FROM_POLL,
            labels=["cluster_name", "collection"])
        oldest = GaugeMetricFamily(
            "zilliz_import_oldest_active_job_age_seconds", "Age of the oldest pending or "
            "importing job, measured from when the exporter first saw it; 0 when none."
            + _FROM_POLL, labels=["cluster_name", "collection"])
        stuck_info = GaugeMetricFamily(
            "zilliz_import_stuck_job_info", "One series per stuck job (reason age or "
            "stalled), at most max_stuck_job_series per cluster." + _FROM_POLL,
            labels=["cluster_name", "collection", "job_id", "state", "reason"])
        transitions = CounterMetricFamily(
            "zilliz_import_job_transitions_total", "Jobs seen reaching completed or failed after "
            "the cluster's first listing." + _FROM_POLL,
            labels=["cluster_name", "collection", "state"])
        up = GaugeMetricFamily("zilliz_import_up", "1 when the cluster's last poll "
                               "succeeded, else 0.", labels=["cluster_name"])
        last_success = GaugeMetricFamily(
            "zilliz_import_last_success_timestamp_seconds",
            "Unix time of the cluster's last published listing.", labels=["cluster_name"])
        duration = GaugeMetricFamily("zilliz_import_poll_duration_seconds",
                                     "How long the cluster's last poll took.",
                                     labels=["cluster_name"])
        errors = CounterMetricFamily("zilliz_import_poll_errors_total", "Failed polls by reason.",
                                     labels=["cluster_name", "reason"])
        requests = CounterMetricFamily(
            "zilliz_import_api_requests_total", "HTTP requests sent to the API; endpoint list "
            "or describe; code is the HTTP status, or error when none came back.",
            labels=["cluster_name", "endpoint", "code"])
        progress = GaugeMetricFamily(
            "zilliz_import_job_progress_ratio", "Progress (0-1) of each active job, at most "
            "max_job_series per cluster, oldest first." + _FROM_POLL,
            labels=["cluster_name", "collection", "job_id", "state"])
        rows = GaugeMetricFamily(
            "zilliz_import_job_rows", "Rows of active jobs whose rows are known (v2 "
            "describe), kind imported or total." + _FROM_POLL,
            labels=["cluster_name", "collection", "job_id", "kind"])
        eta = GaugeMetricFamily(
            "zilliz_import_job_eta_seconds", "Estimated seconds until an importing job "
            "completes, from the rate the exporter observed; absent until it moved."
            + _FROM_POLL, labels=["cluster_name", "collection", "job_id"])
        failed_info = GaugeMetricFamily(
            "zilliz_import_failed_job_info", "One series per job seen failing within "
            "failed_job_window; reason is the API's failure text or unknown. At most "
            "max_failed_job_series per cluster, newest first." + _FROM_POLL,
            labels=["cluster_name", "collection", "job_id", "reason"])
        rows_imported = CounterMetricFamily(
            "zilliz_import_rows_imported_total", "Rows of jobs seen reaching completed after "
            "the cluster's first listing (v2 describe totalRows)." + _FROM_POLL,
            labels=["cluster_name", "collection"])
        waited = CounterMetricFamily(
            "zilliz_import_rate_limit_wait_seconds_total", "Time the cluster's requests "
            "waited for the exporter's own rate limiter (requests_per_second).",
            labels=["cluster_name"])
        info = GaugeMetricFamily("zilliz_import_cluster_info", "Cluster metadata for joins.",
                                 labels=["cluster_name", "cluster_id", "api", "host", "shard"])
        for snap in sorted(self._board.snapshots(), key=lambda s: s.cluster.name):
            name = snap.cluster.name
            info.add_metric([name, snap.cluster.cluster_id, snap.cluster.api,
                             snap.cluster.host, str(snap.shard)], 1)
            if not snap.polled:
                continue
            up.add_metric([name], 1 if snap.up else 0)
            duration.add_metric([name], snap.poll_duration)
            if snap.last_success is not None:
                last_success.add_metric([name], snap.last_success)
            for reason in POLL_ERROR_REASONS:
                errors.add_metric([name, reason], snap.poll_errors.get(reason, 0))
            for (endpoint, code), count in sorted(snap.api_requests.items()):
                requests.add_metric([name, endpoint, code], count)
            waited.add_metric([name], snap.rate_limit_wait)
            summary = snap.jobs
            if summary is None or snap.is_stale(now):
                continue
            for (collection, state), count in summary.counts.items():
                jobs.add_metric([name, collection, state], count)
            for collection, count in summary.stuck.items():
                stuck.add_metric([name, collection], count)
                first_seen = summary.oldest_active.get(collection)
                age = 0.0 if first_seen is None else max(0.0, now - first_seen)
                oldest.add_metric([name, collection], age)
            for job in summary.stuck_jobs:
                stuck_info.add_metric([name, job.collection, job.job_id, job.state,
                                       job.reason], 1)
            for (collection, state), count in summary.transitions.items():
                transitions.add_metric([name, collection, state], count)
            for running in summary.running:
                if running.progress is not None:
                    progress.add_metric([name, running.collection, running.job_id, running.state],
                                        running.progress)
                if running.total_rows >= 0:
                    rows.add_metric([name, running.collection, running.job_id, "imported"],
                                    running.imported_rows)
                    rows.add_metric([name, running.collection, running.job_id, "total"],
                                    running.total_rows)
                if running.eta is not None:
                    eta.add_metric([name, running.collection, running.job_id], running.eta)
            for failed in summary.failed:
                failed_info.add_metric([name, failed.collection, failed.job_id,
                                        failed.reason], 1)
            for collection, count in summary.rows_imported.items():
                rows_imported.add_metric([name, collection], count)
        yield from (jobs, stuck, oldest, stuck_info, transitions, progress, rows, eta,
                    failed_info, rows_imported, up, last_success, duration, errors, requests,
                    waited, info)
        build = GaugeMetricFamily("zilliz_import_exporter_build_info",
                                  "Exporter version and Python version.",
                                  labels=["version", "python_version"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        reload_ok = GaugeMetricFamily("zilliz_import_config_last_reload_successful",
                                      "1 when the last configuration (re)load succeeded.")
        reload_ok.add_metric([], 1 if self._reload_ok() else 0)
        yield reload_ok

