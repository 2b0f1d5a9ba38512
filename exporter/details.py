"""Job details: what "describe one job" (and a listing's failure text) told about a
cluster's jobs, and which jobs to describe next.

Details are kept only for the few jobs that need them: the active jobs behind the
per-job series (progress, rows, ETA), jobs seen failing (the failure reason, for
``failed_job_window``) and jobs waiting for a describe. After each listing
``DetailsBook.follow`` picks the active jobs to show and to describe next; ``plan``
says which jobs the poller should describe, ``record`` folds an answer in, and
``summarise`` turns what is known into the summary's running and failed jobs.

The book never reads the history's job records: the history hands it what it needs
(a job's state, when it last moved, its listed progress).
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass
from typing import Callable, Iterable

from exporter.answers import JobDetails
from exporter.store import DetailRow
from exporter.summary import FailedJob, RunningJob, StuckJob


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


@dataclass(slots=True)
class Track:
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
class Details:
    """What describes (and a listing's failure text) told about one job.

    A v1 job's described progress lives in its record, not here.
    """

    imported_rows: int = -1
    total_rows: int = -1
    reason: str = ""
    failed_at: float = 0.0       # 0: not seen failing after the first listing
    described_at: float = 0.0
    created_at: float = 0.0      # the server's creation time (createTime), 0: unknown
    failed_describe: bool = False    # the last describe failed (in memory only)
    percent: Track | None = None     # ETA observations, importing jobs only
    rows: Track | None = None

    def observe_percent(self, now: float, percent: int) -> None:
        if self.percent is None:
            self.percent = Track()
        self.percent.observe(now, percent)

    def observe_rows(self, now: float) -> None:
        if self.total_rows > 0 and self.imported_rows >= 0:
            if self.rows is None:
                self.rows = Track()
            self.rows.observe(now, self.imported_rows)

    def eta(self, now: float) -> float | None:
        """Rows when they moved, else progress; None until one of them moved."""
        by_rows = None if self.rows is None else self.rows.eta(self.total_rows, now)
        if by_rows is not None:
            return by_rows
        return None if self.percent is None else self.percent.eta(100.0, now)

    def facts(self) -> tuple[int, int, str, float, float]:
        """What it says, without when it was last asked."""
        return self.imported_rows, self.total_rows, self.reason, self.failed_at, \
            self.created_at

    def row(self, job_id: str) -> DetailRow:
        return (job_id, self.imported_rows, self.total_rows, self.reason, self.failed_at,
                self.described_at, self.created_at)


# An active job behind the per-job series: job_id, collection, state, first_seen.
Shown = tuple[str, str, str, int]


class ActiveJobs:
    """A listing's active jobs, column by column, while one listing is folded in, and
    the oldest and the stuck of them: references and packed numbers, no object per job,
    so a listing of 100,000 active jobs costs a few flat buffers that go back in one
    piece."""

    __slots__ = ("ids", "collections", "states", "first_seen", "since", "oldest", "stuck",
                 "_now", "_stuck_after", "_stall_after")

    def __init__(self, now: int, stuck_after: float, stall_after: float) -> None:
        self.ids: list[str] = []
        self.collections: list[str] = []
        self.states: list[str] = []
        self.first_seen = array("I")
        self.since = array("I")     # when its progress or state last changed
        self.oldest: dict[str, float] = {}      # collection -> its oldest's first_seen
        self.stuck: list[StuckJob] = []         # older than stuck_after, or stalled
        self._now, self._stuck_after, self._stall_after = now, stuck_after, stall_after

    def add(self, job_id: str, collection: str, state: str, first_seen: int,
            since: int, progress: int) -> None:
        self.ids.append(job_id)
        self.collections.append(collection)
        self.states.append(state)
        self.first_seen.append(first_seen)
        self.since.append(since)
        now = self._now
        if first_seen < self.oldest.get(collection, now + 1):
            self.oldest[collection] = first_seen
        if now - first_seen > self._stuck_after:
            self.stuck.append(StuckJob(collection, job_id, state, "age", first_seen))
        elif (self._stall_after > 0 and progress >= 0 and state == "importing"
              and now - since > self._stall_after):
            self.stuck.append(StuckJob(collection, job_id, state, "stalled", first_seen))


class DetailsBook:
    """One cluster's job details and describe plan.

    Each listing sets ``waiting`` (jobs waiting for one describe, by id ->
    (collection, state)) and ``failed`` (failures within the window, as (job_id,
    collection)); only these few jobs are kept, never every job.
    """

    def __init__(self, rows: Iterable[DetailRow] = ()) -> None:
        self.rules = DetailRules()
        self.details: dict[str, Details] = {}
        self.described: dict[str, float] = {}    # active job id -> last described
        self.waiting: dict[str, tuple[str, str]] = {}
        self.failed: list[tuple[str, str]] = []
        self.shown: list[Shown] = []             # the oldest active jobs: per-job series
        self._next_active: list[str] = []
        self._dirty: set[str] = set()            # details to persist
        for job_id, imported, total, reason, failed_at, described_at, created_at in rows:
            self.details[job_id] = Details(imported, total, reason, failed_at, described_at,
                                           created_at)
            if described_at:
                self.described[job_id] = described_at

    def newly_terminal(self, job_id: str, state: str, now: float, reason: str) -> bool:
        """A job seen reaching ``state`` (completed or failed) after the first listing,
        whose listing carried failure text ``reason`` ("" when none). True when it is
        to wait for one describe: failed without a reason, or completed (v2, for its
        rows); never with describing off."""
        describing = self.rules.max_describes > 0
        if state != "failed":
            return describing and self.rules.api == "v2"
        known = self.details.get(job_id)
        if known is None:
            known = self.details[job_id] = Details()
        known.failed_at, known.reason = now, reason or known.reason
        self._dirty.add(job_id)
        return describing and not reason

    def terminal(self, job_id: str, collection: str, state: str, now: float,
                 waiting: bool) -> None:
        """A listed job in a terminal (or unknown) state that has details: a failure
        within the window is shown; other details go unless it waits for a describe."""
        known = self.details[job_id]
        if state == "failed" and known.failed_at \
                and now - known.failed_at <= self.rules.failed_window:
            self.failed.append((job_id, collection))
        elif not waiting:              # nothing left to show or to learn
            del self.details[job_id]

    def forget(self, job_id: str) -> None:
        """A job that left the listing."""
        self.details.pop(job_id, None)
        self._dirty.discard(job_id)

    def follow(self, active: ActiveJobs, now: float, is_active: Callable[[str], bool],
               percent_of: Callable[[str], int]) -> None:
        """From the listing's active jobs, keep only the few that matter next: the
        oldest (behind the per-job series, whose listed progress feeds the ETA) and
        the next to describe (importing before pending, least recently described
        first). Drop details no series, wait or duration needs any more (a creation
        time is kept while its job is active).

        v1 jobs are described every time (the listing has no progress); a v2 job is
        described for its rows, so only while they are shown (it is among the oldest
        max_job_series), and only once its listed progress or state moved since its
        last successful describe (its rows cannot have moved otherwise).
        """
        rules, details, described = self.rules, self.details, self.described
        ids, first_seen, since, states = active.ids, active.first_seen, active.since, \
            active.states
        for job_id in [j for j in described if not is_active(j)]:
            del described[job_id]
        oldest = heapq.nsmallest(rules.max_job_series, range(len(ids)),
                                 key=lambda i: (first_seen[i], ids[i]))
        shown = [(ids[i], active.collections[i], states[i], first_seen[i]) for i in oldest]
        shown_ids = {job[0] for job in shown}
        for job_id in [j for j, known in details.items() if j not in shown_ids
                       and not known.failed_at and j not in self.waiting
                       and not (known.created_at and is_active(j))]:
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
                progress = percent_of(job_id)
                if state == "importing" and progress >= 0:
                    known = details.get(job_id)
                    if known is None:
                        known = details[job_id] = Details()
                    known.observe_percent(now, progress)
        self.shown = shown

    def plan(self) -> list[str]:
        """The job ids to describe after the last listing, in the contract's order and
        within ``max_describes``: newly failed without a reason, newly completed
        (v2), then active jobs, importing before pending, least recently described
        first. Only ids of the last listing are ever planned."""
        budget = self.rules.max_describes
        if budget <= 0:
            return []
        waiting = sorted(self.waiting.items())
        plan = [job_id for job_id, (_, state) in waiting if state == "failed"]
        plan += [job_id for job_id, (_, state) in waiting if state != "failed"]
        return (plan + self._next_active)[:budget]

    def describe_failed(self, job_id: str, now: float) -> bool:
        """A describe of ``job_id`` failed: it keeps what it knew, and a waiting job is
        shown as described in vain. True when the job was waiting."""
        self.described[job_id] = now
        if job_id not in self.waiting:
            return False
        known = self.details.get(job_id)
        if known is None:
            known = self.details[job_id] = Details()
        known.failed_describe = True
        return True

    def record(self, job_id: str, answer: JobDetails, now: float, since: float,
               importing: bool) -> Details | None:
        """Fold in one answer about a job that last moved at ``since`` and is
        ``importing`` or not; its details, None when nothing of it is kept."""
        self.described[job_id] = now
        waiting = job_id in self.waiting
        known = self.details.get(job_id)
        # Persisted when what it says changed (a describe that only confirms writes
        # nothing), and on a job's first describe, for its time.
        before = known.facts() if known is not None and known.described_at else None
        if known is None:
            if not waiting and not any(job[0] == job_id for job in self.shown):
                return None             # nothing of it is shown: nothing to keep
            known = self.details[job_id] = Details()
        # Changes are timed in whole seconds: a describe in the second of the change
        # it answers counts as after it, so it is not repeated for nothing.
        known.failed_describe = False
        known.described_at = max(now, since + 1)
        if answer.total_rows >= 0:
            known.imported_rows, known.total_rows = answer.imported_rows, answer.total_rows
        if answer.reason:
            known.reason = answer.reason
        if answer.create_time is not None:
            known.created_at = answer.create_time
        if not waiting and importing:
            known.observe_rows(now)
            if self.rules.api == "v1" and answer.progress >= 0:
                known.observe_percent(now, answer.progress)
        if known.facts() != before:
            self._dirty.add(job_id)
        return known

    def take_dirty(self) -> list[DetailRow]:
        """The details changed since the last call, to persist."""
        rows = [self.details[j].row(j) for j in sorted(self._dirty) if j in self.details]
        self._dirty.clear()
        return rows

    def rows(self) -> list[DetailRow]:
        """Every job's details (a write of the whole history)."""
        self._dirty.clear()
        return [known.row(job_id) for job_id, known in self.details.items()]

    def summarise(self, now: float, percent_of: Callable[[str], int]
                  ) -> tuple[tuple[RunningJob, ...], tuple[FailedJob, ...]]:
        """The running jobs behind the per-job series (oldest first) and the failures
        within the window (newest first, capped)."""
        rules, details = self.rules, self.details
        running = []
        for job_id, collection, state, first_seen in self.shown:
            known = details.get(job_id)
            percent = percent_of(job_id)
            running.append(RunningJob(
                collection, job_id, state, first_seen,
                None if percent < 0 else min(percent, 100) / 100,
                -1 if known is None else known.imported_rows,
                -1 if known is None else known.total_rows,
                known.eta(now) if known is not None and state == "importing" else None))
        failed = []
        describing = rules.max_describes > 0
        for job_id, collection in self.failed:
            known = details[job_id]
            if now - known.failed_at > rules.failed_window:
                continue
            settled = known.reason or known.failed_describe or not describing \
                or job_id not in self.waiting
            if settled:
                failed.append(FailedJob(collection, job_id, known.reason or "unknown",
                                        known.failed_at))
        failed.sort(key=lambda job: (-job.failed_at, job.job_id))
        return tuple(running), tuple(failed[:rules.max_failed_series])
