"""Benchmark: every figure next to its floor or baseline, measured in the same run.

    .venv/bin/python tests/bench/bench.py [--quick]

The simulator runs in its own process (tests/bench/sim_server.py) so that its CPU is
not counted as ours; the exporter runs as a real process where the figure is about the
process (scrape latency, memory, writes). Ratios are ours / floor: below 1 is better.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ExporterProcess, job_counts, parse_metrics, wait_until  # noqa: E402
from exporter.client import make_session  # noqa: E402
from exporter.config import ClusterConfig, PollSettings  # noqa: E402
from exporter.history import JobHistory  # noqa: E402
from exporter.board import SnapshotBoard  # noqa: E402
from exporter.paging import fetch_listing  # noqa: E402
from exporter.poller import ClusterPoller, PollerGroup  # noqa: E402
from exporter.ratelimit import Pacer, RateLimits, pace  # noqa: E402
from exporter.simulator import Simulator  # noqa: E402

# Sections that measure our own cost set a rate no poll ever waits for: pacing has its
# own sections below.
UNPACED = 100_000.0

RESULTS: list[tuple[str, str, str, str, str]] = []


def report(figure: str, ours: str, floor: str, ratio: float | None, target: str) -> None:
    shown = "-" if ratio is None else f"{ratio:.2f}"
    RESULTS.append((figure, ours, floor, shown, target))
    print(f"  {figure:<58} ours {ours:>14}  floor {floor:>14}  ratio {shown:>6}  {target}",
          flush=True)


class SimProcess:
    def __init__(self, spec: list[dict[str, Any]]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests/bench/sim_server.py"),
                                      json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        self.spec = {c["name"]: c for c in spec}

    def config(self, name: str, page_size: int = 100, **settings: Any) -> ClusterConfig:
        flavour = self.spec[name].get("flavour", "v2")
        url = self.url + (f"/milvus/{name}" if flavour == "milvus" else "")
        settings.setdefault("requests_per_second", UNPACED)
        return ClusterConfig(name=name, url=url, api="v1" if flavour == "v1" else "v2",
                             cluster_id="" if flavour == "milvus" else f"in01-{name}",
                             api_key=self.spec[name].get("api_key", f"key-{name}"),
                             settings=PollSettings(page_size=page_size, **settings))

    def yaml_entry(self, name: str, **extra: Any) -> dict[str, Any]:
        c = self.config(name)
        entry: dict[str, Any] = {"name": name, "url": c.url, "api": c.api, "api_key": c.api_key,
                                 "requests_per_second": 10_000}   # the config's maximum
        if c.cluster_id:
            entry["cluster_id"] = c.cluster_id
        entry.update(extra)
        return entry

    def connections(self) -> int:
        """TCP connections the simulator has accepted so far."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("connections\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_loop(cluster: ClusterConfig, pages: int) -> Callable[[], None]:
    """The floor: a plain keep-alive session that fetches and decodes the same pages."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {cluster.api_key}"
    url = f"{cluster.url}/v2/vectordb/jobs/import/list"

    def run() -> None:
        for page in range(1, pages + 1):
            session.post(url, json={"clusterId": cluster.cluster_id, "pageSize":
                                    cluster.settings.page_size, "currentPage": page},
                         timeout=30).json()
    return run


def our_poll(cluster: ClusterConfig, paced: bool = False) -> Callable[[], None]:
    """One poll as the exporter does it: every page, then folded into the history."""
    session = make_session(cluster)
    if paced:
        pace(session, Pacer(RateLimits(), cluster.host, cluster.api_key, UNPACED))
    history = JobHistory(cluster.name)
    s = cluster.settings

    def run() -> None:
        listing = fetch_listing(session, cluster)
        history.apply(listing, stuck_after=s.stuck_after,
                      stall_after=s.stall_after, max_stuck_series=s.max_stuck_job_series)
    return run


def compare_poll(cluster: ClusterConfig, jobs: int, repeats: int) -> tuple[float, float,
                                                                           float, float]:
    ours, floor = our_poll(cluster), bare_loop(cluster, math.ceil(jobs / 100))
    ours()   # warm: the first poll inserts every job; steady state is what runs all day
    floor()
    o_w, o_c, f_w, f_c = [], [], [], []
    for _ in range(repeats):       # interleaved, so drift hits both alike
        w, c = timed(floor)
        f_w.append(w)
        f_c.append(c)
        w, c = timed(ours)
        o_w.append(w)
        o_c.append(c)
    med = statistics.median
    return med(o_w), med(o_c), med(f_w), med(f_c)


# ---- figures ---------------------------------------------------------------------------

def requests_per_poll() -> None:
    print("Requests per poll (page size 100)")
    cases = [("v1-total", "v1", "total", 20000), ("v1-pagecount", "v1", "page", 20000),
             ("v2-count", "v2", "total", 20050), ("milvus-exact", "milvus", "none", 20000),
             ("milvus-short", "milvus", "none", 20050)]
    sim = SimProcess([{"name": n, "flavour": f, "count_mode": m, "jobs": j}
                      for n, f, m, j in cases])
    try:
        for name, _, mode, jobs in cases:
            cluster = sim.config(name)
            codes: list[str] = []
            session = make_session(cluster)
            listing = fetch_listing(session, cluster,
                                    observe=lambda endpoint, code: codes.append(code))
            assert len(listing) == jobs
            opened = sim.connections()
            fetch_listing(session, cluster)
            if name == "v1-total":      # one cluster's figure: the session is per cluster
                report(f"connections opened, first poll / next poll ({name})",
                       f"{opened} / {sim.connections() - opened}", "1 / 0", opened,
                       "= 1.00")
            total_known = mode == "total"
            floor = math.ceil(jobs / 100) + (0 if total_known or jobs % 100 else 1)
            if name.startswith("milvus"):
                floor = 1            # Milvus ignores paging: one answer holds every job
            report(f"requests, {name} ({jobs} jobs, count={mode})", str(len(codes)),
                   str(floor), len(codes) / floor, "= 1.00")
    finally:
        sim.close()


def poll_cost(sizes: list[int], repeats: int) -> None:
    print("One poll of one cluster, page size 100, against a bare requests.Session loop")
    sim = SimProcess([{"name": f"c{n}", "flavour": "v2", "jobs": n, "collections": 20,
                       "states": ["pending", "importing", "completed", "failed"]}
                      for n in sizes])
    try:
        for n in sizes:
            o_w, o_c, f_w, f_c = compare_poll(sim.config(f"c{n}"), n,
                                              repeats if n <= 20000 else max(2, repeats // 3))
            report(f"poll wall time, {n} jobs", f"{o_w * 1000:.1f} ms", f"{f_w * 1000:.1f} ms",
                   o_w / f_w, "<= 1.25" if n == 20000 else "")
            report(f"poll CPU time, {n} jobs", f"{o_c * 1000:.1f} ms", f"{f_c * 1000:.1f} ms",
                   o_c / f_c, "<= 1.25" if n == 20000 else "")
            report(f"poll CPU per job, {n} jobs", f"{o_c / n * 1e6:.2f} us",
                   f"{f_c / n * 1e6:.2f} us", None, "flat = linear")
    finally:
        sim.close()


def round_of_clusters(repeats: int) -> None:
    print("A round of 20 clusters x 2,000 jobs, 20 ms latency per request")
    names = [f"r{i:02d}" for i in range(20)]
    sim = SimProcess([{"name": n, "flavour": "v2", "jobs": 2000, "latency": 0.02}
                      for n in names])
    try:
        single = ClusterPoller(sim.config(names[0]), SnapshotBoard(), JobHistory(names[0]))
        group = PollerGroup(SnapshotBoard())
        group.apply(tuple(sim.config(n) for n in names), start=False)
        single.poll_once()
        group.poll_all_once()
        singles, rounds = [], []
        for _ in range(repeats):
            singles.append(timed(single.poll_once)[0])
            rounds.append(timed(group.poll_all_once)[0])
        s, r = statistics.median(singles), statistics.median(rounds)
        report("round of 20 clusters vs one cluster's poll", f"{r * 1000:.0f} ms",
               f"{s * 1000:.0f} ms", r / s, "<= 1.5")
    finally:
        sim.close()


def limiter_cost(repeats: int) -> None:
    print("The rate limiter's own cost: one poll of 20,000 jobs, paced at a rate it never "
          "waits for, against the same poll unpaced")
    sim = SimProcess([{"name": "c", "flavour": "v2", "jobs": 20000, "collections": 20}])
    try:
        cluster = sim.config("c")
        plain, paced = our_poll(cluster), our_poll(cluster, paced=True)
        plain()
        paced()
        cpu_plain, cpu_paced = [], []
        for _ in range(repeats * 2):         # interleaved, so drift hits both alike
            cpu_plain.append(timed(plain)[1])
            cpu_paced.append(timed(paced)[1])
        p, q = statistics.median(cpu_plain), statistics.median(cpu_paced)
        report("poll CPU time, 20,000 jobs, paced vs unpaced", f"{q * 1000:.1f} ms",
               f"{p * 1000:.1f} ms", q / p, "<= 1.05")
    finally:
        sim.close()


def job_details(repeats: int) -> None:
    print("Job details: 10,000 jobs of which 50 active, page size 100; a poll with "
          "describing on against the same poll with it off")
    jobs, active = 10000, 50
    sim = SimProcess([{"name": name, "flavour": "v2", "jobs": jobs, "active": active,
                       "states": ["completed", "failed"], "moving": name == "moving"}
                      for name in ("steady", "moving")])
    try:
        for name, what in (("steady", "steady poll (progress unchanged)"),
                           ("moving", "poll while all 50 jobs move")):
            pollers = {budget: ClusterPoller(sim.config(name, max_describes_per_poll=budget),
                                             SnapshotBoard(), JobHistory(name))
                       for budget in (active, 0)}
            last = {budget: poller.poll_once()      # the first listing inserts every job
                    for budget, poller in pollers.items()}
            cpu: dict[int, list[float]] = {active: [], 0: []}
            most: dict[str, int] = {"list": 0, "describe": 0}
            described = sent_describes = 0
            for _ in range(repeats):        # interleaved, so drift hits both alike
                # Changes are timed in whole seconds, and a real interval is at least
                # one: a second between polls, so every moving job is described again.
                time.sleep(1.0)
                for budget, poller in pollers.items():
                    before = last[budget].api_requests
                    started = time.process_time()
                    last[budget] = poller.poll_once()
                    cpu[budget].append(time.process_time() - started)
                    if budget:
                        for endpoint in most:
                            sent = sum(n - before.get((e, c), 0) for (e, c), n
                                       in last[budget].api_requests.items() if e == endpoint)
                            most[endpoint] = max(most[endpoint], sent)
                            if endpoint == "describe":
                                sent_describes += sent
                                described += active   # each moving job, once per poll
            floor = math.ceil(jobs / 100)
            report(f"list requests, {what}", str(most["list"]), str(floor),
                   most["list"] / floor, "= 1.00")
            report(f"describe requests (most in one poll), {what}", str(most["describe"]),
                   f"<= {active}", None, f"<= {active}")
            if name == "moving":
                report(f"describe requests per active job and poll, {what}",
                       str(sent_describes), str(described), sent_describes / described,
                       "= 1.00")
            on, off = statistics.median(cpu[active]), statistics.median(cpu[0])
            # no target: a poll is bounded by the API's rate limit, not by this CPU
            report(f"poll CPU, details on vs off, {what}", f"{on * 1000:.1f} ms",
                   f"{off * 1000:.1f} ms", on / off, "")
    finally:
        sim.close()


def paced_round() -> None:
    print("A round of 20 clusters x 500 jobs sharing one key at 10 requests per second")
    names = [f"p{i:02d}" for i in range(20)]
    sim = SimProcess([{"name": n, "flavour": "v2", "jobs": 500, "api_key": "one-key"}
                      for n in names])
    try:
        group = PollerGroup(SnapshotBoard())
        # list requests only: describes take from a bucket of their own
        group.apply(tuple(sim.config(n, requests_per_second=10, max_describes_per_poll=0)
                          for n in names), start=False)
        wall, _ = timed(group.poll_all_once)
        sent = sum(sum(s.api_requests.values()) for s in group.poll_all_once())
        floor = sent / 2 / 10                # two rounds were sent; the limit sets the pace
        report(f"round wall time ({sent // 2} requests at a shared 10/s)", f"{wall:.2f} s",
               f"{floor:.2f} s", wall / floor, "<= 1.10")
    finally:
        sim.close()


def limits_trial(tmp: Path, minutes: float) -> None:
    """Issue 9's trial: 20 clusters x 2,000 jobs on one key under the server's limit."""
    for server_limit in (20, 5):
        print(f"Fleet trial: 20 clusters x 2,000 jobs on one key, page size 100, interval "
              f"30s, requests_per_second 18; the server allows {server_limit}/s per key and "
              f"endpoint; {minutes:g} minutes")
        sim = Simulator()
        sim.rate_limit = server_limit
        names = [f"f{i:02d}" for i in range(20)]
        for name in names:       # mostly history, a few running: what a real cluster lists
            cluster = sim.add_cluster(name, "v2", api_key="fleet-key")
            cluster.add_jobs(1990, "docs", "completed", 100)
            cluster.add_jobs(10, "docs", "importing", 40)
        sim.start()
        exporter = Exporter({"defaults": {"interval": "30s", "page_size": 100,
                                          "requests_per_second": 18, "timeout": "30s"},
                             "clusters": [sim.cluster_config(n) for n in names]}, tmp)
        started = time.monotonic()
        longest = 0.0
        successes: dict[str, set[float]] = {n: set() for n in names}
        exact = True
        while time.monotonic() - started < minutes * 60:
            metrics = parse_metrics(exporter.fetch("/metrics").text)
            for name in names:
                labels = (("cluster_name", name),)
                longest = max(longest, metrics.get(("zilliz_import_poll_duration_seconds",
                                                    labels), 0.0))
                when = metrics.get(("zilliz_import_last_success_timestamp_seconds", labels))
                if when is not None:
                    successes[name].add(when)
                    exact &= job_counts(metrics, name) == {("docs", "completed"): 1990.0,
                                                           ("docs", "importing"): 10.0}
            time.sleep(1)
        failed_polls = sum(v for (name, _), v in metrics.items()
                           if name == "zilliz_import_poll_errors_total")
        exporter.stop()
        sim.stop()
        log = [r for r in sim.log if r.endpoint == "list"]
        after = [r for r in log if r.at - log[0].at >= 60]
        throttled_after = sum(r.status == 429 for r in after)
        throttled = sum(r.status == 429 for r in log)
        report(f"throttled list requests, server limit {server_limit}/s",
               f"{throttled} of {len(log)}", "0", None,
               "= 0" if server_limit == 20 else "")
        if server_limit == 20:
            busiest = sim.busiest_second("list")
            report("most list requests the server saw in one second", str(busiest),
                   "20", busiest / 20, "<= 1.00")
            report("longest poll (a round must fit its interval)", f"{longest:.1f} s",
                   "30 s", longest / 30, "< 1.00")
        else:
            share = throttled_after / max(1, len(after))
            report("throttled after the first minute, server limit 5/s",
                   f"{throttled_after} of {len(after)}", f"{0.05 * len(after):.0f}", share / 0.05,
                   "< 1.00 (5%)")
        report(f"published listings per cluster, fewest (limit {server_limit}/s)",
               str(min(len(v) for v in successes.values())), "-", None, "> 0, all exact")
        print(f"  every published count exact: {exact}; failed polls: {failed_polls:.0f}")


def fleet(tmp: Path, seconds: float) -> None:
    """Issue 19's trial, as a new user runs it: 20 v2 clusters x 5,000 jobs on one key,
    requests_per_second 10, interval 60s, 50 describes per poll (100 jobs of each
    cluster importing, their progress moving), the simulator refusing more than 20
    requests per second per key and endpoint. Everything is measured from outside: the
    simulator's request log and timed scrapes."""
    clusters, jobs, active, rate = 20, 5000, 100, 10.0
    print(f"Fleet: {clusters} clusters x {jobs:,} jobs on one key, requests_per_second "
          f"{rate:g}, interval 60s, 50 describes per poll; server limit 20/s; {seconds:g} s")
    names = [f"g{i:02d}" for i in range(clusters)]
    settings = {"interval": "60s", "page_size": 100, "requests_per_second": rate,
                "max_describes_per_poll": 50, "timeout": "30s"}

    def fleet_sim(jobs_each: int) -> Simulator:
        sim = Simulator()
        sim.rate_limit = 20
        for name in names:
            cluster = sim.add_cluster(name, "v2", api_key="fleet-key")
            if jobs_each:
                cluster.add_jobs(jobs_each - active, "docs", "completed", 100)
                cluster.add_jobs(active, "docs", "importing", 40)
        return sim.start()

    # The same exporter with no jobs: the floor of its resident memory.
    empty_sim = fleet_sim(0)
    empty = Exporter({"defaults": settings,
                      "clusters": [empty_sim.cluster_config(n) for n in names]}, tmp)
    empty.wait_ready(60)
    time.sleep(5)
    empty_rss = empty.rss()
    empty.stop()
    empty_sim.stop()

    sim = fleet_sim(jobs)
    stop = threading.Event()

    def move() -> None:            # every running job moves: each is due a describe
        step = 0
        while not stop.wait(1.0):
            step += 1
            for cluster in sim.clusters.values():
                for job in [j for j in cluster.jobs.values() if j.state == "importing"]:
                    cluster.set_progress(job.job_id, 41 + step % 58)
    threading.Thread(target=move, daemon=True).start()
    exporter = Exporter({"defaults": settings,
                         "clusters": [sim.cluster_config(n) for n in names]}, tmp)
    started = time.monotonic()
    published: dict[str, list[float]] = {n: [] for n in names}
    latencies: list[float] = []
    last: dict[str, float] = {}
    while time.monotonic() - started < seconds:
        t0 = time.perf_counter()
        body = exporter.fetch("/metrics").text
        latencies.append(time.perf_counter() - t0)
        for line in body.splitlines():
            if line.startswith("zilliz_import_last_success_timestamp_seconds{"):
                name = line.split('cluster_name="', 1)[1].split('"', 1)[0]
                when = float(line.rsplit(" ", 1)[1])
                if last.get(name) != when:
                    last[name] = when
                    published[name].append(time.monotonic())
        time.sleep(0.2)
    metrics = parse_metrics(exporter.fetch("/metrics").text)
    rss = exporter.rss()
    exporter.stop()
    stop.set()
    sim.stop()
    exact = all(job_counts(metrics, n) == {("docs", "completed"): float(jobs - active),
                                           ("docs", "importing"): float(active)}
                for n in names)
    floor = clusters * math.ceil(jobs / 100) / rate
    gaps = [b - a for times in published.values() for a, b in zip(times, times[1:])]
    log = list(sim.log)
    window = [r for r in log if r.at - log[0].at >= 20]       # past the start's burst
    span = window[-1].at - window[0].at if len(window) > 1 else 1.0
    list_rate = sum(r.endpoint == "list" for r in window) / span
    describe_rate = sum(r.endpoint == "describe" for r in window) / span
    throttled = sum(r.status == 429 for r in log)
    if gaps:
        report("time between a cluster's listings, longest (floor: pages / rate)",
               f"{max(gaps):.0f} s", f"{floor:.0f} s", max(gaps) / floor, "<= 1.10")
        report("time between a cluster's listings, median", f"{statistics.median(gaps):.0f} s",
               f"{floor:.0f} s", statistics.median(gaps) / floor, "")
    else:
        report("time between a cluster's listings", "fewer than 2 listings", f"{floor:.0f} s",
               None, "run longer")
    report("list bucket, requests per second", f"{list_rate:.2f}", f"{rate:g}",
           list_rate / rate, ">= 0.95")
    report("describe bucket's use, requests per second", f"{describe_rate:.2f}", f"{rate:g}",
           describe_rate / rate, "> 0 (in parallel)")
    report("throttled requests (429)", f"{throttled} of {len(log)}", "0", None, "= 0")
    report("scrape p50 / p99 while polls publish",
           f"{statistics.median(latencies) * 1000:.1f} / "
           f"{statistics.quantiles(latencies, n=100)[98] * 1000:.1f} ms", "25 ms (p99)",
           statistics.quantiles(latencies, n=100)[98] / 0.025, "< 1.00")
    per_job = (rss - empty_rss) / (clusters * jobs)
    report("resident memory per job over the same exporter with none",
           f"{per_job:.0f} B", f"{empty_rss / 2**20:.1f} MiB empty", per_job / 300, "<= 1.00")
    print(f"  counts exact at the end: {exact}")


