"""The state file: every cluster's job history in SQLite, so a restart neither resets
ages nor counts or describes anything twice.

One file holds every cluster (one writer: a second exporter on the same file is
refused). Each listing writes, in one transaction, only the rows that changed,
appeared or left; a listing that changed nothing writes nothing. A file from an
earlier release is migrated in place; one that cannot be read is moved aside.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from typing import Callable

log = logging.getLogger("exporter.store")

SCHEMA_VERSION = 2   # 2 added the details table; a version 1 file is migrated in place

_DETAILS_TABLE = """
    CREATE TABLE details (
        cluster TEXT NOT NULL, job_id TEXT NOT NULL,
        imported_rows INTEGER NOT NULL, total_rows INTEGER NOT NULL, reason TEXT NOT NULL,
        failed_at REAL NOT NULL, described_at REAL NOT NULL,
        PRIMARY KEY (cluster, job_id)) WITHOUT ROWID;"""

# job_id, first_seen, progress_since, progress, state, flags
JobRow = tuple[str, float, float, int, str, int]
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

    def load(self, cluster: str) -> tuple[bool, list[JobRow],
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

    def write(self, cluster: str, upserts: list[JobRow],
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

    def replace(self, cluster: str, rows: list[JobRow],
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
              everything: Callable[[], tuple[list[JobRow], list[DetailRow]]]) -> None:
        """Write ``upserts``, ``deletes`` and ``details()``, or ``everything()`` after a
        failed write; a failure raises and marks the next write to write everything."""
        try:
            if self._resync:
                self._store.replace(self._cluster, *everything())
                self._resync = False
            else:
                self._store.write(self._cluster, upserts, deletes, baseline=baseline,
                                  details=details())
        except sqlite3.Error:
            self._resync = True
            raise
