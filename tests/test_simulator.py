"""The simulator is shipped (``--demo``, compose): it must speak both APIs faithfully."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

from conftest import wait_until
from exporter.client import list_import_jobs, make_session
from exporter.config import ClusterConfig
from exporter.demo import DEMO_CLUSTERS, DemoDirector
from exporter.simulator import Simulator


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


def list_v2(sim: Simulator, path: str, body: dict, key: str) -> tuple[int, dict, dict]:
    """(HTTP status, headers, body) of one v2 list call, errors included."""
    request = urllib.request.Request(f"{sim.base_url}{path}/v2/vectordb/jobs/import/list",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.load(error)


def test_milvus_ignores_paging_and_shuffles_and_old_milvus_answers_200(simulator) -> None:
    milvus = simulator.add_cluster("m", "milvus", api_key="u:p")
    milvus.add_jobs(30)
    orders = set()
    for _ in range(5):
        _, _, body = list_v2(simulator, "/milvus/m", {"pageSize": 5, "currentPage": 3}, "u:p")
        records = body["data"]["records"]
        assert len(records) == 30 and "count" not in body["data"]
        orders.add(tuple(r["jobId"] for r in records))
    assert len(orders) > 1                         # a new order on (almost) every call
    assert body["code"] == 0
    milvus.v2_success_code = 200
    assert list_v2(simulator, "/milvus/m", {}, "u:p")[2]["code"] == 200


def test_rate_limit_per_key_and_endpoint_with_and_without_retry_after(simulator) -> None:
    simulator.rate_limit = 3
    simulator.add_cluster("a", "v2", api_key="k1")
    simulator.add_cluster("b", "v2", api_key="k1")
    simulator.add_cluster("c", "v2", api_key="k2")
    statuses = [list_v2(simulator, "", {"clusterId": f"in01-{name}"}, key)[0]
                for name, key in (("a", "k1"), ("b", "k1"), ("a", "k1"), ("b", "k1"),
                                  ("c", "k2"))]
    assert statuses == [200, 200, 200, 429, 200]      # a and b share key k1; c has its own
    status, headers, body = list_v2(simulator, "", {"clusterId": "in01-a"}, "k1")
    assert status == 429 and headers["Retry-After"] == "1" and body["code"] == 429
    simulator.rate_limit_retry_after = None
    status, headers, _ = list_v2(simulator, "", {"clusterId": "in01-a"}, "k1")
    assert status == 429 and "Retry-After" not in headers
    assert simulator.throttled() == 3 and len(simulator.log) == 7
    assert simulator.busiest_second(status=200) == 4       # 3 for k1 + 1 for k2
    assert [r.cluster for r in simulator.log][:5] == ["a", "b", "a", "b", "c"]


def test_timed_jobs_move_by_the_clock_and_answers_carry_their_times() -> None:
    from conftest import FakeClock
    from exporter.answers import timestamp
    clock = FakeClock(1_700_000_000.0)
    with Simulator(clock=clock) as sim:
        milvus = sim.add_cluster("m", "milvus", report_create_time=True)
        zilliz = sim.add_cluster("z", "v2")
        (m,) = milvus.add_timed_jobs(1, "docs", 10, 20)
        (z,) = zilliz.add_timed_jobs(1, "docs", 10, 20, "failed")
        states = []
        for _ in range(4):
            states.append((milvus.truth(), zilliz.truth()))
            clock.advance(10)
        assert [(dict(a), dict(b)) for a, b in states] == [
            ({("docs", "pending"): 1}, {("docs", "pending"): 1}),
            ({("docs", "importing"): 1}, {("docs", "importing"): 1}),
            ({("docs", "importing"): 1}, {("docs", "importing"): 1}),
            ({("docs", "completed"): 1}, {("docs", "failed"): 1})]
        done = post(f"{sim.base_url}/milvus/m/v2/vectordb/jobs/import/describe",
                    {"jobId": m}, milvus.api_key)["data"]
        failed = post(f"{sim.base_url}/v2/vectordb/jobs/import/describe",
                      {"jobId": z, "clusterId": zilliz.cluster_id}, zilliz.api_key)["data"]
    assert done["createTime"].endswith("+08:00")           # Milvus: the server's zone
    assert (timestamp(done["createTime"]), timestamp(done["completeTime"])) == \
        (1_700_000_000.0, 1_700_000_030.0)
    assert "createTime" not in failed and failed["completeTime"].endswith("Z")
    assert timestamp(failed["completeTime"]) == 1_700_000_030.0
def list_clusters_raw(sim: Simulator, key: str, **query: int) -> tuple[int, dict]:
    """(HTTP status, body) of one GET /v2/clusters, errors included."""
    request = urllib.request.Request(
        f"{sim.base_url}/v2/clusters?" + "&".join(f"{k}={v}" for k, v in query.items()),
        headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_control_plane_lists_a_keys_clusters_paged_and_changeable(simulator) -> None:
    for name in ("a", "b", "c"):
        simulator.add_cluster(name, "v2", api_key="k1")
    simulator.add_cluster("other", "v2", api_key="k2")
    status, body = list_clusters_raw(simulator, "k1", pageSize=2, currentPage=1)
    assert status == 200 and body["code"] == 0
    data = body["data"]
    assert (data["count"], data["currentPage"], data["pageSize"]) == (3, 1, 2)
    assert [c["clusterId"] for c in data["clusters"]] == ["in01-a", "in01-b"]
    assert {"clusterId", "clusterName", "regionId", "projectId", "plan", "status", "cuType",
            "cuSize", "connectAddress", "createTime"} <= set(data["clusters"][0])
    # renamed, stopped and removed at run time
    simulator.clusters["a"].rename("alpha")
    simulator.clusters["b"].set_status("STOPPED")
    simulator.remove_cluster("c")
    _, body = list_clusters_raw(simulator, "k1", pageSize=100)
    assert [(c["clusterId"], c["clusterName"], c["status"]) for c in body["data"]["clusters"]] \
        == [("in01-a", "alpha", "RUNNING"), ("in01-b", "b", "STOPPED")]
    # a key nobody holds, and one revoked, get what Zilliz Cloud answers
    assert list_clusters_raw(simulator, "nobody") == \
        (401, {"code": 21119, "message": "The apikey is illegal."})
    simulator.control_plane("k1").fail("auth_http", times=1)
    assert list_clusters_raw(simulator, "k1")[0] == 401
    assert list_clusters_raw(simulator, "k1", pageSize=101)[1]["code"] == 96008
    simulator.control_plane("k1").bare_array = True
    _, body = list_clusters_raw(simulator, "k1")
    assert [c["clusterId"] for c in body["data"]] == ["in01-a", "in01-b"]
