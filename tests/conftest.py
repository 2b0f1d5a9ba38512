"""Shared fixtures: the simulator on loopback, a stub API through ``responses``, and the
real exporter process."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NoReturn
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import build_registry
from exporter.answers import CloudCluster
from exporter.config import ClusterConfig, Config, DiscoveryConfig, PollSettings, parse_config
from exporter.discovery import Discovery, DiscoveryBoard, DiscoveredCluster, SourceSnapshot
from exporter.board import ClusterSnapshot, SnapshotBoard
from exporter.poller import PollerGroup
from exporter.store import HistoryStore
from exporter.summary import FailedJob, FinishedJob, Histogram, JobSummary, RunningJob, StuckJob
from exporter.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"

# The exporter honours the environment's proxies: every test starts without any, so a
# machine behind a proxy runs them as any other (tests/test_proxy.py sets its own).
for _variable in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "REQUESTS_CA_BUNDLE",
                  "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
    os.environ.pop(_variable, None)
    os.environ.pop(_variable.lower(), None)


def require_tool(name: str, install: str = "apt-get install -y prometheus brings promtool "
                 "and prometheus; prometheus-alertmanager brings it and amtool; chromium "
                 "for the browser test") -> str:
    """The tool's path (on PATH or beside this Python, as in .venv/bin); skip with a
    reason when it is missing, fail under CI=true."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        missing(f"{name} is not installed ({install})")
    return path


