"""Renders the snapshot board as metric families, fresh on every scrape.

Every ``zilliz_import_*`` family is declared once in ``FAMILIES`` (name, type,
HELP, labels), in the order it renders; ``ImportCollector.collect`` only fills
values. HELP text, types and order are public: tests/golden/metrics.txt pins them.

Nothing persists between scrapes: a collection that leaves a listing, or a
cluster removed by a reload or gone from a discovery source, is simply not rendered
again. Rendering never calls the API; ages are the only values computed at scrape
time.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, cast

from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go_float

from exporter import __version__
from exporter.board import ClusterSnapshot, SnapshotBoard
from exporter.discovery import DiscoveryBoard, SourceSnapshot
from exporter.summary import Histogram

# ``le`` as prometheus_client's own histograms write it ("30.0", "+Inf", "1e+06").
float_label = cast(Callable[[float], str], _untyped_go_float)
POLL_ERROR_REASONS = ("auth", "timeout", "connection", "http", "api", "decode", "pagination")
_FROM_POLL = " Served from the last poll, not fetched at scrape time."


@dataclass(frozen=True)
class Family:
    """One metric family's descriptor: what /metrics says about it besides values."""

    name: str
    kind: str                   # "gauge", "counter" or "histogram"
    help: str
    labels: tuple[str, ...] = ()

    def new(self) -> GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily:
        """An empty family to fill (a counter's name keeps its ``_total``)."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind == "histogram":
            return HistogramMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def fill(self, family: Metric, labels: Sequence[str], value: float | Histogram) -> None:
        """Add one series: a histogram's cumulative buckets (``le``), count and sum."""
        if isinstance(value, Histogram):
            assert isinstance(family, HistogramMetricFamily)
            family.add_metric(labels, [(float_label(bound), n)
                                       for bound, n in value.cumulative()], value.total)
        else:
            assert isinstance(family, (GaugeMetricFamily, CounterMetricFamily))
            family.add_metric(labels, value)


_JOB = ("cluster_name", "collection")
_CLUSTER = ("cluster_name",)

JOBS = Family("zilliz_import_jobs", "gauge",
              "Import jobs in the cluster's last listing, by state." + _FROM_POLL,
              (*_JOB, "state"))
JOBS_STUCK = Family("zilliz_import_jobs_stuck", "gauge",
                    "Active import jobs older than stuck_after or without progress for "
                    "stall_after." + _FROM_POLL, _JOB)
OLDEST_ACTIVE_AGE = Family("zilliz_import_oldest_active_job_age_seconds", "gauge",
                           "Age of the oldest pending or importing job, measured from when "
                           "the exporter first saw it; 0 when none." + _FROM_POLL, _JOB)
STUCK_JOB_INFO = Family("zilliz_import_stuck_job_info", "gauge",
                        "One series per stuck job (reason age or stalled), at most "
                        "max_stuck_job_series per cluster." + _FROM_POLL,
                        (*_JOB, "job_id", "state", "reason"))
TRANSITIONS = Family("zilliz_import_job_transitions_total", "counter",
                     "Jobs seen reaching completed or failed after the cluster's first "
                     "listing." + _FROM_POLL, (*_JOB, "state"))
PROGRESS = Family("zilliz_import_job_progress_ratio", "gauge",
                  "Progress (0-1) of each active job, at most max_job_series per cluster, "
                  "oldest first." + _FROM_POLL, (*_JOB, "job_id", "state"))
ROWS = Family("zilliz_import_job_rows", "gauge",
              "Rows of active jobs whose rows are known (v2 describe), kind imported or "
              "total." + _FROM_POLL, (*_JOB, "job_id", "kind"))
ETA = Family("zilliz_import_job_eta_seconds", "gauge",
             "Estimated seconds until an importing job completes, from the rate the "
             "exporter observed; absent until it moved." + _FROM_POLL, (*_JOB, "job_id"))
