"""Discovery: every cluster an API key can see, polled without being listed by hand.

Each discovery source (``config.DiscoveryConfig``) asks Zilliz Cloud's control plane for
the clusters its key can see (``client.list_clusters``, paged as listings are), at start
and every ``refresh_interval``, in its own thread (``SourceRefresher``). ``resolve`` turns
what every source listed, with the configured clusters, into the clusters to poll: a
listed cluster that passes its source's filters and whose status is in
``poll_statuses`` becomes a v2 cluster named after its ``clusterName``, unless a
configured cluster (or an earlier source) has its ``clusterId``; names are made unique
whatever order the servers list in, and sharding applies by name. ``Discovery`` hands
that set to the poller group (``PollerGroup.apply``: appearing clusters start, leaving
ones stop, the rest are untouched) and publishes each source's health and what became
of every cluster it listed to the ``DiscoveryBoard`` for the collector and the status
page.

A failed refresh keeps the source's last good listing, as Prometheus's service
discovery does: the clusters it found keep polling.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, Protocol

import requests

from exporter.answers import CloudCluster, ClustersPage
from exporter.client import list_clusters, make_session
from exporter.config import ClusterConfig, Config, DiscoveryConfig
from exporter.errors import DecodeFailure, PollFailure
from exporter.logs import bind
from exporter.paging import Stopped, page_through, with_retries
from exporter.ratelimit import Pacer, RateLimits, pace
from exporter.sharding import select_shard, shard_of

log = logging.getLogger("exporter.discovery")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# A discovered cluster's job history is kept under its clusterId (config.ClusterConfig.
# history); the prefix keeps it apart from configured names, which cannot hold ':'.
HISTORY_PREFIX = "clusterId:"


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``-``."""
    return _UNSAFE.sub("-", text)


def fetch_clusters(session: requests.Session, source: DiscoveryConfig, *,
                   observe: Callable[[str, str], None] = lambda endpoint, code: None,
                   wait: Callable[[float], bool] | None = None,
                   rng: random.Random | None = None) -> tuple[CloudCluster, ...]:
    """Every cluster the source's key can see, paged as listings are (``page_through``);
    each clusterId once, the later page winning. Raises PollFailure."""
    settings = source.settings
    chosen_rng = rng or random.Random()
    chosen_wait = wait or threading.Event().wait
    source_log = bind(log, source=source.name)
    found: dict[str, CloudCluster] = {}

    def fetch(page: int) -> ClustersPage:
        return with_retries(lambda: list_clusters(session, source, page, observe), settings,
                            wait=chosen_wait, rng=chosen_rng, logger=source_log.bind(page=page))

    def add(page: ClustersPage) -> int:
        before = len(found)
        found.update((cluster.cluster_id, cluster) for cluster in page.records)
        return len(found) - before
    page_through(fetch, add, lambda: len(found), page_size=settings.page_size,
                 max_pages=settings.max_pages, noun="clusters")
    return tuple(found.values())


# ---- what becomes of each listed cluster ----------------------------------------------

@dataclass(frozen=True)
class DiscoveredCluster:
    """A listed cluster and what became of it: the ``cluster_name`` it is polled under
    (or would be), whether this replica polls it, and why not."""

    listed: CloudCluster
    name: str
    polled: bool
    why_not: str = ""


@dataclass(frozen=True)
class Resolution:
    """The clusters this replica polls (configured and discovered) and, per source,
    what became of every cluster it listed, in its listing's order."""

    clusters: tuple[ClusterConfig, ...]
    sources: Mapping[str, tuple[DiscoveredCluster, ...]]


def _filtered_out(source: DiscoveryConfig, listed: CloudCluster) -> str:
    """Why the source's filters or statuses leave a listed cluster out, or ""."""
    if source.include and not re.fullmatch(source.include, listed.name):
        return "not matched by include"
    if source.exclude and re.fullmatch(source.exclude, listed.name):
        return "matched by exclude"
    if source.projects and listed.project_id not in source.projects:
        return f"project {listed.project_id or '(none)'} not in projects"
    if source.regions and listed.region_id not in source.regions:
        return f"region {listed.region_id or '(none)'} not in regions"
    if listed.status not in source.poll_statuses:
        return f"status {listed.status or '(none)'} not in poll_statuses"
    return ""


