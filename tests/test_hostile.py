"""A server as an attacker or a buggy server would be: answers that never end, answers
far too large, bodies that break parsers. Every one must end as a published poll
outcome with one of the contract's reasons, never an exception or a hang."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from exporter.answers import parse_describe_answer, parse_list_answer
from exporter.client import list_import_jobs, make_session
from exporter.errors import (
    ConnectionFailure, PollFailure, DecodeFailure, PaginationFailure, TimeoutFailure,
    label_text,
)
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.jobs import Listing
from exporter.board import SnapshotBoard
from exporter.paging import fetch_listing
from exporter.poller import ClusterPoller
from exporter.ratelimit import Pacer, RateLimits, pace

from conftest import StubApi

Writer = Callable[[BaseHTTPRequestHandler], None]
LIST = "/v2/vectordb/jobs/import/list"


class QuietHTTPServer(ThreadingHTTPServer):
    """A test server whose client hung up (the API client drops a connection it will
    not read to the end) prints no traceback: only a real error does."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HostileServer:
    """A loopback HTTP server whose every answer is written by ``writer``."""

    def __init__(self, writer: Writer) -> None:
        stop = self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    writer(self)
                except OSError:     # the client gave up: that is the point
                    pass
                self.close_connection = True

        Handler.stop = stop   # type: ignore[attr-defined]
        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def cluster(self, **settings: Any) -> ClusterConfig:
        return ClusterConfig(name="hostile", url=f"http://127.0.0.1:{self.server.server_port}",
                             api="v2", settings=PollSettings(retries=0, **settings))


def endless_chunks(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"d\r\n{\"code\": 0, \"\r\n")
    chunk = b" " * 4096
    while not handler.stop.is_set():   # type: ignore[attr-defined]
        handler.wfile.write(b"1000\r\n" + chunk + b"\r\n")
        time.sleep(0.001)


def records_body(n: int) -> bytes:
    records = [{"jobId": str(i), "collectionName": "c", "state": "Pending"} for i in range(n)]
    return json.dumps({"code": 0, "data": {"records": records}}).encode()