class Exporter(ExporterProcess):
    """The tests' exporter process, plus what the benchmark reads off it."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        directory = Path(tempfile.mkdtemp(prefix="exporter-", dir=tmp))
        super().__init__(directory, config, ["--web.enable-lifecycle"],
                         env={"PYTHONPATH": str(ROOT)})
        self.start()
        self.session = requests.Session()   # keep-alive, as Prometheus scrapes

    def fetch(self, path: str) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=60)

    def reload_with(self, config: dict[str, Any]) -> None:
        self.write_config(config)
        assert self.session.post(f"{self.url}/-/reload").status_code == 200

    def wait_ready(self, timeout: float = 300) -> None:
        wait_until(lambda: self.fetch("/-/ready").status_code == 200, timeout, "ready")

    def rss(self) -> int:
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore

    def write_bytes(self) -> int:
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/io").read_text()
        return int(re.search(r"write_bytes: (\d+)", text).group(1))  # type: ignore

    def requests_to(self, cluster: str) -> float:
        total = 0.0
        for line in self.fetch("/metrics").text.splitlines():
            if line.startswith("zilliz_import_api_requests_total{") and \
                    f'cluster_name="{cluster}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def scrape_latencies(exporter_get: Callable[[], requests.Response], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        assert exporter_get().content   # the whole body, read
        out.append(time.perf_counter() - start)
    return out


FLOOR_SERVER = r"""
import sys, threading
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
disable_created_metrics()   # our counters carry no _created samples either
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from exporter.board import SnapshotBoard
from exporter.web import WebApp, create_server
registry = CollectorRegistry()
ProcessCollector(registry=registry); PlatformCollector(registry=registry); GCCollector(registry=registry)
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    if not family.name.startswith("zilliz_import_"):
        continue
    labels = sorted({k for s in family.samples for k in s.labels})
    kind = Counter if family.type == "counter" else Gauge
    metric = kind(family.name, family.documentation, labels, registry=registry)
    for s in family.samples:
        if s.name.endswith("_created"):
            continue
        child = metric.labels(**s.labels) if labels else metric
        child.inc(s.value) if kind is Counter else child.set(s.value)