def require_module(name: str) -> Any:
    """Import a test-only package; skip when it is missing, fail under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python package {name} is not installed (bash tests/run.sh installs the "
                f"'test' extra)")


def missing(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"CI=true and {message}")
    pytest.skip(message)


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}: last error {last_error!r}")


class FakeClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    """A loopback port nobody listens on (for servers that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m exporter ARGS`` as a user runs it: (exit code, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def samples(metrics: dict, name: str, **labels: str) -> dict[tuple, float]:
    return {k: v for k, v in metrics.items()
            if k[0] == name and all(dict(k[1]).get(lk) == lv for lk, lv in labels.items())}


def job_counts(metrics: dict, cluster: str) -> dict[tuple[str, str], float]:
    """{(collection, state): value} of zilliz_import_jobs for one cluster, zeros dropped."""
    out = {}
    for (name, labels), value in metrics.items():
        d = dict(labels)
        if name == "zilliz_import_jobs" and d["cluster_name"] == cluster and value:
            out[(d["collection"], d["state"])] = value
    return out


class ExporterProcess:
    """The real exporter, started as a user would, on a free loopback port."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None, args: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.config_path = tmp / "config.yaml"
        if config is not None:
            self.write_config(config)
        self.log_path = tmp / f"exporter-{time.monotonic_ns()}.log"
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.scheme = "http"

    def write_config(self, config: dict[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        os.replace(tmp, self.config_path)

    def start(self, wait_listening: bool = True) -> "ExporterProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "-c", str(self.config_path),
             "--web.listen-address", "127.0.0.1:0", *self.args],
            stdout=subprocess.PIPE, stderr=self._log, cwd=str(self.tmp), env=self.env)
        if wait_listening:
            def listening() -> int:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"exporter exited {self.proc.returncode}: "
                                         f"{self.logs()}")
                match = re.search(r'"?msg"?[=:] ?"?listening"?,? "?address"?[=:] ?"?[\d.]+:(\d+)',
                                  self.logs())
                return int(match.group(1)) if match else 0
            self.port = wait_until(listening, 20, "the exporter to listen")
        return self

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None,
            method: str = "GET", context: Any = None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, headers=headers or {},
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def metrics(self) -> dict:
        status, _, body = self.get()
        assert status == 200, body
        return parse_metrics(body.decode())

    def wait_for_metrics(self, check: Callable[[dict], Any], timeout: float = 20.0,
                         what: str = "") -> dict:
        found: dict = {}

        def probe() -> bool:
            found.clear()
            found.update(self.metrics())
            return bool(check(found))
        wait_until(probe, timeout, what)
        return found

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class InProcessExporter:
    """The exporter's parts wired as the entry point wires them, polled (and its
    discovery sources refreshed) by the test on a FakeClock instead of by threads on real
    time: minutes of a poll schedule (stuck and stalled jobs, restarts with a state file)
    cost no minutes of the test. The API is still the simulator over loopback. Its
    sources are refreshed once at the start, as the exporter's are."""

    def __init__(self, config: Config | dict[str, Any], clock: FakeClock,
                 requests_per_second: float | None = 10_000) -> None:
        self.config = config if isinstance(config, Config) else \
            parse_config(config, "<test>", environ={})
        running = self.config
        # The rate limiter paces by real time and has tests of its own: lifted unless a
        # test passes None (each cluster's configured rate).
        if requests_per_second is not None:
            def lifted(settings: PollSettings) -> PollSettings:
                return dataclasses.replace(settings, requests_per_second=requests_per_second)
            running = dataclasses.replace(
                running, clusters=tuple(dataclasses.replace(c, settings=lifted(c.settings))
                                        for c in running.clusters),
                discovery=tuple(dataclasses.replace(s, settings=lifted(s.settings))
                                for s in running.discovery))
        self.clock = clock
        self.store = HistoryStore(self.config.state_file) if self.config.state_file else None
        self.board = SnapshotBoard()
        self.group = PollerGroup(self.board, store=self.store, clock=clock)
        self.discovery = Discovery(DiscoveryBoard(), self.group.apply,
                                   limits=self.group.limits, clock=clock)
        self.discovery.configure(running, start=False)
        self.discovery.refresh_all()
        self.registry = build_registry(self.board, reload_ok=lambda: True, clock=clock,
                                       discovery=self.discovery.board)

    def poll(self) -> dict:
        """Poll every cluster once; the metrics a scrape then sees."""
        self.group.poll_all_once()
        return self.metrics()

    def refresh(self) -> dict:
        """Refresh every discovery source once; the metrics a scrape then sees."""
        self.discovery.refresh_all()
        return self.metrics()

    def metrics(self) -> dict:
        return parse_metrics(generate_latest(self.registry).decode())

    def close(self) -> None:
        """Stop as SIGTERM does: sources and pollers, then the state file."""
        self.discovery.stop()
        self.group.stop()
        if self.store is not None:
            self.store.close()


# ---- a stub API: ``responses`` in place of the network ------------------------------------

@dataclasses.dataclass(frozen=True)
class StubCall:
    """One request as the stub received it. ``headers`` looks names up case-insensitively;
    ``json`` is the parsed body, None when the body is not JSON."""

    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]
    body: bytes
    json: Any


StubCallback = Callable[[StubCall], tuple[int, Mapping[str, str], bytes | str]]


@dataclasses.dataclass(frozen=True)
class StubAnswer:
    """One registered answer (see ``StubApi.add``)."""

    status: int = 200
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    hang: bool = False
    drop: bool = False
    callback: StubCallback | None = None


