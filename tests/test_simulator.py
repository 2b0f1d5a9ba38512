"""The simulator is shipped (``--demo``, compose): it must speak both APIs faithfully."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from conftest import wait_until
from exporter.client import list_import_jobs, make_session
from exporter.config import ClusterConfig
from exporter.simulator import DEMO_CLUSTERS, DemoDirector, Simulator


def post(url: str, body: dict, key: str) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_wire_formats_of_both_flavours(simulator: Simulator) -> None:
    v1 = simulator.add_cluster("one", "v1")
    v1.add_jobs(3, "c", "importing")
    v2 = simulator.add_cluster("two", "v2")
    v2.add_jobs(3, "c", "completed")
    url = f"{simulator.base_url}/v1/vector/collections/import/list?clusterId=in01-one" \
          "&pageSize=2&currentPage=2"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {v1.api_key}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = json.load(response)
    assert body["code"] == 200 and body["data"]["count"] == 3
    assert [t["state"] for t in body["data"]["tasks"]] == ["ImportRunning"]
    body = post(f"{simulator.base_url}/v2/vectordb/jobs/import/list",
                {"clusterId": "in01-two", "pageSize": 10, "currentPage": 1}, v2.api_key)
    assert body["code"] == 0 and {r["state"] for r in body["data"]["records"]} == {"Completed"}
    assert set(body["data"]["records"][0]) == {"collectionName", "jobId", "state", "progress",
                                               "reason"}
    assert post(f"{simulator.base_url}/v2/vectordb/jobs/import/list",
                {"clusterId": "in01-two"}, "wrong")["code"] == 21119


def test_demo_director_moves_jobs_through_every_state() -> None:
    with Simulator() as sim:
        director = DemoDirector(sim, tick=0)
        seen = set()
        for _ in range(40):
            director.step()
            for name, *_ in DEMO_CLUSTERS:
                seen |= {state for _, state in sim.clusters[name].truth()}
        stuck = sim.clusters["demo-cloud-v1"].jobs[director.stuck_job]
        assert (stuck.state, stuck.progress) == ("importing", 42)   # never moves
    assert seen == {"pending", "importing", "completed", "failed"}


def test_runs_alone_as_a_module() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "exporter.simulator", "--port", "0",
                             "--tick", "0.2"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = {}
        for _ in DEMO_CLUSTERS:
            name, _, rest = proc.stdout.readline().partition(": ")
            lines[name] = dict(item.split("=", 1) for item in rest.split())
        milvus = lines["demo-milvus"]
        key = next(k for n, _, k, _ in DEMO_CLUSTERS if n == "demo-milvus")
        cluster = ClusterConfig(name="m", url=milvus["url"], api="v2", api_key=key)
        page = wait_until(lambda: list_import_jobs(make_session(cluster), cluster, 1))
        assert page.records and page.count is None       # Milvus gives no count
    finally:
        proc.terminate()
        proc.wait(5)
