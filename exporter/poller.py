"""Schedules: each cluster's listings become immutable snapshots.

``ClusterPoller`` runs ``fetch_listing`` (exporter.paging) on the cluster's own
schedule in its own thread
and publishes a fresh ``ClusterSnapshot`` to the ``SnapshotBoard`` after every
poll, success or not. A scrape only reads the board, so it never waits on a
poll, and a slow cluster delays nobody but itself.

Each cluster has two lanes: listings, on ``interval`` and the list bucket alone, and
job details ("describe"), beside them on a session and pacer of their own, always
from the plan of the latest published listing: a new listing replaces an unfinished
plan (after the describe in hand), and a describe is sent only while the latest
published listing holds its job.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from typing import Callable, Iterable

import requests

from exporter.answers import JobDetails
from exporter.client import describe_import_job, make_session
from exporter.config import ClusterConfig
from exporter.errors import DecodeFailure, HttpFailure, PollFailure
from exporter.details import DetailRules
from exporter.durations import TimingRules
from exporter.history import JobHistory
from exporter.jobs import CANONICAL_STATES, MAX_UNKNOWN_STATES, OTHER_STATE
from exporter.board import ClusterSnapshot, SnapshotBoard
from exporter.deadline import DeadlineAdapter
from exporter.logs import FieldsAdapter, bind
from exporter.memory import release_free_memory
from exporter.paging import Stopped, fetch_listing, with_retries
from exporter.ratelimit import Pacer, RateLimits, pace
from exporter.store import HistoryStore
from exporter.summary import JobSummary

log = logging.getLogger("exporter.poller")

# After a listing this large, hand the pages it used back (see exporter.memory).
TRIM_AFTER_JOBS = 10_000


class PlanReplaced(Exception):
    """The job left the listing while its describe waited for its turn: the plan it
    came from is over (never a describe for an id the latest listing does not hold)."""


def next_poll_delay(interval: float, elapsed: float) -> float:
    """Seconds from the end of a poll to the start of the next.

    Polls start ``interval`` apart; one that took longer than that (500 pages at
    10 requests per second) is followed at once by the next, never overlapped.
    """
    return max(0.0, interval - elapsed)


def detail_rules(cluster: ClusterConfig) -> DetailRules:
    settings = cluster.settings
    return DetailRules(max_describes=settings.max_describes_per_poll,
                       max_job_series=settings.max_job_series,
                       max_failed_series=settings.max_failed_job_series,
                       failed_window=settings.failed_job_window,
                       api=cluster.api)


def timing_rules(cluster: ClusterConfig) -> TimingRules:
    settings = cluster.settings
    return TimingRules(interval=settings.interval, buckets=settings.duration_buckets,
                       max_finished=settings.max_job_series)


class UnknownStates:
    """Logs each unknown state name once, up to MAX_UNKNOWN_STATES of them (beyond, the
    history counts new names under OTHER_STATE): a server inventing names grows neither
    this set nor the log without bound."""

    def __init__(self, logger: FieldsAdapter) -> None:
        self._log = logger
        self._seen: set[str] = set()
        self._capped = False

    def log(self, states: set[str]) -> None:
        for state in sorted(states - self._seen):
            if state in CANONICAL_STATES or self._capped:
                continue
            if len(self._seen) >= MAX_UNKNOWN_STATES:
                self._capped = True
                self._log.warning("too many distinct job states; new ones are counted "
                                  f"under {OTHER_STATE!r} and not logged",
                                  extra={"fields": {"state": state}})
                continue
            self._seen.add(state)
            self._log.warning("unknown job state; counted under its own name",
                              extra={"fields": {"state": state}})


class Describer:
    """Describes one job on the details lane's session; once ``describe`` answers HTTP
    404 (Milvus 2.4.0 to 2.4.12) it uses ``get_progress`` instead, until ``reset``."""

    def __init__(self, session: requests.Session, cluster: ClusterConfig,
                 observe: Callable[[str, str], None], logger: FieldsAdapter) -> None:
        self.session = session
        self._cluster = cluster
        self._observe = observe
        self._log = logger
        self.get_progress = False

    def reset(self) -> None:
        """Forget what was learnt about the server (on reload: it may be upgraded)."""
        self.get_progress = False

    def __call__(self, job_id: str) -> JobDetails:
        cluster = self._cluster
        try:
            return describe_import_job(self.session, cluster, job_id,
                                       get_progress=self.get_progress, observe=self._observe)
        except HttpFailure as failure:
            if failure.status != 404 or cluster.api != "v2" or self.get_progress:
                raise
        self.get_progress = True
        self._log.info("describe answered 404: using get_progress (Milvus 2.4.0 to 2.4.12) "
                       "from now on")
        return describe_import_job(self.session, cluster, job_id, get_progress=True,
                                   observe=self._observe)


class ClusterReport:
    """One cluster's latest snapshot and what it counts (polls failed by reason, API
    requests by endpoint and code), published to the board by both lanes under one
    lock; it logs the cluster starting to fail and recovering."""

    def __init__(self, cluster: ClusterConfig, board: SnapshotBoard, shard: int,
                 clock: Callable[[], float], current: Callable[[], bool],
                 waited: Callable[[], float], logger: FieldsAdapter) -> None:
        self._board = board
        self._clock = clock
        self._current = current
        self._waited = waited           # seconds waited for the rate limiter
        self._log = logger
        self._publish_lock = threading.Lock()     # the snapshot, from both lanes
        self._counts_lock = threading.Lock()      # api requests, from both lanes
        self._poll_errors: dict[str, int] = {}
        self._api_requests: dict[tuple[str, str], int] = {}
        self._failing = False
        self.snapshot = ClusterSnapshot(cluster=cluster, shard=shard)
        board.publish(self.snapshot, current)

    def observe(self, endpoint: str, code: str) -> None:
        key = (endpoint, code)
        with self._counts_lock:
            self._api_requests[key] = self._api_requests.get(key, 0) + 1

    def _publish(self, snapshot: ClusterSnapshot) -> ClusterSnapshot:
        """``snapshot`` with the counts as they are, published (the lock held)."""
        with self._counts_lock:
            requests_sent = dict(self._api_requests)
        snapshot = replace(snapshot, poll_errors=dict(self._poll_errors),
                           api_requests=requests_sent, rate_limit_wait=self._waited())
        self.snapshot = snapshot
        self._board.publish(snapshot, self._current)
        return snapshot

    def listing(self, summary: JobSummary, duration: float, fields: dict[str, object],
                refresh: Callable[[JobSummary], JobSummary]) -> ClusterSnapshot:
        """A listing folded in after ``duration`` seconds (``fields`` for the log).

        Its summary is refreshed with the details learnt meanwhile, under the lock the
        describe lane publishes under: a describe that finished between the listing's
        fold and this publish must not be taken back (rows and durations would drop,
        which rate() reads as a counter reset)."""
        if self._failing:
            self._log.info("cluster recovered", extra={"fields": fields})
        else:
            self._log.debug("poll succeeded", extra={"fields": fields})
        self._failing = False
        with self._publish_lock:
            return self._publish(replace(self.snapshot, polled=True, up=True,
                                         poll_duration=duration, last_success=self._clock(),
                                         jobs=refresh(summary)))

    def failure(self, failure: PollFailure, duration: float,
                log_it: bool = True) -> ClusterSnapshot:
        """A failed poll: up 0, the reason counted, job series kept until stale."""
        self._poll_errors[failure.reason] = self._poll_errors.get(failure.reason, 0) + 1
        if log_it:
            fields = {"reason": failure.reason, "error": str(failure),
                      "duration_seconds": round(duration, 3)}
            self._log.warning("poll failed" if self._failing else "cluster started failing",
                              extra={"fields": fields})
        self._failing = True
        with self._publish_lock:
            return self._publish(replace(self.snapshot, polled=True, up=False,
                                         poll_duration=duration,
                                         last_error_reason=failure.reason,
                                         last_error=str(failure)))

    def details(self, refresh: Callable[[JobSummary], JobSummary],
                stopped: Callable[[], bool]) -> ClusterSnapshot:
        """The latest snapshot's jobs refreshed with what describes taught."""
        with self._publish_lock:
            jobs = self.snapshot.jobs
            if jobs is None or stopped():
                return self.snapshot
            return self._publish(replace(self.snapshot, jobs=refresh(jobs)))


