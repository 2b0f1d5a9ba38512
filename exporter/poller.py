"""Paging, retries and schedules: each cluster's listings become immutable snapshots.

``fetch_listing`` pages through one listing without trusting the server to page
well; ``ClusterPoller`` runs it on the cluster's own schedule in its own thread
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
from array import array
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence, TypeVar

import requests

from exporter.client import (
    DecodeFailure, HttpFailure, JobDetails, ListingPage, PaginationFailure, PollFailure,
    describe_import_job, list_import_jobs, make_session,
)
from exporter.config import ClusterConfig, PollSettings
from exporter.jobs import CANONICAL_STATES, MAX_UNKNOWN_STATES, OTHER_STATE, JobRecord, NameIndex
from exporter.history import DetailRules, HistoryStore, JobHistory, JobSummary
from exporter.logs import FieldsAdapter, bind
from exporter.memory import release_free_memory
from exporter.deadline import DeadlineAdapter
from exporter.ratelimit import Pacer, RateLimits, pace

log = logging.getLogger("exporter.poller")

MAX_BACKOFF = 30.0

T = TypeVar("T")


# After a listing this large, hand the pages it used back (see exporter.memory).
TRIM_AFTER_JOBS = 10_000


class Stopped(Exception):
    """The poller was told to stop while it waited."""


class PlanReplaced(Exception):
    """The job left the listing while its describe waited for its turn: the plan it
    came from is over (never a describe for an id the latest listing does not hold)."""


class Listing:
    """The jobs of one listing, held compactly while its pages arrive.

    A listing of 100,000 jobs must not cost 100,000 objects on top of the job ids:
    collection and state names are stored once and referred to by index, and the
    records are rebuilt one at a time when the listing is read. A repeated job id
    overwrites the earlier one (the later page wins).
    """

    def __init__(self) -> None:
        self.pages = 0
        # The ids in the order they came (a dict keeps it): one table, not a list and a
        # set, costs about 30 bytes a job less while the pages arrive.
        self._ids: dict[str, None] = {}
        self._positions: dict[str, int] | None = None   # only once a server repeats ids
        self._names = NameIndex()
        self._collection = array("I")
        self._state = array("I")
        self._progress = array("i")
        self.reasons: dict[str, str] = {}    # failure texts the records carried

    def extend(self, records: Iterable[JobRecord],
               reasons: Mapping[str, str] | None = None) -> int:
        """Add one page of jobs; returns how many of their ids were new."""
        if reasons:
            self.reasons.update(reasons)
        ids, names = self._ids, self._names.index
        add_collection, add_state = self._collection.append, self._state.append
        add_progress = self._progress.append
        new = 0
        for job_id, collection_name, state_name, progress in records:
            collection = names.get(collection_name)
            if collection is None:
                collection = self._names(collection_name)
            state = names.get(state_name)
            if state is None:
                state = self._names(state_name)
            if job_id in ids:
                self._overwrite(job_id, collection, state, progress)
                continue
            if self._positions is not None:
                self._positions[job_id] = len(ids)
            ids[job_id] = None
            add_collection(collection)
            add_state(state)
            add_progress(progress)
            new += 1
        return new

    def _overwrite(self, job_id: str, collection: int, state: int, progress: int) -> None:
        if self._positions is None:
            self._positions = {j: i for i, j in enumerate(self._ids)}
        i = self._positions[job_id]
        self._collection[i], self._state[i], self._progress[i] = collection, state, progress

    @classmethod
    def of(cls, records: Iterable[JobRecord]) -> "Listing":
        listing = cls()
        listing.extend(records)
        return listing

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    def __iter__(self) -> Iterator[JobRecord]:
        names = self._names.names
        for job_id, collection, state, progress in zip(
                self._ids, self._collection, self._state, self._progress, strict=True):
            yield JobRecord(job_id, names[collection], names[state], progress)

    def states(self) -> set[str]:
        return {self._names.names[i] for i in set(self._state)}


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the collector and the status page know about one cluster."""

    cluster: ClusterConfig
    shard: int = 0
    polled: bool = False
    up: bool = False
    last_success: float | None = None
    poll_duration: float = 0.0
    last_error_reason: str = ""
    last_error: str = ""
    jobs: JobSummary | None = None
    poll_errors: Mapping[str, int] = field(default_factory=dict)
    api_requests: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, code)
    rate_limit_wait: float = 0.0      # seconds, cumulative

    def is_stale(self, now: float) -> bool:
        """Job series are withdrawn once stale_after has passed without a success."""
        return (self.last_success is None
                or now - self.last_success > self.cluster.settings.stale_after and not self.up)


