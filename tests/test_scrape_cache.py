"""/metrics under load and under bad data: one render per board change and second,
bad series left out and counted, bad requests answered at once."""

from __future__ import annotations

import dataclasses
import gzip
import socket
import threading
import time
import zlib
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from conftest import GOLDEN_NOW, FakeClock, golden_board, parse_metrics
from exporter.collector import ImportCollector
from exporter.summary import FailedJob
from exporter import web
from exporter.cli import ConfigRuntime, _run_once, build_registry
from exporter.config import ClusterConfig, Config, ConfigError, parse_config
from exporter.board import ClusterSnapshot, SnapshotBoard
from exporter.poller import PollerGroup
from exporter.exposition import ExpositionCache
from exporter.web import WebApp, create_server

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


class Counting(Collector):
    """One gauge per cluster name; counts how often it was collected."""

    def __init__(self, names: tuple[str, ...] = ("a", "b")) -> None:
        self.names = names
        self.collected = 0

    def collect(self) -> Iterator[Metric]:
        self.collected += 1
        family = GaugeMetricFamily("zilliz_import_up", "up", labels=["cluster_name"])
        for name in self.names:
            family.add_metric([name], 1)
        yield family


def cache_for(collector: Collector, enabled: bool = True
              ) -> tuple[ExpositionCache, SnapshotBoard, FakeClock]:
    registry = CollectorRegistry()
    registry.register(collector)
    board, clock = SnapshotBoard(), FakeClock()
    return ExpositionCache(registry, board, clock, enabled), board, clock


def text(cache: ExpositionCache, accept: str = "", gzipped: bool = False) -> str:
    encoder, content_type = choose_encoder(accept)
    body = cache.body(encoder, content_type, gzipped)
    return (gzip.decompress(body) if gzipped else body).decode()


def test_one_render_per_board_change_and_second_each_encoding_once() -> None:
    collector = Counting()
    cache, board, clock = cache_for(collector)
    first = text(cache)
    for _ in range(20):
        assert text(cache) == first
        assert text(cache, gzipped=True) == first        # compressed from the same render
    assert collector.collected == 1
    assert text(cache, OPENMETRICS).endswith("# EOF\n")
    assert text(cache, OPENMETRICS, gzipped=True) == text(cache, OPENMETRICS)
    assert collector.collected == 2                       # one per encoding
    clock.advance(0.5)
    text(cache)
    assert collector.collected == 2                       # same second
    clock.advance(0.5)
    text(cache)
    assert collector.collected == 3                       # ages move with the second
    board.publish(ClusterSnapshot(cluster=ClusterConfig(name="x", url="http://h", api="v2")))
    text(cache)
    assert collector.collected == 4                       # the board changed


def test_bypassed_cache_renders_every_scrape() -> None:
    collector = Counting()
    cache, _, _ = cache_for(collector, enabled=False)
    for _ in range(3):
        text(cache)
    assert collector.collected == 3


