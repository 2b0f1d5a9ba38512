"""The demo: three simulated clusters (Zilliz Cloud v1 and v2, and Milvus) whose jobs
move through every state, and two more that only a discovery source finds, for
``--demo``, ``python -m exporter.simulator`` and the compose stack. One job is stuck
importing forever; another stalls for a while.
"""

from __future__ import annotations

import random
import threading

from exporter.simcluster import SimCluster
from exporter.simulator import Simulator

DEMO_CLUSTERS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # name, flavour, key, collections
    ("demo-cloud-v1", "v1", "demo-v1-api-key-0123456789", ("medium_articles", "products")),
    ("demo-cloud-v2", "v2", "demo-v2-api-key-abcdefghij", ("images", "faq")),
    ("demo-milvus", "milvus", "root:Milvus-demo-pass", ("logs",)),
)
# The clusters only the demo's discovery source finds (its key sees these two): one
# running, whose jobs move like the others', and one stopped, listed but not polled.
DEMO_DISCOVERY_KEY = "demo-discovery-key-klmnopqrst"
DEMO_DISCOVERED: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # name, clusterName, status, collections
    ("demo-discovered", "demo discovered", "RUNNING", ("uploads",)),
    ("demo-paused", "demo paused", "STOPPED", ()),
)


# What real imports fail with: a missing or unreadable file, a schema that does not
# match the collection's, a bad row.
DEMO_FAILURES = (
    "failed to read file 'imports/{collection}/part-0003.parquet': NoSuchKey: The "
    "specified key does not exist",
    "schema mismatch: field 'embedding' of collection '{collection}' expects a float "
    "vector of dim 768, the file has dim 512",
    "the primary key field 'id' is auto_id, but the file 'imports/{collection}/"
    "batch-17.json' provides it",
    "row 48213 of 'imports/{collection}/part-0001.parquet': field 'title' exceeds "
    "max_length 512",
)

# Progress per tick while importing: most collections import in about 8 ticks, these
# in about 25, so the duration histograms show two kinds of import.
DEFAULT_PACE = (5, 25)
SLOW_PACE = {"products": (2, 6), "logs": (2, 6)}


class DemoDirector:
    """Moves demo jobs through every state; one job is stuck importing forever.

    Importing jobs advance their rows as Milvus reports them (both 0 until the import
    stage at 40%), and every 10 ticks one job per cluster fails with a realistic reason,
    so every detail series and status page section fills within a minute. New jobs
    arrive all the time and finish within about 20 to 60 seconds (``products`` and
    ``logs`` are the slow ones), so the duration histograms and the jobs finished most
    recently fill within two minutes.
    """

    def __init__(self, sim: Simulator, tick: float = 2.0, seed: int = 7) -> None:
        self.sim = sim
        self.tick = tick
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._ticks = 0
        self.stuck_job = ""
        self._stalling: dict[str, int] = {}   # job id -> tick it was created
        self._sizes: dict[str, int] = {}      # job id -> rows in its files
        # the clusters whose jobs move: (name, collections)
        self._moving: list[tuple[str, tuple[str, ...]]] = []
        for name, flavour, key, collections in DEMO_CLUSTERS:
            sim.add_cluster(name, flavour, key)
            self._moving.append((name, collections))
        for name, display, status, found in DEMO_DISCOVERED:
            sim.add_cluster(name, "v2", DEMO_DISCOVERY_KEY, display_name=display,
                            status=status)
            if status == "RUNNING":
                self._moving.append((name, found))
        for name, collections in self._moving:
            cluster = sim.clusters[name]
            for collection in collections:
                cluster.add_jobs(2, collection, "completed", 100)
                for job_id in cluster.add_jobs(1, collection, "failed", 37):
                    cluster.set_reason(job_id, self._failure(collection))
                for job_id in cluster.add_jobs(2, collection, "importing", 10):
                    self._advance(cluster, job_id, 10)
                cluster.add_jobs(2, collection, "pending")
        v1 = sim.clusters["demo-cloud-v1"]
        self.stuck_job = v1.add_jobs(1, "medium_articles", "importing", 42,
                                     prefix="stuck")[0]

    def _failure(self, collection: str) -> str:
        return self._rng.choice(DEMO_FAILURES).format(collection=collection)

    def _advance(self, cluster: SimCluster, job_id: str, progress: int) -> None:
        """Set progress and the rows that go with it."""
        total = self._sizes.setdefault(job_id, self._rng.randrange(200_000, 5_000_000, 1000))
        cluster.set_progress(job_id, progress)
        if progress < 40:
            cluster.set_rows(job_id, 0, 0)
        else:
            cluster.set_rows(job_id, total * (progress - 40) // 60, total)

    def step(self) -> None:
        """One tick: every job moves a little; every 15 ticks a job that stalls appears."""
        self._ticks += 1
        if self._ticks % 15 == 1:
            v2 = self.sim.clusters["demo-cloud-v2"]
            job_id = v2.add_jobs(1, "images", "importing", 30, prefix="stalls")[0]
            self._stalling[job_id] = self._ticks
        for name, collections in self._moving:
            cluster = self.sim.clusters[name]
            with cluster._lock:
                jobs = list(cluster.jobs.values())
            doomed = self._ticks % 10 == 3    # one failure per cluster every 10 ticks
            for job in jobs:
                if job.job_id == self.stuck_job:
                    continue                      # importing forever, progress frozen
                born = self._stalling.get(job.job_id)
                if born is not None and self._ticks - born < 12:
                    continue                      # frozen for its first 12 ticks
                if job.state == "pending" and self._rng.random() < 0.3:
                    cluster.set_state(job.job_id, "importing", 0)
                    self._advance(cluster, job.job_id, 0)
                elif job.state == "importing":
                    pace = SLOW_PACE.get(job.collection, DEFAULT_PACE)
                    progress = min(100, job.progress + self._rng.randint(*pace))
                    if doomed or progress >= 100 and self._rng.random() < 0.2:
                        doomed = False
                        cluster.set_state(job.job_id, "failed")
                        cluster.set_reason(job.job_id, self._failure(job.collection))
                    elif progress >= 100:
                        self._advance(cluster, job.job_id, 100)
                        cluster.set_state(job.job_id, "completed")
                    else:
                        self._advance(cluster, job.job_id, progress)
            if self._rng.random() < 0.5:
                cluster.add_jobs(1, self._rng.choice(collections), "pending")
            terminal = [j.job_id for j in jobs if j.state in ("completed", "failed")]
            if len(terminal) > 30:
                gone = terminal[:len(terminal) - 30]
                cluster.remove_jobs(gone)
                for job_id in gone:
                    self._sizes.pop(job_id, None)

    def start(self) -> "DemoDirector":
        def run() -> None:
            while not self._stop.wait(self.tick):
                self.step()
        threading.Thread(target=run, daemon=True, name="demo-director").start()
        return self

    def stop(self) -> None:
        self._stop.set()
