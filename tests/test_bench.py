"""The benchmark is run by hand, so nothing else notices when it stops loading."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_benchmark_loads_and_explains_itself() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "bench.py"),
                             "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:")
