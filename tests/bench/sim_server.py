"""Run a Simulator in its own process for the benchmark, so server CPU is not ours.

    python tests/bench/sim_server.py '<json list of clusters>'

Each cluster: {"name", "flavour", "jobs", "collections", "latency", "count_mode", "api_key",
"states": [...] (cycled over jobs)}. Prints the base URL, then serves until stdin closes.
"""

from __future__ import annotations

import json
import sys

from exporter.simulator import Simulator


def main() -> None:
    spec = json.loads(sys.argv[1])
    sim = Simulator()
    for item in spec:
        cluster = sim.add_cluster(item["name"], item.get("flavour", "v2"),
                                  api_key=item.get("api_key", ""),
                                  latency=item.get("latency", 0.0),
                                  count_mode=item.get("count_mode", "total"))
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
    sys.stdin.read()
    sim.stop()


if __name__ == "__main__":
    main()