class StubApi:
    """The API as a test registers it, through ``responses`` (the design card's tool for
    the client's tests): requests to any host reach it, and no socket is opened.

    Answers for one (method, path) are served in the order they were added, each once but
    the last, which repeats until another is added after it; the query string plays no
    part in matching. ``hang`` answers as a read timeout would end, ``drop`` as a
    connection closed without an answer; ``callback`` computes (status, headers, body)
    from the request. ``calls`` records every request, and one nobody registered an
    answer for is answered 501 and fails the test. tests/test_deadline.py holds what
    needs real sockets.
    """

    url = "http://api.stub.test"

    def __init__(self, mock: responses.RequestsMock) -> None:
        self.calls: list[StubCall] = []
        self.unmatched: list[StubCall] = []
        self._answers: dict[tuple[str, str], list[StubAnswer]] = {}
        self._repeating: set[tuple[str, str]] = set()   # its last answer was served
        self._lock = threading.Lock()
        for method in ("GET", "POST"):
            mock.add_callback(method, re.compile(r"https?://.*"), callback=self._serve)

    def add(self, method: str, path: str, *, json: Any = None, body: bytes | str = b"",
            status: int = 200, headers: Mapping[str, str] | None = None, hang: bool = False,
            drop: bool = False, callback: StubCallback | None = None) -> None:
        """Queue an answer to ``method path``; ``json`` (a value) wins over ``body``."""
        headers = dict(headers or {})
        if json is not None:
            body = _json_bytes(json)
            headers.setdefault("Content-Type", "application/json")
        answer = StubAnswer(status, headers, body.encode() if isinstance(body, str) else body,
                            hang, drop, callback)
        key = (method.upper(), path)
        with self._lock:
            if key in self._repeating:      # a served answer gives way to a later one
                self._repeating.discard(key)
                del self._answers[key]
            self._answers.setdefault(key, []).append(answer)

    def replace(self, method: str, path: str, **answer: Any) -> None:
        """Forget the answers queued for ``method path``, then add this one."""
        key = (method.upper(), path)
        with self._lock:
            self._answers.pop(key, None)
            self._repeating.discard(key)
        self.add(method, path, **answer)

    def reset(self) -> None:
        """Forget every answer and every recorded call."""
        with self._lock:
            self._answers.clear()
            self._repeating.clear()
            self.calls.clear()
            self.unmatched.clear()

    def _serve(self, request: Any) -> Any:
        target = urlsplit(request.url)
        raw = request.body or b""
        body = raw.encode() if isinstance(raw, str) else raw
        call = StubCall(request.method, target.path,
                        dict(parse_qsl(target.query, keep_blank_values=True)),
                        request.headers, body, _json_or_none(body))
        with self._lock:
            self.calls.append(call)
            key = (call.method, call.path)
            queue = self._answers.get(key, [])
            answer = queue[0] if queue else None
            if len(queue) > 1:
                queue.pop(0)
            elif queue:
                self._repeating.add(key)
            else:
                self.unmatched.append(call)
        if answer is None:
            return 501, {}, f"stub: no answer for {call.method} {call.path}"
        if answer.drop:
            return requests.ConnectionError("Connection aborted: remote end closed connection")
        if answer.hang:
            return requests.ReadTimeout("read timed out")
        if answer.callback:
            return answer.callback(call)
        return answer.status, answer.headers, answer.body


def _json_bytes(value: Any) -> bytes:
    """``add``'s ``json`` argument hides the module."""
    return json.dumps(value).encode()


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


