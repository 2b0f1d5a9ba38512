"""The counters a cluster's listings and describes add up: jobs seen reaching
``completed`` or ``failed`` and the rows of completed jobs, per collection.

Prometheus' ``increase()`` takes a series' first sample as its start, so a collection
new to the listing shows its counters at 0 for that one listing and counts from the
next: a job failing in its collection's first listing (a first import with the wrong
schema) would otherwise never show as an increase. In this process's first listing
every collection is new to it: one created while the exporter was down is new to
Prometheus too, and for the others a 0 after the restart is a reset, from which the
next listing counts in full.

A collection that leaves the listing leaves ``/metrics``, counters included (a counter
that comes back starts again from 0, which Prometheus reads as a reset), so series and
memory stay flat under collection churn.
"""

from __future__ import annotations

from collections import Counter

OUTCOMES = ("completed", "failed")


class Tally:
    """One cluster's counters; the history increments ``transitions`` in its listing
    loop and calls ``listed`` once per listing."""

    def __init__(self) -> None:
        self.transitions: Counter[tuple[str, str]] = Counter()   # (collection, state)
        self._rows: Counter[str] = Counter()
        self._collections: set[str] = set()
        self._fresh: set[str] = set()     # collections first listed by the last listing

    def add_rows(self, collection: str, rows: int) -> None:
        self._rows[collection] += rows

    def listed(self, collections: set[str]) -> None:
        """A listing holding ``collections`` was folded in: collections new to it start
        at 0, those that left are forgotten."""
        self._fresh = collections - self._collections
        self._collections = collections
        for key in [k for k in self.transitions if k[0] not in collections]:
            del self.transitions[key]
        for collection in [c for c in self._rows if c not in collections]:
            del self._rows[collection]

    def shown_transitions(self) -> dict[tuple[str, str], int]:
        """Both outcomes of every listed collection, sorted as they render."""
        shown = {key: 0 if key[0] in self._fresh else n
                 for key, n in self.transitions.items()}
        for collection in self._collections:
            for state in OUTCOMES:
                shown.setdefault((collection, state), 0)
        return dict(sorted(shown.items()))

    def shown_rows(self) -> dict[str, int]:
        """Rows imported of every listed collection, sorted as they render."""
        shown = {collection: 0 if collection in self._fresh else n
                 for collection, n in self._rows.items()}
        for collection in self._collections:
            shown.setdefault(collection, 0)
        return dict(sorted(shown.items()))