server = create_server(WebApp(registry=registry, board=SnapshotBoard()), "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def scrape_latency(tmp: Path, scrapes: int, big_jobs: int) -> None:
    print(f"/metrics latency, 2,000 collections x 4 states, {scrapes} scrapes each")
    sim = SimProcess([
        {"name": "wide", "flavour": "v2", "jobs": 8000, "collections": 2000,
         "states": ["pending", "importing", "completed", "failed"]},
        {"name": "big", "flavour": "v2", "jobs": big_jobs, "collections": 1}])
    try:
        exporter = Exporter({"defaults": {"interval": "1h", "stuck_after": "1h"},
                             "clusters": [sim.yaml_entry("wide")]}, tmp)
        exporter.wait_ready()
        exposition = tmp / "exposition.txt"
        exposition.write_text(exporter.fetch("/metrics").text)
        floor_proc = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(exposition)],
                                      stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert floor_proc.stdout is not None
        floor_port = int(floor_proc.stdout.readline())
        floor_session = requests.Session()

        def floor_get() -> requests.Response:
            return floor_session.get(f"http://127.0.0.1:{floor_port}/metrics", timeout=60)
        samples_ours = sum(1 for l in exposition.read_text().splitlines()
                           if l.startswith("zilliz_import_"))
        samples_floor = sum(1 for l in floor_get().text.splitlines()
                            if l.startswith("zilliz_import_"))
        print(f"  samples: ours {samples_ours}, floor {samples_floor}")
        scrape_latencies(lambda: exporter.fetch("/metrics"), 20)
        scrape_latencies(floor_get, 20)
        idle = scrape_latencies(lambda: exporter.fetch("/metrics"), scrapes)
        floor = scrape_latencies(floor_get, scrapes)
        med = statistics.median
        report("scrape median, idle", f"{med(idle) * 1000:.2f} ms",
               f"{med(floor) * 1000:.2f} ms", med(idle) / med(floor), "<= 1.3")
        p99 = lambda xs: sorted(xs)[int(len(xs) * 0.99) - 1]  # noqa: E731
        report("scrape p99, idle", f"{p99(idle) * 1000:.2f} ms",
               f"{p99(floor) * 1000:.2f} ms", p99(idle) / p99(floor), "")
        # now a poll of the big cluster runs back to back while we scrape
        exporter.reload_with({"defaults": {"interval": "1h", "stuck_after": "1h"},
                               "clusters": [sim.yaml_entry("wide"),
                                            sim.yaml_entry("big", interval="1s")]})
        while exporter.requests_to("big") < 3:
            time.sleep(0.01)
        busy = scrape_latencies(lambda: exporter.fetch("/metrics"), scrapes)
        # the floor's server under the same load: a poll takes both cores from it too
        busy_floor = scrape_latencies(floor_get, scrapes)
        in_flight = exporter.requests_to("big")
        floor_proc.terminate()
        report(f"scrape p99 during a {big_jobs}-job poll vs idle median",
               f"{p99(busy) * 1000:.2f} ms", f"{med(idle) * 1000:.2f} ms",
               p99(busy) / med(idle), "<= 2.0")
        report("scrape p99 during the poll vs the floor's p99 during it",
               f"{p99(busy) * 1000:.2f} ms", f"{p99(busy_floor) * 1000:.2f} ms",
               p99(busy) / p99(busy_floor), "")
        report("scrape median during the poll vs idle median", f"{med(busy) * 1000:.2f} ms",
               f"{med(idle) * 1000:.2f} ms", med(busy) / med(idle), "")
        print(f"  ({in_flight:.0f} list requests had been sent to the big cluster by the end)")
        exporter.stop()
    finally:
        sim.close()