FAILED_JOB_INFO = Family("zilliz_import_failed_job_info", "gauge",
                         "One series per job seen failing within failed_job_window; reason "
                         "is the API's failure text or unknown. At most "
                         "max_failed_job_series per cluster, newest first." + _FROM_POLL,
                         (*_JOB, "job_id", "reason"))
ROWS_IMPORTED = Family("zilliz_import_rows_imported_total", "counter",
                       "Rows of jobs seen reaching completed after the cluster's first "
                       "listing (v2 describe totalRows)." + _FROM_POLL, _JOB)
_TIMED = (" Each job once, if the exporter knows its start (createTime, or it saw the "
          "job appear)." + _FROM_POLL)
DURATION = Family("zilliz_import_job_duration_seconds", "histogram",
                  "How long finished import jobs took, from their start to completed or "
                  "failed (outcome)." + _TIMED, (*_JOB, "outcome"))
WAIT = Family("zilliz_import_job_wait_seconds", "histogram",
              "How long import jobs waited in pending, observed when first seen past "
              "pending." + _TIMED, _JOB)
UP = Family("zilliz_import_up", "gauge",
            "1 when the cluster's last poll succeeded, else 0.", _CLUSTER)
LAST_SUCCESS = Family("zilliz_import_last_success_timestamp_seconds", "gauge",
                      "Unix time of the cluster's last published listing.", _CLUSTER)
POLL_DURATION = Family("zilliz_import_poll_duration_seconds", "gauge",
                       "How long the cluster's last poll took.", _CLUSTER)
POLL_ERRORS = Family("zilliz_import_poll_errors_total", "counter", "Failed polls by reason.",
                     (*_CLUSTER, "reason"))
API_REQUESTS = Family("zilliz_import_api_requests_total", "counter",
                      "HTTP requests sent to the API; endpoint list or describe; code is the "
                      "HTTP status, or error when none came back.",
                      (*_CLUSTER, "endpoint", "code"))
RATE_LIMIT_WAIT = Family("zilliz_import_rate_limit_wait_seconds_total", "counter",
                         "Time the cluster's requests waited for the exporter's own rate "
                         "limiter (requests_per_second).", _CLUSTER)
CLUSTER_INFO = Family("zilliz_import_cluster_info", "gauge", "Cluster metadata for joins.",
                      (*_CLUSTER, "cluster_id", "api", "host", "shard"))
BUILD_INFO = Family("zilliz_import_exporter_build_info", "gauge",
                    "Exporter version and Python version.", ("version", "python_version"))
RELOAD_OK = Family("zilliz_import_config_last_reload_successful", "gauge",
                   "1 when the last configuration (re)load succeeded.")
_SOURCE = ("source",)
DISCOVERY_UP = Family("zilliz_import_discovery_up", "gauge",
                      "1 when the discovery source's last refresh succeeded, else 0.", _SOURCE)
DISCOVERY_LAST_SUCCESS = Family("zilliz_import_discovery_last_success_timestamp_seconds",
                                "gauge", "Unix time of the discovery source's last "
                                "successful refresh.", _SOURCE)
DISCOVERY_ERRORS = Family("zilliz_import_discovery_errors_total", "counter",
                          "Failed refreshes of the discovery source, by reason.",
                          (*_SOURCE, "reason"))
DISCOVERED_CLUSTER_INFO = Family(
    "zilliz_import_discovered_cluster_info", "gauge",
    "Every cluster the discovery source lists (its last good listing); polled is true "
    "when this exporter polls it, as cluster_name.",
    (*_SOURCE, "cluster_name", "cluster_id", "cluster_display_name", "region_id",
     "project_id", "plan", "status", "polled"))
# Rendered by the scrape itself (web.ExpositionCache), after every other family.
RENDER_ERRORS = Family("zilliz_import_render_errors_total", "counter",
                       "Series that could not be rendered and were left out of a scrape "
                       "(the rest of the scrape is still served).")