@pytest.fixture
def stub() -> Iterator[StubApi]:
    """The stub API (see StubApi); a request it had no answer for fails the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        api = StubApi(mock)
        yield api
    assert not api.unmatched, "requests the test registered no answer for: " + ", ".join(
        f"{c.method} {c.path}" for c in api.unmatched)


# ---- certificates ---------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> str:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA, a server cert for 127.0.0.1, a client cert, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    out = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ca", ca_key, _name("test ca"), ca_key, ca=True)
    out["ca"] = _write(directory / "ca.pem", ca)
    for role, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(role, key, ca.subject, ca_key, server=server)
        out[f"{role}_cert"] = _write(directory / f"{role}.pem", cert)
        out[f"{role}_key"] = _write(directory / f"{role}.key", key=key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("other ca", other_key, _name("other ca"), other_key, ca=True)
    out["other_ca"] = _write(directory / "other-ca.pem", other)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _cert("rogue", rogue_key, other.subject, other_key)
    out["rogue_cert"] = _write(directory / "rogue.pem", rogue)
    out["rogue_key"] = _write(directory / "rogue.key", key=rogue_key)
    return out


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    sim = Simulator().start()
    yield sim
    sim.stop()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    """Factory: exporter(config_dict, *args, env=...) starts a real exporter process."""
    started: list[ExporterProcess] = []

    def start(config: dict[str, Any] | None, *args: str, env: dict[str, str] | None = None,
              wait_listening: bool = True, tmp: Path | None = None) -> ExporterProcess:
        directory = tmp or tmp_path
        process = ExporterProcess(directory, config, list(args), env)
        started.append(process)
        return process.start(wait_listening)

    yield start
    for process in started:
        process.stop()


class Tinyproxy:
    """A real forward proxy (Debian's tinyproxy) on loopback, logging every CONNECT;
    with ``auth`` (user, password) it asks for basic auth, as corporate proxies do."""

    def __init__(self, directory: Path, auth: tuple[str, str] | None = None) -> None:
        binary = require_tool("tinyproxy", "apt-get install -y tinyproxy; bash tests/run.sh "
                              "installs it")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"tinyproxy-{self.port}.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 30", "MaxClients 50",
                 f'LogFile "{self.log_path}"', "LogLevel Connect", "Allow 127.0.0.1",
                 "DisableViaHeader Yes"]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        config = directory / f"tinyproxy-{self.port}.conf"
        config.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([binary, "-d", "-c", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, 10, "tinyproxy to listen")

    def connects(self) -> list[str]:
        """The targets of the CONNECTs the proxy was asked for ("127.0.0.1:8443")."""
        if not self.log_path.exists():
            return []
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+)",
                          self.log_path.read_text(errors="replace"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Callable[..., Tinyproxy]]:
    """Factory: tinyproxy(auth=None) starts a real forward proxy; stopped after the test."""
    started: list[Tinyproxy] = []

    def start(auth: tuple[str, str] | None = None) -> Tinyproxy:
        started.append(Tinyproxy(tmp_path, auth))
        return started[-1]
    yield start
    for proxy in started:
        proxy.stop()


def fast_defaults(**extra: Any) -> dict[str, Any]:
    """Defaults that make an exporter poll every second in tests."""
    return {"interval": "1s", "timeout": "2s", "retries": 0, **extra}


# ---- the golden exposition's board (tests/golden/metrics.txt; see test_collector) ----

GOLDEN_NOW = 1_700_000_000.0

_GOLDEN_SETTINGS = PollSettings(stale_after=300)


def golden_board() -> SnapshotBoard:
    """Three clusters: one up with every kind of job series, one down (its job series
    stale and withdrawn), one not polled yet."""
    board = SnapshotBoard()
    summary = JobSummary(
        counts={("docs", "completed"): 7, ("docs", "failed"): 1, ("docs", "importing"): 2,
                ("docs", "pending"): 1, ("images", "completed"): 0, ("images", "failed"): 0,
                ("images", "importing"): 0, ("images", "pending"): 0,
                ("images", "waiting_for_retry"): 3},
        stuck={"docs": 1, "images": 0},
        oldest_active={"docs": GOLDEN_NOW - 9000},
        stuck_jobs=(StuckJob("docs", "job-1", "importing", "age", GOLDEN_NOW - 9000),),
        transitions={("docs", "completed"): 4, ("docs", "failed"): 1,
                     ("images", "completed"): 0, ("images", "failed"): 0},
        running=(RunningJob("docs", "job-1", "importing", GOLDEN_NOW - 9000, 0.25, 250, 1000,
                            1800.0),
                 RunningJob("docs", "job-2", "importing", GOLDEN_NOW - 60, 0.5, -1, -1,
                            None),
                 RunningJob("docs", "job-3", "pending", GOLDEN_NOW - 30, None, -1, -1,
                            None)),
        failed=(FailedJob("docs", "job-9", "bad file s3://b/x.parquet: schema mismatch",
                          GOLDEN_NOW - 600),),
        rows_imported={"docs": 123456, "images": 0},
        durations={("_other", "completed"): Histogram((60.0, 3600.0, 86400.0), (0, 0, 0, 0),
                                                      0.0),
                   ("_other", "failed"): Histogram((60.0, 3600.0, 86400.0), (0, 0, 0, 0), 0.0),
                   ("docs", "completed"): Histogram((60.0, 3600.0, 86400.0), (1, 2, 0, 1),
                                                    100_000.0),
                   ("docs", "failed"): Histogram((60.0, 3600.0, 86400.0), (0, 1, 0, 0), 90.5)},
        waits={"_other": Histogram((60.0, 3600.0, 86400.0), (0, 0, 0, 0), 0.0),
               "docs": Histogram((60.0, 3600.0, 86400.0), (3, 1, 0, 0), 700.0)},
        finished=(FinishedJob("docs", "job-8", "completed", 5400.0, GOLDEN_NOW - 120),
                  FinishedJob("docs", "job-7", "failed", None, GOLDEN_NOW - 400)))
    board.publish(ClusterSnapshot(
        cluster=ClusterConfig(name="prod-search",
                              url="https://controller.api.gcp.zillizcloud.com", api="v1",
                              cluster_id="in01-0123456789abcdef",
                              api_key="golden-secret", settings=_GOLDEN_SETTINGS),
        shard=0, polled=True, up=True, last_success=GOLDEN_NOW - 20, poll_duration=0.75,
        jobs=summary, poll_errors={"timeout": 2},
        api_requests={("describe", "200"): 5, ("list", "200"): 40, ("list", "error"): 2},
        rate_limit_wait=1.5))
    board.publish(ClusterSnapshot(
        cluster=ClusterConfig(name="milvus-a", url="http://milvus:19530", api="v2",
                              settings=_GOLDEN_SETTINGS),
        shard=0, polled=True, up=False, last_success=GOLDEN_NOW - 3600, poll_duration=2.0,
        last_error_reason="auth", last_error="HTTP 401 from milvus: credentials refused",
        jobs=summary, poll_errors={"auth": 3}, api_requests={("list", "401"): 3}))
    board.publish(ClusterSnapshot(
        cluster=ClusterConfig(name="new-one", url="https://api.cloud.zilliz.com", api="v2",
                              cluster_id="in01-new", settings=_GOLDEN_SETTINGS)))
    return board


def golden_discovery() -> DiscoveryBoard:
    """Two sources: one up, whose key sees a cluster it polls, one a configured cluster
    polls and one stopped; one whose refreshes fail (its last listing stands)."""
    board = DiscoveryBoard()
    polled = CloudCluster("in01-search", "search eu", "aws-eu-central-1", "proj-1",
                          "Enterprise", "RUNNING")
    configured = CloudCluster("in01-0123456789abcdef", "prod search", "gcp-us-west1",
                              "proj-1", "Enterprise", "RUNNING")
    stopped = CloudCluster("in01-old", "old", "aws-eu-central-1", "proj-2", "Standard",
                           "STOPPED")
    board.publish([
        SourceSnapshot(DiscoveryConfig(name="prod", api_key="golden-secret"), refreshed=True,
                       up=True, last_success=GOLDEN_NOW - 40, listed=(polled, configured,
                                                                      stopped),
                       clusters=(DiscoveredCluster(polled, "search-eu", True),
                                 DiscoveredCluster(configured, "prod-search", False,
                                                   "configured as prod-search"),
                                 DiscoveredCluster(stopped, "old", False,
                                                   "status STOPPED not in poll_statuses"))),
        SourceSnapshot(DiscoveryConfig(name="staging", url="https://api.cloud.zilliz.com.cn",
                                       api_key="golden-secret-2"),
                       refreshed=True, up=False, last_error_reason="auth",
                       last_error="HTTP 401 from api.cloud.zilliz.com.cn: credentials refused",
                       errors={"auth": 3, "http": 1})])
    return board
