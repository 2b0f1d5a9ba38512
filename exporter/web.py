"""HTTP: /metrics, the status page, health, readiness and reload, behind TLS and auth.

``respond`` answers one request from a ``WebApp`` (registry, board, callbacks)
without a socket, so routes, auth and pages are tested in process; ``create_server``
wraps it in a thin threaded HTTP(S) server. Scrapes render the registry; they never
wait on a poll.

The exposition is rendered once per change of the snapshot board and per second
(ages move with the clock), each encoding at most once, every cluster's series only
when it published, and every scraper in between is served the same bytes
(``exposition.ExpositionCache``): fifty scrapers cost one render.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping, cast

import bcrypt
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

from exporter import __version__
from exporter.collector import ImportCollector
from exporter.exposition import ExpositionCache
from exporter.discovery import DiscoveryBoard, SourceSnapshot
from exporter.jobs import CANONICAL_STATES
from exporter.webconfig import WebConfig, tls_context
from exporter.board import ClusterSnapshot, SnapshotBoard

log = logging.getLogger("exporter.web")

# The largest request body we accept (POST /-/reload needs none).
MAX_REQUEST_BODY = 65536
# Seconds a request head may pause between two reads before the connection is
# dropped; an idle keep-alive connection waits for its next request IDLE_TIMEOUT.
HEAD_READ_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0

@dataclass
class WebApp:
    """What the HTTP server serves; callbacks keep it from reaching back up the chain."""

    registry: CollectorRegistry
    board: SnapshotBoard
    telemetry_path: str = "/metrics"
    discovery: DiscoveryBoard = field(default_factory=DiscoveryBoard)
    web_config: WebConfig = field(default_factory=WebConfig)
    lifecycle: bool = False
    reload: Callable[[], str | None] = lambda: None   # None when applied, else the error
    is_ready: Callable[[], bool] = lambda: True
    clock: Callable[[], float] = time.time
    cache_exposition: bool = True      # False renders on every scrape (the benchmark's baseline)
    # Changes whenever something rendered from outside the board changes (a reload sets
    # zilliz_import_config_last_reload_successful): part of the exposition cache's key.
    generation: Callable[[], int] = lambda: 0
    # The import collector, when it is not in ``registry``: its series are then encoded
    # piece by piece, each cluster's once per publish (exposition.ExpositionCache).
    imports: ImportCollector | None = None
    # Built from the fields above: what respond() keeps between requests.
    cache: ExpositionCache = field(init=False, repr=False)
    auth: _AuthCache | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache = ExpositionCache(self.registry, self.board, self.clock,
                                     self.cache_exposition, self.generation, self.imports)
        self.auth = _AuthCache(dict(self.web_config.basic_auth_users)) \
            if self.web_config.basic_auth_users else None


# A bcrypt hash of a password nobody has: an unknown user costs one bcrypt check like a
# known one, so response times do not tell which user names exist (as exporter-toolkit).
_UNKNOWN_USER_HASH = b"$2b$10$go6HRwD.Few2DJgAZNRlBuzVZkJJ6DLOPeS//M2JirDqUY032A/rG"


class _AuthCache:
    """bcrypt is slow by design; remember credentials already verified, and run one
    check at a time so a burst of bad logins cannot take every CPU."""

    def __init__(self, users: dict[str, str],
                 checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw) -> None:
        self._users = users
        self._checkpw = checkpw
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        hashed = self._users.get(user)
        token = hashlib.sha256(f"{user}\0{password}\0{hashed}".encode()).digest()
        with self._lock:
            if token in self._ok:
                return True
        with self._bcrypt:
            try:
                matches = self._checkpw(password.encode("utf-8"), _UNKNOWN_USER_HASH
                                        if hashed is None else hashed.encode("utf-8"))
            except ValueError:      # bcrypt refuses passwords over 72 bytes
                matches = False
        if not matches or hashed is None:
            return False
        with self._lock:
            self._ok.add(token)
        return True


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128      # socketserver's 5 drops connections under a scrape burst
    ssl_context: ssl.SSLContext | None = None

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens in the handler thread, so a slow client never
            # blocks the accept loop.
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        log.debug("connection error", extra={"fields": {"client": client_address[0]}})


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _age(seconds: float) -> str:
    return _duration(seconds) + " ago"


def _rows(imported: int, total: int) -> str:
    return f"{imported:,} / {total:,}" if total >= 0 else "-"


class _Markup(str):
    """HTML built here from numbers: the one kind of cell not escaped."""


def _tr(*cells: str) -> str:
    """A table row; every cell is escaped unless it is _Markup."""
    return "<tr>" + "".join(f"<td>{c if isinstance(c, _Markup) else html.escape(c)}</td>"
                            for c in cells) + "</tr>"


def _table(table_id: str, head: tuple[str, ...], rows: list[str], empty: str) -> str:
    """A table of rows made by ``_tr``; one cell saying ``empty`` when there are none."""
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(rows) or f'<tr><td colspan="{len(head)}" class="none">{empty}</td></tr>'
    return f'<table id="{table_id}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody>' \
        "</table>\n"


def _job_sections(snapshots: list[ClusterSnapshot], now: float) -> str:
    """Stuck jobs, running jobs, recent failures and the jobs finished most recently of
    every cluster, each capped like its series (the summaries are), every value
    escaped."""
    stuck, running, failed, finished = [], [], [], []
    for snap in snapshots:
        summary = snap.jobs
        if summary is None or snap.is_stale(now):
            continue
        cluster = snap.cluster.name
        for job in summary.stuck_jobs:
            stuck.append((job.first_seen, _tr(cluster, job.collection, job.job_id, job.state,
                                              _duration(now - job.first_seen), job.reason)))
        for run in summary.running:
            bar: str = "-"
            if run.progress is not None:
                percent = round(run.progress * 100)
                bar = _Markup(f'<progress max="100" value="{percent}"></progress> '
                              f"<span>{percent}%</span>")
            running.append((run.first_seen, _tr(
                cluster, run.collection, run.job_id, run.state, bar,
                _rows(run.imported_rows, run.total_rows),
                "-" if run.eta is None else _duration(run.eta))))
        for fail in summary.failed:
            failed.append((-fail.failed_at, _tr(cluster, fail.collection, fail.job_id,
                                                _age(now - fail.failed_at), fail.reason)))
        for done in summary.finished:
            finished.append((-done.finished_at, _tr(
                cluster, done.collection, done.job_id, done.outcome,
                "start unknown" if done.duration is None else _duration(done.duration),
                _age(now - done.finished_at))))

    def table(table_id: str, title: str, head: tuple[str, ...],
              rows: list[tuple[float, str]], empty: str) -> str:
        return f"<h2>{title}</h2>\n" + _table(
            table_id, head, [row for _, row in sorted(rows, key=lambda r: r[0])], empty)

    return (table("stuck", "Stuck jobs", ("cluster", "collection", "job id", "state", "age",
                                          "reason"), stuck, "none stuck")
            + table("running", "Running jobs", ("cluster", "collection", "job id", "state",
                                                "progress", "rows imported / total", "ETA"),
                    running, "none running")
            + table("failed", "Recent failures", ("cluster", "collection", "job id",
                                                  "first seen failed", "reason"),
                    failed, "no failures within failed_job_window")
            + table("finished", "Finished most recently", ("cluster", "collection",
                                                           "job id", "outcome", "duration",
                                                           "finished"),
                    finished, "no job finished since the exporter started"))


@dataclass(frozen=True)
class ClusterRow:
    """What the per-cluster table's cells are made from: one snapshot, at one time."""

    snap: ClusterSnapshot
    now: float
    by_state: dict[str, int]          # empty when the jobs are unknown or stale

    @classmethod
    def of(cls, snap: ClusterSnapshot, now: float) -> "ClusterRow":
        return cls(snap, now, snap.jobs.by_state()
                   if snap.jobs is not None and not snap.is_stale(now) else {})

    def status(self) -> str:
        return "waiting" if not self.snap.polled else "up" if self.snap.up else "down"

    def jobs(self, state: str) -> str:
        return str(self.by_state.get(state, 0)) if self.by_state else "-"