# What ImportCollector renders, in this order.
FAMILIES = (JOBS, JOBS_STUCK, OLDEST_ACTIVE_AGE, STUCK_JOB_INFO, TRANSITIONS, PROGRESS, ROWS,
            ETA, FAILED_JOB_INFO, ROWS_IMPORTED, DURATION, WAIT, UP, LAST_SUCCESS,
            POLL_DURATION, POLL_ERRORS, API_REQUESTS, RATE_LIMIT_WAIT, CLUSTER_INFO,
            BUILD_INFO, RELOAD_OK, DISCOVERY_UP, DISCOVERY_LAST_SUCCESS, DISCOVERY_ERRORS,
            DISCOVERED_CLUSTER_INFO)

# (family, label values, value): one series
Sample = tuple[Family, Sequence[str], "float | Histogram"]


class ImportCollector(Collector):
    def __init__(self, board: SnapshotBoard, *, clock: Callable[[], float] = time.time,
                 reload_ok: Callable[[], bool] = lambda: True,
                 discovery: DiscoveryBoard | None = None) -> None:
        self._board = board
        self._clock = clock
        self._reload_ok = reload_ok
        self._discovery = discovery or DiscoveryBoard()
        # by cluster name: (the snapshot, stale then, its pieces without ages)
        self._pieces: dict[str, tuple[ClusterSnapshot, bool, dict[Family, Metric]]] = {}

    def describe(self) -> list[Metric]:
        return []  # dynamic: registering must not trigger a collect()

    def collect(self) -> Iterator[Metric]:
        families = {family: family.new() for family in FAMILIES}
        for family, labels, value in self._samples(self._clock()):
            family.fill(families[family], labels, value)
        yield from families.values()

    def parts(self) -> Iterator[Metric]:
        """collect()'s families in pieces, in the same order: for each family one piece
        per cluster that has its series, then the global series. A cluster's pieces are
        the same objects until it publishes again or goes stale (only its ages are made
        anew: they move with the clock), so an encoding of them can be kept."""
        now = self._clock()
        snaps = sorted(self._board.snapshots(), key=lambda s: s.cluster.name)
        clusters = [self._pieces_of(snap, now) for snap in snaps]
        ages = [_families(_age_samples(snap, now)) for snap in snaps]
        own = _families(self._global_samples())
        self._pieces = {snap.cluster.name: self._pieces[snap.cluster.name]
                        for snap in snaps}           # clusters gone are forgotten
        for family in FAMILIES:
            pieces = [found[family] for found in (ages if family is OLDEST_ACTIVE_AGE
                                                  else clusters) if family in found]
            pieces += [own[family]] if family in own else []
            yield from pieces or [family.new()]

    def _pieces_of(self, snap: ClusterSnapshot, now: float) -> dict[Family, Metric]:
        stale = snap.is_stale(now)
        kept = self._pieces.get(snap.cluster.name)
        if kept is None or kept[0] is not snap or kept[1] != stale:
            kept = self._pieces[snap.cluster.name] = (
                snap, stale, _families(_cluster_samples(snap, now, ages=False)))
        return kept[2]

    def _samples(self, now: float) -> Iterator[Sample]:
        for snap in sorted(self._board.snapshots(), key=lambda s: s.cluster.name):
            yield from _cluster_samples(snap, now)
        yield from self._global_samples()

    def _global_samples(self) -> Iterator[Sample]:
        yield BUILD_INFO, (__version__, platform.python_version()), 1
        yield RELOAD_OK, (), 1 if self._reload_ok() else 0
        for source in self._discovery.snapshots():
            yield from _source_samples(source)