def memory_and_writes(tmp: Path, big_jobs: int) -> None:
    print(f"Memory per tracked job ({big_jobs} jobs, state_file set), and writes")
    sim = SimProcess([{"name": "big", "flavour": "v2", "jobs": big_jobs, "collections": 1},
                      {"name": "empty", "flavour": "v2", "jobs": 0}])
    try:
        state = tmp / "state.db"
        empty = Exporter({"state_file": str(tmp / "empty.db"), "defaults": {"interval": "2s"},
                          "clusters": [sim.yaml_entry("empty")]}, tmp)
        empty.wait_ready()
        time.sleep(5)
        base = empty.rss()
        empty.stop()
        full = Exporter({"state_file": str(state), "defaults": {"interval": "2s"},
                         "clusters": [sim.yaml_entry("big")]}, tmp)
        full.wait_ready()
        first = full.requests_to("big")
        pages = math.ceil(big_jobs / 100)
        rss: list[int] = []
        while full.requests_to("big") < first + 3 * pages:   # three more complete polls
            rss.append(full.rss())
            time.sleep(0.02)
        # Between polls the process holds the history; during one it also holds the
        # listing being fetched. Sampled every 20 ms, the minimum is the former.
        report(f"RSS per tracked job at {big_jobs} jobs, between polls",
               f"{(min(rss) - base) / big_jobs:.0f} B", f"{base / 2**20:.1f} MiB empty", None,
               "<= 300 B")
        report(f"RSS per tracked job at {big_jobs} jobs, peak during a poll",
               f"{(max(rss) - base) / big_jobs:.0f} B", f"{base / 2**20:.1f} MiB empty", None,
               "")
        files = [state, Path(str(state) + "-wal")]
        before = [(p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
                  for p in files]
        wrote = full.write_bytes()
        start = full.requests_to("big")
        while full.requests_to("big") < start + 3 * pages:   # three unchanged polls
            time.sleep(0.2)
        after = [(p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
                 for p in files]
        written = full.write_bytes() - wrote
        report("bytes written by 3 polls that changed nothing", f"{written} B", "0 B", None,
               "= 0")
        report("state file and WAL untouched (size, mtime)", str(before == after), "True",
               None, "")
        full.stop()
    finally:
        sim.close()



# ---- issue 13: hostile servers, churn, TLS bursts, many scrapers ------------------------

HOSTILE_SERVER = r"""
import sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
RECORD = b'{"jobId": "j%09d", "collectionName": "c", "state": "Pending"}, '
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        def chunk(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        try:
            chunk(b'{"code": 0, "data": {"records": [')
            if not self.path.startswith("/endless"):   # valid records, then the end
                size = 200_000_000 if self.path.startswith("/huge") else 31 * 2**20
                sent, i = 0, 0
                while sent < size:
                    block = b"".join(RECORD % (i + k) for k in range(1000))
                    chunk(block); sent += len(block); i += 1000
                chunk(b'{"jobId": "last", "state": "Pending"}]}}')
                self.wfile.write(b"0\r\n\r\n")
            else:                                   # never ends, 100 KB/s: not the cap
                while True:
                    chunk(b" " * 1024)
                    time.sleep(0.01)
        except OSError:
            pass
        self.close_connection = True
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
"""

HOSTILE_CLIENT = r"""
import json, resource, sys, time
from exporter.client import PollFailure, list_import_jobs, make_session
from exporter.config import ClusterConfig, PollSettings
from exporter.memory import resident_bytes
url, timeout, prefix = sys.argv[1], float(sys.argv[2]), sys.argv[3]
cluster = ClusterConfig(name="h", url=url + prefix, api="v2",
                        settings=PollSettings(timeout=timeout, retries=0))
before = resident_bytes()
started = time.monotonic()
try:
    list_import_jobs(make_session(cluster), cluster, 1)
    reason = "none"
except PollFailure as failure:
    reason = failure.reason
print(json.dumps({"reason": reason, "seconds": time.monotonic() - started,
                  "before": before,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def hostile_answers() -> None:
    print("Hostile answers: 200 MB, never-ending, and just under max_response_bytes (32MiB); "
          "timeout 5s")
    server = subprocess.Popen([sys.executable, "-c", HOSTILE_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert server.stdout is not None
    url = f"http://127.0.0.1:{int(server.stdout.readline())}"
    try:
        for name, prefix in (("200 MB answer", "/huge"), ("endless chunked answer", "/endless"),
                             ("31 MiB answer (just under the cap)", "/max")):
            out = subprocess.run([sys.executable, "-c", HOSTILE_CLIENT, url, "5", prefix],
                                 capture_output=True, text=True, cwd=ROOT, timeout=120,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            result = json.loads(out.stdout)
            grew = (result["peak"] - result["before"]) / 2**20
            report(f"{name}: reason {result['reason']}, seconds taken",
                   f"{result['seconds']:.2f} s", "5 s timeout", result["seconds"] / 5,
                   "<= 1.2 (timeout + 1 s)")
            if prefix == "/max":     # parsed: what a maximal answer costs, against the cap
                report(f"{name}: peak RSS growth vs the cap", f"{grew:.1f} MiB", "32 MiB",
                       grew / 32, "a small multiple")
            else:
                report(f"{name}: peak RSS growth", f"{grew:.1f} MiB", "64 MiB", grew / 64,
                       "< 1")
    finally:
        server.terminate()


CHURN_CHILD = r"""
import json, sys
from prometheus_client import CollectorRegistry, generate_latest
from exporter.collector import ImportCollector
from exporter.config import ClusterConfig, PollSettings
from exporter.history import JobHistory
from exporter.memory import release_free_memory, resident_bytes
from exporter.board import SnapshotBoard
from exporter.poller import ClusterPoller
from exporter.simulator import Simulator
polls = int(sys.argv[1])
now = [1_000_000.0]
clock = lambda: now[0]
board = SnapshotBoard()
registry = CollectorRegistry()
registry.register(ImportCollector(board, clock=clock))
out = {}
with Simulator() as sim:
    c = sim.add_cluster("churn", "v2")
    config = ClusterConfig(name="churn", url=sim.url_for("churn"), api="v2",
                           cluster_id=c.cluster_id, api_key=c.api_key,
                           settings=PollSettings(retries=0, max_describes_per_poll=5,
                                                 requests_per_second=100000))
    poller = ClusterPoller(config, board, JobHistory("churn", clock=clock), clock=clock)
    rounds = []
    for i in range(polls):
        if rounds:
            for job_id in rounds[-1]:
                c.set_rows(job_id, 10, 10)
                c.set_state(job_id, "completed" if i % 2 else "failed", 100)
        rounds.append(c.add_jobs(20, f"coll-{i}", "importing", progress=50))
        if len(rounds) > 5:
            c.remove_jobs(rounds.pop(0))
        poller.poll_once()
        now[0] += 60
        if i + 1 in (polls // 5, polls):
            text = generate_latest(registry).decode()
            release_free_memory()
            out[i + 1] = {"rss": resident_bytes(),
                          "series": sum(1 for l in text.splitlines()
                                        if l.startswith("zilliz_import_")),
                          "stale": sum(1 for l in text.splitlines() if 'collection="coll-' in l
                                       and int(l.split('collection="coll-')[1].split('"')[0])
                                       < i - 5)}
print(json.dumps(out))
"""


def collection_churn(polls: int) -> None:
    print(f"Collection churn: {polls} polls, a new collection each, 5 listed at once")
    out = subprocess.run([sys.executable, "-c", CHURN_CHILD, str(polls)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.stdout)
    early, late = result[str(polls // 5)], result[str(polls)]
    report(f"series after {polls} polls vs after {polls // 5}", str(late["series"]),
           str(early["series"]), late["series"] / early["series"], "= 1.00")
    report("series of collections no longer listed", str(late["stale"]), "0", None, "= 0")
    grew = (late["rss"] - early["rss"]) / 2**20
    report(f"RSS growth from poll {polls // 5} to {polls}", f"{grew:.2f} MiB",
           f"{early['rss'] / 2**20:.1f} MiB", late["rss"] / early["rss"], "~ 1.00 (flat)")


def tls_exporter(tmp: Path, tag: str) -> tuple[ExporterProcess, SimProcess, str]:
    """A running exporter serving /metrics over TLS (a CA of its own, whose file is
    returned) in front of a small simulated cluster."""
    import datetime  # noqa: F401 - conftest's certificate helpers need cryptography
    from cryptography.hazmat.primitives.asymmetric import ec

    from conftest import _cert, _name, _write
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("bench ca", ca_key, _name("bench ca"), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("server", key, ca.subject, ca_key, server=True)
    web = tmp / f"web-{tag}.yml"
    web.write_text(json.dumps({"tls_server_config": {
        "cert_file": _write(tmp / f"{tag}.pem", cert),
        "key_file": _write(tmp / f"{tag}.key", key=key)}}))
    sim = SimProcess([{"name": "c", "flavour": "v2", "jobs": 100, "collections": 5}])
    directory = Path(tempfile.mkdtemp(prefix="exporter-", dir=tmp))
    exporter = ExporterProcess(directory, {"clusters": [sim.yaml_entry("c")]},
                               ["--web.config.file", str(web)],
                               env={"PYTHONPATH": str(ROOT)})
    exporter.start()
    return exporter, sim, _write(tmp / f"{tag}-ca.pem", ca)


def tls_burst(tmp: Path, connections: int) -> None:
    print(f"{connections} TLS connections opened at once, then closed")
    import socket
    import ssl

    exporter, sim, ca_file = tls_exporter(tmp, "burst-full")
    try:
        port = exporter.port
        ctx = ssl.create_default_context(cafile=ca_file)
        time.sleep(3)
        assert exporter.proc is not None
        rss = lambda: int(re.search(r"VmRSS:\s+(\d+) kB", Path(  # noqa: E731
            f"/proc/{exporter.proc.pid}/status").read_text()).group(1)) * 1024  # type: ignore
        before = rss()
        socks = []
        for _ in range(connections):
            sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30),
                                   server_hostname="127.0.0.1")
            sock.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(4096)
            socks.append(sock)
        peak = rss()
        for sock in socks:
            sock.close()
        time.sleep(10)
        after = rss()
        exporter.stop()
        report("RSS before the burst", f"{before / 2**20:.1f} MiB", "", None, "")
        report(f"RSS with {connections} TLS connections open", f"{peak / 2**20:.1f} MiB",
               f"{before / 2**20:.1f} MiB", peak / before, "")
        report("RSS 10 s after they closed, growth over before",
               f"{(after - before) / 2**20:.1f} MiB", "8 MiB", (after - before) / 2**20 / 8,
               "< 1")
    finally:
        sim.close()


def client_hello() -> bytes:
    """The first flight of a TLS handshake, to send and never follow up."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def half_open_bursts(tmp: Path, connections: int, bursts: int = 3) -> None:
    """Issue 19's trial: bursts of TLS handshakes that never finish, held, then closed;
    how soon resident memory comes back, and whether bursts ratchet it up."""
    print(f"{bursts} bursts of {connections} half-open TLS handshakes, held 5 s, then closed")
    import socket

    hello = client_hello()
    exporter, sim, _ = tls_exporter(tmp, "burst-half")
    try:
        assert exporter.proc is not None
        status = Path(f"/proc/{exporter.proc.pid}/status")
        rss = lambda: int(re.search(r"VmRSS:\s+(\d+) kB",  # noqa: E731
                                    status.read_text()).group(1)) * 1024  # type: ignore
        time.sleep(5)
        before = rss()
        settled: list[float] = []
        for burst in range(bursts):
            socks = []
            for _ in range(connections):
                sock = socket.create_connection(("127.0.0.1", exporter.port), timeout=30)
                sock.sendall(hello)
                socks.append(sock)
            time.sleep(5)
            peak = rss()
            for sock in socks:
                sock.close()
            closed, back = time.monotonic(), None
            allowed = max(16 * 2**20, before // 4)
            while time.monotonic() - closed < 20:
                if back is None and rss() - before <= allowed:
                    back = time.monotonic() - closed
                time.sleep(0.25)
            settled.append(rss())
            report(f"burst {burst + 1}: RSS held open / 20 s after, vs before",
                   f"{peak / 2**20:.1f} / {settled[-1] / 2**20:.1f} MiB",
                   f"{before / 2**20:.1f} MiB", settled[-1] / before, "")
            report(f"burst {burst + 1}: seconds until RSS within max(16 MiB, 25%) of before",
                   "never" if back is None else f"{back:.1f} s", "15 s",
                   None if back is None else back / 15, "<= 1.00")
        report("third burst's settled RSS over the first's",
               f"{(settled[-1] - settled[0]) / 2**20:+.1f} MiB", "5 MiB",
               (settled[-1] - settled[0]) / 2**20 / 5, "<= 1.00")
        exporter.stop()
    finally:
        sim.close()


SCRAPE_CHILD = r"""
import sys, time
from exporter.cli import build_registry
from exporter.config import ClusterConfig, PollSettings
from exporter.board import SnapshotBoard
from exporter.poller import PollerGroup
from exporter.web import WebApp, create_server
base, clusters, cached = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "cached"
board = SnapshotBoard()
group = PollerGroup(board)
group.apply(tuple(ClusterConfig(name=f"c{i}", url=base, api="v2", cluster_id=f"in01-c{i}",
                                api_key=f"key-c{i}",
                                settings=PollSettings(interval=2, requests_per_second=100000))
                  for i in range(clusters)))
server = create_server(WebApp(registry=build_registry(board, lambda: True), board=board,
                              cache_exposition=cached), "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def many_scrapers(seconds: float, scrapers: int = 50, clusters: int = 10) -> None:
    print(f"{scrapers} concurrent scrapers for {seconds:g} s of polls on {clusters} clusters "
          "x 2,000 jobs (interval 2s)")
    import threading
    sim = SimProcess([{"name": f"c{i}", "flavour": "v2", "jobs": 2000, "collections": 20,
                       "states": ["pending", "importing", "completed", "failed"]}
                      for i in range(clusters)])
    figures = {}
    try:
        for mode in ("bypassed", "cached"):
            child = subprocess.Popen([sys.executable, "-c", SCRAPE_CHILD, sim.url,
                                      str(clusters), mode], stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert child.stdout is not None
            url = f"http://127.0.0.1:{int(child.stdout.readline())}/metrics"
            wait_until(lambda: requests.get(url, timeout=30).text.count(
                "zilliz_import_up{") == clusters, 120, "every cluster polled")
            latencies: list[float] = []
            errors = [0]
            lock = threading.Lock()
            end = time.monotonic() + seconds

            def scrape() -> None:
                session = requests.Session()
                mine = []
                while time.monotonic() < end:
                    started = time.perf_counter()
                    try:
                        response = session.get(url, timeout=30)
                        ok = response.status_code == 200 and response.content
                    except requests.RequestException:
                        ok = False
                    mine.append(time.perf_counter() - started)
                    if not ok:
                        with lock:
                            errors[0] += 1
                with lock:
                    latencies.extend(mine)
            threads = [threading.Thread(target=scrape) for _ in range(scrapers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            child.terminate()
            child.wait()
            latencies.sort()
            figures[mode] = (len(latencies) / seconds, latencies[int(len(latencies) * 0.99)],
                             statistics.median(latencies), errors[0])
    finally:
        sim.close()
    cached, bypassed = figures["cached"], figures["bypassed"]
    report("scrapes per second, cached vs rendered every scrape", f"{cached[0]:.0f}/s",
           f"{bypassed[0]:.0f}/s", cached[0] / bypassed[0], ">= 10")
    report("scrape p99 with the cache", f"{cached[1] * 1000:.0f} ms",
           f"{bypassed[1] * 1000:.0f} ms", cached[1] / bypassed[1], "p99 < 1 s")
    report("scrape median with the cache", f"{cached[2] * 1000:.0f} ms",
           f"{bypassed[2] * 1000:.0f} ms", cached[2] / bypassed[2], "")
    report("failed scrapes with the cache", str(cached[3]), str(bypassed[3]), None, "= 0")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and scrapes")
    sections = ["requests", "poll", "round", "limiter", "paced", "details", "scrape", "memory",
                "hostile", "churn", "tls", "burst", "scrapers"]
    parser.add_argument("--only", choices=sections + ["fleet", "limits"], action="append",
                        help="run only these sections (fleet, issue 19's 5-minute trial, and "
                        "limits, the 6-minute rate-limit trial, run only when named)")
    args = parser.parse_args()
    wanted = set(args.only or sections)
    repeats = 3 if args.quick else 7
    print(f"zilliz-import-exporter benchmark, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="zie-bench-") as tmp:
        if "requests" in wanted:
            requests_per_poll()
        if "poll" in wanted:
            poll_cost([1000, 10000, 20000, 100000], repeats)
        if "round" in wanted:
            round_of_clusters(repeats)
        if "limiter" in wanted:
            limiter_cost(repeats)
        if "paced" in wanted:
            paced_round()
        if "limits" in wanted:
            limits_trial(Path(tmp), 1.5 if args.quick else 3)
        if "fleet" in wanted:
            fleet(Path(tmp), 150 if args.quick else 270)
        if "details" in wanted:
            job_details(repeats * 3)
        if "scrape" in wanted:
            scrape_latency(Path(tmp), 400 if args.quick else 2000, 100000)
        if "memory" in wanted:
            memory_and_writes(Path(tmp), 100000)
        if "hostile" in wanted:
            hostile_answers()
        if "churn" in wanted:
            collection_churn(500)
        if "tls" in wanted:
            tls_burst(Path(tmp), 500)
        if "burst" in wanted:
            half_open_bursts(Path(tmp), 500)
        if "scrapers" in wanted:
            many_scrapers(10 if args.quick else 30)
    print("\n| figure | ours | floor | ratio | target |\n|---|---|---|---|---|")
    for row in RESULTS:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