@dataclass(frozen=True)
class Column:
    """One column of the per-cluster table: its heading, its cell's text (escaped when
    rendered) and its cell's CSS class."""

    heading: str
    cell: Callable[[ClusterRow], str]
    css: Callable[[ClusterRow], str] = lambda row: ""


def _state_column(state: str) -> Column:
    return Column(state, lambda row: row.jobs(state))


# The per-cluster table, one declaration per column, in order.
CLUSTER_COLUMNS = (
    Column("cluster", lambda row: row.snap.cluster.name),
    Column("api", lambda row: row.snap.cluster.api),
    Column("host", lambda row: row.snap.cluster.host),
    Column("status", ClusterRow.status,
           lambda row: {"waiting": "wait"}.get(row.status(), row.status())),
    Column("last success", lambda row: _age(row.now - row.snap.last_success)
           if row.snap.last_success else "never"),
    Column("last error", lambda row: f"{row.snap.last_error_reason}: {row.snap.last_error}"
           if row.snap.last_error_reason else "", lambda row: "err"),
    *(_state_column(state) for state in CANONICAL_STATES),
    Column("other", lambda row: str(sum(n for s, n in row.by_state.items()
                                        if s not in CANONICAL_STATES))),
    Column("stuck", lambda row: str(sum(row.snap.jobs.stuck.values()))
           if row.snap.jobs is not None and row.by_state else "0"),
    Column("interval", lambda row: f"{row.snap.cluster.settings.interval:g}s"),
)


