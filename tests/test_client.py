"""The API client's requests and answers, through ``responses`` (the stub fixture);
tests/test_deadline.py holds what needs real sockets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import requests

from exporter.answers import CloudCluster, JobDetails
from exporter.client import (
    describe_import_job, list_clusters, list_import_jobs, make_session, parse_retry_after,
)
from exporter.errors import (
    MAX_REASON_CHARS, ApiFailure, AuthFailure, ConnectionFailure, DecodeFailure,
    HttpFailure, PollFailure, TimeoutFailure, failure_text,
)
from exporter.jobs import normalise_state
from exporter.config import ClusterConfig, DiscoveryConfig, PollSettings

from conftest import StubApi, StubCall

KEY = "zc-client-test-key-93b1"
# fetch and describe send to the stub (see at); these URLs name real servers.
V1 = ClusterConfig(name="a", url="https://controller.api.example.com", api="v1",
                   cluster_id="in01-x", api_key=KEY, settings=PollSettings(page_size=3))
V2 = ClusterConfig(name="b", url="https://api.cloud.zilliz.com", api="v2",
                   cluster_id="in01-y", api_key=KEY, db_name="db1",
                   settings=PollSettings(page_size=3))
V1_LIST = "/v1/vector/collections/import/list"
V2_LIST = "/v2/vectordb/jobs/import/list"


def at(stub: StubApi, cluster: ClusterConfig, **settings: float) -> ClusterConfig:
    """The cluster with its API at the stub (and ``settings`` changed)."""
    return dataclasses.replace(cluster, url=stub.url, settings=dataclasses.replace(
        cluster.settings, **settings))


def fetch(stub: StubApi, cluster: ClusterConfig, page: int = 1, **settings: float):
    codes: list[str] = []
    cluster = at(stub, cluster, **settings)
    result = list_import_jobs(make_session(cluster), cluster, page,
                              lambda endpoint, code: codes.append(code))
    return result, codes


def only_call(stub: StubApi) -> StubCall:
    (call,) = stub.calls
    return call


@pytest.mark.parametrize("raw,state", [
    ("ImportCompleted", "completed"), ("Completed", "completed"), ("ImportFailed", "failed"),
    ("Failed", "failed"), ("ImportPending", "pending"), ("Pending", "pending"),
    ("Importing", "importing"), ("ImportRunning", "importing"), ("Running", "importing"),
    ("WaitingForRetry", "waiting_for_retry")])
def test_state_normalisation(raw: str, state: str) -> None:
    assert normalise_state(raw) == state


def test_v1_sends_get_with_query_and_bearer(stub: StubApi) -> None:
    stub.add("GET", V1_LIST, json={"code": 200, "data": {"tasks": [
        {"collectionName": "c", "jobId": "j1", "state": "ImportRunning"},
        {"collectionName": "c", "jobId": 7, "state": "ImportCompleted"}], "count": 9}})
    page, codes = fetch(stub, V1, 2)
    assert [(r.job_id, r.state, r.progress) for r in page.records] == \
        [("j1", "importing", -1), ("7", "completed", -1)]
    assert page.count == 9 and codes == ["200"]
    call = only_call(stub)
    assert call.query == {"clusterId": "in01-x", "pageSize": "3", "currentPage": "2"}
    assert call.headers["Authorization"] == f"Bearer {KEY}"


def test_v2_posts_json_body_with_empty_optionals_and_db_header(stub: StubApi) -> None:
    stub.add("POST", V2_LIST, json={"code": 0, "data": {"records": [
        {"collectionName": "c", "jobId": "j", "state": "Importing", "progress": 40,
         "reason": ""}]}})
    page, _ = fetch(stub, V2)
    assert page.records[0].progress == 40 and page.count is None
    call = only_call(stub)
    assert call.json == {"clusterId": "in01-y", "pageSize": 3, "currentPage": 1,
                         "dbName": "db1", "projectId": "", "regionId": ""}
    assert call.headers["DB-Name"] == "db1"


@pytest.mark.parametrize("code", [0, 200])
def test_v2_accepts_code_0_and_the_old_milvus_200(stub: StubApi, code: int) -> None:
    """Milvus 2.4.0 to about 2.4.4 answered success with body code 200 on v2 routes."""
    stub.add("POST", V2_LIST, json={"code": code, "data": {"records": [
        {"collectionName": "c", "jobId": "j", "state": "Completed", "progress": 100}]}})
    page, _ = fetch(stub, V2)
    assert [(r.job_id, r.state) for r in page.records] == [("j", "completed")]


@pytest.mark.parametrize("cluster,path,body,error,reason", [
    (V1, V1_LIST, {"code": 80001, "message": "Invalid token"}, AuthFailure, "auth"),
    (V1, V1_LIST, {"code": 80002, "message": "The token is invalid"}, AuthFailure, "auth"),
    (V2, V2_LIST, {"code": 21119, "message": "The apikey is illegal."}, AuthFailure, "auth"),
    *[(V2, V2_LIST, {"code": code, "message": "no permission for the cluster"}, AuthFailure,
       "auth") for code in (96014, 96015, 96016, 96017)],
    (V2, V2_LIST, {"code": 96008, "message": "pageSize out of range"}, ApiFailure, "api"),
    (V2, V2_LIST, {"code": 1800, "message": "user hasn't authenticated"}, AuthFailure, "auth"),
    (V2, V2_LIST, {"code": 100, "message": "collection not found"}, ApiFailure, "api"),
    (V1, V1_LIST, {"code": 0, "data": {}}, ApiFailure, "api"),  # v1 success is 200
    (V2, V2_LIST, {"code": 1, "message": "service not ready"}, ApiFailure, "api"),
    (V2, V2_LIST, {"code": [0], "data": {}}, ApiFailure, "api"),  # a list is no code
    (V1, V1_LIST, {"code": {"a": 1}, "message": "x"}, ApiFailure, "api"),
    (V2, V2_LIST, {"data": {}}, DecodeFailure, "decode"),
    (V2, V2_LIST, {"code": 0, "data": {"records": {"a": 1}}}, DecodeFailure, "decode"),
    (V2, V2_LIST, {"code": 0, "data": {"records": [{"jobId": "x"}]}}, DecodeFailure, "decode"),
    (V2, V2_LIST, {"code": 0, "data": []}, DecodeFailure, "decode"),
])
def test_body_codes_are_classified(stub, cluster, path, body, error, reason) -> None:
    stub.add("GET" if cluster.api == "v1" else "POST", path, json=body)
    with pytest.raises(error) as info:
        fetch(stub, cluster)
    assert info.value.reason == reason and not info.value.retryable
    assert isinstance(info.value, PollFailure)      # the root: every way a poll fails
    assert isinstance(info.value, ApiFailure) == (reason == "api")
    assert KEY not in str(info.value)


@pytest.mark.parametrize("status,error,reason,retryable", [
    (401, AuthFailure, "auth", False), (403, AuthFailure, "auth", False),
    (404, HttpFailure, "http", False), (429, HttpFailure, "http", True),
    (500, HttpFailure, "http", True), (503, HttpFailure, "http", True)])
def test_http_statuses_are_classified(stub, status, error, reason, retryable) -> None:
    stub.add("POST", V2_LIST, status=status, body="nope", headers={"Retry-After": "7"})
    with pytest.raises(error) as info:
        _, codes = fetch(stub, V2)
    assert (info.value.reason, info.value.retryable) == (reason, retryable)
    if status == 429:
        assert info.value.retry_after == 7


def test_a_redirect_is_not_followed_and_names_where_to(stub: StubApi) -> None:
    """A redirected POST would not be the same call: the operator fixes ``url``."""
    stub.add("POST", V2_LIST, status=301, headers={"Location": "https://new.example/v2\t"})
    with pytest.raises(HttpFailure, match="HTTP 301 from .*: redirects to "
                       "https://new.example/v2; set url to it") as info:
        fetch(stub, V2)
    assert info.value.reason == "http" and not info.value.retryable
    assert len(stub.calls) == 1


def test_transport_failures_are_classified(stub: StubApi) -> None:
    stub.add("POST", V2_LIST, hang=True)
    with pytest.raises(TimeoutFailure) as info:
        fetch(stub, V2)
    assert info.value.retryable and info.value.reason == "timeout"
    stub.replace("POST", V2_LIST, drop=True)
    with pytest.raises(ConnectionFailure) as info2:
        fetch(stub, V2)
    assert info2.value.reason == "connection" and KEY not in str(info2.value)
    stub.replace("POST", V2_LIST, body="{not json", status=200)
    with pytest.raises(DecodeFailure):
        fetch(stub, V2)


def test_request_codes_are_observed(stub: StubApi) -> None:
    stub.add("POST", V2_LIST, status=502)
    cluster = at(stub, V2)
    codes: list[tuple[str, str]] = []
    with pytest.raises(HttpFailure):
        list_import_jobs(make_session(cluster), cluster, 1, lambda *seen: codes.append(seen))
    stub.replace("POST", V2_LIST, drop=True)
    with pytest.raises(ConnectionFailure):
        list_import_jobs(make_session(cluster), cluster, 1, lambda *seen: codes.append(seen))
    assert codes == [("list", "502"), ("list", "error")]


def test_server_messages_never_leak_a_user_password_key(stub: StubApi) -> None:
    milvus = ClusterConfig(name="m", url=stub.url, api="v2", api_key="root:hunter2pw")
    stub.add("POST", V2_LIST, json={"code": 1800, "message": "bad password hunter2pw for root"})
    with pytest.raises(AuthFailure) as info:
        list_import_jobs(make_session(milvus), milvus, 1)
    assert "hunter2pw" not in str(info.value) and len(stub.calls) == 1


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470) == 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_request_sends_the_key_once_and_nothing_that_is_unset(stub) -> None:
    stub.add("POST", "/v2/vectordb/jobs/import/list", json={"code": 0, "data": {}})
    keyless = ClusterConfig(name="k", url=stub.url, api="v2")
    list_import_jobs(make_session(keyless), keyless, 1)
    keyed = at(stub, V2)
    list_import_jobs(make_session(keyed), keyed, 1)
    keyless_call, keyed_call = stub.calls
    assert "Authorization" not in keyless_call.headers and "DB-Name" not in keyless_call.headers
    sent = "".join(f"{name}: {value}\n" for name, value in keyed_call.headers.items())
    assert sent.count(KEY) == 1
    assert keyed_call.headers["User-Agent"].startswith("zilliz-import-exporter/")
    assert keyed_call.headers["Accept-Encoding"] == "gzip"


# ---- describe one job ------------------------------------------------------------------

V1_GET = "/v1/vector/collections/import/get"
V2_DESCRIBE = "/v2/vectordb/jobs/import/describe"
V2_GET_PROGRESS = "/v2/vectordb/jobs/import/get_progress"


def describe(stub: StubApi, cluster: ClusterConfig, job_id: str = "j1", **kwargs: bool):
    seen: list[tuple[str, str]] = []
    cluster = at(stub, cluster)
    details = describe_import_job(make_session(cluster), cluster, job_id,
                                  observe=lambda *pair: seen.append(pair), **kwargs)
    return details, seen


def test_v1_describe_reads_ready_percentage_and_error_message(stub: StubApi) -> None:
    stub.add("GET", V1_GET, json={"code": 200, "data": {
        "collectionName": "medium_articles", "fileName": "1af7/1.parquet",
        "fileSize": 19599887, "readyPercentage": 37.6, "completeTime": None,
        "errorMessage": None, "jobId": "j1", "details": []}})
    details, seen = describe(stub, V1)
    assert details == JobDetails("j1", progress=38) and seen == [("describe", "200")]
    assert only_call(stub).query == {"jobId": "j1", "clusterId": "in01-x"}
    stub.replace("GET", V1_GET, json={"code": 200, "data": {
        "jobId": "j1", "readyPercentage": 0, "errorMessage": "file\n  not   found"}})
    assert describe(stub, V1)[0] == JobDetails("j1", progress=0, reason="file not found")


@pytest.mark.parametrize("code", [0, 200])   # Milvus 2.4.0-2.4.4 answered 200
def test_v2_describe_reads_rows_and_reason(stub: StubApi, code: int) -> None:
    stub.add("POST", V2_DESCRIBE, json={"code": code, "data": {
        "jobId": "j1", "collectionName": "c", "state": "Importing", "progress": 55,
        "importedRows": 1200, "totalRows": 5000, "completeTime": "", "details": []}})
    details, _ = describe(stub, V2)
    assert details == JobDetails("j1", progress=55, imported_rows=1200, total_rows=5000,
                                 state="importing")
    call = only_call(stub)
    assert call.json == {"jobId": "j1", "clusterId": "in01-y", "projectId": "", "regionId": ""}
    assert (call.headers["DB-Name"], call.headers["Authorization"]) == ("db1", f"Bearer {KEY}")


def test_describe_failures_use_the_same_classes_and_get_progress_path(
        stub: StubApi) -> None:
    stub.add("POST", V2_DESCRIBE, status=404, body="404 page not found")
    with pytest.raises(HttpFailure) as info:
        describe(stub, V2)
    assert info.value.status == 404
    stub.add("POST", V2_GET_PROGRESS, json={"code": 2100,
                                            "message": "import job does not exist, jobID=9"})
    with pytest.raises(ApiFailure) as api:
        describe(stub, V2, get_progress=True)
    assert api.value.reason == "api" and "does not exist" in str(api.value)
    stub.add("POST", V2_GET_PROGRESS, status=401)
    with pytest.raises(AuthFailure):
        describe(stub, V2, get_progress=True)


def test_failure_text_is_one_short_line_without_the_key() -> None:
    raw = f"bad file s3://b/x.parquet\n\tauth {KEY} refused " + "x" * 300
    text = failure_text(raw, KEY)
    assert "\n" not in text and "\t" not in text and KEY not in text
    assert len(text) == 200 and text.startswith("bad file s3://b/x.parquet auth <secret>")
    assert failure_text("pw hunter2pw leaked", "root:hunter2pw") == "pw <secret> leaked"
    assert failure_text(None, KEY) == ""


def test_list_reasons_are_sanitised_and_kept_apart(stub: StubApi) -> None:
    stub.add("POST", V2_LIST, json={"code": 0, "data": {"records": [
        {"collectionName": "c", "jobId": "f", "state": "Failed", "progress": 0,
         "reason": f"schema\nmismatch {KEY}"},
        {"collectionName": "c", "jobId": "ok", "state": "Completed", "progress": 100,
         "reason": ""}]}})
    page, _ = fetch(stub, V2)
    assert dict(page.reasons) == {"f": "schema mismatch <secret>"}


def test_a_key_echoed_across_the_200_character_cut_never_leaves_a_prefix(
        stub: StubApi) -> None:
    """The message is scrubbed before it is cut: a cut key would escape the scrub."""
    half = len(KEY) // 2
    padding = "x" * (MAX_REASON_CHARS - 1 - half - 1)    # the cut falls mid-key
    stub.add("POST", V2_LIST, json={"code": 1100, "message": f"{padding} {KEY} trailing"})
    with pytest.raises(ApiFailure) as info:
        fetch(stub, V2)
    assert KEY[:half] not in str(info.value)


# ---- times in describe answers (API-NOTES "Times in the answers") ------------------

@pytest.mark.parametrize("raw,seconds", [
    ("2024-06-01T10:00:00Z", 1717236000.0),               # Zilliz v2: UTC
    ("2024-06-01T18:00:00+08:00", 1717236000.0),          # Milvus: the server's offset
    ("2024-06-01T10:00:00.250z", 1717236000.25),
    ("2024-06-01T10:00:00.123456789-01:30", 1717241400.123456),   # Go's nanoseconds
    ("2024-06-01 10:00:00", None),                        # no zone: any of 25 hours
    ("", None), (None, None), (1717236000, None), ("soon", None),
    ("2024-13-01T10:00:00Z", None), ("0001-01-01T00:00:00Z", None),   # Go's zero time
    ("0001-01-01T00:00:00+08:00", None)])
def test_times_are_read_only_with_their_zone(raw: object, seconds: float | None) -> None:
    from exporter.answers import timestamp
    assert timestamp(raw) == seconds


def test_describe_reads_create_and_complete_times() -> None:
    from exporter.answers import parse_describe_answer
    answer = {"code": 0, "data": {"jobId": "j", "state": "Completed", "progress": 100,
                                  "createTime": "2024-06-01T17:00:00+08:00",
                                  "completeTime": "2024-06-01T18:00:00+08:00"}}
    details = parse_describe_answer(json.dumps(answer).encode(), V2, "j")
    assert (details.create_time, details.complete_time) == (1717232400.0, 1717236000.0)
    running = {"code": 0, "data": {"jobId": "j", "state": "Importing", "completeTime": ""}}
    details = parse_describe_answer(json.dumps(running).encode(), V2, "j")
    assert (details.create_time, details.complete_time) == (None, None)
    v1 = {"code": 200, "data": {"jobId": "j", "readyPercentage": 100,
                                "completeTime": "2024-06-01T10:00:00Z"}}
    assert parse_describe_answer(json.dumps(v1).encode(), V1, "j").complete_time == \
        1717236000.0
# ---- discovery: the clusters a key can see -----------------------------------------------

SOURCE = DiscoveryConfig(name="prod", api_key=KEY, settings=PollSettings(page_size=2))
CLUSTERS = "/v2/clusters"


def listed(cluster_id: str, **fields: object) -> dict:
    return {"clusterId": cluster_id, "clusterName": f"name {cluster_id}",
            "regionId": "aws-us-west-2", "projectId": "proj-1", "plan": "Serverless",
            "status": "RUNNING", "cuSize": 1, "createTime": "2024-06-01T10:00:00Z", **fields}


def clusters_page(stub: StubApi, page: int = 1):
    source = dataclasses.replace(SOURCE, url=stub.url)
    codes: list[str] = []
    result = list_clusters(make_session(source.control_plane), source, page,
                           lambda endpoint, code: codes.append(f"{endpoint} {code}"))
    return result, codes


@pytest.mark.parametrize("data", [
    {"count": 3, "currentPage": 2, "pageSize": 2, "clusters": [listed("in01-a")]},
    [listed("in01-a")]], ids=["object", "bare-array"])
def test_list_clusters_reads_data_as_an_object_or_a_bare_array(stub: StubApi,
                                                               data: object) -> None:
    stub.add("GET", CLUSTERS, json={"code": 0, "data": data})
    page, codes = clusters_page(stub, 2)
    assert page.records == (CloudCluster("in01-a", "name in01-a", "aws-us-west-2", "proj-1",
                                         "Serverless", "RUNNING"),)
    assert page.count == (3 if isinstance(data, dict) else None)
    call = only_call(stub)
    assert call.method == "GET" and call.query == {"pageSize": "2", "currentPage": "2"}
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert codes == ["clusters 200"]


def test_list_clusters_reads_what_is_absent_as_empty_and_accepts_code_200(stub) -> None:
    stub.add("GET", CLUSTERS, json={"code": 200, "data": {"clusters": [
        {"clusterId": "in01-b", "status": None}]}})
    page, _ = clusters_page(stub)
    assert page.records == (CloudCluster("in01-b"),) and page.count is None


@pytest.mark.parametrize("status, body, error, reason", [
    # what Zilliz Cloud answers a bad key (a recorded reply)
    (401, {"code": 21119, "message": "The apikey is illegal."}, AuthFailure, "auth"),
    (200, {"code": 21119, "message": "The apikey is illegal."}, AuthFailure, "auth"),
    (500, {"message": "oops"}, HttpFailure, "http"),
    (200, {"code": 65535, "message": "busy"}, ApiFailure, "api"),
    (200, {"code": 0, "data": "clusters"}, DecodeFailure, "decode"),
    (200, {"code": 0, "data": {"clusters": {"in01-a": {}}}}, DecodeFailure, "decode"),
    (200, {"code": 0, "data": {"clusters": [{"clusterName": "no id"}]}}, DecodeFailure,
     "decode"),
    (200, {"code": 0, "data": {"clusters": [{"clusterId": 7}]}}, DecodeFailure, "decode"),
    (200, {"code": 0, "data": {"clusters": [listed("in01-a", status=["RUNNING"])]}},
     DecodeFailure, "decode"),
])
def test_list_clusters_failures_are_classified_as_for_polls(stub, status, body, error,
                                                            reason) -> None:
    stub.add("GET", CLUSTERS, status=status, json=body)
    with pytest.raises(error) as info:
        clusters_page(stub)
    assert info.value.reason == reason and KEY not in str(info.value)


def test_list_clusters_texts_are_label_safe(stub: StubApi) -> None:
    stub.add("GET", CLUSTERS, json={"code": 0, "data": {"clusters": [
        listed("in01-a", clusterName="bad\x00name\ud800", status="RUN\nNING")]}})
    page, _ = clusters_page(stub)
    assert (page.records[0].name, page.records[0].status) == ("badname\ufffd", "RUNNING")


def test_a_proxy_password_never_leaves_in_a_failure(stub: StubApi) -> None:
    """requests' own messages may name the proxy with its password: the client's
    messages are its own, never a copy of them."""
    password = "pr0xy-pw%2F9"                 # percent-encoded in the URL, as users write it
    behind = dataclasses.replace(V2, settings=dataclasses.replace(
        V2.settings, proxy_url=f"http://ops:{password}@proxy.corp:3128"))
    stub.add("POST", V2_LIST, body=requests.exceptions.ProxyError(
        f"Unable to connect to proxy http://ops:{password}@proxy.corp:3128 (ops:pr0xy-pw/9)"))
    with pytest.raises(ConnectionFailure, match="through the proxy") as info:
        list_import_jobs(make_session(behind), behind, 1)
    assert "pr0xy-pw" not in str(info.value)
