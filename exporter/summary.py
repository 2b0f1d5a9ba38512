"""What one cluster's published listing says, ready to render: immutable values the
history makes and the collector and the status page read, never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from exporter.jobs import CANONICAL_STATES


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
class FinishedJob:
    collection: str
    job_id: str
    outcome: str                # "completed" or "failed"
    duration: float | None      # seconds; None when its start is not known
    finished_at: float          # its end (exporter.durations)


@dataclass(frozen=True)
class Histogram:
    """One histogram series: observations per bucket (``counts[i]`` at most
    ``bounds[i]`` and above the bound before it, the last one above every bound) and
    their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at most that), ending with +Inf: every one."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


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
    # (collection label, outcome) -> how long finished jobs took; label -> time pending
    durations: Mapping[tuple[str, str], Histogram] = field(default_factory=dict)
    waits: Mapping[str, Histogram] = field(default_factory=dict)
    finished: tuple[FinishedJob, ...] = ()         # newest first, capped

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_state(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(CANONICAL_STATES, 0)
        for (_, state), n in self.counts.items():
            out[state] = out.get(state, 0) + n
        return out


def listing_summary(counts: dict[tuple[str, str], int], oldest: Mapping[str, float],
                    stuck_jobs: list[StuckJob], collections: set[str], max_stuck_series: int,
                    transitions: Mapping[tuple[str, str], int]) -> JobSummary:
    """A listing's summary, job details aside: every canonical state of every listed
    collection (zeros included) and the oldest stuck jobs, capped. Sorted once here,
    so every scrape renders it in order without sorting."""
    for collection in collections:
        for state in CANONICAL_STATES:
            counts.setdefault((collection, state), 0)
    stuck = dict.fromkeys(sorted(collections), 0)
    for job in stuck_jobs:
        stuck[job.collection] += 1
    stuck_jobs.sort(key=lambda job: (job.first_seen, job.job_id))
    return JobSummary(counts=dict(sorted(counts.items())), stuck=stuck,
                      oldest_active=oldest, stuck_jobs=tuple(stuck_jobs[:max_stuck_series]),
                      transitions=transitions)
