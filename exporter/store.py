"""The state file: every cluster's job history in SQLite, so a restart neither resets
ages nor counts, describes or times anything twice.

One file holds every cluster (one writer: a second exporter on the same file is
refused). Each listing writes, in one transaction, only the rows that changed,
appeared or left; a listing that changed nothing writes nothing. A file from an
earlier release is migrated in place; one that cannot be read is moved aside.

Each cluster's last successful listing (when it started, how long it took) decides
whether a job new to the next listing has a known start (exporter.durations). It is
written with the listing's changes when there are any, and at close otherwise, so an
idle cluster still writes nothing: a listing that held a new job always wrote, so the
listing on file is never older than the last one that held a job the file lacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from typing import Callable, Iterator, NamedTuple

log = logging.getLogger("exporter.store")

# The first release's schema; every later version is a migration from it, so a new
# file and a migrated one are made by the same statements.
_SCHEMA_1 = """
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    INSERT INTO schema_version VALUES (1);
    CREATE TABLE clusters (cluster TEXT PRIMARY KEY) WITHOUT ROWID;
    CREATE TABLE jobs (
        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
        first_seen REAL NOT NULL, progress_since REAL NOT NULL,
        progress INTEGER NOT NULL, state TEXT NOT NULL,
        counted INTEGER NOT NULL,
        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;"""
# version -> the statements that take a file from it to the next. Job rows stay as they
# are: their ``counted`` column holds the record's flags, and the earlier releases'
# 0/1 are valid flags (no job of theirs has a known start: none is ever timed).
_MIGRATIONS = {
    1: """
    CREATE TABLE details (
        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
        imported_rows INTEGER NOT NULL, total_rows INTEGER NOT NULL, reason TEXT NOT NULL,
        failed_at REAL NOT NULL, described_at REAL NOT NULL,
        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;""",
    2: """
    ALTER TABLE details ADD COLUMN created_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE clusters ADD COLUMN listed_at REAL NOT NULL DEFAULT 0;
    ALTER TABLE clusters ADD COLUMN listing_seconds REAL NOT NULL DEFAULT 0;""",
}
SCHEMA_VERSION = max(_MIGRATIONS) + 1   # 2 added details, 3 the times durations need

# job_id, first_seen, progress_since, progress, state, flags
JobRow = tuple[str, float, float, int, str, int]
# job_id, imported_rows, total_rows, reason, failed_at, described_at, created_at
DetailRow = tuple[str, int, int, str, float, float, float]


class Listed(NamedTuple):
    """A successful listing: when it started (the history's clock) and how long it took."""

    at: float
    seconds: float


class Saved(NamedTuple):
    """What the file holds for one cluster."""

    baseline: bool               # its first listing has been folded in
    jobs: list[JobRow]
    details: list[DetailRow]
    listed: Listed | None        # its last successful listing, if known


class StateFileInUse(Exception):
    """Another exporter holds the state file."""


class HistoryStore:
    """SQLite persistence for every cluster's job history (one file, one writer)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._closed = False
        self._unwritten: dict[str, Listed] = {}   # listings to write at close
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
                if row is None or not 1 <= row[0] <= SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"unknown schema version {row}")
                if row[0] < SCHEMA_VERSION:
                    self._migrate(conn, row[0])
                    log.info("state file migrated", extra={"fields": {
                        "path": self.path, "from_version": row[0],
                        "to_version": SCHEMA_VERSION}})
                check = conn.execute("PRAGMA quick_check").fetchone()
                if check is None or check[0] != "ok":
                    raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            elif tables:
                raise sqlite3.DatabaseError("not an exporter state file")
            else:
                self._migrate(conn, 0)
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection, version: int) -> None:
        """From ``version`` (0: an empty file) to SCHEMA_VERSION, in one transaction."""
        steps = [_SCHEMA_1] if version == 0 else []
        steps += [_MIGRATIONS[v] for v in range(max(version, 1), SCHEMA_VERSION)]
        conn.executescript("BEGIN;" + "".join(steps) +
                           f"UPDATE schema_version SET version = {SCHEMA_VERSION}; COMMIT;")

    def load(self, cluster: str) -> Saved:
        """What the file holds for one cluster."""
        with self._lock:
            found = self._conn.execute(
                "SELECT listed_at, listing_seconds FROM clusters WHERE cluster=?",
                (cluster,)).fetchone()
            rows = self._conn.execute(
                "SELECT job_id, first_seen, progress_since, progress, state, counted "
                "FROM jobs WHERE cluster=?", (cluster,)).fetchall()
            details = self._conn.execute(
                "SELECT job_id, imported_rows, total_rows, reason, failed_at, described_at, "
                "created_at FROM details WHERE cluster=?", (cluster,)).fetchall()
        listed = Listed(*found) if found is not None and found[0] else None
        return Saved(found is not None, rows, details, listed)

    def write(self, cluster: str, upserts: list[JobRow],
              deletes: list[str], baseline: bool,
              details: list[DetailRow] | None = None, listed: Listed | None = None) -> None:
        """Apply one listing's changes in one transaction, with ``listed`` (the listing);
        nothing to do writes nothing (the listing waits for the next write or close)."""
        with self._lock:
            if listed is not None:
                self._unwritten[cluster] = listed
            if not upserts and not deletes and not baseline and not details:
                return
            if self._closed:   # shutting down: the poller's listing is abandoned
                return
            with self._transaction() as conn:
                if baseline:
                    conn.execute("INSERT OR IGNORE INTO clusters (cluster) VALUES (?)",
                                 (cluster,))
                conn.executemany(
                    "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(cluster, *row) for row in upserts])
                if details:
                    conn.executemany(
                        "INSERT OR REPLACE INTO details VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [(cluster, *row) for row in details])
                gone = [(cluster, job_id) for job_id in deletes]
                conn.executemany("DELETE FROM jobs WHERE cluster=? AND job_id=?", gone)
                conn.executemany("DELETE FROM details WHERE cluster=? AND job_id=?", gone)
                self._write_listed(cluster)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction, under the lock the caller holds: committed, or rolled back
        on any error."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write_listed(self, cluster: str) -> None:
        listed = self._unwritten.pop(cluster, None)
        if listed is not None:
            self._conn.execute("UPDATE clusters SET listed_at=?, listing_seconds=? "
                               "WHERE cluster=?", (*listed, cluster))

    def replace(self, cluster: str, rows: list[JobRow], details: list[DetailRow],
                listed: Listed | None = None) -> None:
        """Write a cluster's whole history, in place of what the file holds for it."""
        with self._lock:
            if listed is not None:
                self._unwritten[cluster] = listed
            if self._closed:
                return
            with self._transaction() as conn:
                conn.execute("INSERT OR IGNORE INTO clusters (cluster) VALUES (?)", (cluster,))
                conn.execute("DELETE FROM jobs WHERE cluster=?", (cluster,))
                conn.execute("DELETE FROM details WHERE cluster=?", (cluster,))
                conn.executemany("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [(cluster, *row) for row in rows])
                conn.executemany("INSERT INTO details VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 [(cluster, *row) for row in details])
                self._write_listed(cluster)

    def forget(self, cluster: str) -> None:
        """Drop a cluster that left the configuration."""
        with self._lock:
            self._unwritten.pop(cluster, None)
            if self._closed:
                return
            with self._transaction() as conn:
                for table in ("jobs", "details", "clusters"):
                    conn.execute(f"DELETE FROM {table} WHERE cluster=?", (cluster,))

    def close(self) -> None:
        """Write the listings not written yet, then close (a restart soon after then
        still knows the starts of jobs created meanwhile)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with self._transaction():
                    for cluster in list(self._unwritten):
                        self._write_listed(cluster)
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()
                os.close(self._lock_fd)


class ClusterWriter:
    """One cluster's writes to the store: each listing's changes or, after a write that
    failed (disk full...), the cluster's whole history, since memory moved on without
    the file and the changes it missed are lost otherwise."""

    def __init__(self, store: HistoryStore, cluster: str) -> None:
        self._store = store
        self._cluster = cluster
        self._resync = False

    def write(self, upserts: list[JobRow], deletes: list[str], *, baseline: bool,
              details: Callable[[], list[DetailRow]],
              everything: Callable[[], tuple[list[JobRow], list[DetailRow]]],
              listed: Listed | None = None) -> None:
        """Write ``upserts``, ``deletes`` and ``details()``, or ``everything()`` after a
        failed write; a failure raises and marks the next write to write everything."""
        try:
            if self._resync:
                self._store.replace(self._cluster, *everything(), listed=listed)
                self._resync = False
            else:
                self._store.write(self._cluster, upserts, deletes, baseline=baseline,
                                  details=details(), listed=listed)
        except sqlite3.Error:
            self._resync = True
            raise
