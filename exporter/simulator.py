"""A faithful fake of both import-job APIs (list and describe), on 127.0.0.1, for tests
and --demo.

It serves Zilliz Cloud v1 (GET, body code 200, ``tasks`` and ``count``), Zilliz
Cloud v2 (POST, body code 0, ``records``, optional ``count``) and self-hosted
Milvus v2 (no cluster id, no count, ``user:password`` keys, served under
``/milvus/<name>``; like the real one it ignores paging and answers every job in
a new random order each time). Every way a server can misbehave is a switch a
test can flip at run time: paging ignored, ``count`` as page length, bad keys as
body codes or HTTP 401, 429 with Retry-After, 5xx, malformed JSON, latency,
hangs, code 200 on v2 (Milvus 2.4.0-2.4.4), and Zilliz's per-user rate limit
(``Simulator.rate_limit``: 429 above N requests per second per key and endpoint).
Every request is logged with its arrival time (``Simulator.log``) so tests can
measure the rate the server saw.

Zilliz Cloud's control plane is served too: ``GET /v2/clusters?pageSize=&currentPage=``
lists the v2 clusters of the key asking (``SimCluster.api_key``), paged, each with its
``clusterName`` (``display_name``), region, project, plan and ``status``; a key with no
cluster gets HTTP 401 and code 21119, as the real one answers. Clusters come, go
(``Simulator.remove_cluster``), are renamed and change status at run time, and the
key's ``SimControlPlane`` misbehaves on demand like a cluster does.

Describe answers follow API-NOTES.md: v1 ``readyPercentage``/``errorMessage`` (no
state, no rows); v2 ``state``, ``progress``, ``importedRows``, ``totalRows`` and
``reason`` (Milvus leaves ``reason`` out when empty and reports progress 0 and rows 0
for a failed job). ``legacy_describe`` plays Milvus 2.4.0-2.4.12 (``describe`` is
404, only ``get_progress``), ``v2_success_code`` 200 plays Milvus 2.4.0-2.4.4, and
``unknown_describes`` counts describes of ids the cluster does not hold (which
crash old Milvus).

Each cluster (exporter.simcluster) keeps its jobs' times as a server reports them, and
can hold jobs that move by the simulator's clock alone, for tests of durations.

``python -m exporter.simulator`` runs it alone with the demo clusters moving
(``exporter.demo``).
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

from exporter.simcluster import FaultSwitch, SimCluster


@dataclass
class SimControlPlane:
    """Zilliz Cloud's control plane as one API key sees it (``Simulator.control_plane``):
    how it answers GET /v2/clusters, which lists the key's v2 clusters."""

    api_key: str
    bare_array: bool = False      # ``data`` as a bare array (the schema) instead of an object
    latency: float = 0.0
    requests: int = 0
    pages_served: list[int] = field(default_factory=list)
    _faults: FaultSwitch = field(default_factory=FaultSwitch, repr=False)

    def fail(self, mode: str, times: int | None = None, from_page: int = 1) -> None:
        """Misbehave on the next ``times`` requests (forever when None) from a page on;
        ``auth_http`` and ``auth_body`` both answer what a revoked key gets (401, 21119)."""
        self._faults.set(mode, times, from_page)

    def heal(self) -> None:
        self._faults.clear()