def test_an_answer_broken_off_is_counted_under_the_status_that_came() -> None:
    """The headers said 200 and 100 bytes; 10 came: a broken answer (connection, worth a
    retry), counted as the 200 it was, not as a request that got no answer."""
    def broken_off(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100")
        handler.end_headers()
        handler.wfile.write(b'{"code": 0,')

    codes: list[tuple[str, str]] = []
    with HostileServer(broken_off) as server:
        cluster = server.cluster()
        with pytest.raises(ConnectionFailure, match="broke off its answer") as info:
            list_import_jobs(make_session(cluster), cluster, 1,
                             lambda *seen: codes.append(seen))
    assert info.value.retryable and codes == [("list", "200")]


def test_an_endless_answer_fails_with_timeout_within_the_timeout() -> None:
    with HostileServer(endless_chunks) as server:
        cluster = server.cluster(timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutFailure, match="no complete answer from .* within 0.5s"):
            list_import_jobs(make_session(cluster), cluster, 1)
        # generous: the bound is the timeout, not each read's timeout
        assert time.monotonic() - started < 0.5 + 2.5


def test_a_slow_drip_is_bounded_by_the_whole_timeout() -> None:
    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        while not handler.stop.is_set():   # type: ignore[attr-defined]
            handler.wfile.write(b" ")
            time.sleep(0.1)       # each read is well within the timeout

    with HostileServer(drip) as server:
        cluster = server.cluster(timeout=0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutFailure):
            list_import_jobs(make_session(cluster), cluster, 1)
        assert time.monotonic() - started < 0.5 + 2.5


def trickled_headers(handler: BaseHTTPRequestHandler) -> None:
    """A status line, then headers a byte every 0.1 s, never finishing them."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    handler.wfile.flush()
    for byte in b"X-Slow: " + b"z" * 1000:
        if handler.stop.is_set():   # type: ignore[attr-defined]
            return
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.1)


@pytest.mark.parametrize("paced", [False, True])
def test_trickled_headers_are_bounded_by_the_whole_timeout(paced: bool) -> None:
    """requests bounds each read; the deadline bounds the headers as a whole."""
    with HostileServer(trickled_headers) as server:
        cluster = server.cluster(timeout=0.5)
        session = make_session(cluster)
        if paced:
            pace(session, Pacer(RateLimits(), cluster.host, cluster.api_key, 100))
        started = time.monotonic()
        with pytest.raises(TimeoutFailure):
            list_import_jobs(session, cluster, 1)
        assert time.monotonic() - started < 0.5 + 2.5


@pytest.mark.parametrize("declare_length", [True, False])
def test_an_answer_past_max_response_bytes_is_decode_naming_the_limit(
        declare_length: bool) -> None:
    body = records_body(5000)          # about 300 KB of valid JSON

    def large(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        if declare_length:
            handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)

    with HostileServer(large) as server:
        cluster = server.cluster(max_response_bytes=64 * 1024)
        with pytest.raises(DecodeFailure, match="max_response_bytes=65536"):
            list_import_jobs(make_session(cluster), cluster, 1)
        within = server.cluster(max_response_bytes=len(body))
        page = list_import_jobs(make_session(within), within, 1)
        assert len(page.records) == 5000


def test_a_gzip_bomb_is_capped_after_inflating() -> None:
    bomb = gzip.compress(b" " * (8 * 1024 * 1024))    # 8 MiB of spaces, ~8 KB on the wire

    def inflating(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    with HostileServer(inflating) as server:
        cluster = server.cluster(max_response_bytes=1024 * 1024)
        with pytest.raises(DecodeFailure, match="max_response_bytes"):
            list_import_jobs(make_session(cluster), cluster, 1)


def test_a_later_page_larger_than_asked_is_pagination(stub: StubApi) -> None:
    cluster = ClusterConfig(name="c", url=stub.url, api="v2",
                            settings=PollSettings(page_size=2, retries=0))
    page1 = {"code": 0, "data": {"records": [
        {"jobId": "1", "state": "Pending"}, {"jobId": "2", "state": "Pending"}]}}
    page2 = json.loads(records_body(3).decode())
    for i in page2["data"]["records"]:
        i["jobId"] = "x" + i["jobId"]
    stub.add("POST", LIST, json=page1)
    stub.add("POST", LIST, json=page2)
    with pytest.raises(PaginationFailure, match="page 2 held 3 jobs"):
        fetch_listing(make_session(cluster), cluster)


# ---- total parsing ------------------------------------------------------------------

V2 = ClusterConfig(name="p", url="https://api.example.com", api="v2", api_key="k-secret")
V1 = ClusterConfig(name="p", url="https://controller.api.example.com", api="v1")


def listing_of(*records: dict[str, Any]) -> bytes:
    return json.dumps({"code": 0, "data": {"records": list(records)}}).encode()


@pytest.mark.parametrize("body,reason", [
    (b'{"code": [1], "message": "x"}', "api"),
    (b'{"code": {"a": 1}}', "api"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": "Pending", '
     b'"progress": NaN}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": "Pending", '
     b'"progress": Infinity}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": "Pending", '
     b'"progress": 1e400}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": "Pending", '
     b'"progress": "50"}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": ["Pending"]}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": "1", "state": "Failed", '
     b'"reason": {"nested": 1}}]}}', "decode"),
    (b'{"code": 0, "data": {"records": [{"jobId": 1.5, "state": "Pending"}]}}', "decode"),
    (b"[" * 100_000 + b"]" * 100_000, "decode"),
    (b'{"code": 0, "data": ' + b"[" * 5000 + b"]" * 5000 + b"}", "decode"),
    (b"\xff\xfe\x00garbage", "decode"),
])
def test_malformed_answers_are_contract_reasons(body: bytes, reason: str) -> None:
    with pytest.raises(PollFailure) as failure:
        parse_list_answer(body, V2)
    assert failure.value.reason == reason


def test_out_of_range_progress_is_clamped_and_fits_the_listing() -> None:
    page = parse_list_answer(listing_of(
        {"jobId": "1", "state": "Importing", "progress": 2 ** 40},
        {"jobId": "2", "state": "Importing", "progress": -2 ** 70},
        {"jobId": 3, "state": "Importing", "progress": 42.6}), V2)
    assert [r.progress for r in page.records] == [100, 0, 43]
    assert [r.progress for r in Listing.of(page.records)] == [100, 0, 43]


def test_server_text_becomes_label_safe() -> None:
    page = parse_list_answer(listing_of(
        {"jobId": "j\ud800", "collectionName": "c\ud800\x00\x1b[31m", "state": "Fai\x07led",
         "reason": "bad\ud83d row\nhere"}), V2)
    record = page.records[0]
    assert record == ("j\ufffd", "c\ufffd[31m", "failed", -1)
    assert page.reasons["j\ufffd"] == "bad\ufffd row here"
    for text in (*record[:3], page.reasons["j\ufffd"]):
        text.encode("utf-8")
    assert label_text("plain-name_1.0") == "plain-name_1.0"


@pytest.mark.parametrize("data", [
    {"progress": -1e308}, {"progress": 1e308, "importedRows": 1e308, "totalRows": -1},
    {"state": ["x"], "reason": {"a": 1}}, {"importedRows": 2 ** 80},
])
def test_describe_numbers_and_types_never_raise(data: dict[str, Any]) -> None:
    body = json.dumps({"code": 0, "data": data}).encode()
    details = parse_describe_answer(body, V2, "1")
    assert 0 <= details.progress <= 100 or details.progress == -1
    v1 = json.dumps({"code": 200, "data": {"readyPercentage": 1e308}}).encode()
    assert parse_describe_answer(v1, V1, "1").progress == 100


# Any JSON value, anywhere a server could put it.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None), max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["code", "data", "records", "tasks", "jobId", "state",
                                       "collectionName", "progress", "reason", "count",
                                       "message", "totalRows", "importedRows",
                                       "readyPercentage", "errorMessage"]) | st.text(max_size=4),
                      inner, max_size=6),
    max_leaves=20)
record = st.fixed_dictionaries({"jobId": json_values, "state": json_values}, optional={
    "collectionName": json_values, "progress": json_values, "reason": json_values})
answers = st.one_of(
    json_values,
    st.builds(lambda code, recs: {"code": code, "data": {"records": recs, "tasks": recs}},
              st.sampled_from([0, 200]), st.lists(record, max_size=4)),
    st.builds(lambda code, data: {"code": code, "data": data},
              st.sampled_from([0, 200]), json_values))
PROPERTY = settings(max_examples=200, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _only_contract_failures(body: bytes) -> None:
    for cluster in (V1, V2):
        try:
            page = parse_list_answer(body, cluster)
        except PollFailure as failure:
            assert failure.reason in ("api", "auth", "decode")
        else:
            listing = Listing.of(page.records)    # the poller's store takes every record
            for job_id, collection, state, progress in listing:
                assert -1 <= progress <= 100
                for text in (job_id, collection, state, *page.reasons.values()):
                    text.encode("utf-8")
                    assert text == label_text(text)
        try:
            parse_describe_answer(body, cluster, "1")
        except PollFailure as failure:
            assert failure.reason in ("api", "auth", "decode")


@PROPERTY
@given(answers)
def test_any_json_answer_is_a_listing_or_a_contract_failure(value: Any) -> None:
    _only_contract_failures(json.dumps(value, allow_nan=False).encode())


@PROPERTY
@given(st.binary(max_size=64))
def test_any_bytes_are_a_listing_or_a_contract_failure(body: bytes) -> None:
    _only_contract_failures(body)


# ---- belt and braces ----------------------------------------------------------------

class BrokenHistory(JobHistory):
    def apply(self, *args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")


def test_a_bug_in_a_poll_publishes_a_failed_snapshot_and_logs_once(
        stub: StubApi, caplog: pytest.LogCaptureFixture) -> None:
    cluster = ClusterConfig(name="c", url=stub.url, api="v2",
                            settings=PollSettings(retries=0, max_describes_per_poll=0))
    stub.add("POST", LIST, body=listing_of({"jobId": "1", "state": "Pending"}))
    board = SnapshotBoard()
    poller = ClusterPoller(cluster, board, BrokenHistory("c"))
    with caplog.at_level(logging.WARNING, logger="exporter.poller"):
        poller.poll_once()
        snapshot = poller.poll_once()
    assert board.get("c") == snapshot
    assert snapshot.polled and not snapshot.up
    assert snapshot.poll_errors == {"decode": 2}
    assert "ZeroDivisionError" in snapshot.last_error
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].levelno == logging.ERROR


def test_a_lone_surrogate_from_a_server_leaves_every_cluster_served() -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    from conftest import FakeClock, parse_metrics
    from exporter.collector import ImportCollector
    from exporter.simulator import Simulator
    from exporter.exposition import ExpositionCache

    board, clock = SnapshotBoard(), FakeClock()
    with Simulator() as sim:
        for name, collection in (("bad", "x\ud800\x00y"), ("good", "docs")):
            sim.add_cluster(name, "v2").add_jobs(2, collection, "importing", progress=10)
            config = ClusterConfig(name=name, url=sim.url_for(name), api="v2",
                                   cluster_id=sim.clusters[name].cluster_id,
                                   api_key=sim.clusters[name].api_key,
                                   settings=PollSettings(retries=0))
            assert ClusterPoller(config, board, JobHistory(name, clock=clock),
                                 clock=clock).poll_once().up
    registry = CollectorRegistry()
    registry.register(ImportCollector(board, clock=clock))
    encoder, content_type = choose_encoder("")
    metrics = parse_metrics(ExpositionCache(registry, board, clock).body(
        encoder, content_type, False).decode())
    importing = {dict(labels)["cluster_name"]: (dict(labels)["collection"], value)
                 for (name, labels), value in metrics.items()
                 if name == "zilliz_import_jobs" and dict(labels)["state"] == "importing"}
    assert importing == {"bad": ("x\ufffdy", 2), "good": ("docs", 2)}
    assert metrics[("zilliz_import_render_errors_total", ())] == 0


def test_the_watchdog_fires_only_what_is_still_armed() -> None:
    """On a fake clock: a disarmed watch is never fired, an armed one past due is."""
    from exporter.deadline import Watchdog

    class Sock:
        def __init__(self) -> None:
            self.shut = threading.Event()

        def shutdown(self, how: int) -> None:
            self.shut.set()
    now = [100.0]
    dog = Watchdog(clock=lambda: now[0])
    done, late = Sock(), Sock()
    dog.disarm(dog.arm(101.0, done))
    dog.arm(102.0, late)
    now[0] = 103.0                  # the thread looks again when its wait times out
    assert late.shut.wait(5) and not done.shut.is_set()