class Unencodable(Collector):
    """One label value that UTF-8 cannot encode (a lone surrogate), among good ones."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("zilliz_import_jobs", "jobs",
                                   labels=["cluster_name", "collection"])
        family.add_metric(["good", "docs"], 3)
        family.add_metric(["bad", "x\ud800"], 1)
        family.add_metric(["other", "images"], 2)
        yield family
        yield from Counting(("good", "bad", "other")).collect()


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_a_series_that_cannot_be_encoded_is_left_out_and_counted(accept: str) -> None:
    cache, _, clock = cache_for(Unencodable())
    body = text(cache, accept)
    metrics = parse_metrics(body)
    jobs = {labels: v for (name, labels), v in metrics.items() if name == "zilliz_import_jobs"}
    assert jobs == {(("cluster_name", "good"), ("collection", "docs")): 3,
                    (("cluster_name", "other"), ("collection", "images")): 2}
    assert len([k for k in metrics if k[0] == "zilliz_import_up"]) == 3
    assert metrics[("zilliz_import_render_errors_total", ())] == 1
    other = OPENMETRICS if not accept else ""     # the same second in the other encoding:
    assert parse_metrics(text(cache, other))[("zilliz_import_render_errors_total", ())] == 1
    clock.advance(1)
    assert parse_metrics(text(cache, accept))[("zilliz_import_render_errors_total", ())] == 2


class Crashing(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a bug")


def test_a_crashing_collector_leaves_the_others_served() -> None:
    registry = CollectorRegistry()
    registry.register(Counting())
    registry.register(Crashing())
    cache = ExpositionCache(registry, SnapshotBoard(), FakeClock())
    metrics = parse_metrics(text(cache))
    assert metrics[("zilliz_import_up", (("cluster_name", "a"),))] == 1
    assert metrics[("zilliz_import_render_errors_total", ())] == 1


# ---- the HTTP server ----------------------------------------------------------------------

@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    registry = CollectorRegistry()
    registry.register(Counting())
    srv = create_server(WebApp(registry=registry, board=SnapshotBoard(), lifecycle=True),
                        "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def exchange(address: tuple[str, int], request: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return answer


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", str(10 ** 12)])
def test_a_bad_content_length_is_400_at_once(server: tuple[str, int], length: str) -> None:
    answer = exchange(server, f"POST /-/reload HTTP/1.1\r\nHost: x\r\n"
                              f"Content-Length: {length}\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_a_good_content_length_is_read(server: tuple[str, int]) -> None:
    answer = exchange(server, b"POST /-/reload HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_trickling_request_head_is_dropped(server: tuple[str, int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web, "HEAD_READ_TIMEOUT", 0.2)
    with socket.create_connection(server, timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # and never the end
        started = time.monotonic()
        assert sock.recv(1024) == b""                          # closed by the server
        assert time.monotonic() - started < 4                  # not the 60 s idle wait


def test_a_reload_by_signal_or_watcher_shows_at_the_next_scrape() -> None:
    """The reload gauge is not on the board: the reload generation is in the cache key,
    so a SIGHUP or auto-reload (which do not go through /-/reload) shows within the
    second, not a second later."""
    config = parse_config({"clusters": [{"name": "a", "url": "http://127.0.0.1:1",
                                         "api": "v2"}]}, "<test>", environ={})
    board, clock = SnapshotBoard(), FakeClock()
    group = PollerGroup(board, clock=clock)
    refuse = [False]

    def loader() -> Config:
        if refuse[0]:
            raise ConfigError(["<test>: key 'x': refused"])
        return config
    runtime = ConfigRuntime(config, group, (1, 0), loader)
    registry = build_registry(board, lambda: runtime.reload_ok, clock)
    cache = ExpositionCache(registry, board, clock, generation=lambda: runtime.generation)
    reload_ok = ("zilliz_import_config_last_reload_successful", ())
    try:
        assert parse_metrics(text(cache))[reload_ok] == 1
        refuse[0] = True
        assert runtime.reload() is not None
        assert parse_metrics(text(cache))[reload_ok] == 0       # same second
        refuse[0] = False
        assert runtime.reload() is None
        assert parse_metrics(text(cache))[reload_ok] == 1
    finally:
        group.stop()


def test_once_renders_like_metrics_leaving_out_what_cannot_be_encoded(
        tmp_path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """--once goes through the same tolerant renderer as /metrics: a bad series is left
    out and counted, to stdout and to --output alike."""
    config = parse_config({"clusters": [{"name": "a", "url": "http://127.0.0.1:1",
                                         "api": "v2"}]}, "<test>", environ={})
    board = SnapshotBoard()
    group = PollerGroup(board)
    runtime = ConfigRuntime(config, group, (1, 0), lambda: config)
    registry = CollectorRegistry()
    registry.register(Unencodable())
    output = tmp_path / "out.prom"
    try:
        for target in ("-", str(output)):
            assert _run_once(runtime, registry, board, target) == 1   # the cluster is down
    finally:
        group.stop()
    for body in (capsysbinary.readouterr().out.decode(), output.read_text()):
        metrics = parse_metrics(body)
        assert metrics[("zilliz_import_render_errors_total", ())] == 1
        assert len([k for k in metrics if k[0] == "zilliz_import_jobs"]) == 2


# ---- piece by piece: each cluster's series encoded once per publish ----------------------

def pieces_cache(board: SnapshotBoard, clock: FakeClock) -> ExpositionCache:
    """As the exporter serves: the import collector beside the registry, not in it."""
    imports = ImportCollector(board, clock=clock)
    return ExpositionCache(CollectorRegistry(), board, clock, imports=imports)


def whole_cache(board: SnapshotBoard, clock: FakeClock) -> ExpositionCache:
    """The same series rendered whole on every render (the collector in the registry)."""
    registry = CollectorRegistry()
    registry.register(ImportCollector(board, clock=clock))
    return ExpositionCache(registry, board, clock, enabled=False)


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_pieces_join_into_the_same_bytes_as_a_whole_render(accept: str) -> None:
    board, clock = golden_board(), FakeClock(GOLDEN_NOW)
    pieces, whole = pieces_cache(board, clock), whole_cache(board, clock)
    for _ in range(3):                     # cached pieces, then ages re-made each second
        assert text(pieces, accept) == text(whole, accept)
        assert text(pieces, accept, gzipped=True) == text(whole, accept)
        clock.advance(1)
    raw = pieces.body(*choose_encoder(accept), True)
    assert zlib.decompress(raw, 16 + zlib.MAX_WBITS) == pieces.body(*choose_encoder(accept),
                                                                     False)


def test_a_publish_re_encodes_only_that_clusters_pieces() -> None:
    board, clock = golden_board(), FakeClock(GOLDEN_NOW)
    cache = pieces_cache(board, clock)
    encoded: list[str] = []
    encoder, content_type = choose_encoder("")

    def spying(collector: Collector) -> bytes:
        for family in collector.collect():
            encoded.extend(s.labels.get("cluster_name", "") for s in family.samples)
        return encoder(collector)
    first = cache.body(spying, content_type, False)
    assert {"prod-search", "milvus-a"} <= set(encoded)
    changed = board.get("prod-search")
    assert changed is not None
    encoded.clear()
    board.publish(dataclasses.replace(changed, poll_duration=changed.poll_duration + 1))
    second = cache.body(spying, content_type, False).decode()
    assert "prod-search" in encoded and not {"milvus-a", "new-one"} & set(encoded)
    assert second != first.decode() and second == text(whole_cache(board, clock))


def test_series_left_out_of_a_cached_piece_count_on_every_render_as_a_whole_render() -> None:
    board, clock = golden_board(), FakeClock(GOLDEN_NOW)
    snap = board.get("prod-search")
    assert snap is not None and snap.jobs is not None
    bad = dataclasses.replace(snap.jobs, failed=(
        FailedJob("docs", "job-9", "bad \udc80 text", GOLDEN_NOW - 600),))
    board.publish(dataclasses.replace(snap, jobs=bad))
    pieces, whole = pieces_cache(board, clock), whole_cache(board, clock)
    for second in range(1, 4):
        assert text(pieces) == text(whole)
        assert pieces.render_errors == whole.render_errors == second
        clock.advance(1)


def test_a_new_accept_version_on_every_scrape_keeps_a_bounded_cache() -> None:
    """prometheus_client names the client's version in the content type: a client can
    ask for a new one every scrape, and only the last few keep their pieces."""
    board, clock = golden_board(), FakeClock(GOLDEN_NOW)
    cache = pieces_cache(board, clock)
    for n in range(40):
        cache.body(*choose_encoder(f"{OPENMETRICS.split(';')[0]}; version=1.{n}.0"), False)
    kept = {key[0] for key in cache._pieces} | {key[0] for key in cache._headers}
    assert 1 <= len(kept) <= 8 and any("version=1.39.0" in k for k in kept)
