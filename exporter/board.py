"""The snapshot board: each cluster's latest immutable ``ClusterSnapshot``, published
by its poller and read by the collector and the status page, which never take a lock
and so never wait on a poll.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from exporter.config import ClusterConfig
from exporter.summary import JobSummary


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the collector and the status page know about one cluster."""

    cluster: ClusterConfig
    shard: int = 0
    polled: bool = False
    up: bool = False
    last_success: float | None = None
    poll_duration: float = 0.0
    last_error_reason: str = ""
    last_error: str = ""
    jobs: JobSummary | None = None
    poll_errors: Mapping[str, int] = field(default_factory=dict)
    api_requests: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, code)
    rate_limit_wait: float = 0.0      # seconds, cumulative

    def is_stale(self, now: float) -> bool:
        """Job series are withdrawn once stale_after has passed without a success."""
        return (self.last_success is None
                or now - self.last_success > self.cluster.settings.stale_after and not self.up)


class SnapshotBoard:
    """The latest snapshot of every cluster; readers never take a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, ClusterSnapshot] = {}
        self.version = 0      # changes with every publish and removal: a cache key

    def snapshots(self) -> tuple[ClusterSnapshot, ...]:
        return tuple(self._snapshots.values())

    def get(self, name: str) -> ClusterSnapshot | None:
        return self._snapshots.get(name)

    def publish(self, snapshot: ClusterSnapshot,
                current: Callable[[], bool] = lambda: True) -> None:
        """Swap in a snapshot unless its poller has been retired meanwhile."""
        with self._lock:
            if current():
                self._snapshots = {**self._snapshots, snapshot.cluster.name: snapshot}
                self.version += 1

    def remove(self, name: str) -> None:
        with self._lock:
            self._snapshots = {k: v for k, v in self._snapshots.items() if k != name}
            self.version += 1