def _cluster_table(snapshots: list[ClusterSnapshot], now: float) -> str:
    head = "".join(f"<th>{html.escape(column.heading)}</th>" for column in CLUSTER_COLUMNS)
    rows = []
    for snap in snapshots:
        row = ClusterRow.of(snap, now)
        cells = []
        for column in CLUSTER_COLUMNS:
            css = column.css(row)
            attribute = f' class="{css}"' if css else ""
            cells.append(f"<td{attribute}>{html.escape(column.cell(row))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="clusters"><thead><tr>{head}</tr></thead><tbody>\n'
            f"{''.join(rows)}\n</tbody></table>")


def _discovery_sections(sources: tuple[SourceSnapshot, ...], now: float) -> str:
    """Each discovery source's health, then every cluster it listed: polled, or why
    not. Nothing without sources."""
    if not sources:
        return ""
    health, found = [], []
    for snap in sources:
        source = snap.source.name
        status = "down" if not snap.up and snap.last_error_reason else \
            "up" if snap.up else "waiting"
        error = f"{snap.last_error_reason}: {snap.last_error}" if not snap.up and \
            snap.last_error_reason else ""
        health.append(_tr(source, snap.source.control_plane.host,
                          _Markup(f'<span class="{"wait" if status == "waiting" else status}"'
                                  f">{status}</span>"),
                          _age(now - snap.last_success) if snap.last_success else "never",
                          error, str(len(snap.clusters)),
                          str(sum(1 for c in snap.clusters if c.polled)),
                          f"{snap.source.refresh_interval:g}s"))
        for cluster in sorted(snap.clusters, key=lambda c: (not c.polled, c.name)):
            listed = cluster.listed
            found.append(_tr(source, cluster.name, listed.name, listed.cluster_id,
                             listed.region_id, listed.project_id, listed.status,
                             "yes" if cluster.polled else f"no: {cluster.why_not}"))
    return ("<h2>Discovery</h2>\n"
            + _table("sources", ("source", "host", "status", "last success", "last error",
                                "clusters listed", "polled", "refresh interval"),
                    health, "no discovery source")
            + _table("discovered", ("source", "cluster", "clusterName", "clusterId", "region",
                                   "project", "status", "polled"),
                    found, "no cluster listed yet"))


def render_status_page(app: WebApp) -> str:
    """The landing page: links, one row per cluster, then the jobs that need a look."""
    now = app.clock()
    snapshots = sorted(app.board.snapshots(), key=lambda s: s.cluster.name)
    metrics = html.escape(app.telemetry_path)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Zilliz Import Exporter</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}
