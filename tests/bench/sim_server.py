"""Run a Simulator in its own process for the benchmark, so server CPU is not ours.

    python tests/bench/sim_server.py '<json list of clusters>'

Each cluster: {"name", "flavour", "jobs", "collections", "latency", "count_mode", "api_key",
"states": [...] (cycled over jobs), "active": n (the first n jobs importing with rows),
"moving": true (the active jobs' progress and rows move every 20 ms)}. Prints the base
URL, then serves until stdin closes; a line "connections" on stdin is answered with the
number of TCP connections accepted so far.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading

import time

from exporter.simcluster import SimCluster
from exporter.simulator import Simulator


def move(cluster: SimCluster, job_ids: list[str]) -> None:
    """Import-stage progress (41-99%) and the rows that go with it, moving for ever."""
    for step in itertools.count():
        progress = 41 + step % 59
        for job_id in job_ids:
            cluster.set_progress(job_id, progress)
            cluster.set_rows(job_id, (progress - 40) * 1_000_000 // 60, 1_000_000)
        time.sleep(0.02)


def main() -> None:
    spec = json.loads(sys.argv[1])
    sim = Simulator()
    for item in spec:
        cluster = sim.add_cluster(item["name"], item.get("flavour", "v2"),
                                  api_key=item.get("api_key", ""),
                                  latency=item.get("latency", 0.0),
                                  count_mode=item.get("count_mode", "total"))
        active = cluster.add_jobs(item.get("active", 0), "collection_00000", "importing",
                                  progress=50)
        for job_id in active:
            cluster.set_rows(job_id, 500_000, 1_000_000)
        if item.get("moving"):
            threading.Thread(target=move, args=(cluster, active), daemon=True).start()
        item["jobs"] -= len(active)
        collections = item.get("collections", 1)
        states = item.get("states", ["importing"])
        per = max(1, item["jobs"] // (collections * len(states))) if item["jobs"] else 0
        made = 0
        for c in range(collections):
            for state in states:
                n = min(per, item["jobs"] - made)
                if n > 0:
                    cluster.add_jobs(n, f"collection_{c:05d}", state, progress=10)
                    made += n
        if made < item["jobs"]:
            cluster.add_jobs(item["jobs"] - made, "collection_00000", states[0], progress=10)
    sim.start()
    print(sim.base_url, flush=True)
    for line in sys.stdin:
        if line.strip() == "connections":
            print(sim.connections, flush=True)
    sim.stop()


if __name__ == "__main__":
    main()