def _source_samples(snap: SourceSnapshot) -> Iterator[Sample]:
    """A discovery source's health once it has refreshed, and every cluster of its last
    good listing."""
    if not snap.refreshed and not snap.errors and snap.last_success is None:
        return
    name = snap.source.name
    yield DISCOVERY_UP, (name,), 1 if snap.up else 0
    if snap.last_success is not None:
        yield DISCOVERY_LAST_SUCCESS, (name,), snap.last_success
    for reason in POLL_ERROR_REASONS:
        yield DISCOVERY_ERRORS, (name, reason), snap.errors.get(reason, 0)
    for found in snap.clusters:
        listed = found.listed
        yield DISCOVERED_CLUSTER_INFO, (
            name, found.name, listed.cluster_id, listed.name, listed.region_id,
            listed.project_id, listed.plan, listed.status,
            "true" if found.polled else "false"), 1


def _families(samples: Iterable[Sample]) -> dict[Family, Metric]:
    """Samples into families, each family made when its first sample comes."""
    families: dict[Family, Metric] = {}
    for family, labels, value in samples:
        found = families.get(family)
        if found is None:
            found = families[family] = family.new()
        family.fill(found, labels, value)
    return families


def _age_samples(snap: ClusterSnapshot, now: float) -> Iterator[Sample]:
    """The ages of a cluster's oldest active jobs, the one thing that moves with the
    clock between its publishes."""
    summary = snap.jobs
    if not snap.polled or summary is None or snap.is_stale(now):
        return
    name = snap.cluster.name
    for collection in summary.stuck:
        first_seen = summary.oldest_active.get(collection)
        yield OLDEST_ACTIVE_AGE, (name, collection), \
            0.0 if first_seen is None else max(0.0, now - first_seen)


def _cluster_samples(snap: ClusterSnapshot, now: float,
                     ages: bool = True) -> Iterator[Sample]:
    """One cluster's series: its health, then its jobs unless stale (ages too, unless
    ``ages`` is False)."""
    name, cluster = snap.cluster.name, snap.cluster
    yield CLUSTER_INFO, (name, cluster.cluster_id, cluster.api, cluster.host,
                         str(snap.shard)), 1
    if not snap.polled:
        return
    yield UP, (name,), 1 if snap.up else 0
    yield POLL_DURATION, (name,), snap.poll_duration
    if snap.last_success is not None:
        yield LAST_SUCCESS, (name,), snap.last_success
    for reason in POLL_ERROR_REASONS:
        yield POLL_ERRORS, (name, reason), snap.poll_errors.get(reason, 0)
    for (endpoint, code), count in sorted(snap.api_requests.items()):
        yield API_REQUESTS, (name, endpoint, code), count
    yield RATE_LIMIT_WAIT, (name,), snap.rate_limit_wait
    summary = snap.jobs
    if summary is None or snap.is_stale(now):
        return
    for (collection, state), count in summary.counts.items():
        yield JOBS, (name, collection, state), count
    for collection, count in summary.stuck.items():
        yield JOBS_STUCK, (name, collection), count
    if ages:
        yield from _age_samples(snap, now)
    for job in summary.stuck_jobs:
        yield STUCK_JOB_INFO, (name, job.collection, job.job_id, job.state, job.reason), 1
    for (collection, state), count in summary.transitions.items():
        yield TRANSITIONS, (name, collection, state), count
    for running in summary.running:
        job_labels = (name, running.collection, running.job_id)
        if running.progress is not None:
            yield PROGRESS, (*job_labels, running.state), running.progress
        if running.total_rows >= 0:
            yield ROWS, (*job_labels, "imported"), running.imported_rows
            yield ROWS, (*job_labels, "total"), running.total_rows
        if running.eta is not None:
            yield ETA, job_labels, running.eta
    for failed in summary.failed:
        yield FAILED_JOB_INFO, (name, failed.collection, failed.job_id, failed.reason), 1
    for collection, count in summary.rows_imported.items():
        yield ROWS_IMPORTED, (name, collection), count
    for (collection, outcome), histogram in summary.durations.items():
        yield DURATION, (name, collection, outcome), histogram
    for collection, histogram in summary.waits.items():
        yield WAIT, (name, collection), histogram
