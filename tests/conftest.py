"""Shared fixtures: the simulator on loopback and the real exporter process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.simulator import Simulator

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """The tool's path; skip with a reason when it is missing, fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install -y prometheus brings promtool " \
                  f"and prometheus; chromium for the browser test)"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


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


def fast_defaults(**extra: Any) -> dict[str, Any]:
    """Defaults that make an exporter poll every second in tests."""
    return {"interval": "1s", "timeout": "2s", "retries": 0, **extra}