class SnapshotBoard:
    """The latest snapshot of every cluster; readers never take a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, ClusterSnapshot] = {}
        self.version = 0      # changes with every publish and removal: a cache key

    def snapshots(self) -> tuple[ClusterSnapshot, ...]:
        return tuple(self._snapshots.values())

    def get(self, name: str) -> ClusterSnapshot | None:
        return self._snapshots.get(name)

    def publish(self, snapshot: ClusterSnapshot,
                current: Callable[[], bool] = lambda: True) -> None:
        """Swap in a snapshot unless its poller has been retired meanwhile."""
        with self._lock:
            if current():
                self._snapshots = {**self._snapshots, snapshot.cluster.name: snapshot}
                self.version += 1

    def remove(self, name: str) -> None:
        with self._lock:
            self._snapshots = {k: v for k, v in self._snapshots.items() if k != name}
            self.version += 1


def backoff_delay(attempt: int, retry_after: float | None, cap: float,
                  rng: random.Random) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins if longer."""
    delay = rng.uniform(0, min(MAX_BACKOFF, 0.5 * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def with_retries(call: Callable[[], T], settings: PollSettings, *,
                 wait: Callable[[float], bool], rng: random.Random,
                 logger: FieldsAdapter) -> T:
    """One API call, retried after timeouts, connection errors, 429 and 5xx.

    Backs off exponentially with jitter (Retry-After honoured); ``wait`` sleeps and
    returns True when the poller must stop, which raises Stopped.
    """
    attempt = 0
    while True:
        try:
            return call()
        except PollFailure as failure:
            if not failure.retryable or attempt >= settings.retries:
                raise
            delay = backoff_delay(attempt, failure.retry_after,
                                  max(settings.interval, settings.timeout), rng)
            logger.debug("retrying request", extra={"fields": {
                "reason": failure.reason, "delay_seconds": round(delay, 3)}})
            attempt += 1
            if wait(delay):
                raise Stopped() from None


class Page(Protocol):
    """One page of a listing as the API client returns it."""

    @property
    def records(self) -> Sequence[object]: ...

    @property
    def count(self) -> int | None: ...


P = TypeVar("P", bound=Page)


def page_through(fetch: Callable[[int], P], add: Callable[[P], int], held: Callable[[], int],
                 *, page_size: int, max_pages: int, noun: str = "jobs") -> int:
    """Page through a listing from page 1 without trusting the server to page well;
    returns how many pages it took, or raises PollFailure.

    ``fetch`` gets a page, ``add`` takes it in and says how many of its ids were new,
    ``held`` says how many ids are in. Stops on a short or empty page, on a reached
    total, on a page that brings no new id (servers that ignore paging), and fails
    past max_pages. A first page holding more than were asked for is a server that
    ignores paging (Milvus): it is the whole listing, and no second request is sent;
    a later page doing so is refused (pagination).
    """
    total: int | None = None
    page = 0
    while True:
        page += 1
        if page > max_pages:
            raise PaginationFailure(f"listing did not end within max_pages={max_pages} "
                                    f"pages ({held()} {noun} so far)")
        result = fetch(page)
        held_here = len(result.records)
        oversized = held_here > page_size
        if oversized and page > 1:
            raise PaginationFailure(f"page {page} held {held_here} {noun}, more than the "
                                    f"page_size={page_size} asked for")
        new_ids = add(result)
        if oversized:           # page 1 of a server that ignores paging: the whole listing
            return page
        if result.count is not None and result.count > held_here:
            total = result.count        # a count larger than its page is a total
        if not held_here or held_here < page_size:
            return page
        if total is not None and held() >= total:
            return page
        if new_ids == 0:
            return page


def fetch_listing(session: requests.Session, cluster: ClusterConfig, *,
                  observe: Callable[[str, str], None] = lambda endpoint, code: None,
                  wait: Callable[[float], bool] | None = None,
                  rng: random.Random | None = None) -> Listing:
    """Page through one listing (``page_through``); raise PollFailure (never return
    half a listing). ``wait`` sleeps between retries and returns True when the poller
    must stop.
    """
    settings = cluster.settings
    chosen_rng = rng or random.Random()
    chosen_wait = wait or threading.Event().wait
    listing = Listing()
    cluster_log = bind(log, cluster_name=cluster.name)

    def fetch(page: int) -> ListingPage:
        return with_retries(lambda: list_import_jobs(session, cluster, page, observe),
                            settings, wait=chosen_wait, rng=chosen_rng,
                            logger=cluster_log.bind(page=page))
    listing.pages = page_through(fetch, lambda page: listing.extend(page.records, page.reasons),
                                 lambda: len(listing), page_size=settings.page_size,
                                 max_pages=settings.max_pages)
    return listing


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
        self._board = board
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
        self._threads: list[threading.Thread] = []
        # The listing lane sets it when a listing is published (and stop() does).
        self._planned = threading.Event()
        # Held while a listing is folded in, and while a describe is sent: a describe
        # goes only for an id of the latest published listing. ``_listings`` counts them.
        self._listing_lock = threading.Lock()
        self._listings = 0
        self._plan_of = -1        # the listing the describe lane's plan came from
        self._describing = ""     # the job id of the describe being sent
        self._publish_lock = threading.Lock()     # _snapshot, from both lanes
        self._counts_lock = threading.Lock()      # _api_requests, from both lanes
        self._poll_errors: dict[str, int] = {}
        self._api_requests: dict[tuple[str, str], int] = {}
        self._unknown_states: set[str] = set()    # at most MAX_UNKNOWN_STATES
        self._states_capped = False
        self._get_progress = False    # describe answered 404: an old Milvus
        self._failing = False
        self._crashes: set[type[BaseException]] = set()   # logged with a traceback once
        self._snapshot = ClusterSnapshot(cluster=cluster, shard=shard)
        board.publish(self._snapshot, self._current)

    @property
    def snapshot_polled(self) -> bool:
        return self._snapshot.polled

    def _current(self) -> bool:
        return not self._stop.is_set()

    def _rate_limit_wait(self) -> float:
        return sum(pacer.waited for pacer in self._pacers)

    def _observe(self, endpoint: str, code: str) -> None:
        key = (endpoint, code)
        with self._counts_lock:
            self._api_requests[key] = self._api_requests.get(key, 0) + 1

    def _counts(self) -> dict[tuple[str, str], int]:
        with self._counts_lock:
            return dict(self._api_requests)

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
        self._get_progress = False

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
            return self._publish_failure(failure, started)
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
            return self._publish_failure(
                DecodeFailure(f"internal error handling the answer: {type(exc).__name__}"),
                started, log_it=not first)

    def _poll(self, started: float) -> ClusterSnapshot:
        cluster = self.cluster
        try:
            listing = fetch_listing(self._session, cluster, observe=self._observe,
                                    wait=self._wait, rng=self._rng)
        except PollFailure as failure:
            if self._stop.is_set():
                raise Stopped() from None
            return self._publish_failure(failure, started)
        self._log_unknown_states(listing.states())
        settings = cluster.settings
        if self._stop.is_set():     # retired meanwhile: a newer poller owns the history
            raise Stopped()
        with self._listing_lock:     # no describe is sent while the listing changes
            summary = self._history.apply(
                listing, stuck_after=settings.stuck_after,
                stall_after=settings.stall_after,
                max_stuck_series=settings.max_stuck_job_series,
                rules=detail_rules(cluster))
            self._listings += 1
        duration = time.monotonic() - started
        if self._stop.is_set():
            raise Stopped()
        fields = {"duration_seconds": round(duration, 3), "pages": listing.pages,
                  "jobs": len(listing)}
        if self._failing:
            self._log.info("cluster recovered", extra={"fields": fields})
        else:
            self._log.debug("poll succeeded", extra={"fields": fields})
        self._failing = False
        if len(listing) >= TRIM_AFTER_JOBS:
            del listing
            release_free_memory()
        with self._publish_lock:
            snapshot = replace(self._snapshot, polled=True, up=True, poll_duration=duration,
                               last_success=self._clock(), jobs=summary,
                               poll_errors=dict(self._poll_errors),
                               api_requests=self._counts(),
                               rate_limit_wait=self._rate_limit_wait())
            self._snapshot = snapshot
            self._board.publish(snapshot, self._current)
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
                return self._snapshot
        except Stopped:
            raise
        except Exception as exc:
            if type(exc) not in self._crashes:
                self._crashes.add(type(exc))
                self._log.error("describing jobs crashed; the listing stands, its jobs "
                                "keep their last known details", exc_info=True)
            return self._snapshot
        with self._publish_lock:
            if self._snapshot.jobs is None or self._stop.is_set():
                return self._snapshot
            snapshot = replace(self._snapshot, jobs=self._history.refresh(self._snapshot.jobs),
                               api_requests=self._counts(),
                               rate_limit_wait=self._rate_limit_wait())
            self._snapshot = snapshot
            self._board.publish(snapshot, self._current)
        return snapshot

    def _log_unknown_states(self, states: set[str]) -> None:
        """Log each unknown state name once, up to MAX_UNKNOWN_STATES of them (beyond,
        the history counts new names under OTHER_STATE): a server inventing names
        grows neither this set nor the log without bound."""
        for state in sorted(states - self._unknown_states):
            if state in CANONICAL_STATES or self._states_capped:
                continue
            if len(self._unknown_states) >= MAX_UNKNOWN_STATES:
                self._states_capped = True
                self._log.warning("too many distinct job states; new ones are counted "
                                  f"under {OTHER_STATE!r} and not logged",
                                  extra={"fields": {"state": state}})
                continue
            self._unknown_states.add(state)
            self._log.warning("unknown job state; counted under its own name",
                              extra={"fields": {"state": state}})

    def _publish_failure(self, failure: PollFailure, started: float,
                         log_it: bool = True) -> ClusterSnapshot:
        """Publish a failed poll: up 0, the reason counted, job series kept until stale."""
        duration = time.monotonic() - started
        self._poll_errors[failure.reason] = self._poll_errors.get(failure.reason, 0) + 1
        if log_it:
            fields = {"reason": failure.reason, "error": str(failure),
                      "duration_seconds": round(duration, 3)}
            self._log.warning("poll failed" if self._failing else "cluster started failing",
                        extra={"fields": fields})
        self._failing = True
        with self._publish_lock:
            snapshot = replace(self._snapshot, polled=True, up=False, poll_duration=duration,
                               last_error_reason=failure.reason, last_error=str(failure),
                               poll_errors=dict(self._poll_errors),
                               api_requests=self._counts(),
                               rate_limit_wait=self._rate_limit_wait())
            self._snapshot = snapshot
            self._board.publish(snapshot, self._current)
        return snapshot

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

    def _describe(self, job_id: str) -> JobDetails:
        try:
            return describe_import_job(self._details_session, self.cluster, job_id,
                                       get_progress=self._get_progress,
                                       observe=self._observe)
        except HttpFailure as failure:
            if failure.status != 404 or self.cluster.api != "v2" or self._get_progress:
                raise
        self._get_progress = True
        self._log.info("describe answered 404: using get_progress (Milvus 2.4.0 to 2.4.12) "
                       "from now on")
        return describe_import_job(self._details_session, self.cluster, job_id,
                                   get_progress=True, observe=self._observe)


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
        listing into the history finish writing it before the state file closes.
        """
        with self._lock:
            pollers = list(self._pollers.values())
        for poller in pollers:
            poller.stop()
        deadline = time.monotonic() + timeout
        for poller in pollers:
            poller.join(max(0.0, deadline - time.monotonic()))

