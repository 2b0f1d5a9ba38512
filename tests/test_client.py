from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from exporter.client import (
    ApiFailure, AuthFailure, ConnectionFailure, DecodeFailure, HttpFailure, TimeoutFailure,
    list_import_jobs, make_session, normalise_state, parse_retry_after,
)
from exporter.config import ClusterConfig, PollSettings

KEY = "zc-client-test-key-93b1"
V1 = ClusterConfig(name="a", url="https://controller.api.example.com", api="v1",
                   cluster_id="in01-x", api_key=KEY, settings=PollSettings(page_size=3))
V2 = ClusterConfig(name="b", url="https://api.cloud.zilliz.com", api="v2",
                   cluster_id="in01-y", api_key=KEY, db_name="db1",
                   settings=PollSettings(page_size=3))
V1_URL = f"{V1.url}/v1/vector/collections/import/list"
V2_URL = f"{V2.url}/v2/vectordb/jobs/import/list"


def fetch(cluster: ClusterConfig, page: int = 1):
    codes: list[str] = []
    result = list_import_jobs(make_session(cluster), cluster, page, codes.append)
    return result, codes


@pytest.mark.parametrize("raw,state", [
    ("ImportCompleted", "completed"), ("Completed", "completed"), ("ImportFailed", "failed"),
    ("Failed", "failed"), ("ImportPending", "pending"), ("Pending", "pending"),
    ("Importing", "importing"), ("ImportRunning", "importing"), ("Running", "importing"),
    ("WaitingForRetry", "waiting_for_retry")])
def test_state_normalisation(raw: str, state: str) -> None:
    assert normalise_state(raw) == state


@responses.activate
def test_v1_sends_get_with_query_and_bearer() -> None:
    responses.get(V1_URL, match=[
        matchers.query_param_matcher({"clusterId": "in01-x", "pageSize": "3",
                                      "currentPage": "2"}),
        matchers.header_matcher({"Authorization": f"Bearer {KEY}"})],
        json={"code": 200, "data": {"tasks": [
            {"collectionName": "c", "jobId": "j1", "state": "ImportRunning"},
            {"collectionName": "c", "jobId": 7, "state": "ImportCompleted"}], "count": 9}})
    page, codes = fetch(V1, 2)
    assert [(r.job_id, r.state, r.progress) for r in page.records] == \
        [("j1", "importing", -1), ("7", "completed", -1)]
    assert page.count == 9 and codes == ["200"]


@responses.activate
def test_v2_posts_json_body_with_empty_optionals_and_db_header() -> None:
    responses.post(V2_URL, match=[
        matchers.json_params_matcher({"clusterId": "in01-y", "pageSize": 3, "currentPage": 1,
                                      "dbName": "db1", "projectId": "", "regionId": ""}),
        matchers.header_matcher({"DB-Name": "db1"})],
        json={"code": 0, "data": {"records": [
            {"collectionName": "c", "jobId": "j", "state": "Importing", "progress": 40,
             "reason": ""}]}})
    page, _ = fetch(V2)
    assert page.records[0].progress == 40 and page.count is None


@pytest.mark.parametrize("code", [0, 200])
@responses.activate
def test_v2_accepts_code_0_and_the_old_milvus_200(code: int) -> None:
    """Milvus 2.4.0 to about 2.4.4 answered success with body code 200 on v2 routes."""
    responses.post(V2_URL, json={"code": code, "data": {"records": [
        {"collectionName": "c", "jobId": "j", "state": "Completed", "progress": 100}]}})
    page, _ = fetch(V2)
    assert [(r.job_id, r.state) for r in page.records] == [("j", "completed")]