def _cluster(source: DiscoveryConfig, listed: CloudCluster, name: str) -> ClusterConfig:
    """A discovered cluster, as the contract derives it from its source."""
    return ClusterConfig(name=name, url=source.url, api="v2", cluster_id=listed.cluster_id,
                         api_key=source.api_key, settings=source.settings,
                         history_key=HISTORY_PREFIX + listed.cluster_id)


def resolve(config: Config, listings: Mapping[str, Iterable[CloudCluster]],
            shard: tuple[int, int] = (1, 0)) -> Resolution:
    """What every source listed (``listings`` by source name), against the configured
    clusters: the clusters to poll and, per source, what became of each listed one.

    Names do not depend on the order of any listing: a ``clusterName`` made safe, and
    when two clusters (discovered or configured) would share a name, every discovered
    one of them is ``<name>-<clusterId>``. A configured cluster with the same
    ``cluster_id`` wins, and so does the first source listing a cluster.
    """
    count, index = shard
    configured = {c.cluster_id: c.name for c in config.clusters if c.cluster_id}
    configured_names = Counter(c.name for c in config.clusters)
    why: dict[tuple[str, str], str] = {}            # (source, clusterId) -> why not
    chosen: dict[str, tuple[DiscoveryConfig, CloudCluster]] = {}    # clusterId ->
    for source in config.discovery:
        for listed in listings.get(source.name, ()):
            reason = _filtered_out(source, listed)
            if not reason and listed.cluster_id in configured:
                reason = f"configured as {configured[listed.cluster_id]}"
            if not reason and listed.cluster_id in chosen:
                reason = f"listed by source {chosen[listed.cluster_id][0].name}"
            if reason:
                why[(source.name, listed.cluster_id)] = reason
            else:
                chosen[listed.cluster_id] = (source, listed)

    def base(listed: CloudCluster) -> str:
        return safe_name(listed.name or listed.cluster_id)

    def suffixed(listed: CloudCluster) -> str:
        return f"{base(listed)}-{safe_name(listed.cluster_id)}"
    bases = Counter(base(listed) for _, listed in chosen.values()) + configured_names
    names = {cluster_id: base(listed) if bases[base(listed)] == 1 else suffixed(listed)
             for cluster_id, (_, listed) in chosen.items()}
    # <name>-<clusterId> may still meet another name (a cluster named so): neither is polled
    taken = Counter(names.values()) + configured_names
    polled: list[ClusterConfig] = list(select_shard(config, count, index))
    for cluster_id, (source, listed) in chosen.items():
        name = names[cluster_id]
        if taken[name] > 1:
            why[(source.name, cluster_id)] = f"name {name} is taken"
        elif shard_of(name, count) != index:
            why[(source.name, cluster_id)] = f"shard {shard_of(name, count)} of {count}"
        else:
            polled.append(_cluster(source, listed, name))
    in_use = set(taken)
    sources: dict[str, tuple[DiscoveredCluster, ...]] = {}
    for source in config.discovery:
        rows = []
        for listed in listings.get(source.name, ()):
            reason = why.get((source.name, listed.cluster_id), "")
            # the name it is (or would be) polled under, here or by what wins over it
            if listed.cluster_id in configured:
                name = configured[listed.cluster_id]
            elif listed.cluster_id in names:
                name = names[listed.cluster_id]
            else:
                name = base(listed) if base(listed) not in in_use else suffixed(listed)
            rows.append(DiscoveredCluster(listed, name, not reason, reason))
        sources[source.name] = tuple(rows)
    return Resolution(clusters=tuple(polled), sources=sources)


