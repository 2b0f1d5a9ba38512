"""Job history: first-seen times, progress, transitions, and their persistence.

The list API gives no creation time, so a job's age is measured from when this
exporter first saw it. Each cluster's ``JobHistory`` remembers every listed job
in one packed 12-byte record (memory stays under 300 bytes a job at 100,000
jobs), forgets jobs that leave the listing, and turns each published listing
into an immutable ``JobSummary`` for the collector.

With a state file, ``HistoryStore`` keeps the same records in SQLite (WAL mode)
and each listing writes, in one transaction, only the rows that changed,
appeared or left; a listing that changed nothing writes nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol

from exporter.client import (
    ACTIVE_STATES, CANONICAL_STATES, TERMINAL_STATES, JobRecord, NameIndex,
)

log = logging.getLogger("exporter.history")

SCHEMA_VERSION = 1

# first_seen, progress_since (whole unix seconds), progress (-1: none), state index,
# counted flag: 12 bytes, so each job's record is a 48-byte object, not 64.
_RECORD = struct.Struct("<IIbHB")


@dataclass(frozen=True)
class StuckJob:
    collection: str
    job_id: str
    state: str
    reason: str          # "age" or "stalled"
    first_seen: float


@dataclass(frozen=True)
class JobSummary:
    """What one published listing says, ready to render; never mutated."""

    # The mappings keyed by collection are sorted by key, the order they render in.
    counts: Mapping[tuple[str, str], int]          # (collection, state) -> jobs
    stuck: Mapping[str, int]                       # collection -> stuck jobs
    oldest_active: Mapping[str, float]             # collection -> first_seen; absent: none
    stuck_jobs: tuple[StuckJob, ...]               # oldest first, capped
    transitions: Mapping[tuple[str, str], int]     # (collection, state) -> cumulative

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(CANONICAL_STATES, 0)
        for (_, state), n in self.counts.items():
            out[state] = out.get(state, 0) + n
        return out


class JobListing(Protocol):
    """A complete listing: its records, and membership by job id."""

    def __iter__(self) -> Iterator[JobRecord]: ...

    def __len__(self) -> int: ...

    def __contains__(self, job_id: object) -> bool: ...


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
                if row is None or row[0] != SCHEMA_VERSION:
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
                    COMMIT;""")
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    def load(self, cluster: str) -> tuple[bool, list[tuple[str, float, float, int, str, int]]]:
        """(baseline listing done, job rows) for one cluster."""
        with self._lock:
            baseline = self._conn.execute(
                "SELECT 1 FROM clusters WHERE cluster=?", (cluster,)).fetchone() is not None
            rows = self._conn.execute(
                "SELECT job_id, first_seen, progress_since, progress, state, counted "
                "FROM jobs WHERE cluster=?", (cluster,)).fetchall()
        return baseline, rows

    def write(self, cluster: str, upserts: list[tuple[str, float, float, int, str, int]],
              deletes: list[str], baseline: bool) -> None:
        """Apply one listing's changes in one transaction; nothing to do writes nothing."""
        if not upserts and not deletes and not baseline:
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
                conn.executemany("DELETE FROM jobs WHERE cluster=? AND job_id=?",
                                 [(cluster, job_id) for job_id in deletes])
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


