"""The package as it would be published: built with `python -m build`, checked by twine,
and an sdist whose own tests run."""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, require_module, require_tool

PIP = "bash tests/run.sh installs it from PyPI into .venv"


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_module("build")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the test extra brings setuptools>=77, so no environment is fetched
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist",
                          "--wheel", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_strict(dists: dict[str, Path]) -> None:
    twine = require_tool("twine", f"the twine package; {PIP}")
    run = subprocess.run([twine, "check", "--strict", *map(str, dists.values())],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("PASSED") == 2, run.stdout


def test_wheel_metadata(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = wheel.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(wheel.read(metadata))
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert b"Apache License" in wheel.read(license_file)
    assert meta["License-Expression"] == "Apache-2.0"
    assert not [c for c in meta.get_all("Classifier") if c.startswith("License ::")]
    assert "Topic :: System :: Monitoring" in meta.get_all("Classifier")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues"} <= set(urls)
    assert meta["Description-Content-Type"] == "text/markdown"
    assert not [n for n in names if n.startswith(("tests/", "deploy/"))]


def test_sdist_carries_and_passes_its_own_tests(dists: dict[str, Path],
                                                tmp_path: Path) -> None:
    with tarfile.open(dists["sdist"]) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    for needed in ("LICENSE", "config.example.yaml", "tests/conftest.py", "tests/run.sh",
                   "deploy/prometheus/alerts.yml", "deploy/kubernetes/base/kustomization.yaml",
                   "deploy/helm/zilliz-import-exporter/files/alerts.yml"):
        assert (root / needed).is_file(), needed
    # the sdist's own tests, run against the sdist's own package (cwd comes first)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_kubernetes.py", "tests/test_config.py"],
                         capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
