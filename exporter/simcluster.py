"""One simulated cluster of the simulator (exporter.simulator): its jobs, their states
and times, and the switches tests flip to make it misbehave.

Jobs keep the times a server reports: ``completeTime`` once done (Zilliz v2 in UTC,
Milvus in the server's local ``+08:00``, Zilliz v1 without a zone, Milvus ``""`` for a
failed job) and, with ``report_create_time``, ``createTime`` (the newest Milvus). Jobs
made by ``add_timed_jobs`` move by the cluster's clock alone: so long pending, so long
importing, then their outcome, so a test knows to the second how long each one took.
"""

from __future__ import annotations

import datetime
import itertools
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

# Wire names of the canonical states; the simulator derives what it sends from the
# canonical state it holds, so its ground truth never goes through the exporter's own
# normalisation (a bug there would show on both sides and pass).
_V1_STATES = {"pending": "ImportPending", "importing": "ImportRunning",
              "completed": "ImportCompleted", "failed": "ImportFailed"}
_V2_STATES = {"pending": "Pending", "importing": "Importing", "completed": "Completed",
              "failed": "Failed"}
FAULTS = ("auth_body", "auth_http", "429", "500", "503", "malformed", "bad_shape",
          "api_error", "hang")


@dataclass
class FaultSwitch:
    """How a simulated endpoint misbehaves: ``mode`` (one of FAULTS) on the next ``left``
    requests (forever when None) from page ``from_page`` on."""

    mode: str = ""
    left: int | None = None
    from_page: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, mode: str, times: int | None = None, from_page: int = 1) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}")
        with self._lock:
            self.mode, self.left, self.from_page = mode, times, from_page

    def clear(self) -> None:
        with self._lock:
            self.mode, self.left = "", None

    def take(self, page: int) -> str:
        """The fault this request of ``page`` meets, "" for none; counts it down."""
        with self._lock:
            if not self.mode or page < self.from_page:
                return ""
            fault = self.mode
            if self.left is not None:
                self.left -= 1
                if self.left <= 0:
                    self.mode, self.left = "", None
            return fault


@dataclass
class SimJob:
    job_id: str
    collection: str
    state: str            # canonical: what /metrics must show ("waiting_for_retry", ...)
    progress: int = 0
    reason: str = ""
    imported_rows: int = 0
    total_rows: int = 0
    wire: str = ""        # the name sent instead of the flavour's usual one
    created_at: float = 0.0
    finished_at: float | None = None      # when it reached completed or failed
    timeline: tuple[float, float, str] | None = None   # pending for, importing for, outcome

    def wire_state(self, flavour: str) -> str:
        """The state as this flavour's server spells it."""
        names = _V1_STATES if flavour == "v1" else _V2_STATES
        return self.wire or names[self.state]

    def settle(self, now: float) -> None:
        """A timed job's state at ``now``: its timeline decides, nothing else."""
        if self.timeline is None:
            return
        pending, importing, outcome = self.timeline
        elapsed = now - self.created_at
        if elapsed < pending:
            self.state, self.progress = "pending", 0
        elif elapsed < pending + importing:
            self.state, self.progress = "importing", int(100 * (elapsed - pending) / importing)
        else:
            self.state, self.progress = outcome, 100 if outcome == "completed" else 0
            self.finished_at = self.created_at + pending + importing
            self.reason = self.reason or ("import failed" if outcome == "failed" else "")


# How each flavour writes a time: Zilliz v2 in UTC, Milvus in the server's local zone
# (here +08:00), Zilliz v1 undocumented (here without a zone, which nobody can read).
_ZONES = {"v2": datetime.timezone.utc,
          "milvus": datetime.timezone(datetime.timedelta(hours=8))}


def wire_time(when: float | None, flavour: str) -> str | None:
    """``when`` as the flavour's server writes it; None (v1) or "" (v2) when unset."""
    if when is None:
        return None if flavour == "v1" else ""
    zone = _ZONES.get(flavour)
    text = datetime.datetime.fromtimestamp(when, zone or datetime.timezone.utc).isoformat(
        timespec="seconds")
    return text.replace("+00:00", "Z") if zone else text[:19].replace("T", " ")


