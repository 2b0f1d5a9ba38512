"""Job history: first-seen times, progress and transitions of one cluster's jobs.

The list API gives no creation time, so a job's age is measured from when this
exporter first saw it. Each cluster's ``JobHistory`` remembers every listed job in
one packed 12-byte record (memory stays under 300 bytes a job at 100,000 jobs),
forgets jobs that leave the listing, and turns each published listing into an
immutable ``JobSummary`` for the collector.

Small collaborators keep the rest: a ``DetailsBook`` (exporter.details) what
describes told about the few jobs that need details, a ``Tally`` (exporter.tally)
the counters, and a ``DurationBook`` (exporter.durations) how long jobs took and
waited. The records' flags say which jobs have a known start and which were timed,
so none is timed twice. With a state file, a ``HistoryStore`` (exporter.store) keeps
the records and details in SQLite; each listing writes only what changed.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Callable, Iterable, Iterator, Mapping, Protocol

from exporter.answers import JobDetails
from exporter.details import ActiveJobs, DetailRules, Details, DetailsBook
from exporter.durations import DurationBook, TimingRules
from exporter.jobs import (
    CANONICAL_STATES, TERMINAL_STATES, JobRecord, is_active, state_index,
)
from exporter.logs import bind
from exporter.store import ClusterWriter, HistoryStore, JobRow, Saved
from exporter.summary import JobSummary, listing_summary
from exporter.tally import Tally

log = logging.getLogger("exporter.history")

# first_seen, progress_since (whole unix seconds: when its progress or state last
# changed; a terminal job's, when it was first seen terminal), progress (-1: none),
# state index, flags: 12 bytes, so each job's record is a 48-byte object, not 64.
_RECORD = struct.Struct("<IIbHB")
_COUNTED = 1     # its transition to completed/failed has been counted (and timed)
_DESCRIBE = 2    # waits for one describe: newly failed without a reason, or newly
                 # completed (v2, for its rows); timed when it comes or will not
_START_KNOWN = 4    # first seen soon after a listing without it: first_seen is its start
_WAITED = 8      # seen past pending: its time pending was observed, or cannot be
# state_index() numbers the canonical states in CANONICAL_STATES' order.
_PENDING = CANONICAL_STATES.index("pending")
_PAST_PENDING = frozenset(CANONICAL_STATES.index(s) for s in ("importing", "completed",
                                                               "failed"))


class JobListing(Protocol):
    """A complete listing: its records, membership by job id, and the failure texts
    its records carried, by job id."""

    @property
    def reasons(self) -> Mapping[str, str]: ...

    def __iter__(self) -> Iterator[JobRecord]: ...

    def __len__(self) -> int: ...

    def __contains__(self, job_id: object) -> bool: ...


def _clamp(progress: int) -> int:
    """Progress as one signed byte: -1 for none, else 0..100 (the API's percent)."""
    return -1 if progress < 0 else min(progress, 127)


class JobRecords:
    """One cluster's jobs, each one packed record (``_RECORD``) by job id; the history's
    listing loop reads and writes ``jobs`` directly, everything else goes through here."""

    def __init__(self, rows: Iterable[JobRow] = ()) -> None:
        self.jobs: dict[str, bytes] = {}
        self.states = state_index()
        self.changed: list[JobRow] = []    # rows changed outside a listing, to persist
        for job_id, first_seen, since, progress, state, flags in rows:
            self.jobs[job_id] = _RECORD.pack(int(first_seen), int(since), _clamp(progress),
                                             self.states(state), flags)

    def __len__(self) -> int:
        return len(self.jobs)

    def first_seen(self, job_id: str) -> float | None:
        packed = self.jobs.get(job_id)
        return None if packed is None else _RECORD.unpack(packed)[0]

    def percent_of(self, job_id: str) -> int:
        progress: int = _RECORD.unpack(self.jobs[job_id])[2]
        return progress

    def state_of(self, job_id: str) -> str:
        index: int = _RECORD.unpack(self.jobs[job_id])[3]
        return self.states.names[index]

    def is_active(self, job_id: str) -> bool:
        return job_id in self.jobs and is_active(self.state_of(job_id))

    def repack(self, job_id: str, *, end_wait: bool = False, progress: int = -1,
               now: int = 0) -> None:
        """Change one job's record outside a listing: end its wait for a describe, or
        take a described progress (v1), persisted with the next write."""
        first_seen, since, old_progress, index, flags = _RECORD.unpack(self.jobs[job_id])
        if end_wait:
            flags &= ~_DESCRIBE
        elif progress != old_progress:
            since, old_progress = now, _clamp(progress)
        else:
            return
        self.jobs[job_id] = _RECORD.pack(first_seen, since, old_progress, index, flags)
        self.changed.append((job_id, first_seen, since, old_progress,
                             self.states.names[index], flags))

    def take_changed(self) -> list[JobRow]:
        changed, self.changed = self.changed, []
        return changed

    def rows(self) -> list[JobRow]:
        """Every job as the state file stores it."""
        names = self.states.names
        return [(job_id, first_seen, since, progress, names[index], flags)
                for job_id, (first_seen, since, progress, index, flags)
                in ((j, _RECORD.unpack(packed)) for j, packed in self.jobs.items())]


class JobHistory:
    """Everything remembered about one cluster's jobs."""

    def __init__(self, cluster: str, store: HistoryStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self._log = bind(log, cluster_name=cluster)
        self._clock = clock
        saved = Saved(False, [], [], None) if store is None else store.load(cluster)
        self._baseline_done = saved.baseline
        self._records = JobRecords(saved.jobs)
        self._book = DetailsBook(saved.details)
        self._tally = Tally()
        self._timer = DurationBook(saved.listed)
        self._writer = None if store is None else ClusterWriter(store, cluster)
        self._cap_logged = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    def first_seen(self, job_id: str) -> float | None:
        return self._records.first_seen(job_id)

    def apply(self, records: JobListing, *, stuck_after: float, stall_after: float,
              max_stuck_series: int, rules: DetailRules = DetailRules(),
              timing: TimingRules = TimingRules(), started: float | None = None
              ) -> JobSummary:
        """Fold one complete listing, which started at ``started`` (by default now),
        into the history and summarise it."""
        with self._lock:
            self._book.rules = rules
            self._timer.configure(timing)
            summary = self._apply(records, stuck_after, stall_after, max_stuck_series,
                                  started)
            return self._with_details(summary)

    def _apply(self, records: JobListing, stuck_after: float, stall_after: float,
               max_stuck_series: int, started: float | None) -> JobSummary:
        clock = self._clock()
        now = int(clock)
        start_known = _START_KNOWN if self._timer.begin(
            clock if started is None else started) else 0
        jobs, book, tally = self._records.jobs, self._book, self._tally
        details, transitions = book.details, tally.transitions
        listed_reasons = records.reasons
        describing = book.rules.max_describes > 0     # 0: job details are off
        pack, unpack = _RECORD.pack, _RECORD.unpack
        baseline_done = self._baseline_done
        counts: Counter[tuple[str, str]] = Counter()
        upserts: list[JobRow] = []
        active = ActiveJobs(now, stuck_after, stall_after)
        waiting: dict[str, tuple[str, str]] = {}
        book.failed = []
        names = self._records.states
        state_index, terminal_states = names.index, TERMINAL_STATES
        # pending, importing and the unknown names that do not look final
        active_states = {name for name in names.names if is_active(name)}
        for job_id, collection, state, progress in records:
            if progress < 0 or progress > 127:
                progress = _clamp(progress)
            index = state_index.get(state)
            if index is None:       # a new name, or past MAX_STATE_NAMES: OTHER_STATE
                index = names(state)
                state = names.names[index]
                if is_active(state):
                    active_states.add(state)
            previous = jobs.get(job_id)
            terminal = state in terminal_states
            newly_terminal = False
            if previous is None:
                first_seen = since = now
                flags = (_COUNTED if terminal else 0) | start_known
                if start_known:         # its series show 0 before its first observation
                    self._timer.track(collection)
                if terminal and baseline_done:
                    transitions[(collection, state)] += 1
                    newly_terminal = True
                changed = True
            else:
                first_seen, since, old_progress, old_index, flags = unpack(previous)
                if progress < 0:      # v1 lists none: the last described progress stands
                    progress = old_progress
                changed = progress != old_progress or index != old_index
                if changed and (index != old_index or not terminal):
                    since = now
                if terminal and not flags & _COUNTED:
                    flags, changed, newly_terminal = flags | _COUNTED, True, True
                    transitions[(collection, state)] += 1
                if old_index == _PENDING and index in _PAST_PENDING and not flags & _WAITED:
                    flags |= _WAITED
                    start = self._start(job_id, flags, first_seen)
                    if start is not None:
                        self._timer.wait(collection, now - start)
            if newly_terminal:
                if book.newly_terminal(job_id, state, now, listed_reasons.get(job_id, "")):
                    flags |= _DESCRIBE           # timed once described
                else:
                    self._timer.finish(job_id, collection, state,
                                       self._start(job_id, flags, first_seen), now)
            if flags & _DESCRIBE:
                if describing:
                    waiting[job_id] = (collection, state)
                else:       # describing turned off meanwhile: timed without it
                    flags, changed = flags & ~_DESCRIBE, True
                    self._time_waiting(job_id, collection, state)
            if changed:
                jobs[job_id] = pack(first_seen, since, progress, index, flags)
                upserts.append((job_id, first_seen, since, progress, state, flags))
            counts[(collection, state)] += 1
            if state in active_states:
                active.add(job_id, collection, state, first_seen, since, progress)
            elif job_id in details:
                book.terminal(job_id, collection, state, now, bool(flags & _DESCRIBE))
        # Every listed id is in jobs now, so equal sizes mean nobody left.
        deletes = [] if len(jobs) == len(records) else \
            [job_id for job_id in jobs if job_id not in records]
        for job_id in deletes:
            if job_id in book.waiting:      # left before its describe: timed without it
                self._time_waiting(job_id, *book.waiting[job_id])
            del jobs[job_id]
            book.forget(job_id)
        book.waiting = waiting
        book.follow(active, now, self._records.is_active, self._records.percent_of)
        oldest, candidates = active.oldest, active.stuck
        del active
        self._timer.end(clock)
        self._persist(upserts, deletes, baseline=not baseline_done)
        self._baseline_done = True
        collections = {collection for collection, _ in counts}
        tally.listed(collections)
        self._timer.listed(collections)
        if len(candidates) > max_stuck_series and not self._cap_logged:
            self._cap_logged = True
            self._log.warning("more stuck jobs than max_stuck_job_series; the rest are "
                              "counted in zilliz_import_jobs_stuck only",
                              extra={"fields": {"stuck": len(candidates),
                                                "max_stuck_job_series": max_stuck_series}})
        return listing_summary(counts, oldest, candidates, collections, max_stuck_series,
                               tally.shown_transitions())

    def _start(self, job_id: str, flags: int, first_seen: float) -> float | None:
        """A job's start: the server's creation time, else its first sighting when that
        was soon after a listing without it, else unknown."""
        known = self._book.details.get(job_id)
        if known is not None and known.created_at:
            return known.created_at
        return first_seen if flags & _START_KNOWN else None

    def _time_waiting(self, job_id: str, collection: str, outcome: str,
                      complete_time: float | None = None) -> None:
        """Time a job that waited for a describe, first seen terminal at its record's
        ``since``."""
        first_seen, since, _, _, flags = _RECORD.unpack(self._records.jobs[job_id])
        self._timer.finish(job_id, collection, outcome,
                           self._start(job_id, flags, first_seen), since, complete_time)

    # ---- job details -----------------------------------------------------------------

    def describe_plan(self) -> list[str]:
        """The job ids to describe after the last listing (see DetailsBook.plan)."""
        with self._lock:
            return self._book.plan()

    def record_details(self, job_id: str, answer: JobDetails | None, *,
                       final: bool = False) -> None:
        """Fold in one describe: its answer, or None when it failed. A failure that
        will not change on a retry (``final``) ends a waiting job's wait."""
        with self._lock:
            packed = self._records.jobs.get(job_id)
            if packed is None:          # left the listing meanwhile
                return
            now = self._clock()
            book = self._book
            if answer is None:          # keeps what it knew; a failure waits no more
                if book.describe_failed(job_id, now) and final:
                    self._end_wait(job_id, None)
                return
            since, _, index = _RECORD.unpack(packed)[1:4]
            state = self._records.states.names[index]
            if book.rules.api == "v1" and answer.progress >= 0 and is_active(state):
                self._records.repack(job_id, progress=answer.progress, now=int(now))
            known = book.record(job_id, answer, now, since, importing=state == "importing")
            if job_id in book.waiting:
                self._end_wait(job_id, known, answer.complete_time)

    def _end_wait(self, job_id: str, known: Details | None,
                  complete_time: float | None = None) -> None:
        """A waiting job's describe came (``known``: what it said) or will not come."""
        collection, state = self._book.waiting.pop(job_id)
        if state == "completed" and known is not None and known.total_rows >= 0:
            self._tally.add_rows(collection, known.total_rows)
        self._time_waiting(job_id, collection, state, complete_time)
        self._records.repack(job_id, end_wait=True)

    def _persist(self, upserts: list[JobRow], deletes: list[str], baseline: bool) -> None:
        """Write changes, with the last listing (it waits for a later write if none)."""
        if self._writer is not None:
            self._writer.write(upserts, deletes, baseline=baseline,
                               details=self._book.take_dirty,
                               everything=lambda: (self._records.rows(), self._book.rows()),
                               listed=self._timer.last_listing)

    def refresh(self, summary: JobSummary) -> JobSummary:
        """``summary`` with the details learnt since it was made; persists them."""
        with self._lock:
            self._persist(self._records.take_changed(), [], baseline=False)
            return self._with_details(summary)

    def flush(self) -> None:
        """Persist what describes changed since the last write: a poller stopped before
        its refresh leaves no timed job untimed on file, to be timed after a restart."""
        with self._lock:
            try:
                self._persist(self._records.take_changed(), [], baseline=False)
            except sqlite3.Error as exc:
                self._log.error("cannot write the state file", extra={"fields": {
                    "error": str(exc)}})

    def _with_details(self, summary: JobSummary) -> JobSummary:
        running, failed = self._book.summarise(self._clock(), self._records.percent_of)
        durations, waits, finished = self._timer.summary()
        return replace(summary, running=running, failed=failed,
                       rows_imported=self._tally.shown_rows(), durations=durations,
                       waits=waits, finished=finished)