class JobHistory:
    """Everything remembered about one cluster's jobs."""

    def __init__(self, cluster: str, store: HistoryStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self._store = store
        self._clock = clock
        self._state_index = NameIndex(CANONICAL_STATES)
        self._jobs: dict[str, bytes] = {}
        self._transitions: Counter[tuple[str, str]] = Counter()
        self._baseline_done = False
        self._cap_logged = False
        self._lock = threading.Lock()
        if store is not None:
            self._baseline_done, rows = store.load(cluster)
            for job_id, first_seen, since, progress, state, counted in rows:
                self._jobs[job_id] = _RECORD.pack(int(first_seen), int(since),
                                                  _clamp(progress), self._state_index(state),
                                                  counted)

    def __len__(self) -> int:
        return len(self._jobs)

    def first_seen(self, job_id: str) -> float | None:
        packed = self._jobs.get(job_id)
        return None if packed is None else _RECORD.unpack(packed)[0]

    def apply(self, records: JobListing, *, stuck_after: float, stall_after: float,
              max_stuck_series: int) -> JobSummary:
        """Fold one complete listing into the history and summarise it."""
        with self._lock:
            return self._apply(records, stuck_after, stall_after, max_stuck_series)

    def _apply(self, records: JobListing, stuck_after: float, stall_after: float,
               max_stuck_series: int) -> JobSummary:
        now = int(self._clock())
        jobs = self._jobs
        pack, unpack = _RECORD.pack, _RECORD.unpack
        baseline_done = self._baseline_done
        counts: Counter[tuple[str, str]] = Counter()
        oldest: dict[str, float] = {}
        candidates: list[StuckJob] = []
        upserts: list[tuple[str, float, float, int, str, int]] = []
        state_index, terminal_states, active_states = self._state_index.index, \
            TERMINAL_STATES, ACTIVE_STATES
        for job_id, collection, state, progress in records:
            if progress < 0 or progress > 127:
                progress = _clamp(progress)
            index = state_index.get(state)
            if index is None:
                index = self._state_index(state)
            previous = jobs.get(job_id)
            terminal = state in terminal_states
            if previous is None:
                first_seen = since = now
                counted = 1 if terminal else 0
                if terminal and baseline_done:
                    self._transitions[(collection, state)] += 1
                changed = True
            else:
                first_seen, since, old_progress, old_index, counted = unpack(previous)
                changed = progress != old_progress or index != old_index
                if changed:
                    since = now
                if terminal and not counted:
                    counted, changed = 1, True
                    self._transitions[(collection, state)] += 1
            if changed:
                jobs[job_id] = pack(first_seen, since, progress, index, counted)
                upserts.append((job_id, first_seen, since, progress, state, counted))
            counts[(collection, state)] += 1
            if state in active_states:
                if first_seen < oldest.get(collection, now + 1):
                    oldest[collection] = first_seen
                if now - first_seen > stuck_after:
                    candidates.append(StuckJob(collection, job_id, state, "age", first_seen))
                elif (stall_after > 0 and progress >= 0 and state == "importing"
                      and now - since > stall_after):
                    candidates.append(StuckJob(collection, job_id, state, "stalled",
                                               first_seen))
        # Every listed id is in jobs now, so equal sizes mean nobody left.
        deletes = [] if len(jobs) == len(records) else \
            [job_id for job_id in jobs if job_id not in records]
        for job_id in deletes:
            del jobs[job_id]
        if self._store is not None:
            self._store.write(self.cluster, upserts, deletes, baseline=not baseline_done)
        self._baseline_done = True

        collections = {collection for collection, _ in counts}
        for collection in collections:
            for state in CANONICAL_STATES:
                counts.setdefault((collection, state), 0)
        stuck = dict.fromkeys(sorted(collections), 0)
        for job in candidates:
            stuck[job.collection] += 1
        candidates.sort(key=lambda job: (job.first_seen, job.job_id))
        if len(candidates) > max_stuck_series and not self._cap_logged:
            self._cap_logged = True
            log.warning("more stuck jobs than max_stuck_job_series; the rest are counted "
                        "in zilliz_import_jobs_stuck only",
                        extra={"fields": {"cluster_name": self.cluster,
                                          "stuck": len(candidates),
                                          "max_stuck_job_series": max_stuck_series}})
        transitions = dict(self._transitions)
        for collection in collections:
            for state in ("completed", "failed"):
                transitions.setdefault((collection, state), 0)
        # Sorted once here, so every scrape renders them in order without sorting.
        return JobSummary(counts=dict(sorted(counts.items())), stuck=stuck,
                          oldest_active=oldest,
                          stuck_jobs=tuple(candidates[:max_stuck_series]),
                          transitions=dict(sorted(transitions.items())))