def _paging(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """(currentPage, pageSize) of a request, 1 and 10 (the documented default) when
    absent; None when not numbers."""
    try:
        return int(params.get("currentPage") or 1), int(params.get("pageSize") or 10)
    except (TypeError, ValueError):
        return None


def _arrive(endpoint: SimCluster | SimControlPlane, page: int, lock: threading.Lock) -> str:
    """A request for ``page`` arrives: count it, wait out the latency, and return the
    fault it meets ("" for none)."""
    with lock:
        endpoint.requests += 1
        endpoint.pages_served.append(page)
    if endpoint.latency:
        time.sleep(endpoint.latency)
    return endpoint._faults.take(page)


def _authorised(cluster: SimCluster, auth: str) -> bool:
    return not cluster.api_key or auth == f"Bearer {cluster.api_key}"


def _refusal(cluster: SimCluster) -> tuple[int, dict[str, str], bytes]:
    code, message = {"v1": (80001, "Invalid token"),
                     "v2": (21119, "The apikey is illegal."),
                     "milvus": (1800, "user hasn't authenticated")}[cluster.flavour]
    return 200, {}, json.dumps({"code": code, "message": message}).encode()


def _illegal_key() -> tuple[int, dict[str, str], bytes]:
    """The reply Zilliz Cloud's control plane gives a bad key (API-NOTES.md)."""
    return 401, {}, b'{"code": 21119, "message": "The apikey is illegal."}'


def _page_answer(cluster: SimCluster, page: int, size: int) -> bytes:
    items, total = cluster._page(page, size)
    if cluster.flavour == "v1":
        data: dict[str, Any] = {"tasks": items, "currentPage": page, "pageSize": size}
        if cluster.count_mode != "none":
            data["count"] = total if cluster.count_mode == "total" else len(items)
        return json.dumps({"code": 200, "data": data}).encode()
    data = {"records": items}
    if cluster.flavour == "v2" and cluster.count_mode != "none":
        data.update(count=total if cluster.count_mode == "total" else len(items),
                    currentPage=page, pageSize=size)
    return json.dumps({"code": cluster.v2_success_code, "data": data}).encode()


def busiest_window(times: Iterable[float], width: float = 1.0) -> int:
    """The most of ``times`` that fall within any half-open window ``width`` long."""
    ordered, busiest, first = sorted(times), 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= width:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up (a poller stopped mid-request) is no error worth a
    traceback on stderr, as the stdlib server would print."""

    daemon_threads = True
    connections = 0      # accepted so far: a client that keeps them alive opens few

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class SimRequest:
    """One request as the server saw it."""

    at: float            # time.monotonic() on arrival
    endpoint: str        # last path segment: "list", ...
    cluster: str         # "" when no cluster matched
    status: int


class Simulator:
    """The HTTP server holding any number of simulated clusters."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock`` times the jobs (creation, completion, timed jobs' moves)."""
        self.clock = clock
        self.clusters: dict[str, SimCluster] = {}
        self.planes: dict[str, SimControlPlane] = {}     # by API key
        # Zilliz Cloud's limit: at most rate_limit requests in any one second per API key
        # and endpoint (0: none); a refused request is a 429, with Retry-After if set.
        self.rate_limit = 0
        self.rate_limit_retry_after: str | None = "1"
        self.log: collections.deque[SimRequest] = collections.deque(maxlen=100_000)
        self._admitted: dict[tuple[str, str], collections.deque[float]] = {}
        self._log_lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _QuietServer((host, port), _handler(self))
        self._scheme = "http"
        if tls is not None:   # an API behind a private CA, as some Milvus installs are
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = self._server.server_address[0]
        text = host.decode() if isinstance(host, bytes) else str(host)
        return f"{self._scheme}://{text}:{self._server.server_port}"

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        return self._server.connections

    def add_cluster(self, name: str, flavour: str = "v2", api_key: str = "",
                    **settings: Any) -> SimCluster:
        if flavour not in ("v1", "v2", "milvus"):
            raise ValueError(flavour)
        cluster_id = "" if flavour == "milvus" else settings.pop("cluster_id", f"in01-{name}")
        if flavour == "milvus":
            for key, value in (("count_mode", "none"), ("ignore_paging", True),
                               ("shuffle", True)):
                settings.setdefault(key, value)
        settings.setdefault("clock", self.clock)
        cluster = SimCluster(name=name, flavour=flavour, cluster_id=cluster_id,
                             api_key=api_key or f"key-{name}", **settings)
        self.clusters[name] = cluster
        return cluster

    def remove_cluster(self, name: str) -> None:
        """Delete a cluster: it leaves the control plane's listing and stops answering."""
        self.clusters.pop(name, None)

    def control_plane(self, api_key: str) -> SimControlPlane:
        """The control plane as ``api_key`` sees it (made on first use)."""
        return self.planes.setdefault(api_key, SimControlPlane(api_key))

    def url_for(self, name: str) -> str:
        cluster = self.clusters[name]
        return self.base_url + (f"/milvus/{name}" if cluster.flavour == "milvus" else "")

    def discovery_config(self, name: str, api_key: str, **extra: Any) -> dict[str, Any]:
        """The exporter's YAML entry for a discovery source asking this simulator's
        control plane with ``api_key``."""
        return {"name": name, "url": self.base_url, "api_key": api_key, **extra}

    def cluster_config(self, name: str, **extra: Any) -> dict[str, Any]:
        """The exporter's YAML entry for a simulated cluster."""
        c = self.clusters[name]
        item: dict[str, Any] = {"name": name, "url": self.url_for(name),
                                "api": "v1" if c.flavour == "v1" else "v2",
                                "api_key": c.api_key}
        if c.cluster_id:
            item["cluster_id"] = c.cluster_id
        item.update(extra)
        return item

    def start(self) -> "Simulator":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="simulator")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def find(self, path: str, cluster_id: str) -> SimCluster | None:
        if path.startswith("/milvus/"):
            return self.clusters.get(path.split("/")[2])
        for cluster in self.clusters.values():
            if cluster.cluster_id and cluster.cluster_id == cluster_id:
                return cluster
        return None

    def busiest_second(self, endpoint: str | None = None, status: int | None = None) -> int:
        """The most requests that arrived within any one second (of one endpoint/status)."""
        with self._log_lock:
            return busiest_window(r.at for r in self.log
                                  if (endpoint is None or r.endpoint == endpoint)
                                  and (status is None or r.status == status))

    def throttled(self) -> int:
        """Requests refused with 429 by the rate limit."""
        with self._log_lock:
            return sum(1 for r in self.log if r.status == 429)

    def _admit(self, auth: str, endpoint: str, now: float) -> bool:
        """Zilliz-style limit: a sliding one-second window per (API key, endpoint)."""
        with self._log_lock:
            window = self._admitted.setdefault((auth, endpoint), collections.deque())
            while window and now - window[0] >= 1.0:
                window.popleft()
            if len(window) >= self.rate_limit:
                return False
            window.append(now)
            return True

    def answer(self, method: str, path: str, query: dict[str, str], body: dict[str, Any],
               auth: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request, logged with its arrival time."""
        now = time.monotonic()
        endpoint = path.rstrip("/").rsplit("/", 1)[-1]
        cluster = self.find(path, str((query if method == "GET" else body).get("clusterId")
                                      or ""))
        if self.rate_limit and not self._admit(auth, endpoint, now):
            retry = self.rate_limit_retry_after
            status, headers, payload = 429, {"Retry-After": retry} if retry else {}, \
                b'{"code": 429, "message": "rate limit exceeded"}'
        else:
            status, headers, payload = self._answer(method, path, query, body, auth, cluster)
        with self._log_lock:
            self.log.append(SimRequest(now, endpoint, cluster.name if cluster else "", status))
        return status, headers, payload

    def _answer(self, method: str, path: str, query: dict[str, str], body: dict[str, Any],
                auth: str, cluster: SimCluster | None) -> tuple[int, dict[str, str], bytes]:
        if path.endswith("/v2/clusters") and method == "GET":
            return self._clusters_answer(query, auth)
        v1 = path.endswith("/v1/vector/collections/import/list")
        v2 = path.endswith("/v2/vectordb/jobs/import/list")
        v1_get = path.endswith("/v1/vector/collections/import/get")
        v2_describe = path.endswith(("/v2/vectordb/jobs/import/describe",
                                     "/v2/vectordb/jobs/import/get_progress"))
        if not ((v1 or v1_get) and method == "GET") and \
                not ((v2 or v2_describe) and method == "POST"):
            return 404, {}, b'{"code": 404, "message": "not found"}'
        params = query if v1 or v1_get else body
        if cluster is None or (cluster.flavour == "v1") != (v1 or v1_get):
            return 200, {}, b'{"code": 100, "message": "cluster not found"}'
        if v1_get or v2_describe:
            return self._describe_answer(cluster, path, str(params.get("jobId") or ""), auth)
        paging = _paging(params)
        if paging is None:
            return 200, {}, b'{"code": 1100, "message": "invalid paging"}'
        page, size = paging
        fault = _arrive(cluster, page, cluster._lock)
        if fault == "auth_http":
            return 401, {}, b'{"code": 401, "message": "Unauthorized"}'
        misbehaving = self._fault_answer(fault, cluster.retry_after)
        if misbehaving is not None:
            return misbehaving
        if fault == "auth_body" or not _authorised(cluster, auth):
            return _refusal(cluster)
        return 200, {}, _page_answer(cluster, page, size)

    def _fault_answer(self, fault: str, retry_after: str
                      ) -> tuple[int, dict[str, str], bytes] | None:
        """The answer of a fault every endpoint has in common; None for the others."""
        if fault == "hang":
            self._closing.wait(3600)
            return 504, {}, b""
        if fault in ("429", "500", "503"):
            headers = {"Retry-After": retry_after} if fault == "429" else {}
            return int(fault), headers, b'{"message": "try later"}'
        if fault == "malformed":
            return 200, {}, b'{"code": 0, "data": {"records": [{"jobId": '
        if fault == "bad_shape":    # not a list, where a job list or cluster list should be
            return 200, {}, b'{"code": 0, "data": {"records": {"not": "a list"}, ' \
                b'"clusters": {"not": "a list"}}}'
        if fault == "api_error":
            return 200, {}, b'{"code": 65535, "message": "internal: collection busy"}'
        return None

    def _clusters_answer(self, query: dict[str, str], auth: str
                         ) -> tuple[int, dict[str, str], bytes]:
        """GET /v2/clusters: the v2 clusters of the key asking, paged."""
        key = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        members = [c for c in list(self.clusters.values())
                   if c.flavour == "v2" and c.api_key == key]
        if not members and key not in self.planes:
            return _illegal_key()
        plane = self.control_plane(key)
        paging = _paging(query)
        if paging is None:
            return 200, {}, b'{"code": 1100, "message": "invalid paging"}'
        page, size = paging
        if not 1 <= size <= 100:
            return 200, {}, b'{"code": 96008, "message": "pageSize must be 1 to 100"}'
        fault = _arrive(plane, page, self._log_lock)
        if fault in ("auth_http", "auth_body"):
            return _illegal_key()
        misbehaving = self._fault_answer(fault, "1")
        if misbehaving is not None:
            return misbehaving
        records = [c.cloud_record() for c in members[(page - 1) * size: page * size]]
        data: Any = records if plane.bare_array else {
            "count": len(members), "currentPage": page, "pageSize": size, "clusters": records}
        return 200, {}, json.dumps({"code": 0, "data": data}).encode()

    def _describe_answer(self, cluster: SimCluster, path: str, job_id: str,
                         auth: str) -> tuple[int, dict[str, str], bytes]:
        if cluster.legacy_describe and path.endswith("/describe"):
            return 404, {}, b'404 page not found'
        if not _authorised(cluster, auth):
            return _refusal(cluster)
        if cluster.latency or cluster.describe_latency:
            time.sleep(cluster.latency + cluster.describe_latency)
        fault = cluster.describe_fault
        if fault == "hang":
            self._closing.wait(3600)
            return 504, {}, b""
        if fault == "500":
            return 500, {}, b'{"message": "internal error"}'
        if fault == "api_error":
            return 200, {}, b'{"code": 65535, "message": "internal: describe failed"}'
        data = cluster._details(job_id)
        if data is None:
            if cluster.flavour == "v1":
                return 200, {}, b'{"code": 80020, "message": "job not found"}'
            return 200, {}, json.dumps({"code": 2100, "message": "import job does not exist, "
                                        f"jobID={job_id}"}).encode()
        success = 200 if cluster.flavour == "v1" else cluster.v2_success_code
        return 200, {}, json.dumps({"code": success, "data": data}).encode()


def _handler(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else keep-alive clients wait ~40 ms per answer

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            body: dict[str, Any] = {}
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    body = {}
            status, headers, payload = sim.answer(
                self.command, parts.path, query, body if isinstance(body, dict) else {},
                self.headers.get("Authorization", ""))
            try:
                self.send_response(status)
                headers.setdefault("Content-Type", "application/json")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass

        do_GET = do_POST = _serve

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="Serve the simulated Zilliz/Milvus import-job APIs with the demo clusters.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    parser.add_argument("--tick", type=float, default=2.0,
                        help="seconds between job moves (default %(default)s)")
    args = parser.parse_args(argv)
    # As PID 1 in a container nothing stops us on SIGTERM unless we handle it ourselves;
    # handled before the address is printed, so whoever reads it may signal at once.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from exporter.demo import DemoDirector      # the demo builds on this module
    sim = Simulator(args.host, args.port)
    director = DemoDirector(sim, tick=args.tick)
    sim.start()
    director.start()
    for name in sim.clusters:
        c = sim.clusters[name]
        print(f"{name}: flavour={c.flavour} url={sim.url_for(name)} "
              f"cluster_id={c.cluster_id or '-'}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        director.stop()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
