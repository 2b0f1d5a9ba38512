from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from exporter.client import (
    MAX_REASON_CHARS,
    ApiFailure, AuthFailure, ConnectionFailure, DecodeFailure, HttpFailure, JobDetails,
    PollFailure, TimeoutFailure, describe_import_job, failure_text, list_import_jobs,
    make_session, parse_retry_after,
)
from exporter.jobs import normalise_state
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
    result = list_import_jobs(make_session(cluster), cluster, page,
                              lambda endpoint, code: codes.append(code))
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
    (V1, V1_URL, {"code": 80002, "message": "The token is invalid"}, AuthFailure, "auth"),
    (V2, V2_URL, {"code": 21119, "message": "The apikey is illegal."}, AuthFailure, "auth"),
    *[(V2, V2_URL, {"code": code, "message": "no permission for the cluster"}, AuthFailure,
       "auth") for code in (96014, 96015, 96016, 96017)],
    (V2, V2_URL, {"code": 96008, "message": "pageSize out of range"}, ApiFailure, "api"),
    (V2, V2_URL, {"code": 1800, "message": "user hasn't authenticated"}, AuthFailure, "auth"),
    (V2, V2_URL, {"code": 100, "message": "collection not found"}, ApiFailure, "api"),
    (V1, V1_URL, {"code": 0, "data": {}}, ApiFailure, "api"),  # v1 success is 200
    (V2, V2_URL, {"code": 1, "message": "service not ready"}, ApiFailure, "api"),
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
    assert isinstance(info.value, PollFailure)      # the root: every way a poll fails
    assert isinstance(info.value, ApiFailure) == (reason == "api")
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
    codes: list[tuple[str, str]] = []
    with pytest.raises(HttpFailure):
        list_import_jobs(make_session(V2), V2, 1, lambda *seen: codes.append(seen))
    responses.replace(responses.POST, V2_URL, body=requests.ConnectionError("x"))
    with pytest.raises(ConnectionFailure):
        list_import_jobs(make_session(V2), V2, 1, lambda *seen: codes.append(seen))
    assert codes == [("list", "502"), ("list", "error")]


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


# ---- describe one job ------------------------------------------------------------------

V1_GET = f"{V1.url}/v1/vector/collections/import/get"
V2_DESCRIBE = f"{V2.url}/v2/vectordb/jobs/import/describe"
V2_GET_PROGRESS = f"{V2.url}/v2/vectordb/jobs/import/get_progress"


def describe(cluster: ClusterConfig, job_id: str = "j1", **kwargs: bool):
    seen: list[tuple[str, str]] = []
    details = describe_import_job(make_session(cluster), cluster, job_id,
                                  observe=lambda *pair: seen.append(pair), **kwargs)
    return details, seen


@responses.activate
def test_v1_describe_reads_ready_percentage_and_error_message() -> None:
    responses.get(V1_GET, match=[matchers.query_param_matcher(
        {"jobId": "j1", "clusterId": "in01-x"})], json={"code": 200, "data": {
            "collectionName": "medium_articles", "fileName": "1af7/1.parquet",
            "fileSize": 19599887, "readyPercentage": 37.6, "completeTime": None,
            "errorMessage": None, "jobId": "j1", "details": []}})
    details, seen = describe(V1)
    assert details == JobDetails("j1", progress=38) and seen == [("describe", "200")]
    responses.replace(responses.GET, V1_GET, json={"code": 200, "data": {
        "jobId": "j1", "readyPercentage": 0, "errorMessage": "file\n  not   found"}})
    assert describe(V1)[0] == JobDetails("j1", progress=0, reason="file not found")


@pytest.mark.parametrize("code", [0, 200])   # Milvus 2.4.0-2.4.4 answered 200
@responses.activate
def test_v2_describe_reads_rows_and_reason(code: int) -> None:
    responses.post(V2_DESCRIBE, match=[
        matchers.json_params_matcher({"jobId": "j1", "clusterId": "in01-y", "projectId": "",
                                      "regionId": ""}),
        matchers.header_matcher({"DB-Name": "db1", "Authorization": f"Bearer {KEY}"})],
        json={"code": code, "data": {"jobId": "j1", "collectionName": "c",
                                     "state": "Importing", "progress": 55,
                                     "importedRows": 1200, "totalRows": 5000,
                                     "completeTime": "", "details": []}})
    details, _ = describe(V2)
    assert details == JobDetails("j1", progress=55, imported_rows=1200, total_rows=5000,
                                 state="importing")


@responses.activate
def test_describe_failures_use_the_same_classes_and_get_progress_path() -> None:
    responses.post(V2_DESCRIBE, status=404, body="404 page not found")
    with pytest.raises(HttpFailure) as info:
        describe(V2)
    assert info.value.status == 404
    responses.post(V2_GET_PROGRESS, json={"code": 2100,
                                          "message": "import job does not exist, jobID=9"})
    with pytest.raises(ApiFailure) as api:
        describe(V2, get_progress=True)
    assert api.value.reason == "api" and "does not exist" in str(api.value)
    responses.post(V2_GET_PROGRESS, status=401)
    with pytest.raises(AuthFailure):
        describe(V2, get_progress=True)


def test_failure_text_is_one_short_line_without_the_key() -> None:
    raw = f"bad file s3://b/x.parquet\n\tauth {KEY} refused " + "x" * 300
    text = failure_text(raw, KEY)
    assert "\n" not in text and "\t" not in text and KEY not in text
    assert len(text) == 200 and text.startswith("bad file s3://b/x.parquet auth <secret>")
    assert failure_text("pw hunter2pw leaked", "root:hunter2pw") == "pw <secret> leaked"
    assert failure_text(None, KEY) == ""


@responses.activate
def test_list_reasons_are_sanitised_and_kept_apart() -> None:
    responses.post(V2_URL, json={"code": 0, "data": {"records": [
        {"collectionName": "c", "jobId": "f", "state": "Failed", "progress": 0,
         "reason": f"schema\nmismatch {KEY}"},
        {"collectionName": "c", "jobId": "ok", "state": "Completed", "progress": 100,
         "reason": ""}]}})
    page, _ = fetch(V2)
    assert dict(page.reasons) == {"f": "schema mismatch <secret>"}


@responses.activate
def test_a_key_echoed_across_the_200_character_cut_never_leaves_a_prefix() -> None:
    """The message is scrubbed before it is cut: a cut key would escape the scrub."""
    half = len(KEY) // 2
    padding = "x" * (MAX_REASON_CHARS - 1 - half - 1)    # the cut falls mid-key
    responses.post(V2_URL, json={"code": 1100, "message": f"{padding} {KEY} trailing"})
    with pytest.raises(ApiFailure) as info:
        fetch(V2)
    assert KEY[:half] not in str(info.value)