# ---- refreshing -------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceSnapshot:
    """Everything the collector and the status page know about one source."""

    source: DiscoveryConfig
    refreshed: bool = False          # a refresh ended (success or not) and was applied
    up: bool = False
    last_success: float | None = None
    last_error_reason: str = ""
    last_error: str = ""
    errors: Mapping[str, int] = field(default_factory=dict)    # reason -> failed refreshes
    listed: tuple[CloudCluster, ...] = ()                        # the last good listing
    clusters: tuple[DiscoveredCluster, ...] = ()                 # ``listed``, resolved


class DiscoveryBoard:
    """The latest snapshot of every source, in the configuration's order; readers never
    take a lock."""

    def __init__(self) -> None:
        self._snapshots: tuple[SourceSnapshot, ...] = ()
        self.version = 0      # changes with every publish: part of the scrape cache's key

    def snapshots(self) -> tuple[SourceSnapshot, ...]:
        return self._snapshots

    def publish(self, snapshots: Iterable[SourceSnapshot]) -> None:
        self._snapshots = tuple(snapshots)
        self.version += 1


class ApplyClusters(Protocol):
    """Moves the pollers to a set of clusters (``PollerGroup.apply``)."""

    def __call__(self, clusters: tuple[ClusterConfig, ...], start: bool = True, *,
                 paced: Iterable[ClusterConfig] = (), relearn: bool = True
                 ) -> dict[str, str]: ...


class SourceRefresher:
    """Refreshes one source at start and every ``refresh_interval``, in its own thread;
    each refresh ends in ``on_refreshed`` (which resolves and applies)."""

    def __init__(self, source: DiscoveryConfig, last: SourceSnapshot, *,
                 on_refreshed: Callable[["SourceRefresher"], None],
                 session_factory: Callable[[ClusterConfig], requests.Session] = make_session,
                 limits: RateLimits | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        """``last`` is the source's last snapshot (before a reload changed it): its
        listing stands until this refresher's first refresh replaces it."""
        self.source = source
        self.state = replace(last, source=source, refreshed=False)
        self._log = bind(log, source=source.name)
        self._on_refreshed = on_refreshed
        self._clock = clock
        self._rng = rng or random.Random()
        plane = source.control_plane
        self._session = session_factory(plane)
        if limits is not None:      # the source key's own endpoint: "clusters"
            pace(self._session, Pacer(limits, plane.host, source.api_key,
                                      source.settings.requests_per_second))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashes: set[type[BaseException]] = set()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"discover-{self.source.name}",
                                        daemon=True)
        self._thread.start()

    def refresh_soon(self) -> None:
        """Refresh now rather than at the end of the interval (a reload)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop at once; a refresh in flight is abandoned and never applied."""
        self._stop.set()
        self._wake.set()
        self._session.close()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()       # a refresh_soon() from here on is not lost
            self.refresh()
            self._wake.wait(self.source.refresh_interval)

    def refresh(self) -> None:
        """One refresh: list every page, then hand over to ``on_refreshed``; a failure
        keeps the last good listing, is counted by reason and logged in one line."""
        try:
            listed = fetch_clusters(self._session, self.source, wait=self._stop.wait,
                                    rng=self._rng)
        except Stopped:
            return
        except PollFailure as failure:
            if self._stop.is_set():
                return
            self._failed(failure)
        except Exception as exc:      # a bug: a failed refresh, its traceback logged once
            if self._stop.is_set():
                return
            if type(exc) not in self._crashes:
                self._crashes.add(type(exc))
                self._log.error("discovery refresh crashed; counted as failed (reason "
                                "decode)", exc_info=True)
            self._failed(DecodeFailure(f"internal error handling the answer: "
                                       f"{type(exc).__name__}"), log_it=False)
        else:
            if self._stop.is_set():
                return
            fields = {"clusters": len(listed)}
            if not self.state.up and self.state.last_error_reason:     # it was failing
                self._log.info("discovery source recovered", extra={"fields": fields})
            else:
                self._log.debug("discovery refreshed", extra={"fields": fields})
            self.state = replace(self.state, refreshed=True, up=True,
                                 last_success=self._clock(), listed=listed)
        self._on_refreshed(self)

    def _failed(self, failure: PollFailure, log_it: bool = True) -> None:
        errors = dict(self.state.errors)
        errors[failure.reason] = errors.get(failure.reason, 0) + 1
        if log_it:
            self._log.warning("discovery refresh failed; the clusters it last found keep "
                              "polling", extra={"fields": {
                                  "reason": failure.reason, "error": str(failure),
                                  "clusters": len(self.state.listed)}})
        self.state = replace(self.state, refreshed=True, up=False, errors=errors,
                             last_error_reason=failure.reason, last_error=str(failure))


