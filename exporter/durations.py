"""Durations: how long finished jobs took and how long they waited in ``pending``, as
per-collection histograms, each job observed once.

A job's start is the server's creation time when an answer carries one (describe's
``createTime``, newest Milvus). Otherwise it is the time of the listing in which the
exporter first saw the job, but only when that listing started at most twice
``interval`` (or twice the previous poll's duration, if longer) after a successful
listing of the same cluster that did not hold it (``DurationBook.begin``; the last
listing survives a restart in the state file). A job already running at a cluster's
first listing, or created while the exporter was down or its polls failed, has no
known start and is never observed: after a fresh start, only new jobs count.

Its end is describe's ``completeTime`` when known, else the time of the first listing
that showed it terminal (one interval's accuracy); a server's time is held between the
start and that listing, whatever its clock says. Its time pending runs from its start
to the first listing that showed it past ``pending``.

Series stay bounded: per cluster the first MAX_COLLECTIONS collections observed keep
their own label, later ones are observed under OTHER_COLLECTION. A label's series appear
(at 0) with the first job of its collection whose start is known, and show 0 in the
listing that first used them in any case, so Prometheus' ``increase()`` sees every
first observation; a collection that leaves the listing takes
its series with it and frees its label (as exporter.tally does for counters). The
histograms start from zero in each process, as any counter; which jobs were observed
is remembered in the history's records, and so in the state file.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

from exporter.config import DEFAULT_DURATION_BUCKETS
from exporter.store import Listed
from exporter.summary import FinishedJob, Histogram

# Each label costs 3 series of len(buckets) + 3 samples (two outcomes and the wait).
MAX_COLLECTIONS = 100
OTHER_COLLECTION = "_other"
OUTCOMES = ("completed", "failed")


@dataclass(frozen=True)
class TimingRules:
    """The per-cluster settings that shape durations (from PollSettings)."""

    interval: float = 60.0
    buckets: tuple[float, ...] = DEFAULT_DURATION_BUCKETS
    max_finished: int = 100       # the status page's finished jobs (max_job_series)


class _Counts:
    """One histogram series while it counts: per bucket (the last above every bound)."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0

    def observe(self, bounds: tuple[float, ...], seconds: float) -> None:
        self.counts[bisect_left(bounds, seconds)] += 1    # le: the first bound >= it
        self.total += seconds


class DurationBook:
    """One cluster's duration and wait histograms, and its jobs finished most recently.

    The history calls ``begin`` as each listing starts to be folded in, ``wait`` and
    ``finish`` as it sees jobs move, and ``end`` with the listing's time once it is in.
    """

    def __init__(self, last_listing: Listed | None = None) -> None:
        self.rules = TimingRules()
        self.last_listing = last_listing    # the last successful listing, None before one
        self._started: float | None = None    # when the listing begun last started
        self._durations: dict[tuple[str, str], _Counts] = {}    # (label, outcome)
        self._waits: dict[str, _Counts] = {}                     # label
        self._labels: dict[str, str] = {}     # observed collection -> its label
        self._own = 0                         # collections with a label of their own
        self._fresh: set[str] = set()     # labels first used since the last listing began
        self._finished: deque[FinishedJob] = deque(maxlen=self.rules.max_finished)

    def configure(self, rules: TimingRules) -> None:
        """New buckets start the histograms over (their series are new ones anyway)."""
        if rules.buckets != self.rules.buckets:
            self._durations.clear()
            self._waits.clear()
            self._labels.clear()
            self._own = 0
        if rules.max_finished != self.rules.max_finished:
            self._finished = deque(self._finished, maxlen=rules.max_finished)
        self.rules = rules

    def begin(self, started: float) -> bool:
        """A listing that started at ``started`` is being folded in: True when the jobs
        it holds for the first time have a known start (their first sighting)."""
        self._fresh = set()
        self._started, last = started, self.last_listing
        return last is not None and \
            0 <= started - last.at <= 2 * max(self.rules.interval, last.seconds)

    def end(self, now: float) -> None:
        """The listing begun last is folded in at ``now``: it is the last successful
        listing, and took this long."""
        if self._started is not None:
            self.last_listing = Listed(self._started, max(0.0, now - self._started))

    def listed(self, collections: set[str]) -> None:
        """The last listing held ``collections``: those that left take their series
        with them (OTHER_COLLECTION's go with the last collection it holds)."""
        for collection in [c for c in self._labels if c not in collections]:
            label = self._labels.pop(collection)
            if label == OTHER_COLLECTION and OTHER_COLLECTION in self._labels.values():
                continue
            self._own -= label != OTHER_COLLECTION
            del self._waits[label]
            for outcome in OUTCOMES:
                del self._durations[(label, outcome)]

    def track(self, collection: str) -> None:
        """A job of ``collection`` with a known start appeared: its series show 0 from
        now on, so its first observation is an increase."""
        self._label(collection)

    def _label(self, collection: str) -> str:
        label = self._labels.get(collection)
        if label is None:
            own = self._own < MAX_COLLECTIONS
            label = self._labels[collection] = collection if own else OTHER_COLLECTION
            self._own += own
        if label not in self._waits:
            size = len(self.rules.buckets)
            self._waits[label] = _Counts(size)
            for outcome in OUTCOMES:
                self._durations[(label, outcome)] = _Counts(size)
            self._fresh.add(label)
        return label

    def wait(self, collection: str, seconds: float) -> None:
        """A job with a known start was first seen past pending after ``seconds``."""
        self._waits[self._label(collection)].observe(self.rules.buckets, max(0.0, seconds))

    def finish(self, job_id: str, collection: str, outcome: str, start: float | None,
               seen: float, complete_time: float | None = None) -> None:
        """A job first ``seen`` terminal then reached ``outcome``, at the server's
        ``complete_time`` if known (held between its start and ``seen``). It is
        observed when its ``start`` is known, and listed as finished either way."""
        end = seen if complete_time is None else min(complete_time, seen)
        duration = None
        if start is not None:
            end = max(start, end)
            duration = end - start
            self._durations[(self._label(collection), outcome)].observe(
                self.rules.buckets, duration)
        self._finished.append(FinishedJob(collection, job_id, outcome, duration, end))

    def summary(self) -> tuple[dict[tuple[str, str], Histogram], dict[str, Histogram],
                               tuple[FinishedJob, ...]]:
        """(durations by (label, outcome), waits by label, finished jobs newest first),
        sorted as they render; a label first used by this listing shows 0."""
        bounds = self.rules.buckets
        empty = Histogram(bounds, (0,) * (len(bounds) + 1), 0.0)

        def frozen(label: str, counts: _Counts) -> Histogram:
            return empty if label in self._fresh else \
                Histogram(bounds, tuple(counts.counts), counts.total)
        durations = {key: frozen(key[0], counts)
                     for key, counts in sorted(self._durations.items())}
        waits = {label: frozen(label, counts) for label, counts in sorted(self._waits.items())}
        finished = sorted(self._finished, key=lambda job: (-job.finished_at, job.job_id))
        return durations, waits, tuple(finished)