class ClusterPoller:
    """Polls one cluster on its own schedule and publishes its snapshots."""

    def __init__(self, cluster: ClusterConfig, board: SnapshotBoard, history: JobHistory, *,
                 shard: int = 0, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 session_factory: Callable[[ClusterConfig], requests.Session] = make_session,
                 limits: RateLimits | None = None,
                 wait: Callable[[float], bool] | None = None) -> None:
        """``wait`` sleeps between retries and returns True when the poller must stop;
        by default it waits on the poller's stop event (tests pass one that records
        the backoff instead of sleeping through it)."""
        self.cluster = cluster
        self._log = bind(log, cluster_name=cluster.name)
        self._history = history
        self._clock = clock
        self._rng = rng or random.Random()
        # One session per lane: each keeps its own connection alive and waits for its
        # own endpoint's bucket; a reload or stop closes both.
        self._session = session_factory(cluster)
        self._details_session = session_factory(cluster)
        self._pacers: list[Pacer] = []
        if limits is not None:
            self._pacers = [pace(session, Pacer(limits, cluster.host, cluster.api_key,
                                                cluster.settings.requests_per_second))
                            for session in (self._session, self._details_session)]
        for adapter in self._details_session.adapters.values():
            if isinstance(adapter, DeadlineAdapter):
                adapter.guard = self._listing_stands
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._report = ClusterReport(cluster, board, shard, clock, self._current,
                                     lambda: sum(pacer.waited for pacer in self._pacers),
                                     self._log)
        self._describe = Describer(self._details_session, cluster, self._report.observe,
                                   self._log)
        self._threads: list[threading.Thread] = []
        # The listing lane sets it when a listing is published (and stop() does).
        self._planned = threading.Event()
        # Held while a listing is folded in, and while a describe is sent: a describe
        # goes only for an id of the latest published listing. ``_listings`` counts them.
        self._listing_lock = threading.Lock()
        self._listings = 0
        self._plan_of = -1        # the listing the describe lane's plan came from
        self._describing = ""     # the job id of the describe being sent
        self._unknown_states = UnknownStates(self._log)
        self._crashes: set[type[BaseException]] = set()   # logged with a traceback once

    @property
    def snapshot_polled(self) -> bool:
        return self._report.snapshot.polled

    def _current(self) -> bool:
        return not self._stop.is_set()

    def _listing_stands(self) -> Callable[[], None]:
        """Before each describe is written, after its turn: the latest published
        listing holds the job (else PlanReplaced), and no other is folded in until the
        request is written (the release this returns)."""
        self._listing_lock.acquire()
        if self._history.first_seen(self._describing) is None:
            self._listing_lock.release()
            raise PlanReplaced()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._listing_lock.release()
        return release

    def reset_fallbacks(self) -> None:
        """Forget what was learnt about the server (on reload: it may be upgraded)."""
        self._describe.reset()

    def start(self) -> None:
        name = self.cluster.name
        self._threads = [threading.Thread(target=self._run, name=f"poll-{name}", daemon=True),
                         threading.Thread(target=self._describe_lane, name=f"details-{name}",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop at once; a request in flight is abandoned and never published."""
        self._stop.set()
        self._planned.set()
        self._session.close()
        self._details_session.close()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _describe_lane(self) -> None:
        """Describe from each published listing's plan, beside the listings."""
        while True:
            self._planned.wait()
            if self._stop.is_set():
                return
            self._planned.clear()
            try:
                self._describe_and_publish()
            except Stopped:
                return

    def _run(self) -> None:
        interval = self.cluster.settings.interval
        if self._stop.wait(self._rng.uniform(0, min(interval, 2.0))):
            return
        while True:
            started = time.monotonic()
            try:
                self._poll_listing()
            except Stopped:
                return
            if self._stop.wait(next_poll_delay(interval, time.monotonic() - started)):
                return

    def poll_once(self) -> ClusterSnapshot:
        """One poll: fetch, fold into history, publish, then describe from its plan and
        publish again (for --once and tests; a running poller's describe lane does the
        second half beside the next listing). Returns the last snapshot."""
        snapshot = self._poll_listing()
        if snapshot.up and self._planned.is_set():
            self._planned.clear()
            return self._describe_and_publish()
        return snapshot

    def _poll_listing(self) -> ClusterSnapshot:
        """Fetch, fold into history, publish; the describe lane is told of the plan."""
        started = time.monotonic()
        try:
            return self._poll(started)
        except Stopped:
            raise
        except PollFailure as failure:     # not from the listing: still a failed poll
            return self._report.failure(failure, time.monotonic() - started)
        except Exception as exc:
            # A bug must neither kill the cluster's schedule nor leave it silently
            # stale: the poll fails like any other, and the traceback is logged once.
            if self._stop.is_set():
                raise Stopped() from None
            first = type(exc) not in self._crashes
            self._crashes.add(type(exc))
            if first:
                self._log.error("poll crashed; counted as a failed poll (reason decode)",
                                exc_info=True)
            return self._report.failure(
                DecodeFailure(f"internal error handling the answer: {type(exc).__name__}"),
                time.monotonic() - started, log_it=not first)

    def _poll(self, started: float) -> ClusterSnapshot:
        cluster, listed_at = self.cluster, self._clock()    # the listing's start
        try:
            listing = fetch_listing(self._session, cluster, observe=self._report.observe,
                                    wait=self._wait, rng=self._rng)
        except PollFailure as failure:
            if self._stop.is_set():
                raise Stopped() from None
            return self._report.failure(failure, time.monotonic() - started)
        self._unknown_states.log(listing.states())
        settings = cluster.settings
        if self._stop.is_set():     # retired meanwhile: a newer poller owns the history
            raise Stopped()
        with self._listing_lock:     # no describe is sent while the listing changes
            if self._stop.is_set():  # retired while a describe was being written
                raise Stopped()
            summary = self._history.apply(
                listing, stuck_after=settings.stuck_after,
                stall_after=settings.stall_after,
                max_stuck_series=settings.max_stuck_job_series,
                rules=detail_rules(cluster), timing=timing_rules(cluster), started=listed_at)
            self._listings += 1
        duration = time.monotonic() - started
        if self._stop.is_set():
            raise Stopped()
        fields: dict[str, object] = {"duration_seconds": round(duration, 3),
                                     "pages": listing.pages, "jobs": len(listing)}
        if len(listing) >= TRIM_AFTER_JOBS:
            del listing
            release_free_memory()
        snapshot = self._report.listing(summary, duration, fields, self._history.refresh)
        # The listing is out; details follow in a second snapshot, from the describe
        # lane, so a slow or failing describe endpoint never holds the listing back,
        # and nothing going wrong while describing turns this poll into a failed one.
        self._planned.set()
        return snapshot

    def _describe_and_publish(self) -> ClusterSnapshot:
        """Describe the latest listing's plan; publish what it taught, over whatever
        snapshot is the latest by then."""
        try:
            if not self._describe_jobs():
                return self._report.snapshot
        except Stopped:
            raise
        except Exception as exc:
            if type(exc) not in self._crashes:
                self._crashes.add(type(exc))
                self._log.error("describing jobs crashed; the listing stands, its jobs "
                                "keep their last known details", exc_info=True)
            return self._report.snapshot
        return self._report.details(self._history.refresh, self._stop.is_set)

    def _describe_jobs(self) -> bool:
        """Describe the jobs the history plans; False when it planned none.

        A failure never fails the poll: the job keeps its last known details. One
        that a retry could cure (timeouts, 5xx, ...) ends this round, and so does
        any failure before a first success (an endpoint the key may not use answers
        every job alike), so a broken endpoint costs one request per poll; the rest
        wait for the next poll.
        """
        with self._listing_lock:
            plan = self._history.describe_plan()
            self._plan_of = self._listings
        answered = False
        for done, job_id in enumerate(plan):
            if done and self._listings != self._plan_of:
                break               # a newer listing's plan comes next
            self._describing = job_id
            job_log = self._log.bind(job_id=job_id)
            try:
                details = with_retries(lambda: self._describe(job_id), self.cluster.settings,
                                       wait=self._wait, rng=self._rng, logger=job_log)
            except PlanReplaced:        # it left the listing: the newer one's plan comes next
                break
            except PollFailure as failure:
                if self._stop.is_set():
                    raise Stopped() from None
                final = failure.reason in ("api", "decode")
                self._history.record_details(job_id, None, final=final)
                job_log.debug("describe failed; the job keeps its last known details",
                              extra={"fields": {"reason": failure.reason,
                                                "error": str(failure)}})
                if not final or not answered:
                    break
                continue
            if self._stop.is_set():
                raise Stopped()
            answered = True
            self._history.record_details(job_id, details)
        return bool(plan)


class PollerGroup:
    """The set of running pollers; ``apply`` moves it to a new configuration."""

    def __init__(self, board: SnapshotBoard, *, store: HistoryStore | None = None,
                 shard: int = 0, clock: Callable[[], float] = time.time,
                 session_factory: Callable[[ClusterConfig], requests.Session] = make_session,
                 ) -> None:
        self._board = board
        self._store = store
        self._shard = shard
        self._clock = clock
        self._session_factory = session_factory
        self._limits = RateLimits()
        self._pollers: dict[str, ClusterPoller] = {}
        self._histories: dict[str, JobHistory] = {}
        self._lock = threading.Lock()

    @property
    def pollers(self) -> dict[str, ClusterPoller]:
        return dict(self._pollers)

    @property
    def limits(self) -> RateLimits:
        """The rate limits every poller of this group shares."""
        return self._limits

    def apply(self, clusters: tuple[ClusterConfig, ...], start: bool = True, *,
              paced: Iterable[ClusterConfig] = (), relearn: bool = True) -> dict[str, str]:
        """Start added, stop removed and restart changed clusters; keep the rest.

        ``paced`` are the other users of the rate limits (discovery sources' control
        planes). ``relearn`` makes the unchanged pollers forget what they learnt about
        their servers (a reload: they may have been upgraded; not a discovery refresh).
        A cluster's job history goes with its ``history`` key, not its name: a
        discovered cluster renamed in the console keeps it. Returns what happened to
        each cluster name, for the log.
        """
        changes: dict[str, str] = {}
        with self._lock:
            wanted = {c.name: c for c in clusters}
            self._limits.configure((c.host, c.api_key, c.settings.requests_per_second)
                                   for c in (*clusters, *paced))
            for name, poller in list(self._pollers.items()):
                if name not in wanted:
                    poller.stop()
                    self._board.remove(name)
                    del self._pollers[name]
                    changes[name] = "removed"
            kept = {c.history for c in clusters}
            for key in [k for k in self._histories if k not in kept]:
                del self._histories[key]
                if self._store is not None:
                    self._store.forget(key)
            for name, cluster in wanted.items():
                old = self._pollers.get(name)
                if old is not None and old.cluster == cluster:
                    if relearn:
                        old.reset_fallbacks()
                    continue
                if old is not None:
                    old.stop()
                    changes[name] = "changed"
                else:
                    changes[name] = "added"
                history = self._histories.get(cluster.history)
                if history is None:
                    history = self._histories[cluster.history] = JobHistory(
                        cluster.history, self._store, self._clock)
                poller = ClusterPoller(cluster, self._board, history, shard=self._shard,
                                       clock=self._clock,
                                       session_factory=self._session_factory,
                                       limits=self._limits)
                self._pollers[name] = poller
                if start:
                    poller.start()
        return changes

    def poll_all_once(self) -> list[ClusterSnapshot]:
        """Poll every cluster once, concurrently (for --once)."""
        results: dict[str, ClusterSnapshot] = {}

        def run(poller: ClusterPoller) -> None:
            results[poller.cluster.name] = poller.poll_once()

        threads = [threading.Thread(target=run, args=(p,), daemon=True)
                   for p in self._pollers.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [results[name] for name in self._pollers if name in results]

    def stop(self, timeout: float = 1.0) -> None:
        """Stop every poller; wait up to ``timeout`` in all for them to finish.

        A poller blocked in a request that hangs is abandoned (its thread is a daemon
        and its listing is never published); the wait only lets one that is folding a
        listing into the history finish writing it before the state file closes. Then
        each history writes what the describes of an unfinished poll changed.
        """
        with self._lock:
            pollers = list(self._pollers.values())
            histories = list(self._histories.values())
        for poller in pollers:
            poller.stop()
        deadline = time.monotonic() + timeout
        for poller in pollers:
            poller.join(max(0.0, deadline - time.monotonic()))
        for history in histories:
            history.flush()