class Discovery:
    """Every source of the running configuration: refreshes them, resolves what they
    list against the configured clusters, hands the result to ``apply`` and publishes
    the sources' snapshots. With no source, it applies the configured clusters alone."""

    def __init__(self, board: DiscoveryBoard, apply: ApplyClusters, *,
                 shard: tuple[int, int] = (1, 0),
                 session_factory: Callable[[ClusterConfig], requests.Session] = make_session,
                 limits: RateLimits | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.board = board
        self._apply_clusters = apply
        self._shard = shard
        self._session_factory = session_factory
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._config: Config | None = None
        self._start = True
        self._refreshers: dict[str, SourceRefresher] = {}

    def configure(self, config: Config, *, start: bool = True) -> dict[str, str]:
        """Move to ``config``: added and changed sources start afresh (a changed one's
        last listing stands until its first refresh), removed ones stop, unchanged ones
        refresh soon; then apply. ``start`` False starts no threads (``refresh_all``
        refreshes). Returns what happened to each cluster name."""
        with self._lock:
            self._config, self._start = config, start
            old, self._refreshers = self._refreshers, {}
            for source in config.discovery:
                current = old.pop(source.name, None)
                if current is not None and current.source == source:
                    self._refreshers[source.name] = current
                    current.refresh_soon()
                    continue
                if current is not None:
                    current.stop()
                self._refreshers[source.name] = SourceRefresher(
                    source, current.state if current is not None else SourceSnapshot(source),
                    on_refreshed=self._refreshed, session_factory=self._session_factory,
                    limits=self._limits, clock=self._clock)
            for gone in old.values():
                gone.stop()
            changes = self._apply(relearn=True)
            if start:
                for refresher in self._refreshers.values():
                    if not refresher.started:
                        refresher.start()
            return changes

    def refresh_all(self) -> None:
        """Refresh every source once, here and now (``--once``, ``--discover``)."""
        for refresher in list(self._refreshers.values()):
            refresher.refresh()

    def settled(self) -> bool:
        """Every source has refreshed (success or not) and what it found is applied."""
        return all(snap.refreshed for snap in self.board.snapshots())

    def stop(self) -> None:
        with self._lock:
            for refresher in self._refreshers.values():
                refresher.stop()

    def _refreshed(self, refresher: SourceRefresher) -> None:
        with self._lock:
            if refresher.stopped or self._refreshers.get(refresher.source.name) \
                    is not refresher:
                return                 # retired by a reload meanwhile
            changes = self._apply(relearn=False)
        summary = {kind: ",".join(sorted(n for n, k in changes.items() if k == kind))
                   for kind in ("added", "removed", "changed")}
        if any(summary.values()):
            log.info("discovered clusters changed", extra={"fields": {
                "source": refresher.source.name, **{k: v for k, v in summary.items() if v}}})

    def _apply(self, relearn: bool) -> dict[str, str]:
        """Resolve every source's listing, apply, publish (holding the lock)."""
        assert self._config is not None
        listings = {name: r.state.listed for name, r in self._refreshers.items()}
        resolution = resolve(self._config, listings, self._shard)
        changes = self._apply_clusters(
            resolution.clusters, self._start, relearn=relearn,
            paced=[r.source.control_plane for r in self._refreshers.values()])
        self.board.publish(replace(r.state, clusters=resolution.sources[name])
                           for name, r in self._refreshers.items())
        return changes