table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
.up{{color:#080}}.down{{color:#c00;font-weight:bold}}.wait{{color:#888}}
.err{{max-width:30em}}#failed td:last-child{{max-width:40em;overflow-wrap:anywhere}}
.none{{color:#888}}#running td:nth-child(5){{white-space:nowrap}}progress{{width:10em}}
</style>
</head><body><h1>Zilliz Import Exporter</h1>
<p>Version {__version__}. <a href="{metrics}">Metrics</a> ·
<a href="/-/healthy">Health</a> · <a href="/-/ready">Readiness</a></p>
<h2>Clusters</h2>
{_cluster_table(snapshots, now)}
{_job_sections(snapshots, now)}{_discovery_sections(app.discovery.snapshots(), now)}</body></html>
"""


# status, headers (Content-Length aside: the server frames the body), body
Response = tuple[int, dict[str, str], bytes]
_TEXT = "text/plain; charset=utf-8"


def respond(app: WebApp, method: str, path: str, headers: Mapping[str, str],
            body: bytes = b"") -> Response:
    """The answer to one request, without a socket: auth, routes, lifecycle, the status
    page and /metrics content negotiation. Header names match in any case; a HEAD is
    answered as a GET (the server leaves the body out)."""
    asked = {name.lower(): value for name, value in headers.items()}
    status, payload, content_type, extra = _route(app, method, path.split("?", 1)[0], asked,
                                                  body)
    return status, {"Content-Type": content_type, **app.web_config.headers, **extra}, payload


def _route(app: WebApp, method: str, path: str, headers: dict[str, str],
           body: bytes) -> tuple[int, bytes, str, dict[str, str]]:
    """(status, body, content type, more headers) of one request."""
    if app.auth is not None and not app.auth.check(headers.get("authorization")):
        return 401, b"Unauthorized\n", _TEXT, {
            "WWW-Authenticate": 'Basic realm="zilliz-import-exporter"'}
    if method == "POST":
        if path != "/-/reload":
            return 405, b"Method not allowed\n", _TEXT, {}
        if not app.lifecycle:
            return 403, b"Lifecycle APIs are not enabled (--web.enable-lifecycle)\n", _TEXT, {}
        error = app.reload()
        if error is None:
            return 200, b"Reloaded\n", _TEXT, {}
        return 400, (error + "\n").encode("utf-8"), _TEXT, {}
    if method not in ("GET", "HEAD"):
        return 405, b"Method not allowed\n", _TEXT, {"Allow": "GET, HEAD, POST"}
    if path == app.telemetry_path:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        gzipped = gzip_accepted(headers.get("accept-encoding", ""))
        return 200, app.cache.body(encoder, content_type, gzipped), content_type, \
            {"Content-Encoding": "gzip"} if gzipped else {}
    if path == "/":
        return 200, render_status_page(app).encode("utf-8"), "text/html; charset=utf-8", {}
    if path == "/-/healthy":
        return 200, b"Healthy\n", _TEXT, {}
    if path == "/-/ready":
        if app.is_ready():
            return 200, b"Ready\n", _TEXT, {}
        return 503, b"Not ready: waiting for every cluster's first poll\n", _TEXT, {}
    if path == "/-/reload":
        return 405, b"Use POST\n", _TEXT, {"Allow": "POST"}
    return 404, b"Not found\n", _TEXT, {}


def create_server(app: WebApp, host: str, port: int) -> ExporterServer:
    """A threaded HTTP(S) server for ``app``; call serve_forever() to run it.

    The handler only does what needs the socket (TLS, timeouts, keep-alive, reading a
    request body, leaving a HEAD answer's body out); respond() does the rest."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        timeout = IDLE_TIMEOUT
        server_version = f"zilliz-import-exporter/{__version__}"

        def handle_one_request(self) -> None:
            """Wait up to IDLE_TIMEOUT for a request; once it starts, each read of its
            head may pause only HEAD_READ_TIMEOUT, so a trickling client lets go."""
            self.connection.settimeout(IDLE_TIMEOUT)
            try:
                started = cast(io.BufferedReader, self.rfile).peek(1)
            except (OSError, ValueError):
                started = b""
            if not started:
                self.close_connection = True
                return
            self.connection.settimeout(HEAD_READ_TIMEOUT)
            super().handle_one_request()

        def log_message(self, format: str, *args: object) -> None:
            log.debug("http request", extra={"fields": {"client": self.client_address[0],
                                                        "request": format % args}})

        def _send(self, response: Response) -> None:
            status, headers, body = response
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type"))
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(respond(app, self.command, self.path, dict(self.headers.items())))

        do_HEAD = do_GET

        def do_POST(self) -> None:
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not declared.isdigit() or int(declared) > MAX_REQUEST_BODY:
                # Answered at once, before auth (as Go's net/http does): reading a body
                # of unknown length would hang.
                self.close_connection = True
                self._send((400, {"Content-Type": _TEXT, **app.web_config.headers,
                                  "Connection": "close"}, b"Bad Content-Length\n"))
                return
            body = self.rfile.read(int(declared)) if int(declared) else b""
            self._send(respond(app, "POST", self.path, dict(self.headers.items()), body))

    server_class: type[ExporterServer] = ExporterServer
    if ":" in host:
        server_class = type("ExporterServer6", (ExporterServer,),
                            {"address_family": socket.AF_INET6})
    server = server_class((host, port), Handler)
    if app.web_config.tls is not None:
        server.ssl_context = tls_context(app.web_config.tls)
    return server