@pytest.mark.parametrize("cluster,url,body,error,reason", [
    (V1, V1_URL, {"code": 80001, "message": "Invalid token"}, AuthFailure, "auth"),
    (V2, V2_URL, {"code": 21119, "message": "The apikey is illegal."}, AuthFailure, "auth"),
    (V2, V2_URL, {"code": 1800, "message": "user hasn't authenticated"}, AuthFailure, "auth"),
    (V2, V2_URL, {"code": 100, "message": "collection not found"}, ApiFailure, "api"),
    (V1, V1_URL, {"code": 0, "data": {}}, ApiFailure, "api"),  # v1 success is 200
    (V2, V2_URL, {"code": 1, "data": {}}, ApiFailure, "api"),   # v2 success is 0 (or 200)
    (V2, V2_URL, {"code": [0], "data": {}}, ApiFailure, "api"),  # a list is no code
    (V1, V1_URL, {"code": {"a": 1}, "message": "x"}, ApiFailure, "api"),
    (V2, V2_URL, {"data": {}}, DecodeFailure, "decode"),
    (V2, V2_URL, {"code": 0, "data": {"records": {"a": 1}}}, DecodeFailure, "decode"),
    (V2, V2_URL, {"code": 0, "data": {"records": [{"jobId": "x"}]}}, DecodeFailure, "decode"),
    (V2, V2_URL, {"code": 0, "data": []}, DecodeFailure, "decode"),
])
@responses.activate
def test_body_codes_are_classified(cluster, url, body, error, reason) -> None:
    responses.add(responses.GET if cluster.api == "v1" else responses.POST, url, json=body)
    with pytest.raises(error) as info:
        fetch(cluster)
    assert info.value.reason == reason and not info.value.retryable
    assert KEY not in str(info.value)


@pytest.mark.parametrize("status,error,reason,retryable", [
    (401, AuthFailure, "auth", False), (403, AuthFailure, "auth", False),
    (404, HttpFailure, "http", False), (429, HttpFailure, "http", True),
    (500, HttpFailure, "http", True), (503, HttpFailure, "http", True)])
@responses.activate
def test_http_statuses_are_classified(status, error, reason, retryable) -> None:
    responses.post(V2_URL, status=status, body="nope", headers={"Retry-After": "7"})
    with pytest.raises(error) as info:
        _, codes = fetch(V2)
    assert (info.value.reason, info.value.retryable) == (reason, retryable)
    if status == 429:
        assert info.value.retry_after == 7


@responses.activate
def test_transport_failures_are_classified() -> None:
    responses.post(V2_URL, body=requests.Timeout("read timed out"))
    with pytest.raises(TimeoutFailure) as info:
        fetch(V2)
    assert info.value.retryable and info.value.reason == "timeout"
    responses.replace(responses.POST, V2_URL,
                      body=requests.ConnectionError(f"Connection refused for Bearer {KEY}"))
    with pytest.raises(ConnectionFailure) as info2:
        fetch(V2)
    assert info2.value.reason == "connection" and KEY not in str(info2.value)
    responses.replace(responses.POST, V2_URL, body="{not json", status=200)
    with pytest.raises(DecodeFailure):
        fetch(V2)


@responses.activate
def test_request_codes_are_observed() -> None:
    responses.post(V2_URL, status=502)
    codes: list[str] = []
    with pytest.raises(HttpFailure):
        list_import_jobs(make_session(V2), V2, 1, codes.append)
    responses.replace(responses.POST, V2_URL, body=requests.ConnectionError("x"))
    with pytest.raises(ConnectionFailure):
        list_import_jobs(make_session(V2), V2, 1, codes.append)
    assert codes == ["502", "error"]


def test_server_messages_never_leak_a_user_password_key() -> None:
    milvus = ClusterConfig(name="m", url="http://m:19530", api="v2", api_key="root:hunter2pw")
    with responses.RequestsMock() as mock:
        mock.post("http://m:19530/v2/vectordb/jobs/import/list",
                  json={"code": 1800, "message": "bad password hunter2pw for root"})
        with pytest.raises(AuthFailure) as info:
            list_import_jobs(make_session(milvus), milvus, 1)
    assert "hunter2pw" not in str(info.value)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_session_settings(tmp_path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    insecure = ClusterConfig(name="i", url="https://x", api="v2",
                             tls_insecure_skip_verify=True)
    custom = ClusterConfig(name="c", url="https://x", api="v2", tls_ca_file=str(ca))
    assert make_session(insecure).verify is False
    assert make_session(custom).verify == str(ca)
    assert "Authorization" not in make_session(custom).headers
    assert json.dumps(dict(make_session(V2).headers)).count(KEY) == 1