@dataclass
class SimCluster:
    """One simulated cluster; tests mutate it through its methods at run time."""

    name: str
    flavour: str                  # "v1", "v2" (Zilliz Cloud) or "milvus"
    api_key: str
    cluster_id: str = ""
    count_mode: str = "total"     # v1/v2: "total", "page" (length of page) or "none"
    ignore_paging: bool = False   # Milvus: every request answers every job
    shuffle: bool = False         # Milvus: a new random order on every request
    v2_success_code: int = 0      # Milvus 2.4.0-2.4.4 answered 200 in v2 bodies
    latency: float = 0.0
    describe_latency: float = 0.0   # on top of latency, for describes only
    retry_after: str = "1"
    jobs: dict[str, SimJob] = field(default_factory=dict)
    requests: int = 0
    pages_served: list[int] = field(default_factory=list)
    legacy_describe: bool = False  # Milvus 2.4.0-2.4.12: only get_progress
    reasons_in_list: bool = True  # list records carry reason (Milvus does)
    describe_fault: str = ""      # "500", "api_error" or "hang": every describe misbehaves
    described: list[str] = field(default_factory=list)   # job ids, in order
    unknown_describes: int = 0
    report_create_time: bool = False   # describe answers createTime (newest Milvus)
    clock: Callable[[], float] = time.time
    # What the control plane lists about it (v2 only): clusterName ("" for the name)...
    display_name: str = ""
    status: str = "RUNNING"
    region_id: str = "aws-us-west-2"
    project_id: str = "proj-0123456789"
    plan: str = "Enterprise"
    _faults: FaultSwitch = field(default_factory=FaultSwitch, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ids: Any = field(default_factory=lambda: itertools.count(1), repr=False)

    # ---- control -----------------------------------------------------------------
    def add_jobs(self, n: int, collection: str = "docs", state: str = "pending",
                 progress: int = 0, prefix: str | None = None, wire: str = "") -> list[str]:
        """Jobs in a canonical ``state``; ``wire`` sends another name for it (a v1
        "ImportRunning", an unknown "WaitingForRetry"), which it needs when the state
        is not one of the four canonical ones."""
        if not wire and state not in _V2_STATES:
            raise ValueError(f"state {state!r} is not canonical: give its wire name")
        with self._lock:
            ids = []
            now = self.clock()
            for _ in range(n):
                job_id = f"{prefix or self.name}-job-{next(self._ids):07d}"
                self.jobs[job_id] = SimJob(
                    job_id, collection, state, progress, wire=wire, created_at=now,
                    finished_at=now if state in ("completed", "failed") else None)
                ids.append(job_id)
            return ids

    def add_timed_jobs(self, n: int, collection: str, pending_for: float,
                       importing_for: float, outcome: str = "completed",
                       prefix: str | None = None) -> list[str]:
        """Jobs created now that stay ``pending_for`` seconds pending, then
        ``importing_for`` importing, then reach ``outcome``, by the clock alone."""
        if outcome not in ("completed", "failed"):
            raise ValueError(f"outcome {outcome!r} is not completed or failed")
        ids = self.add_jobs(n, collection, "pending", prefix=prefix)
        with self._lock:
            for job_id in ids:
                self.jobs[job_id].timeline = (pending_for, importing_for, outcome)
        return ids

    def set_state(self, job_id: str, state: str, progress: int | None = None) -> None:
        """Move a job to a canonical state, sent under the flavour's usual name."""
        if state not in _V2_STATES:
            raise ValueError(f"state {state!r} is not canonical")
        with self._lock:
            job = self.jobs[job_id]
            done = state in ("completed", "failed")
            if done != (job.finished_at is not None):
                job.finished_at = self.clock() if done else None
            job.state, job.wire = state, ""
            if progress is not None:
                job.progress = progress

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self.jobs[job_id].progress = progress

    def set_rows(self, job_id: str, imported: int, total: int) -> None:
        with self._lock:
            job = self.jobs[job_id]
            job.imported_rows, job.total_rows = imported, total

    def set_reason(self, job_id: str, reason: str) -> None:
        """The job's failure text, as the server reports it."""
        with self._lock:
            self.jobs[job_id].reason = reason

    def remove_jobs(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self.jobs.pop(job_id, None)

    def fail(self, mode: str, times: int | None = None, from_page: int = 1) -> None:
        """Misbehave on the next ``times`` requests (forever when None) from a page on."""
        self._faults.set(mode, times, from_page)

    def heal(self) -> None:
        self._faults.clear()

    def rename(self, display_name: str) -> None:
        """Rename it in the console: its clusterName changes, its clusterId stays."""
        with self._lock:
            self.display_name = display_name

    def set_status(self, status: str) -> None:
        """STOPPED, RUNNING, ...: what the control plane says (it still answers)."""
        with self._lock:
            self.status = status

    def cloud_record(self) -> dict[str, Any]:
        """The cluster as GET /v2/clusters lists it."""
        with self._lock:
            return {"clusterId": self.cluster_id, "clusterName": self.display_name or self.name,
                    "description": "", "regionId": self.region_id, "plan": self.plan,
                    "cuType": "Performance-optimized", "cuSize": 1, "status": self.status,
                    "connectAddress": f"https://{self.cluster_id}.{self.region_id}.zilliz.test",
                    "privateLinkAddress": "", "projectId": self.project_id,
                    "createTime": "2024-06-01T10:00:00Z"}

    def truth(self) -> Counter[tuple[str, str]]:
        """Jobs by (collection, canonical state): what /metrics must show."""
        with self._lock:
            return Counter((j.collection, j.state) for j in self._settled())

    def _settled(self) -> list[SimJob]:
        """Every job, timed ones moved to where the clock says (under the lock)."""
        now = self.clock()
        jobs = list(self.jobs.values())
        for job in jobs:
            job.settle(now)
        return jobs

    # ---- serving -----------------------------------------------------------------
    def _page(self, page: int, size: int) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            jobs = self._settled()
            if self.shuffle:
                random.shuffle(jobs)
            chosen = jobs if self.ignore_paging else jobs[(page - 1) * size: page * size]
            out = []
            for job in chosen:
                item: dict[str, Any] = {"collectionName": job.collection, "jobId": job.job_id,
                                        "state": job.wire_state(self.flavour)}
                if self.flavour != "v1":
                    item["progress"] = job.progress
                    if self.reasons_in_list and (job.reason or self.flavour == "v2"):
                        item["reason"] = job.reason   # Milvus: absent when empty
                out.append(item)
            return out, len(jobs)

    def _details(self, job_id: str) -> dict[str, Any] | None:
        """The ``data`` of a describe answer, or None for an unknown id."""
        with self._lock:
            self.described.append(job_id)
            job = self.jobs.get(job_id)
            if job is None:
                self.unknown_describes += 1
                return None
            job.settle(self.clock())
            state = job.state
            failed = state == "failed"
            # Milvus probably answers "" for a failed job (API-NOTES); Zilliz a time.
            finished = None if failed and self.flavour == "milvus" else job.finished_at
            if self.flavour == "v1":
                return {"collectionName": job.collection, "jobId": job.job_id,
                        "fileName": f"{job.job_id}/1.parquet", "fileSize": 19599887,
                        "readyPercentage": 100 if state == "completed" else job.progress,
                        "completeTime": wire_time(finished, "v1"),
                        "errorMessage": (job.reason or "import failed") if failed else None,
                        "details": []}
            data: dict[str, Any] = {
                "jobId": job.job_id, "collectionName": job.collection,
                "state": job.wire_state(self.flavour),
                "progress": 0 if failed else job.progress,
                "importedRows": 0 if failed else job.imported_rows,
                "totalRows": 0 if failed else job.total_rows,
                "fileSize": 19599887, "completeTime": wire_time(finished, self.flavour),
                "details": []}
            if self.report_create_time:
                data["createTime"] = wire_time(job.created_at, self.flavour)
            if failed and job.reason:
                data["reason"] = job.reason
            elif self.flavour == "v2":
                data["reason"] = ""          # Zilliz: always present; Milvus: absent
            return data
