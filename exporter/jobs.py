"""The job model: a listed job, its states, the compact name index both the listing
and the history store jobs with, and a complete listing held compactly (``Listing``).

States are normalised as the contract says: lowercase, an ``Import`` prefix dropped,
the other names servers use for the four canonical states read as them (Zilliz's v2 list
reference says ``InProgress``; Milvus's stages ``PreImporting``, ``Sorting``,
``IndexBuilding`` and ``Committing`` are importing, its two-phase ``Uncommitted`` is
pending); any other value passes through in snake_case and is counted under its own name.

A state nobody foresaw counts as active (for age and stuck) unless its name looks final,
so a job cannot hide from the stuck alert in a new state: ``is_active``.
"""

from __future__ import annotations

import functools
import re
from array import array
from typing import Iterable, Iterator, Mapping, NamedTuple

CANONICAL_STATES = ("pending", "importing", "completed", "failed")
ACTIVE_STATES = frozenset({"pending", "importing"})
TERMINAL_STATES = frozenset({"completed", "failed"})
# An unknown state whose name holds one of these is terminal (cancelled, aborted,
# deleted, expired); any other unknown state is active.
FINAL_MARKERS = ("cancel", "abort", "delet", "expir")

# A hostile or broken server could send a new state name with every job, and each would
# be a new series and memory held for good. A cluster keeps at most MAX_STATE_NAMES
# distinct state names (the four canonical ones and OTHER_STATE included); a new name
# beyond them is counted under OTHER_STATE, and no more unknown names are logged.
MAX_STATE_NAMES = 64
OTHER_STATE = "other"
# The unknown names that keep their own: what the canonical names and OTHER_STATE leave.
MAX_UNKNOWN_STATES = MAX_STATE_NAMES - len(CANONICAL_STATES) - 1

# snake_case names (after the Import prefix is dropped) -> canonical state
_STATE_ALIASES = {
    "running": "importing", "in_progress": "importing", "pre_importing": "importing",
    "sorting": "importing", "index_building": "importing", "committing": "importing",
    "uncommitted": "pending"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


@functools.lru_cache(maxsize=256)
def normalise_state(raw: str) -> str:
    """``ImportCompleted``/``Completed`` -> ``completed``; unknown -> snake_case.

    Cached: a listing holds a handful of distinct states over thousands of jobs.
    """
    name = raw[6:] if raw.startswith("Import") and raw[6:7].isupper() else raw
    snake = _CAMEL.sub("_", name).lower().replace(" ", "_").replace("-", "_")
    return _STATE_ALIASES.get(snake, snake)


@functools.lru_cache(maxsize=256)
def is_active(state: str) -> bool:
    """Whether a normalised state counts for age and stuck: ``pending``, ``importing``,
    and every other name but ``completed``, ``failed`` and those that look final."""
    if state in ACTIVE_STATES:
        return True
    if state in TERMINAL_STATES:
        return False
    return not any(marker in state for marker in FINAL_MARKERS)


class JobRecord(NamedTuple):
    """One job as listed; a tuple because a large listing holds 100,000 of them."""

    job_id: str
    collection: str
    state: str          # normalised
    progress: int       # -1 when the API reports none (v1)


class NameIndex:
    """Small integers for the few names (collections, states) that thousands of jobs
    repeat, so per-job storage holds an index instead of another string.

    Hot loops try ``index.get(name)`` first and call the object only for a new name.
    With a ``limit``, a new name once ``limit - 1`` names are held gets the index of
    ``overflow`` instead, so the index never grows past ``limit``.
    """

    def __init__(self, names: tuple[str, ...] = (), *, limit: int = 0,
                 overflow: str = OTHER_STATE) -> None:
        self.names: list[str] = list(names)
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self._limit = limit
        self._overflow = overflow

    def __call__(self, name: str) -> int:
        found = self.index.get(name)
        if found is None:
            if self._limit and len(self.names) >= self._limit - 1:
                name = self._overflow
                found = self.index.get(name)
                if found is not None:
                    return found
            found = self.index[name] = len(self.names)
            self.names.append(name)
        return found


def state_index() -> NameIndex:
    """A cluster's index of state names, bounded by MAX_STATE_NAMES."""
    return NameIndex(CANONICAL_STATES, limit=MAX_STATE_NAMES)


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
