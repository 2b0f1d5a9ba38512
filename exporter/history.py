"""Job history: first-seen times, progress, transitions, job details, and their persistence.

The list API gives no creation time, so a job's age is measured from when this
exporter first saw it. Each cluster's ``JobHistory`` remembers every listed job
in one packed 12-byte record (memory stays under 300 bytes a job at 100,000
jobs), forgets jobs that leave the listing, and turns each published listing
into an immutable ``JobSummary`` for the collector.

Job details (from the API's "describe one job") are kept only for the few jobs
that need them: active jobs (progress, rows, ETA) and jobs seen failing (the
failure reason, for ``failed_job_window``). ``describe_plan`` says which jobs the
poller should describe next, ``record_details`` folds an answer in, and
``refresh`` re-summarises after a round of describes.

With a state file, ``HistoryStore`` keeps the same records in SQLite (WAL mode)
and each listing writes, in one transaction, only the rows that changed,
appeared or left; a listing that changed nothing writes nothing.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import os
import sqlite3
import struct
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Protocol

from exporter.client import JobDetails
from exporter.logs import bind
from exporter.jobs import (
    CANONICAL_STATES, TERMINAL_STATES, JobRecord, is_active, state_index,
)

log = logging.getLogger("exporter.history")

SCHEMA_VERSION = 2   # 2 added the details table; a version 1 file is migrated in place

# first_seen, progress_since (whole unix seconds), progress (-1: none), state index,
# flags: 12 bytes, so each job's record is a 48-byte object, not 64.
_RECORD = struct.Struct("<IIbHB")
_COUNTED = 1     # its transition to completed/failed has been counted
_DESCRIBE = 2    # waits for one describe: newly failed without a reason, or newly
                 # completed (v2, for its rows)

_DETAILS_TABLE = """
    CREATE TABLE details (
        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
        imported_rows INTEGER NOT NULL, total_rows INTEGER NOT NULL, reason TEXT NOT NULL,
        failed_at REAL NOT NULL, described_at REAL NOT NULL,
        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;"""


@dataclass(frozen=True)
class StuckJob:
    collection: str
    job_id: str
    state: str
    reason: str          # "age" or "stalled"
    first_seen: float


@dataclass(frozen=True)
class RunningJob:
    """An active job's details; -1 rows and None where nothing is known."""

    collection: str
    job_id: str
    state: str
    first_seen: float
    progress: float | None      # 0-1
    imported_rows: int
    total_rows: int
    eta: float | None           # seconds; None until two observations show movement


@dataclass(frozen=True)
class FailedJob:
    collection: str
    job_id: str
    reason: str                 # the API's failure text, or "unknown"
    failed_at: float            # when the exporter first saw it failed


@dataclass(frozen=True)
class DetailRules:
    """The per-cluster settings that shape job details (from PollSettings)."""

    max_describes: int = 50
    max_job_series: int = 100
    max_failed_series: int = 100
    failed_window: float = 6 * 3600.0
    # v2 lists progress and describes rows (so a newly completed job is described for
    # its rows); v1 lists no progress and describes no rows (its progress comes from
    # describe).
    api: str = "v2"


@dataclass(frozen=True)
class JobSummary:
    """What one published listing says, ready to render; never mutated."""

    # The mappings keyed by collection are sorted by key, the order they render in.
    counts: Mapping[tuple[str, str], int]          # (collection, state) -> jobs
    stuck: Mapping[str, int]                       # collection -> stuck jobs
    oldest_active: Mapping[str, float]             # collection -> first_seen; absent: none
    stuck_jobs: tuple[StuckJob, ...]               # oldest first, capped
    transitions: Mapping[tuple[str, str], int]     # (collection, state) -> cumulative
    running: tuple[RunningJob, ...] = ()           # oldest first, capped
    failed: tuple[FailedJob, ...] = ()             # newest first, within the window, capped
    rows_imported: Mapping[str, int] = field(default_factory=dict)   # collection -> rows

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(CANONICAL_STATES, 0)
        for (_, state), n in self.counts.items():
            out[state] = out.get(state, 0) + n
        return out


class JobListing(Protocol):
    """A complete listing: its records, membership by job id, and the failure texts
    its records carried, by job id."""

    @property
    def reasons(self) -> Mapping[str, str]: ...

    def __iter__(self) -> Iterator[JobRecord]: ...

    def __len__(self) -> int: ...

    def __contains__(self, job_id: object) -> bool: ...


# job_id, imported_rows, total_rows, reason, failed_at, described_at
DetailRow = tuple[str, int, int, str, float, float]


class StateFileInUse(Exception):
    """Another exporter holds the state file."""


class HistoryStore:
    """SQLite persistence for every cluster's job history (one file, one writer)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise StateFileInUse(
                f"state_file {path!r} is in use by another exporter process") from None
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as exc:
            aside = f"{path}.corrupt-{int(clock())}"
            log.error("state file is unreadable; moved aside and starting fresh",
                      extra={"fields": {"path": path, "moved_to": aside, "error": str(exc)}})
            os.replace(path, aside)
            for suffix in ("-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-1024")   # 1 MiB: writes touch few pages
            tables = {row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" in tables:
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                if row is not None and row[0] == 1:
                    self._migrate_from_1(conn)
                elif row is None or row[0] != SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"unknown schema version {row}")
                check = conn.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            elif tables:
                raise sqlite3.DatabaseError("not an exporter state file")
            else:
                conn.executescript(f"""
                    BEGIN;
                    CREATE TABLE schema_version (version INTEGER NOT NULL);
                    INSERT INTO schema_version VALUES ({SCHEMA_VERSION});
                    CREATE TABLE clusters (cluster TEXT PRIMARY KEY) WITHOUT ROWID;
                    CREATE TABLE jobs (
                        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
                        first_seen REAL NOT NULL, progress_since REAL NOT NULL,
                        progress INTEGER NOT NULL, state TEXT NOT NULL,
                        counted INTEGER NOT NULL,
                        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;
                    {_DETAILS_TABLE}
                    COMMIT;""")
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def _migrate_from_1(self, conn: sqlite3.Connection) -> None:
        """The previous release's file: add the details table; job rows stay as they
        are (its ``counted`` 0/1 are valid flags)."""
        conn.executescript(f"""
            BEGIN;
            {_DETAILS_TABLE}
            UPDATE schema_version SET version = {SCHEMA_VERSION};
            COMMIT;""")
        log.info("state file migrated", extra={"fields": {
            "path": self.path, "from_version": 1, "to_version": SCHEMA_VERSION}})

    def load(self, cluster: str) -> tuple[bool, list[tuple[str, float, float, int, str, int]],
                                          list[DetailRow]]:
        """(baseline listing done, job rows, detail rows) for one cluster."""
        with self._lock:
            baseline = self._conn.execute(
                "SELECT 1 FROM clusters WHERE cluster=?", (cluster,)).fetchone() is not None
            rows = self._conn.execute(
                "SELECT job_id, first_seen, progress_since, progress, state, counted "
                "FROM jobs WHERE cluster=?", (cluster,)).fetchall()
            details = self._conn.execute(
                "SELECT job_id, imported_rows, total_rows, reason, failed_at, described_at "
                "FROM details WHERE cluster=?", (cluster,)).fetchall()
        return baseline, rows, details

    def write(self, cluster: str, upserts: list[tuple[str, float, float, int, str, int]],
              deletes: list[str], baseline: bool,
              details: list[DetailRow] | None = None) -> None:
        """Apply one listing's changes in one transaction; nothing to do writes nothing."""
        if not upserts and not deletes and not baseline and not details:
            return
        with self._lock:
            if self._closed:   # shutting down: the poller's listing is abandoned
                return
            conn = self._conn
            conn.execute("BEGIN")
            try:
                if baseline:
                    conn.execute("INSERT OR IGNORE INTO clusters VALUES (?)", (cluster,))
                conn.executemany(
                    "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cluster, *row) for row in upserts])
                if details:
                    conn.executemany(
                        "INSERT OR REPLACE INTO details VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(cluster, *row) for row in details])
                gone = [(cluster, job_id) for job_id in deletes]
                conn.executemany("DELETE FROM jobs WHERE cluster=? AND job_id=?", gone)
                conn.executemany("DELETE FROM details WHERE cluster=? AND job_id=?", gone)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def replace(self, cluster: str, rows: list[tuple[str, float, float, int, str, int]],
                details: list[DetailRow]) -> None:
        """Write a cluster's whole history, in place of what the file holds for it."""
        with self._lock:
            if self._closed:
                return
            conn = self._conn
            conn.execute("BEGIN")
            try:
                conn.execute("INSERT OR IGNORE INTO clusters VALUES (?)", (cluster,))
                conn.execute("DELETE FROM jobs WHERE cluster=?", (cluster,))
                conn.execute("DELETE FROM details WHERE cluster=?", (cluster,))
                conn.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(cluster, *row) for row in rows])
                conn.executemany("INSERT INTO details VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(cluster, *row) for row in details])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def forget(self, cluster: str) -> None:
        """Drop a cluster that left the configuration."""
        with self._lock:
            if self._closed:
                return
            self._conn.execute("BEGIN")
            self._conn.execute("DELETE FROM jobs WHERE cluster=?", (cluster,))
            self._conn.execute("DELETE FROM details WHERE cluster=?", (cluster,))
            self._conn.execute("DELETE FROM clusters WHERE cluster=?", (cluster,))
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()
                os.close(self._lock_fd)


def _clamp(progress: int) -> int:
    """Progress as one signed byte: -1 for none, else 0..100 (the API's percent)."""
    return -1 if progress < 0 else min(progress, 127)


@dataclass(slots=True)
class _Track:
    """The first and latest observation of one measure of a job's movement."""

    first_at: float = 0.0
    first: float = -1.0
    last_at: float = 0.0
    last: float = -1.0

    def observe(self, now: float, value: float) -> None:
        if value < self.last or self.first < 0:    # first sighting, or started over
            self.first_at, self.first = now, value
        self.last_at, self.last = now, value

    def eta(self, target: float, now: float) -> float | None:
        """Seconds until ``target`` at the rate seen since the first observation."""
        if self.last_at <= self.first_at or self.last <= self.first:
            return None
        rate = (self.last - self.first) / (self.last_at - self.first_at)
        return max(0.0, (target - self.last) / rate - (now - self.last_at))


@dataclass(slots=True)
class _Details:
    """What describes (and a listing's failure text) told about one job.

    Kept only where something is shown or still to be learnt: the jobs behind the
    per-job series (at most max_job_series), failures within the window, and jobs
    waiting for a describe. A v1 job's described progress lives in its record.
    """

    imported_rows: int = -1
    total_rows: int = -1
    reason: str = ""
    failed_at: float = 0.0       # 0: not seen failing after the first listing
    described_at: float = 0.0
    failed_describe: bool = False    # the last describe failed (in memory only)
    percent: _Track | None = None    # ETA observations, importing jobs only
    rows: _Track | None = None

    def observe_percent(self, now: float, percent: int) -> None:
        if self.percent is None:
            self.percent = _Track()
        self.percent.observe(now, percent)

    def observe_rows(self, now: float) -> None:
        if self.total_rows > 0 and self.imported_rows >= 0:
            if self.rows is None:
                self.rows = _Track()
            self.rows.observe(now, self.imported_rows)

    def eta(self, now: float) -> float | None:
        """Rows when they moved, else progress; None until one of them moved."""
        by_rows = None if self.rows is None else self.rows.eta(self.total_rows, now)
        if by_rows is not None:
            return by_rows
        return None if self.percent is None else self.percent.eta(100.0, now)

    def facts(self) -> tuple[int, int, str, float]:
        """What it says, without when it was last asked."""
        return self.imported_rows, self.total_rows, self.reason, self.failed_at

    def row(self, job_id: str) -> DetailRow:
        return (job_id, *self.facts(), self.described_at)


# An active job behind the per-job series: job_id, collection, state, first_seen.
_Shown = tuple[str, str, str, int]


class _ActiveJobs:
    """A listing's active jobs, column by column, while one listing is folded in:
    references and packed numbers, no object per job, so a listing of 100,000 active
    jobs costs a few flat buffers that go back in one piece."""

    __slots__ = ("ids", "collections", "states", "first_seen", "since")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.collections: list[str] = []
        self.states: list[str] = []
        self.first_seen = array("I")
        self.since = array("I")     # when its progress or state last changed

    def add(self, job_id: str, collection: str, state: str, first_seen: int,
            since: int) -> None:
        self.ids.append(job_id)
        self.collections.append(collection)
        self.states.append(state)
        self.first_seen.append(first_seen)
        self.since.append(since)


class JobHistory:
    """Everything remembered about one cluster's jobs."""

    def __init__(self, cluster: str, store: HistoryStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self._log = bind(log, cluster_name=cluster)
        self._store = store
        self._clock = clock
        self._state_index = state_index()
        self._jobs: dict[str, bytes] = {}
        self._details: dict[str, _Details] = {}
        self._transitions: Counter[tuple[str, str]] = Counter()
        self._rows_imported: Counter[str] = Counter()
        self._baseline_done = False
        self._cap_logged = False
        self._lock = threading.Lock()
        # From the last listing, for describe_plan and refresh: the active jobs to
        # describe next, the oldest active jobs as (job_id, collection, state,
        # first_seen) (the per-job series), jobs waiting for a describe by id ->
        # (collection, state), and the failures within the window as (job_id,
        # collection). Only these few are kept, never every active job.
        self._next_active: list[str] = []
        self._shown: list[_Shown] = []
        self._described: dict[str, float] = {}    # active job id -> last described
        self._waiting: dict[str, tuple[str, str]] = {}
        self._failed: list[tuple[str, str]] = []
        self._collections: set[str] = set()
        self._fresh: set[str] = set()     # collections first listed by the last listing
        self._rules = DetailRules()
        self._dirty: set[str] = set()       # details to persist
        self._changed: list[tuple[str, float, float, int, str, int]] = []   # job rows
        # A write that failed (disk full...) left memory ahead of the file: the next
        # write then writes the whole history instead of the changes since.
        self._resync = False
        if store is not None:
            self._baseline_done, rows, details = store.load(cluster)
            for job_id, first_seen, since, progress, state, flags in rows:
                self._jobs[job_id] = _RECORD.pack(int(first_seen), int(since),
                                                  _clamp(progress), self._state_index(state),
                                                  flags)
            for job_id, imported, total, reason, failed_at, described_at in details:
                self._details[job_id] = _Details(imported, total, reason, failed_at,
                                                 described_at)
                if described_at:
                    self._described[job_id] = described_at

    def __len__(self) -> int:
        return len(self._jobs)

    def first_seen(self, job_id: str) -> float | None:
        packed = self._jobs.get(job_id)
        return None if packed is None else _RECORD.unpack(packed)[0]

    def apply(self, records: JobListing, *, stuck_after: float, stall_after: float,
              max_stuck_series: int, rules: DetailRules = DetailRules()) -> JobSummary:
        """Fold one complete listing into the history and summarise it."""
        with self._lock:
            self._rules = rules
            summary = self._apply(records, stuck_after, stall_after, max_stuck_series)
            return self._with_details(summary)

    def _apply(self, records: JobListing, stuck_after: float, stall_after: float,
               max_stuck_series: int) -> JobSummary:
        now = int(self._clock())
        jobs, details = self._jobs, self._details
        listed_reasons = records.reasons
        describing = self._rules.max_describes > 0     # 0: job details are off
        rows_on_completion = describing and self._rules.api == "v2"
        failed_window = self._rules.failed_window
        pack, unpack = _RECORD.pack, _RECORD.unpack
        baseline_done = self._baseline_done
        counts: Counter[tuple[str, str]] = Counter()
        oldest: dict[str, float] = {}
        candidates: list[StuckJob] = []
        upserts: list[tuple[str, float, float, int, str, int]] = []
        active = _ActiveJobs()
        waiting: dict[str, tuple[str, str]] = {}
        failed: list[tuple[str, str]] = []
        state_index, terminal_states = self._state_index.index, TERMINAL_STATES
        # pending, importing and the unknown names that do not look final
        active_states = {name for name in self._state_index.names if is_active(name)}
        for job_id, collection, state, progress in records:
            if progress < 0 or progress > 127:
                progress = _clamp(progress)
            index = state_index.get(state)
            if index is None:       # a new name, or past MAX_STATE_NAMES: OTHER_STATE
                index = self._state_index(state)
                state = self._state_index.names[index]
                if is_active(state):
                    active_states.add(state)
            previous = jobs.get(job_id)
            terminal = state in terminal_states
            newly_terminal = False
            if previous is None:
                first_seen = since = now
                flags = _COUNTED if terminal else 0
                if terminal and baseline_done:
                    self._transitions[(collection, state)] += 1
                    newly_terminal = True
                changed = True
            else:
                first_seen, since, old_progress, old_index, flags = unpack(previous)
                if progress < 0:      # v1 lists none: the last described progress stands
                    progress = old_progress
                changed = progress != old_progress or index != old_index
                if changed:
                    since = now
                if terminal and not flags & _COUNTED:
                    flags, changed, newly_terminal = flags | _COUNTED, True, True
                    self._transitions[(collection, state)] += 1
            if newly_terminal:
                if state == "failed":
                    reason = listed_reasons.get(job_id, "")
                    known = details.get(job_id)
                    if known is None:
                        known = details[job_id] = _Details()
                    known.failed_at, known.reason = now, reason or known.reason
                    self._dirty.add(job_id)
                    if not reason and describing:
                        flags |= _DESCRIBE
                elif rows_on_completion:
                    flags |= _DESCRIBE
            if changed:
                jobs[job_id] = pack(first_seen, since, progress, index, flags)
                upserts.append((job_id, first_seen, since, progress, state, flags))
            counts[(collection, state)] += 1
            if flags & _DESCRIBE:
                waiting[job_id] = (collection, state)
            if state in active_states:
                active.add(job_id, collection, state, first_seen, since)
                if first_seen < oldest.get(collection, now + 1):
                    oldest[collection] = first_seen
                if now - first_seen > stuck_after:
                    candidates.append(StuckJob(collection, job_id, state, "age", first_seen))
                elif (stall_after > 0 and progress >= 0 and state == "importing"
                      and now - since > stall_after):
                    candidates.append(StuckJob(collection, job_id, state, "stalled",
                                               first_seen))
            elif job_id in details:
                known = details[job_id]
                if state == "failed" and known.failed_at \
                        and now - known.failed_at <= failed_window:
                    failed.append((job_id, collection))
                elif not flags & _DESCRIBE:    # nothing left to show or to learn
                    del details[job_id]
        # Every listed id is in jobs now, so equal sizes mean nobody left.
        deletes = [] if len(jobs) == len(records) else \
            [job_id for job_id in jobs if job_id not in records]
        for job_id in deletes:
            del jobs[job_id]
            details.pop(job_id, None)
            self._dirty.discard(job_id)
        self._waiting, self._failed = waiting, failed
        self._follow_active(active, now)
        del active
        self._persist(upserts, deletes, baseline=not baseline_done)
        self._baseline_done = True

        collections = {collection for collection, _ in counts}
        # A collection new to the listing shows its counters at 0 for this one listing
        # and counts from the next: Prometheus' increase() takes a series' first sample
        # as its start, so a job failing in its collection's first listing (a first
        # import with the wrong schema) would otherwise never show as an increase.
        # In this process's first listing every collection is new to it: one created
        # while the exporter was down is new to Prometheus too, and for the others a
        # 0 after the restart is a reset, from which the next listing counts in full.
        self._fresh = collections - self._collections
        self._collections = collections
        # A collection that left the listing leaves /metrics, counters included (a
        # counter that comes back starts again from 0, which Prometheus reads as a
        # reset), so series and memory stay flat under collection churn.
        for key in [k for k in self._transitions if k[0] not in collections]:
            del self._transitions[key]
        for collection in [c for c in self._rows_imported if c not in collections]:
            del self._rows_imported[collection]
        for collection in collections:
            for state in CANONICAL_STATES:
                counts.setdefault((collection, state), 0)
        stuck = dict.fromkeys(sorted(collections), 0)
        for job in candidates:
            stuck[job.collection] += 1
        candidates.sort(key=lambda job: (job.first_seen, job.job_id))
        if len(candidates) > max_stuck_series and not self._cap_logged:
            self._cap_logged = True
            self._log.warning("more stuck jobs than max_stuck_job_series; the rest are "
                              "counted in zilliz_import_jobs_stuck only",
                              extra={"fields": {"stuck": len(candidates),
                                                "max_stuck_job_series": max_stuck_series}})
        transitions = {key: 0 if key[0] in self._fresh else n
                       for key, n in self._transitions.items()}
        for collection in collections:
            for state in ("completed", "failed"):
                transitions.setdefault((collection, state), 0)
        # Sorted once here, so every scrape renders them in order without sorting.
        return JobSummary(counts=dict(sorted(counts.items())), stuck=stuck,
                          oldest_active=oldest,
                          stuck_jobs=tuple(candidates[:max_stuck_series]),
                          transitions=dict(sorted(transitions.items())))

    def _is_active(self, job_id: str) -> bool:
        return job_id in self._jobs and is_active(self._state_of(job_id))

    def _follow_active(self, active: _ActiveJobs, now: float) -> None:
        """From the listing's active jobs, keep only the few that matter next: the
        oldest (behind the per-job series, whose listed progress feeds the ETA) and
        the next to describe (importing before pending, least recently described
        first). Drop details no series or wait needs any more.

        v1 jobs are described every time (the listing has no progress); a v2 job is
        described for its rows, so only while they are shown (it is among the oldest
        max_job_series), and only once its listed progress or state moved since its
        last successful describe (its rows cannot have moved otherwise).
        """
        rules, details, described = self._rules, self._details, self._described
        ids, first_seen, since, states = active.ids, active.first_seen, active.since, \
            active.states
        for job_id in [j for j in described if not self._is_active(j)]:
            del described[job_id]
        oldest = heapq.nsmallest(rules.max_job_series, range(len(ids)),
                                 key=lambda i: (first_seen[i], ids[i]))
        shown = [(ids[i], active.collections[i], states[i], first_seen[i]) for i in oldest]
        shown_ids = {job[0] for job in shown}
        for job_id in [j for j, known in details.items() if j not in shown_ids
                       and not known.failed_at and j not in self._waiting]:
            del details[job_id]
        candidates: Iterable[int] = range(len(ids))
        if rules.api == "v2":     # only shown rows, and only those that may have moved
            candidates = [i for i in oldest if (known := details.get(ids[i])) is None
                          or known.described_at < since[i] + 1]
        self._next_active = [ids[i] for i in heapq.nsmallest(
            rules.max_describes, candidates,
            key=lambda i: (states[i] != "importing", described.get(ids[i], 0.0), ids[i]))]
        if rules.api == "v2":
            for job_id, _, state, _ in shown:
                progress = _RECORD.unpack(self._jobs[job_id])[2]
                if state == "importing" and progress >= 0:
                    known = details.get(job_id)
                    if known is None:
                        known = details[job_id] = _Details()
                    known.observe_percent(now, progress)
        self._shown = shown

    # ---- job details -----------------------------------------------------------------

    def describe_plan(self) -> list[str]:
        """The job ids to describe after the last listing, in the contract's order and
        within ``max_describes``: newly failed without a reason, newly completed
        (v2), then active jobs, importing before pending, least recently described
        first. Only ids of the last listing are ever planned."""
        with self._lock:
            budget = self._rules.max_describes
            if budget <= 0:
                return []
            waiting = sorted(self._waiting.items())
            plan = [job_id for job_id, (_, state) in waiting if state == "failed"]
            plan += [job_id for job_id, (_, state) in waiting if state != "failed"]
            return (plan + self._next_active)[:budget]

    def record_details(self, job_id: str, answer: JobDetails | None, *,
                       final: bool = False) -> None:
        """Fold in one describe: its answer, or None when it failed. A failure that
        will not change on a retry (``final``) ends a waiting job's wait."""
        with self._lock:
            packed = self._jobs.get(job_id)
            if packed is None:          # left the listing meanwhile
                return
            now = self._clock()
            self._described[job_id] = now
            waiting = self._waiting.get(job_id)
            known = self._details.get(job_id)
            if answer is None:          # keeps what it knew; a failure waits no more
                if waiting is not None:
                    if known is None:
                        known = self._details[job_id] = _Details()
                    known.failed_describe = True
                    if final:
                        self._repack(job_id, end_wait=True)
                return
            # Persisted when what it says changed (a describe that only confirms
            # writes nothing), and on a job's first describe, for its time.
            before = known.facts() if known is not None and known.described_at else None
            if self._rules.api == "v1" and answer.progress >= 0:
                self._repack(job_id, progress=answer.progress, now=int(now))
            if known is None:
                if waiting is None and not any(job[0] == job_id for job in self._shown):
                    return              # nothing of it is shown: nothing to keep
                known = self._details[job_id] = _Details()
            # Changes are timed in whole seconds: a describe in the second of the
            # change it answers counts as after it, so it is not repeated for nothing.
            known.failed_describe = False
            known.described_at = max(now, _RECORD.unpack(packed)[1] + 1)
            if answer.total_rows >= 0:
                known.imported_rows, known.total_rows = answer.imported_rows, answer.total_rows
            if answer.reason:
                known.reason = answer.reason
            if waiting is None and self._state_of(job_id) == "importing":
                known.observe_rows(now)
                if self._rules.api == "v1" and answer.progress >= 0:
                    known.observe_percent(now, answer.progress)
            if known.facts() != before:
                self._dirty.add(job_id)
            if waiting is not None:
                collection, state = waiting
                if state == "completed" and known.total_rows >= 0:
                    self._rows_imported[collection] += known.total_rows
                self._repack(job_id, end_wait=True)

    def _state_of(self, job_id: str) -> str:
        index: int = _RECORD.unpack(self._jobs[job_id])[3]
        return self._state_index.names[index]

    def _repack(self, job_id: str, *, end_wait: bool = False, progress: int = -1,
                now: int = 0) -> None:
        """Change one job's record outside a listing: end its wait for a describe, or
        take a described progress (v1), persisted with the next write."""
        first_seen, since, old_progress, index, flags = _RECORD.unpack(self._jobs[job_id])
        if end_wait:
            flags &= ~_DESCRIBE
            del self._waiting[job_id]
        elif progress != old_progress:
            since, old_progress = now, _clamp(progress)
        else:
            return
        self._jobs[job_id] = _RECORD.pack(first_seen, since, old_progress, index, flags)
        self._changed.append((job_id, first_seen, since, old_progress,
                              self._state_index.names[index], flags))

    def _persist(self, upserts: list[tuple[str, float, float, int, str, int]],
                 deletes: list[str], baseline: bool) -> None:
        """Write changes to the state file; after a failed write, everything."""
        store = self._store
        if store is None:
            return
        try:
            if self._resync:
                names = self._state_index.names
                rows = [(job_id, first_seen, since, progress, names[index], flags)
                        for job_id, (first_seen, since, progress, index, flags)
                        in ((j, _RECORD.unpack(packed)) for j, packed in self._jobs.items())]
                self._dirty.clear()
                store.replace(self.cluster, rows,
                              [known.row(j) for j, known in self._details.items()])
                self._resync = False
            else:
                store.write(self.cluster, upserts, deletes, baseline=baseline,
                            details=self._take_dirty())
        except sqlite3.Error:
            self._resync = True
            raise

    def _take_dirty(self) -> list[DetailRow]:
        rows = [self._details[j].row(j) for j in sorted(self._dirty) if j in self._details]
        self._dirty.clear()
        return rows

    def refresh(self, summary: JobSummary) -> JobSummary:
        """``summary`` with the details learnt since it was made; persists them."""
        with self._lock:
            changed, self._changed = self._changed, []
            self._persist(changed, [], baseline=False)
            return self._with_details(summary)

    def _with_details(self, summary: JobSummary) -> JobSummary:
        rules, details, now = self._rules, self._details, self._clock()
        running = []
        for job_id, collection, state, first_seen in self._shown:
            known = details.get(job_id)
            percent = _RECORD.unpack(self._jobs[job_id])[2]
            running.append(RunningJob(
                collection, job_id, state, first_seen,
                None if percent < 0 else min(percent, 100) / 100,
                -1 if known is None else known.imported_rows,
                -1 if known is None else known.total_rows,
                known.eta(now) if known is not None and state == "importing" else None))
        failed = []
        describing = rules.max_describes > 0
        for job_id, collection in self._failed:
            known = details[job_id]
            if now - known.failed_at > rules.failed_window:
                continue
            settled = known.reason or known.failed_describe or not describing \
                or job_id not in self._waiting
            if settled:
                failed.append(FailedJob(collection, job_id, known.reason or "unknown",
                                        known.failed_at))
        failed.sort(key=lambda job: (-job.failed_at, job.job_id))
        rows = {collection: 0 if collection in self._fresh else n
                for collection, n in self._rows_imported.items()}
        for collection in self._collections:
            rows.setdefault(collection, 0)
        return replace(summary, running=tuple(running),
                       failed=tuple(failed[:rules.max_failed_series]),
                       rows_imported=dict(sorted(rows.items())))
